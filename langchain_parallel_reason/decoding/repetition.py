"""Repetition control as pure functions and small per-sequence state (no model calls here).

Contract: ``RepetitionControl(penalty, ngram_size).start(context_ids)`` gives the state of one
sequence (a parallel branch, a sequential answer); ``state.apply(logits)`` rewrites its logits
``[V]`` exactly as transformers' ``generate(repetition_penalty=..., no_repeat_ngram_size=...)``
does over the same context (prompt included), and ``state.push(token)`` records the sampled
token. The loop guard, pure functions over a sequence's token ids (so any backend can run it on
what it produced): ``find_loop(tokens)`` says whether generated tokens end in a loop, either the
same unit repeated or a template repeated with one changing slot ("a cat is a cat, a dog is a
dog, a rabbit is a rabbit,"), so a decoder can end that sequence with finish reason
``"repetition"``; ``loop_cut`` / ``trim_loop`` keep the tokens up to the first copy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = [
    "COUNTING_RUN_UNITS",
    "LOOP_MAX_PERIOD",
    "LOOP_MIN_SPAN",
    "PATTERN_MAX_SLOT",
    "PATTERN_MAX_UNIT",
    "RepetitionControl",
    "RepetitionState",
    "counting_run",
    "find_loop",
    "find_patterned_loop",
    "loop_cut",
    "trim_loop",
]

LOOP_MAX_PERIOD = 24
"""Longest repeated unit (in tokens) the loop guard looks for: a short sentence."""

LOOP_MIN_SPAN = 16
"""A loop must cover at least this many tokens (and three copies of its unit) to count."""


PATTERN_MAX_UNIT = 40
"""Longest copy of a patterned loop's template (in tokens, slot included): a sentence."""

PATTERN_MAX_SLOT = 4
"""Longest changing slot of a patterned loop, in tokens: one word."""

# A template must have at least this many fixed tokens per copy (and no fewer than its slot
# has tokens): a list such as "apples, pears, plums, figs," is a one-token template, not a loop.
_PATTERN_MIN_FIXED = 4


COUNTING_RUN_UNITS = 10
"""A counting run is at least this many numbers in a row, each followed by the same mark."""

# "1.1.1.1.2.3.4.5.6.7." or "1,2,3,4,5,...": numbers of at most 3 digits, each followed by one
# and the same punctuation mark, nothing else between them (a small model's degenerate list,
# whose tokens change every copy, so neither loop test sees it). Decimals and dates in prose
# are separated by words or spaces and never match.
_COUNTING_RUN = re.compile(
    r"(?:\d{1,3}([.,;:\-])(?:\d{1,3}\1){" + str(COUNTING_RUN_UNITS - 1) + r",})\d{0,3}$"
)


def counting_run(text: str) -> bool:
    """Whether ``text`` (a sequence's decoded tail) ends in a counting run (see
    ``COUNTING_RUN_UNITS``): ended like a loop, with finish reason "repetition"."""
    return _COUNTING_RUN.search(text) is not None


def find_loop(
    tokens: Sequence[int], *, max_period: int = LOOP_MAX_PERIOD, min_span: int = LOOP_MIN_SPAN
) -> int | None:
    """Return the length of the repeated unit ``tokens`` end in, or None.

    Exact loops first: the tail is a loop of period ``p`` when its last ``max(3 * p,
    min_span)`` tokens repeat with period ``p`` (token ``i`` equals token ``i - p``). Three
    copies and ``min_span`` tokens keep ordinary text (a repeated word, "..." or a short list)
    from counting; the shortest period wins. Then patterned loops (`find_patterned_loop`):
    the length of the last copy. Cost: O(max_period * min_span) for the first test and about
    O(`PATTERN_MAX_UNIT` * 3) for the second, independent of the length of ``tokens``.
    """
    period = _exact_period(tokens, max_period, min_span)
    if period is not None:
        return period
    found = find_patterned_loop(tokens, min_span=min_span)
    return None if found is None else found[1] - found[0]


def _exact_period(tokens: Sequence[int], max_period: int, min_span: int) -> int | None:
    """The shortest period ``p`` such that the last ``max(3p, min_span)`` tokens repeat."""
    n = len(tokens)
    for p in range(1, max_period + 1):
        span = max(3 * p, min_span)
        if span > n:
            break
        tail = tokens[n - span :]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return p
    return None


def find_patterned_loop(
    tokens: Sequence[int],
    *,
    max_unit: int = PATTERN_MAX_UNIT,
    max_slot: int = PATTERN_MAX_SLOT,
    min_span: int = LOOP_MIN_SPAN,
) -> tuple[int, int] | None:
    """``(start, end)`` of the first copy when ``tokens`` end in a template repeated three
    times with one changing slot, else None.

    The last three copies ``u1 u2 u3`` (each at most ``max_unit`` tokens, ``u3`` ending the
    tokens) share their first and last tokens; what differs, the slot, is at most
    ``max_slot`` tokens in each copy, or appears twice with the same value ("a cat is a
    cat,"). Copies are cut after the last token (the template's end), so ``u2`` and ``u3``
    each follow that token; ``u1``'s first token may differ (a capitalised sentence start).
    At least ``_PATTERN_MIN_FIXED`` fixed tokens per copy and ``min_span`` tokens in all.
    Earlier copies before ``u1`` are walked back over, so ``start`` is the first copy's.
    """
    n = len(tokens)
    if n < min_span:
        return None
    last = tokens[-1]
    lo = max(0, n - 3 * max_unit - 1)
    # Ends of earlier copies: positions holding the template's last token.
    ends = [j for j in range(n - 2, lo - 1, -1) if tokens[j] == last]
    for e2 in ends:
        u3 = tokens[e2 + 1 :]
        if len(u3) > max_unit:
            break
        for e1 in ends:
            if e1 >= e2:
                continue
            u2 = tokens[e1 + 1 : e2 + 1]
            if len(u2) > max_unit or abs(len(u2) - len(u3)) > 2 * max_slot:
                if len(u2) > max_unit:
                    break
                continue
            if not _same_template(u2, u3, max_slot, aligned=True):
                continue
            longest = min(max_unit, len(u2) + 2 * max_slot)
            for l1 in range(max(2, len(u2) - 2 * max_slot), longest + 1):
                start = e1 + 1 - l1
                if start < 0:
                    break
                if n - start < min_span:
                    continue
                u1 = tokens[start : e1 + 1]
                if _same_template(u1, u2, max_slot, loose_start=True):
                    return _walk_back(tokens, start, e1 + 1, max_slot)
    return None


def _walk_back(tokens: Sequence[int], start: int, end: int, max_slot: int) -> tuple[int, int]:
    """``(start, end)`` of the earliest copy of the loop whose copy ``tokens[start:end]`` is:
    earlier copies that still match it, which the kept text must not hold twice."""
    unit = tokens[start:end]
    moved = True
    while moved and start > 0 and tokens[start - 1] == unit[-1]:
        # An earlier copy follows the template's last token, as the later ones do.
        moved = False
        for length in range(max(2, len(unit) - 2 * max_slot), len(unit) + 2 * max_slot + 1):
            if length > start:
                break
            if _same_template(tokens[start - length : start], unit, max_slot, loose_start=True):
                start, end, moved = start - length, start, True
                break
    return start, end


def _same_template(
    a: Sequence[int],
    b: Sequence[int],
    max_slot: int,
    *,
    loose_start: bool = False,
    aligned: bool = False,
) -> bool:
    """True when ``a`` and ``b`` are one template with one slot filled differently (or the
    same): common first and last tokens around middles of at most ``max_slot`` tokens, or
    middles ``x R x`` / ``y R y`` (the slot twice, ``R`` shared). ``loose_start``: the first
    tokens may differ. ``aligned``: the copies must not run on much past the slot (no more
    common last tokens than first ones), so that they end where a sentence of the template
    ends ("... to relax.") rather than inside the next one ("... to relax. Reading is")."""
    dropped = 0
    if loose_start and a[:1] != b[:1]:
        a, b, dropped = a[1:], b[1:], 1
    if not a or not b:
        return False
    limit = min(len(a), len(b))
    p = 0
    while p < limit and a[p] == b[p]:
        p += 1
    s = 0
    while s < limit - p and a[-1 - s] == b[-1 - s]:
        s += 1
    if aligned and s > p:
        return False
    ma, mb = a[p : len(a) - s], b[p : len(b) - s]
    fixed = p + s + dropped  # a capitalised first word is still the template's
    one_slot = len(ma) <= max_slot and len(mb) <= max_slot
    if one_slot and fixed >= max(_PATTERN_MIN_FIXED, len(ma), len(mb)):
        return True
    # The slot twice: each middle is its slot value, a shared run, the slot value again.
    for x in range(1, max_slot + 1):
        if 2 * x >= len(ma) or ma[:x] != ma[-x:]:
            continue
        for y in range(1, max_slot + 1):
            if 2 * y < len(mb) and mb[:y] == mb[-y:] and ma[x:-x] == mb[y:-y]:
                return fixed + len(ma) - 2 * x >= max(_PATTERN_MIN_FIXED, x, y)
    return False


def loop_cut(
    tokens: Sequence[int], *, max_period: int = LOOP_MAX_PERIOD, min_span: int = LOOP_MIN_SPAN
) -> int | None:
    """How many of ``tokens`` to keep when they end in a loop (exact or patterned, as
    `find_loop` says): everything up to the end of the loop's first copy. None: no loop."""
    tokens = list(tokens)
    p = _exact_period(tokens, max_period, min_span)
    if p is not None:
        # Walk back while the periodicity holds: start is the first token of the periodic run.
        start = len(tokens) - p
        while start > 0 and tokens[start - 1] == tokens[start - 1 + p]:
            start -= 1
        return start + p
    found = find_patterned_loop(tokens, min_span=min_span)
    return None if found is None else found[1]


def trim_loop(
    tokens: Sequence[int], *, max_period: int = LOOP_MAX_PERIOD, min_span: int = LOOP_MIN_SPAN
) -> list[int]:
    """``tokens`` without the repeats of the loop they end in (one copy of the unit is kept).

    Tokens that do not end in a loop come back unchanged.
    """
    tokens = list(tokens)
    cut = loop_cut(tokens, max_period=max_period, min_span=min_span)
    return tokens if cut is None else tokens[:cut]


@dataclass(frozen=True)
class RepetitionControl:
    """transformers' ``repetition_penalty`` and ``no_repeat_ngram_size``, with their meaning.

    Attributes:
        penalty: > 0; 1.0 or None is off. A token already in the context has its logit divided
            by ``penalty`` when positive, multiplied when negative (CTRL, Keskar et al. 2019).
        ngram_size: >= 1; 0 or None is off. A token that would complete an n-gram already in
            the context is banned (logit -inf).
        bad_words, bad_word_ids: words a sequence may never write, and their token ids (see
            `banning`): a token that would complete one of the id sequences right after the
            new tokens written so far is banned, as vLLM's ``bad_words`` sampling parameter
            (and transformers' ``bad_words_ids``) do. Only new tokens are matched, not the
            context.
    """

    penalty: float | None = None
    ngram_size: int | None = None
    bad_words: tuple[str, ...] = ()
    bad_word_ids: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.penalty is not None and not 0.0 < self.penalty < float("inf"):
            msg = f"repetition_penalty must be a finite number > 0 (1.0 = off), got {self.penalty}"
            raise ValueError(msg)
        if self.ngram_size is not None and self.ngram_size < 0:
            msg = f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.ngram_size}"
            raise ValueError(msg)

    @property
    def active(self) -> bool:
        """True when some control changes logits."""
        return (
            (self.penalty is not None and self.penalty != 1.0)
            or bool(self.ngram_size)
            or bool(self.bad_word_ids)
        )

    def banning(self, words: Sequence[str], tokenizer: Any) -> RepetitionControl:
        """This control that also bans ``words``, tokenized as vLLM tokenizes its
        ``bad_words``: each word alone and after a space (the spaced form where it is a
        different first token and the same number of tokens, or one token), so a server sent
        ``words`` as ``bad_words`` and the one-token forms as a logit bias bans the same id
        sequences (``single_token_bans``)."""
        words = tuple(dict.fromkeys(w.strip() for w in words if w.strip()))
        ids: list[tuple[int, ...]] = []
        for word in words:
            bare = tuple(tokenizer.encode(word, add_special_tokens=False))
            spaced = tuple(tokenizer.encode(" " + word, add_special_tokens=False))
            if bare:
                ids.append(bare)
            # vLLM's rule for the spaced form; one token is banned outright in any case (a
            # server gets it as a logit bias of -100), as " rabbit" is one token but "rabbit"
            # two in many vocabularies.
            same_shape = bool(bare) and spaced[:1] != bare[:1] and len(spaced) == len(bare)
            if spaced and (same_shape or len(spaced) == 1):
                ids.append(spaced)
        return replace(
            self,
            bad_words=(*self.bad_words, *words),
            bad_word_ids=tuple(dict.fromkeys((*self.bad_word_ids, *ids))),
        )

    def banning_ids(self, ids: Sequence[int]) -> RepetitionControl:
        """This control that also bans the single tokens ``ids`` (a server gets them as a
        logit bias of -100)."""
        more = tuple((int(i),) for i in ids)
        return replace(self, bad_word_ids=tuple(dict.fromkeys((*self.bad_word_ids, *more))))

    def single_token_bans(self) -> list[int]:
        """The banned words' one-token forms (what a server gets as a logit bias)."""
        return sorted({seq[0] for seq in self.bad_word_ids if len(seq) == 1})

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
        # Bad words by the length of their lead: lead (all ids but the last) -> banned last ids.
        self.bad: dict[int, dict[tuple[int, ...], set[int]]] = {}
        for seq in control.bad_word_ids:
            self.bad.setdefault(len(seq) - 1, {}).setdefault(seq[:-1], set()).add(seq[-1])
        for token in context:
            self.push(token)
        self.context_len = len(self.tokens)

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
        """Return ``logits`` ``[V]`` with the penalty and the bans applied (a new tensor).

        Same order as transformers' logits processors: the penalty, then the n-gram and
        bad-word bans.
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
        banned: set[int] = set()
        if n and len(self.tokens) + 1 >= n:
            key = tuple(self.tokens[len(self.tokens) - n + 1 :]) if n > 1 else ()
            banned |= self.follow.get(key, set())
        written = len(self.tokens) - self.context_len
        for lead, follow in self.bad.items():
            if lead <= written:
                banned |= follow.get(tuple(self.tokens[len(self.tokens) - lead :]), set())
        if banned:
            out = out.clone() if out is logits else out
            out[torch.tensor(sorted(banned), device=logits.device)] = float("-inf")
        return out
