"""Repetition control as pure functions and small per-sequence state (no model calls here).

Contract: ``RepetitionControl(penalty, ngram_size).start(context_ids)`` gives the state of one
sequence (a parallel branch, a sequential answer); ``state.apply(logits)`` rewrites its logits
``[V]`` exactly as transformers' ``generate(repetition_penalty=..., no_repeat_ngram_size=...)``
does over the same context (prompt included), and ``state.push(token)`` records the sampled
token. ``find_loop(tokens)`` says whether generated tokens end in a loop (the same unit repeated),
so a decoder can end that sequence with finish reason ``"repetition"``; ``trim_loop`` keeps the
text up to the first copy of the unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "LOOP_MAX_PERIOD",
    "LOOP_MIN_SPAN",
    "RepetitionControl",
    "RepetitionState",
    "find_loop",
    "trim_loop",
]

LOOP_MAX_PERIOD = 24
"""Longest repeated unit (in tokens) the loop guard looks for: a short sentence."""

LOOP_MIN_SPAN = 16
"""A loop must cover at least this many tokens (and three copies of its unit) to count."""


def find_loop(
    tokens: Sequence[int], *, max_period: int = LOOP_MAX_PERIOD, min_span: int = LOOP_MIN_SPAN
) -> int | None:
    """Return the period of the loop ``tokens`` end in, or None.

    The tail is a loop of period ``p`` when its last ``max(3 * p, min_span)`` tokens repeat
    with period ``p`` (token ``i`` equals token ``i - p``). Three copies and ``min_span``
    tokens keep ordinary text (a repeated word, "..." or a short list) from counting; the
    shortest period wins. Cost: O(max_period * min_span) per call, independent of the length.
    """
    n = len(tokens)
    for p in range(1, max_period + 1):
        span = max(3 * p, min_span)
        if span > n:
            break
        tail = tokens[n - span :]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return p
    return None


def trim_loop(
    tokens: Sequence[int], *, max_period: int = LOOP_MAX_PERIOD, min_span: int = LOOP_MIN_SPAN
) -> list[int]:
    """``tokens`` without the repeats of the loop they end in (one copy of the unit is kept).

    Tokens that do not end in a loop come back unchanged.
    """
    tokens = list(tokens)
    p = find_loop(tokens, max_period=max_period, min_span=min_span)
    if p is None:
        return tokens
    # Walk back while the periodicity holds: start is the first token of the periodic run.
    start = len(tokens) - p
    while start > 0 and tokens[start - 1] == tokens[start - 1 + p]:
        start -= 1
    return tokens[: start + p]


@dataclass(frozen=True)
class RepetitionControl:
    """transformers' ``repetition_penalty`` and ``no_repeat_ngram_size``, with their meaning.

    Attributes:
        penalty: > 0; 1.0 or None is off. A token already in the context has its logit divided
            by ``penalty`` when positive, multiplied when negative (CTRL, Keskar et al. 2019).
        ngram_size: >= 1; 0 or None is off. A token that would complete an n-gram already in
            the context is banned (logit -inf).
    """

    penalty: float | None = None
    ngram_size: int | None = None

    def __post_init__(self) -> None:
        if self.penalty is not None and not 0.0 < self.penalty < float("inf"):
            msg = f"repetition_penalty must be a finite number > 0 (1.0 = off), got {self.penalty}"
            raise ValueError(msg)
        if self.ngram_size is not None and self.ngram_size < 0:
            msg = f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.ngram_size}"
            raise ValueError(msg)

    @property
    def active(self) -> bool:
        """True when either control changes logits."""
        return (self.penalty is not None and self.penalty != 1.0) or bool(self.ngram_size)

    def start(self, context_ids: Sequence[int], vocab_size: int) -> RepetitionState:
        """The state of one sequence whose context (everything before its next token) is
        ``context_ids``."""
        return RepetitionState(self, list(context_ids), vocab_size)


class RepetitionState:
    """Per-sequence state of a `RepetitionControl`: the context seen so far.

    Keeps a ``[V]`` bool mask of tokens seen (for the penalty) and a map from each
    ``(n-1)``-gram to the tokens that followed it (for the n-gram ban), both updated in O(1) per
    token, so a long shared prefix costs once per sequence, not once per step.
    """

    def __init__(self, control: RepetitionControl, context: list[int], vocab_size: int) -> None:
        self.control = control
        self.tokens: list[int] = []
        self.vocab_size = vocab_size
        self.seen: torch.Tensor | None = None  # [V] bool, built on first apply (its device)
        self.follow: dict[tuple[int, ...], set[int]] = {}
        for token in context:
            self.push(token)

    def push(self, token: int) -> None:
        """Record ``token`` as the next one of the sequence."""
        self.tokens.append(int(token))
        if self.seen is not None and 0 <= token < self.vocab_size:
            self.seen[token] = True
        n = self.control.ngram_size or 0
        if n and len(self.tokens) >= n:
            key = tuple(self.tokens[len(self.tokens) - n : -1])
            self.follow.setdefault(key, set()).add(self.tokens[-1])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Return ``logits`` ``[V]`` with the penalty and the n-gram ban applied (a new tensor).

        Same order as transformers' logits processors: the penalty, then the ban.
        """
        control = self.control
        out = logits
        penalty = control.penalty
        if penalty is not None and penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                ids = [t for t in self.tokens if 0 <= t < logits.shape[-1]]
                if ids:
                    self.seen[torch.tensor(ids, device=logits.device)] = True
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            out = torch.where(self.seen, penalised, logits)
        n = control.ngram_size or 0
        if n and len(self.tokens) + 1 >= n:
            key = tuple(self.tokens[len(self.tokens) - n + 1 :]) if n > 1 else ()
            banned = self.follow.get(key)
            if banned:
                out = out.clone() if out is logits else out
                out[torch.tensor(sorted(banned), device=logits.device)] = float("-inf")
        return out
