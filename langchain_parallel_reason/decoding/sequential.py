"""Ordinary one-token-per-step decoding over a caller's cache (Stage 1, Stage 3, fallback).

Contract: ``iter_decode`` appends ``input_ids`` to ``cache`` (which already holds ``start``
tokens), then samples until a stop id, a stop string, the budget, or a terminated grammar; it
yields every new token id and returns a ``SequentialResult``. The last sampled token is never fed
back, so on return the cache holds the input plus all generated tokens but the last. Sampling
rules come in as in ``decoder.iter_decode_branches``: ``params=``, ``seed=``, ``suppress=``.
(``SuppressFirst`` and ``cache_kwarg`` are re-exported here for existing imports.)
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from transformers.cache_utils import DynamicCache

from .cache import cache_kwarg
from .repetition import RepetitionControl
from .sampling import SamplingParams, SuppressFirst, make_generator, sample_next
from .stops import FinishReason, Stopping

__all__ = [
    "Cancelled",
    "LogitsConstraint",
    "SequentialResult",
    "SuppressFirst",  # re-exported from .sampling
    "cache_kwarg",  # re-exported from .cache
    "forward_tokens",
    "iter_decode",
    "result_of",
]


_R = TypeVar("_R")


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
    finish_reason: FinishReason
    stop: str | int | None
    forward_passes: int


def result_of(gen: Generator[Any, None, _R]) -> _R:
    """Run a decode generator (``iter_decode``, ``iter_decode_branches``) to its return value;
    what it yields on the way is dropped."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def forward_tokens(
    model: torch.nn.Module,
    ids: torch.Tensor,
    cache: DynamicCache,
    start: int,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | dict[str, torch.Tensor] | None = None,
    every_token: bool = False,
) -> torch.Tensor:
    """Append ``ids`` at positions ``start..`` to ``cache``; return the last token's logits.

    ``ids`` is ``[S]`` (logits ``[V]``) or a batch ``[B, S]`` (logits ``[B, V]``); with
    ``every_token`` every token's logits come back (``[S, V]`` / ``[B, S, V]``).
    ``position_ids`` ``[B, S]`` replaces ``start..`` (e.g. N branch tokens at one position);
    ``attention_mask`` goes to the model as is (None: the model's own causal mask).
    """
    batch = ids[None] if ids.dim() == 1 else ids  # [B, S]
    size, length = batch.shape
    if position_ids is None:
        position_ids = torch.arange(start, start + length, device=ids.device).expand(size, -1)
    # An index tensor, not logits_to_keep=1: for S > 1 the int form hands lm_head a strided
    # [B, 1, H] view, which a frozen bf16 Linear on CPU (torch 2.13) runs about 40x slower.
    keep = 0 if every_token else torch.tensor([length - 1], device=ids.device)
    out = model(
        input_ids=batch,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=True,
        logits_to_keep=keep,
        **{cache_kwarg(model): cache},
    )
    logits = out.logits if every_token else out.logits[:, -1]  # [B, S, V] or [B, V]
    return logits[0] if ids.dim() == 1 else logits


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
    suppress: SuppressFirst | None = None,
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
        suppress: ids banned for the first new tokens (e.g. EOS right after a step).
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
    if isinstance(constraint, SuppressFirst):
        msg = "SuppressFirst is a sampling rule, not a grammar: pass it as suppress=..."
        raise TypeError(msg)
    device = model.get_input_embeddings().weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    stopping = Stopping.build(stop_token_ids, stop_strings, tokenizer, loop_guard)
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
            if suppress is not None and suppress.active(len(tokens)):
                logits = logits.clone()  # [V]; may be a view of a batched forward's output
                suppress.apply(logits[None], [len(tokens)])
            if constraint is not None:
                logits = constraint.mask_logits(logits)
            tok = int(sample_next(logits[None], params, gen)[0])
            tokens.append(tok)
            if rep is not None:
                rep.push(tok)
            closing = yield tok
            if constraint is not None:
                constraint.advance(tok)
                if constraint.is_terminated():
                    return SequentialResult(tokens, "stop", None, passes)
            if (end := stopping.check(tokens)) is not None:
                return SequentialResult(tokens, end[0], end[1], passes)
            if closing:  # the caller ended the decode (a request machine's Cancel)
                return SequentialResult(tokens, "stop", None, passes)
            forced: list[int] = []
            if jump_forward and constraint is not None and tokenizer is not None:
                for f in _forced_ids(constraint, tokenizer, max_new_tokens - len(tokens)):
                    forced.append(f)
                    tokens.append(f)
                    if rep is not None:
                        rep.push(f)
                    if (yield f):
                        return SequentialResult(tokens, "stop", None, passes)
                if forced and constraint.is_terminated():
                    return SequentialResult(tokens, "stop", None, passes)
            ids = torch.tensor([tok, *forced], device=device)
