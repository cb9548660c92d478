"""Command-line options shared by several commands (stdlib only, so `--help` stays instant).

Contract: `positive_int` is an argparse type; `add_threads_option(parser)` adds `--threads K`.
Commands import from here, never from each other, so no command module imports another.
"""

from __future__ import annotations

import argparse

__all__ = ["add_threads_option", "positive_int"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, else a usage error naming the bad text."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """`--threads K`: CPU threads for the model's forwards (None: the usable cores)."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="K",
        help="CPU threads (default: the cores this process may use)",
    )
