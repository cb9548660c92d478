"""Ordinary one-token-per-step decoding over a caller's cache (Stage 1, Stage 3, fallback).

Contract: ``iter_decode`` appends ``input_ids`` to ``cache`` (which already holds ``start``
tokens), then samples until a stop id, a stop string, the budget, or a terminated grammar; it
yields every new token id and returns a ``SequentialResult``. The last sampled token is never fed
back, so on return the cache holds the input plus all generated tokens but the last.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from transformers.cache_utils import DynamicCache

from .repetition import RepetitionControl, find_loop
from .sampling import SamplingParams, make_generator, sample_next
from .stops import StopStrings

__all__ = [
    "Cancelled",
    "LogitsConstraint",
    "SequentialResult",
    "SuppressFirst",
    "cache_kwarg",
    "forward_tokens",
    "iter_decode",
]


class Cancelled(RuntimeError):  # noqa: N818 - reads as an event, like asyncio.CancelledError
    """Raised inside a decode loop when the caller's cancel event is set."""


class LogitsConstraint(Protocol):
    """Per-call grammar state (see ``decoding.constraints.GrammarConstraint``)."""

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Return logits with disallowed tokens set to -inf."""

    def advance(self, token_id: int) -> None:
        """Accept the sampled token."""

    def is_terminated(self) -> bool:
        """True once the grammar is complete."""


class SuppressFirst:
    """A ``LogitsConstraint`` that bans ``token_ids`` for the first ``count`` tokens, and
    ``first_ids`` for the first token only.

    The sequential twin of ``iter_decode_branches(min_new_tokens=..., suppress_token_ids=...,
    opening_banned_ids=...)``: a step written by ordinary decoding gets the same opening rules
    as a parallel branch.
    """

    def __init__(self, token_ids: Sequence[int], count: int, first_ids: Sequence[int] = ()) -> None:
        self.banned = sorted({int(t) for t in token_ids})
        self.count = count
        self.first = sorted({int(t) for t in first_ids})
        self.seen = 0

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Return ``logits`` with the banned ids at -inf while fewer than ``count`` were seen
        (and the ``first_ids`` at -inf before the first token)."""
        ban = self.banned if self.seen < self.count else []
        if self.seen == 0:
            ban = [*ban, *self.first]
        if not ban:
            return logits
        out = logits.clone()
        out[..., ban] = float("-inf")
        return out

    def advance(self, token_id: int) -> None:
        """Count one accepted token."""
        self.seen += 1

    def is_terminated(self) -> bool:
        """Never ends decoding by itself."""
        return False


@dataclass(frozen=True)
class SequentialResult:
    """Outcome of ``iter_decode``.

    Attributes:
        token_ids: new tokens (a stop id that ended decoding included).
        finish_reason: "stop" (stop id, stop string or finished grammar), "length", or
            "repetition" (the loop guard saw the text repeat itself).
        stop: the stop string or id that ended it, if any.
        forward_passes: model forward calls, the prefill of ``input_ids`` included.
    """

    token_ids: list[int]
    finish_reason: Literal["stop", "length", "repetition"]
    stop: str | int | None
    forward_passes: int


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: the old name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name of the forward's KV-cache argument: ``"cache"`` (transformers >= 5.23, where
    ``past_key_values`` is deprecated, with a FutureWarning per call) or ``"past_key_values"``
    (older releases and models that keep the old name)."""
    return _cache_kwarg_of(type(model))


def forward_tokens(
    model: torch.nn.Module, ids: torch.Tensor, cache: DynamicCache, start: int
) -> torch.Tensor:
    """Append ``ids`` ``[S]`` at positions ``start..`` to ``cache``; return last-token logits [V]."""
    pos = torch.arange(start, start + ids.shape[0], device=ids.device)
    # An index tensor, not logits_to_keep=1: for S > 1 the int form hands lm_head a strided
    # [1, 1, H] view, which a frozen bf16 Linear on CPU (torch 2.13) runs about 40x slower.
    keep = torch.tensor([ids.shape[0] - 1], device=ids.device)
    out = model(
        input_ids=ids[None],
        position_ids=pos[None],
        use_cache=True,
        logits_to_keep=keep,
        **{cache_kwarg(model): cache},
    )
    return out.logits[0, -1]


def _forced_ids(constraint: LogitsConstraint, tokenizer, limit: int) -> list[int]:
    """Tokens of the text the grammar forces next, accepted into ``constraint`` (at most
    ``limit``); stops early at a token the grammar rejects (an odd tokenization)."""
    forced_text = getattr(constraint, "forced_text", None)
    text = forced_text() if callable(forced_text) and limit > 0 else ""
    if not text:
        return []
    accepted: list[int] = []
    for token in tokenizer.encode(text, add_special_tokens=False)[:limit]:
        try:
            constraint.advance(token)
        except ValueError:
            break
        accepted.append(token)
        if constraint.is_terminated():
            break
    return accepted


def iter_decode(
    model: torch.nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    cache: DynamicCache,
    *,
    start: int,
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),  # noqa: B008 - frozen dataclass
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    constraint: LogitsConstraint | None = None,
    cancel: threading.Event | None = None,
    jump_forward: bool = False,
    repetition: RepetitionControl | None = None,
    context_ids: Sequence[int] = (),
    loop_guard: bool = False,
    logits: torch.Tensor | None = None,
) -> Generator[int, None, SequentialResult]:
    """Decode after ``input_ids``; yield each new token; return the result.

    Args:
        model: stock causal LM. input_ids: ``[S]`` (S >= 1) tokens to append first, or none
            when ``logits`` are given.
        cache: DynamicCache already holding ``start`` tokens (its own contents are not checked).
        max_new_tokens: budget (0 returns at once after the prefill).
        params, seed: sampling; the generator is seeded once per call.
        stop_token_ids, stop_strings, tokenizer: when to stop (stop strings need the tokenizer).
        constraint: optional grammar; its mask applies before sampling, and decoding stops as
            soon as it terminates.
        cancel: checked before every forward; raises ``Cancelled`` when set.
        jump_forward: with a constraint that has ``forced_text()`` (and a tokenizer), text the
            grammar forces next (e.g. a JSON key) is tokenized and fed in the next forward
            pass with the sampled token, instead of one pass per token. Those tokens are
            yielded and count as new tokens; when decoding ends right after them, the cache
            lacks them as well as the last sampled token.
        logits: ``[V]`` logits after the cache's last token, when the caller's own forward
            produced them (e.g. ``decoding.merge``): the first token is sampled from them, with
            no forward of its own.
    """
    device = model.get_input_embeddings().weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    stops = StopStrings(tokenizer, stop_strings)
    stop_ids = frozenset(int(t) for t in stop_token_ids)
    gen = None if params.greedy else make_generator(seed, device)
    rep = None
    if repetition is not None and repetition.active:
        vocab = model.get_output_embeddings().weight.shape[0]
        rep = repetition.start([*context_ids, *ids.tolist()], vocab)
    tokens: list[int] = []
    passes = 0
    pos = start
    with torch.inference_mode():
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("decoding cancelled")
            if len(tokens) >= max_new_tokens:
                return SequentialResult(tokens, "length", None, passes)
            if logits is None or tokens:
                logits = forward_tokens(model, ids, cache, pos)
                passes += 1
                pos += ids.shape[0]
            if rep is not None:
                logits = rep.apply(logits)
            if constraint is not None:
                logits = constraint.mask_logits(logits)
            tok = int(sample_next(logits[None], params, gen)[0])
            tokens.append(tok)
            if rep is not None:
                rep.push(tok)
            yield tok
            if constraint is not None:
                constraint.advance(tok)
                if constraint.is_terminated():
                    return SequentialResult(tokens, "stop", None, passes)
            if tok in stop_ids:
                return SequentialResult(tokens, "stop", tok, passes)
            if stops and (hit := stops.find(tokens)) is not None:
                return SequentialResult(tokens, "stop", hit, passes)
            if loop_guard and find_loop(tokens) is not None:
                return SequentialResult(tokens, "repetition", None, passes)
            forced: list[int] = []
            if jump_forward and constraint is not None and tokenizer is not None:
                for f in _forced_ids(constraint, tokenizer, max_new_tokens - len(tokens)):
                    forced.append(f)
                    tokens.append(f)
                    if rep is not None:
                        rep.push(f)
                    yield f
                if forced and constraint.is_terminated():
                    return SequentialResult(tokens, "stop", None, passes)
            ids = torch.tensor([tok, *forced], device=device)
