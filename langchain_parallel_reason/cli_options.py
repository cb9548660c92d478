"""Command-line options shared by several commands (stdlib only, so `--help` stays instant).

Contract: `positive_int` is an argparse type; `add_threads_option(parser)` adds `--threads K`;
`add_server_options(parser)` adds `--base-url` / `--served-model`; `print_remote_result` prints a
remote benchmark's figures; `EMBEDDED_LABEL` names the embedded model in reports. Commands import
from here, never from each other, so no command module imports another.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = [
    "EMBEDDED_LABEL",
    "add_server_options",
    "add_threads_option",
    "positive_int",
    "print_remote_result",
]

EMBEDDED_LABEL = "embedded SmolLM2-135M-Instruct"
"""The model name commands report when `--model` is not given."""


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


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """--base-url / --served-model: run the benchmark on an OpenAI-compatible server."""
    parser.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="run on a vLLM/SGLang server instead, e.g. http://127.0.0.1:8000/v1",
    )
    parser.add_argument(
        "--served-model",
        default=None,
        metavar="NAME",
        help="the server's model name (default: the only one it serves)",
    )


def print_remote_result(result: dict[str, Any], as_json: bool) -> None:
    """A remote benchmark's figures: one JSON object, or indented JSON for reading."""
    sys.stdout.write((json.dumps(result) if as_json else json.dumps(result, indent=2)) + "\n")
