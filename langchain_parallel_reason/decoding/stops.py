"""Stop-string detection over a growing list of token ids.

Contract: ``StopStrings(tokenizer, strings).find(tokens)`` returns the first stop string that the
decoded tail of ``tokens`` contains, or None. Only a bounded tail is decoded each step (enough
tokens to spell the longest stop string even one byte per token), so checking stays O(1) per
token instead of re-decoding the whole branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["StopStrings", "cut_at_stop"]


class StopStrings:
    """Incremental stop-string matcher for one tokenizer.

    Args:
        tokenizer: anything with ``decode(list[int]) -> str``.
        strings: stop strings; empty strings are ignored.
    """

    def __init__(self, tokenizer: Any, strings: Sequence[str]) -> None:
        self.strings = tuple(s for s in strings if s)
        if self.strings and tokenizer is None:
            msg = "stop_strings need a tokenizer: pass tokenizer=... to decode the branches' text"
            raise ValueError(msg)
        self.tokenizer = tokenizer
        # A UTF-8 char is at most 4 bytes and a byte-level token at least 1 byte.
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.strings)

    def find(self, tokens: Sequence[int]) -> str | None:
        """The stop string present in the decoded tail of ``tokens``, if any."""
        if not self.strings or not tokens:
            return None
        tail = self.tokenizer.decode(list(tokens[-self.window :]), skip_special_tokens=False)
        for s in self.strings:
            if s in tail:
                return s
        return None


def cut_at_stop(text: str, strings: Sequence[str]) -> tuple[str, str | None]:
    """Cut ``text`` before the earliest occurrence of any stop string.

    Returns the kept text and the stop string that cut it (None when none occurs).
    """
    best: tuple[int, str] | None = None
    for s in strings:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return text, None
    return text[: best[0]], best[1]
