"""Stop-string detection over a growing list of token ids.

Contract: ``StopStrings(tokenizer, strings).find(tokens)`` returns the first stop string that the
decoded tail of ``tokens`` contains, or None. Only a bounded tail is decoded each step (enough
tokens to spell the longest stop string even one byte per token), so checking stays O(1) per
token instead of re-decoding the whole branch. ``Stopping`` bundles the end rules both decode
loops share (stop ids, stop strings, the loop guard); each loop checks its own budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .repetition import COUNTING_RUN_UNITS, counting_run, find_loop

__all__ = ["FinishReason", "StopStrings", "Stopping", "cut_at_stop"]

FinishReason = Literal["stop", "length", "repetition"]
"""Why a sequence ended: a stop id or string, its budget, or the loop guard."""


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


@dataclass(frozen=True)
class Stopping:
    """When a sequence ends before its budget, checked after every new token.

    Attributes:
        ids: stop token ids (the id that ends a sequence is part of its output).
        strings: stop strings, matched on the decoded tail.
        loop_guard: end a sequence whose tokens end in a loop (``repetition.find_loop``).
    """

    ids: frozenset[int]
    strings: StopStrings
    loop_guard: bool = False

    @classmethod
    def build(
        cls,
        stop_token_ids: Sequence[int],
        stop_strings: Sequence[str],
        tokenizer: Any,
        loop_guard: bool = False,
    ) -> Stopping:
        """The rules from a decode call's arguments (stop strings need ``tokenizer``)."""
        ids = frozenset(int(t) for t in stop_token_ids)
        return cls(ids, StopStrings(tokenizer, stop_strings), loop_guard)

    def check(self, tokens: Sequence[int]) -> tuple[FinishReason, str | int | None] | None:
        """``(reason, stop)`` when ``tokens`` (new tokens, the latest last) must end, else None.

        A stop id wins over a stop string, which wins over the loop guard.
        """
        if tokens[-1] in self.ids:
            return "stop", tokens[-1]
        if self.strings and (hit := self.strings.find(tokens)) is not None:
            return "stop", hit
        if self.loop_guard and find_loop(tokens) is not None:
            return "repetition", None
        if (
            self.loop_guard
            and self.strings.tokenizer is not None
            and len(tokens) >= 2 * COUNTING_RUN_UNITS
        ):
            # At most 4 tokens per number and mark: this tail holds a whole run.
            tail = self.strings.tokenizer.decode(list(tokens[-8 * COUNTING_RUN_UNITS :]))
            if counting_run(tail):
                return "repetition", None
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
