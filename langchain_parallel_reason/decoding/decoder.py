"""The belt-mask parallel decoder: N branches after one shared prefix, in ONE sequence.

Contract: ``iter_decode_branches`` takes a stock transformers causal LM, prefix token ids and one
forced token list per branch, and yields a ``StepEvent`` per forward pass (which branch produced
which token) before returning a ``BranchesOutput``; ``decode_branches`` collects it. Token k of
branch b (forced tokens included) has position ``len(prefix) + k`` and attends to the prefix and
to tokens ``0..k`` of branch b only, so under greedy float32 decoding each branch equals decoding
``prefix + branch_prefix`` alone. Finished branches leave the batch at once. Sampling rules
come in as in ``sequential.iter_decode`` (``params=``, ``seed=``, ``suppress=``); each branch's
state is one ``_Branch`` row. Two attention backends (``attention.AttentionBackend`` objects):

* ``"split"``: prefix referenced once, each branch's keys contiguous in a preallocated buffer,
  attention split into a shared-prefix part and a per-branch part (no masked key scanned, no
  cache copy per step). Used by ``"auto"`` for the architectures it is tested on, except in
  half precision on a CPU, where the mask backend is faster (``choose_attention``).
* ``"mask"``: the branches are appended to a stock ``DynamicCache`` and a float 4D belt mask is
  passed to the model's own eager/sdpa attention. Works for any model that accepts 4D masks.

The prefix cache a caller passes in is returned holding exactly the prefix again.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.cache_utils import DynamicCache

from .attention import AttentionBackend, SplitBackend
from .cache import crop_to, kv_bytes
from .masks import MaskBackend
from .repetition import RepetitionControl, RepetitionState
from .sampling import SamplingParams, SuppressFirst, make_generator, sample_next
from .sequential import Cancelled, forward_tokens, result_of
from .stops import FinishReason, Stopping

__all__ = [
    "SPLIT_ARCHITECTURES",
    "BranchResult",
    "BranchesOutput",
    "StepEvent",
    "choose_attention",
    "decode_branches",
    "iter_decode_branches",
    "model_device",
    "prefill",
]

Attention = Literal["auto", "split", "mask"]

# model_type values whose attention modules the split backend is tested against (exact vs eager).
SPLIT_ARCHITECTURES = frozenset(
    {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"}
)
# Attention implementations that accept an arbitrary float 4D mask.
_MASK_IMPLEMENTATIONS = frozenset({"eager", "sdpa"})


@dataclass(frozen=True)
class StepEvent:
    """What one Stage-2 forward produced: ``token_ids[i]`` is the new token of ``branch_ids[i]``.

    ``finished`` lists ``(branch, reason)`` for branches that ended with this step.
    """

    step: int
    branch_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    finished: tuple[tuple[int, FinishReason], ...] = ()


@dataclass(frozen=True)
class BranchResult:
    """One branch's outcome.

    Attributes:
        token_ids: generated ids, forced prefix excluded; a stop token id that ended the branch
            is included (as ``generate`` does); text after a stop string is the caller's to cut.
        finish_reason: "stop" (stop id or stop string), "length" (``max_new_tokens``) or
            "repetition" (the loop guard saw the branch repeat itself; see ``repetition``).
        forward_passes: forward passes that computed a token of this branch.
        stop: the stop string or stop token id that ended it, if any.
    """

    token_ids: list[int]
    finish_reason: FinishReason
    forward_passes: int
    stop: str | int | None = None


@dataclass(frozen=True)
class BranchesOutput:
    """All branches, plus Stage-2 totals.

    Attributes:
        branches: one result per branch, in input order.
        forward_passes: model forward calls made in Stage 2 (the prefix prefill excluded).
        kv_bytes: peak bytes of keys/values held during Stage 2, the prefix included.
        attention: the backend that ran ("split" or "mask").
        tokens: new tokens of every branch together.
        branch_kv: with ``keep_kv``, per branch its keys/values in the cache (forced tokens and
            every new token but the last, which was never fed), per layer ``[1, kv_heads, L_b,
            head_dim]`` with token k at position ``len(prefix) + k``; else None.
    """

    branches: list[BranchResult]
    forward_passes: int
    kv_bytes: int
    attention: str
    tokens: int = field(default=0)
    branch_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the input embeddings (the first shard when a model is split by device_map)."""
    return model.get_input_embeddings().weight.device


def prefill(
    model: torch.nn.Module, ids: torch.Tensor, cache: DynamicCache, start: int = 0
) -> torch.Tensor:
    """Run ``ids`` ``[S]`` at positions ``start..`` into ``cache``; return last logits ``[V]``."""
    return forward_tokens(model, ids, cache, start)


def choose_attention(model: torch.nn.Module, attention: Attention = "auto") -> str:
    """Resolve the Stage-2 backend for ``model``, or raise a ValueError saying how to fix it."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    # An engine's view of the model reports the implementation the model was loaded with.
    impl = (
        getattr(model, "base_attn_implementation", None)
        or getattr(config, "_attn_implementation", None)
        or "eager"
    )
    if attention not in ("auto", "split", "mask"):
        msg = f"attention must be 'auto', 'split' or 'mask', got {attention!r}"
        raise ValueError(msg)
    if attention == "auto" and _half_on_cpu(model) and impl in _MASK_IMPLEMENTATIONS:
        # In bf16/fp16 on a CPU, split attention's small per-branch matmuls run slow kernels:
        # the embedded model's steps decoded 1.31x (2 steps) and 1.10x (3 steps) the tokens/s
        # of the same steps one after another with split, 1.96x and 1.62x with the belt mask
        # (one sdpa call over the prefix and the branches). float32 and GPUs keep split.
        return "mask"
    if attention == "split" or (attention == "auto" and model_type in SPLIT_ARCHITECTURES):
        if model_type not in SPLIT_ARCHITECTURES and attention == "split":
            msg = (
                f"split attention is only validated for {sorted(SPLIT_ARCHITECTURES)}, not "
                f"{model_type!r}; use attention='mask' (needs eager or sdpa attention)"
            )
            raise ValueError(msg)
        return "split"
    if impl not in _MASK_IMPLEMENTATIONS:
        msg = (
            f"the belt mask needs a float 4D attention mask, which attn_implementation={impl!r} "
            "cannot take; load the model with attn_implementation='sdpa' (or 'eager')"
        )
        raise ValueError(msg)
    return "mask"


def _half_on_cpu(model: Any) -> bool:
    """Whether ``model`` (or an engine's view of it) computes in half precision on a CPU."""
    weight = model.get_input_embeddings().weight
    return weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)


def _as_ids(ids: Sequence[int] | torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long, device=device)
    if t.dim() != 1:
        msg = f"{what} must be a flat sequence of token ids, got shape {tuple(t.shape)}"
        raise ValueError(msg)
    return t


def _check_full_prefix(cache: DynamicCache, length: int) -> None:
    if cache.get_seq_length() != length:
        msg = (
            f"prefix_cache holds {cache.get_seq_length()} tokens but prefix_ids has {length}; "
            "pass the cache built from exactly prefix_ids"
        )
        raise ValueError(msg)
    for i, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.shape[-2] != length:
            msg = (
                f"prefix_cache layer {i} keeps {keys.shape[-2]} of {length} tokens (a sliding-window "
                "cache built with config=...); create it as DynamicCache() without config"
            )
            raise ValueError(msg)


def _check_inputs(
    prefix_ids: Sequence[int] | torch.Tensor,
    branch_prefixes: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    opening_banned_ids: Sequence[Sequence[int]] | None,
    device: torch.device,
) -> tuple[torch.Tensor, list[list[int]], list[int]]:
    """The prefix ``[P]``, the forced ids and the budget of every branch, or a ValueError."""
    prefix = _as_ids(prefix_ids, device, "prefix_ids")
    if prefix.numel() == 0:
        raise ValueError("prefix_ids is empty: the branches need at least one shared token")
    forced = [
        _as_ids(f, device, f"branch_prefixes[{b}]").tolist() for b, f in enumerate(branch_prefixes)
    ]
    n = len(forced)
    if n == 0:
        raise ValueError("branch_prefixes is empty: pass one forced token list per branch")
    if opening_banned_ids is not None and len(opening_banned_ids) != n:
        msg = f"opening_banned_ids needs one list per branch ({n}), got {len(opening_banned_ids)}"
        raise ValueError(msg)
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n or any(int(b) < 1 for b in budgets):
        msg = f"max_new_tokens must be >= 1 (one int, or one per branch), got {max_new_tokens!r}"
        raise ValueError(msg)
    return prefix, forced, budgets


@dataclass
class _Branch:
    """One branch's state while the loop runs (a row of the batch, as in nanochat's engine)."""

    index: int
    forced: list[int]
    budget: int
    generator: torch.Generator | None  # its own draws, seeded seed + index; None when greedy
    opening: torch.Tensor | None  # [K] ids its first new token may not be
    repetition: RepetitionState | None  # over the prefix and this branch's tokens only
    generated: list[int] = field(default_factory=list)
    forward_passes: int = 0
    finish: tuple[FinishReason, str | int | None] | None = None
    logits: torch.Tensor | None = None  # [V] after the branch's last fed token
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # with keep_kv, taken as it ends

    @property
    def length(self) -> int:
        """Tokens the branch holds after the prefix (forced + generated)."""
        return len(self.forced) + len(self.generated)

    def result(self) -> BranchResult:
        """The finished branch as a ``BranchResult``."""
        reason, stop = self.finish
        return BranchResult(self.generated, reason, self.forward_passes, stop)


@dataclass
class _Forwards:
    """The Stage-2 forwards of one call: its backend, cancel check and totals."""

    backend: AttentionBackend
    cancel: threading.Event | None
    peak: int  # most KV bytes held so far, the prefix included
    count: int = 0

    def run(self, branch_ids: list[int], token_idx: list[int], tokens: list[int]) -> torch.Tensor:
        """One forward (``AttentionBackend.forward``); raises ``Cancelled`` first if asked to."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("decoding cancelled")
        logits = self.backend.forward(branch_ids, token_idx, tokens)  # [Q, V]
        self.count += 1
        self.peak = max(self.peak, kv_bytes(self.backend.cache))
        return logits


def _open_prefix(
    model: torch.nn.Module,
    prefix: torch.Tensor,
    prefix_cache: DynamicCache | None,
    prefix_logits: torch.Tensor | None,
    need_logits: bool,
) -> tuple[DynamicCache, torch.Tensor | None]:
    """Phase 1: the prefix KV (the caller's, checked, or a new prefill) and, when some branch
    has no forced token, the logits ``[V]`` after the last prefix token."""
    plen = prefix.shape[0]
    with torch.inference_mode():
        if prefix_cache is None:
            cache = DynamicCache()
            return cache, prefill(model, prefix, cache)
        _check_full_prefix(prefix_cache, plen)
        if prefix_logits is None and need_logits:
            # Recompute the last prefix token's logits: drop it and feed it again.
            crop_to(prefix_cache, plen - 1)
            prefix_logits = prefill(model, prefix[-1:], prefix_cache, start=plen - 1)
    return prefix_cache, prefix_logits


def _new_branches(
    model: torch.nn.Module,
    prefix: torch.Tensor,
    forced: list[list[int]],
    budgets: list[int],
    params: SamplingParams,
    seed: int | None,
    opening_banned_ids: Sequence[Sequence[int]] | None,
    repetition: RepetitionControl | None,
) -> list[_Branch]:
    """One ``_Branch`` per forced list: its generator, opening ban and repetition state."""
    device = prefix.device
    rep_on = repetition is not None and repetition.active
    vocab = model.get_output_embeddings().weight.shape[0] if rep_on else 0
    prefix_list = prefix.tolist()
    rows = []
    for b, (ids, budget) in enumerate(zip(forced, budgets, strict=True)):
        gen = None if params.greedy else make_generator(None if seed is None else seed + b, device)
        ban = sorted(set(opening_banned_ids[b])) if opening_banned_ids is not None else []
        opening = torch.tensor(ban, dtype=torch.long, device=device) if ban else None
        # The branch's repetition context is the prefix and its own tokens, as if decoded alone.
        rep = repetition.start(prefix_list + ids, vocab) if rep_on else None
        rows.append(_Branch(b, ids, int(budget), gen, opening, rep))
    return rows


def _open_backend(
    name: str, model: torch.nn.Module, cache: DynamicCache, branches: list[_Branch]
) -> AttentionBackend:
    """The ``name`` backend sized for ``branches`` after the prefix in ``cache``."""
    device = model_device(model)
    if name == "split":
        max_len = max(len(b.forced) + b.budget for b in branches)
        return SplitBackend(model, cache, len(branches), max_len, device)
    capacity = cache.get_seq_length() + sum(len(b.forced) + b.budget for b in branches)
    return MaskBackend(model, cache, capacity, device)


def _feed_forced(
    forwards: _Forwards,
    branches: list[_Branch],
    prefix_logits: torch.Tensor | None,
    max_rows: int | None = None,
) -> None:
    """Phase 2: every forced token of every branch in ONE forward (or in forwards of at most
    ``max_rows`` rows); a branch without forced tokens starts from the prefix logits."""
    branch_ids: list[int] = []
    token_idx: list[int] = []
    tokens: list[int] = []
    last: dict[int, _Branch] = {}  # row of a branch's last forced token -> the branch
    for b in branches:
        if not b.forced:
            b.logits = prefix_logits
            continue
        branch_ids += [b.index] * len(b.forced)
        token_idx += range(len(b.forced))
        tokens += b.forced
        last[len(tokens) - 1] = b
        b.forward_passes += 1
    # Rows in order, at most max_rows per forward: a branch's earlier forced tokens are in its
    # cache slots before its later ones attend to them.
    step = max_rows or len(tokens) or 1
    for at in range(0, len(tokens), step):
        rows = slice(at, at + step)
        logits = forwards.run(branch_ids[rows], token_idx[rows], tokens[rows])  # [Q, V]
        for row in range(at, min(at + step, len(tokens))):
            if row in last:
                last[row].logits = logits[row - at]


def _pick_tokens(
    live: list[_Branch], params: SamplingParams, suppress: SuppressFirst | None
) -> list[int]:
    """The next token of every live branch, after its rules (suppress, opening, repetition)."""
    logits = torch.stack([b.logits for b in live])  # [L, V]: row i is live[i]'s
    if suppress is not None:
        suppress.apply(logits, [len(b.generated) for b in live])
    for i, b in enumerate(live):
        if b.opening is not None and not b.generated:
            logits[i, b.opening] = float("-inf")
        if b.repetition is not None:
            logits[i] = b.repetition.apply(logits[i])
    # One pass over all rows; each branch draws from its own generator, so its draws do not
    # depend on the others.
    generators = None if params.greedy else [b.generator for b in live]
    return sample_next(logits, params, generators).tolist()


def _record(branch: _Branch, token: int, stopping: Stopping) -> bool:
    """Append ``token`` to ``branch``; True when the branch ends with it."""
    branch.generated.append(token)
    if branch.repetition is not None:
        branch.repetition.push(token)
    branch.finish = stopping.check(branch.generated)
    if branch.finish is None and len(branch.generated) >= branch.budget:
        branch.finish = ("length", None)
    return branch.finish is not None


def _feed_last(forwards: _Forwards, live: list[_Branch], max_rows: int | None = None) -> None:
    """Phase 3's forward: the last new token of every live branch, one per branch (in
    forwards of at most ``max_rows`` branches: they are independent)."""
    step = max_rows or len(live)
    for at in range(0, len(live), step):
        group = live[at : at + step]
        logits = forwards.run(
            [b.index for b in group],
            [b.length - 1 for b in group],
            [b.generated[-1] for b in group],
        )
        for i, b in enumerate(group):
            b.forward_passes += 1
            b.logits = logits[i]


def iter_decode_branches(
    model: torch.nn.Module,
    prefix_ids: Sequence[int] | torch.Tensor,
    branch_prefixes: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    params: SamplingParams = SamplingParams(),  # noqa: B008 - frozen dataclass
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    suppress: SuppressFirst | None = None,
    opening_banned_ids: Sequence[Sequence[int]] | None = None,
    repetition: RepetitionControl | None = None,
    loop_guard: bool = False,
    prefix_cache: DynamicCache | None = None,
    prefix_logits: torch.Tensor | None = None,
    attention: Attention = "auto",
    cancel: threading.Event | None = None,
    keep_kv: bool = False,
    max_rows: int | None = None,
) -> Generator[StepEvent, None, BranchesOutput]:
    """Decode every branch at once; yield one ``StepEvent`` per forward; return the results.
    Sending a set of branch indexes into the generator (``send``) ends those branches there.

    Args:
        model: a stock transformers causal LM (eval mode).
        prefix_ids: ``[P]`` shared prefix token ids (P >= 1).
        branch_prefixes: forced token ids per branch (e.g. the step title); may be empty lists.
        max_new_tokens: new tokens per branch (one int, or one per branch).
        params: sampling (temperature 0 is greedy), as in ``sequential.iter_decode``.
        seed: branch b samples from its own generator seeded ``seed + b``, so a branch's draws do
            not depend on the other branches (None: unseeded).
        stop_token_ids: ids that end a branch (e.g. EOS); included in its ``token_ids``.
        stop_strings: strings that end a branch once its generated text contains one (needs
            ``tokenizer``). Only that branch stops.
        suppress: ids a branch may not produce before it has ``suppress.count`` new tokens
            (e.g. EOS and the next step marker, which a small model writes at once).
        opening_banned_ids: per branch, tokens its first new token may not be (e.g. the start
            of another step's title), or None.
        repetition: transformers' ``repetition_penalty`` / ``no_repeat_ngram_size``, applied
            per branch over that branch's own context (prefix + its forced and new tokens),
            as ``generate`` would over ``prefix + branch_prefix`` alone.
        loop_guard: end a branch whose new tokens end in a loop (``repetition.find_loop``),
            finish reason "repetition".
        prefix_cache: a DynamicCache holding exactly ``prefix_ids`` (e.g. from Stage 1), reused
            instead of a new prefill; it holds exactly the prefix again when this returns.
        prefix_logits: ``[V]`` logits after the last prefix token, if the caller has them (only
            needed when a branch has an empty forced prefix).
        attention: "auto", "split" or "mask" (see the module docstring).
        cancel: checked before every forward; ``decoding.sequential.Cancelled`` is raised when
            it is set (the prefix cache is restored first).
        keep_kv: return each branch's keys/values (``BranchesOutput.branch_kv``), e.g. for a
            Stage 3 that reuses them (``decoding.merge``) instead of prefilling the steps again.
        max_rows: most query rows per forward (None: no limit), e.g. an engine's row cap; the
            rows of a step are then run in several forwards, with the same tokens.
    """
    device = model_device(model)
    prefix, forced, budgets = _check_inputs(
        prefix_ids, branch_prefixes, max_new_tokens, opening_banned_ids, device
    )
    name = choose_attention(model, attention)
    stopping = Stopping.build(stop_token_ids, stop_strings, tokenizer, loop_guard)
    plen = prefix.shape[0]

    # Phase 1: the prefix (prefilled or the caller's) and the per-branch state.
    need_logits = any(not f for f in forced)
    cache, prefix_logits = _open_prefix(model, prefix, prefix_cache, prefix_logits, need_logits)
    branches = _new_branches(
        model, prefix, forced, budgets, params, seed, opening_banned_ids, repetition
    )
    forwards = _Forwards(_open_backend(name, model, cache, branches), cancel, kv_bytes(cache))
    try:
        with torch.inference_mode():
            _feed_forced(forwards, branches, prefix_logits, max_rows)  # Phase 2
            # Phase 3: one token per live branch per forward until every branch has finished.
            live, step = branches, 0
            while live:
                tokens = _pick_tokens(live, params, suppress)
                ended = [
                    (b.index, b.finish[0])
                    for b, tok in zip(live, tokens, strict=True)
                    if _record(b, tok, stopping)
                ]
                # A caller may send the indexes of branches it ends itself (a request machine's
                # Cancel): they retire now, as if stopped, and decode no further token.
                closing = yield StepEvent(
                    step, tuple(b.index for b in live), tuple(tokens), tuple(ended)
                )
                for b in live:
                    if closing and b.index in closing and b.finish is None:
                        b.finish = ("stop", None)
                        ended.append((b.index, "stop"))
                step += 1
                if ended:
                    if keep_kv:  # before retire: the split backend reuses an ended slot
                        for b in live:
                            if b.finish is not None:
                                # Every token but the last new one, which was never fed.
                                b.kv = forwards.backend.branch_kv(b.index, b.length - 1)
                    live = [b for b in live if b.finish is None]
                    forwards.backend.retire([b.index for b in live], [b.length for b in live])
                if live:
                    _feed_last(forwards, live, max_rows)
    finally:
        # The caller's cache holds exactly the prefix again, whatever happened.
        crop_to(cache, plen)
        forwards.backend.close()

    results = [b.result() for b in branches]
    total = sum(len(b.generated) for b in branches)
    kept = [b.kv for b in branches] if keep_kv else None
    return BranchesOutput(results, forwards.count, forwards.peak, name, total, kept)


def _shortcuts(
    kwargs: dict[str, Any],
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_new_tokens: int,
    suppress_token_ids: Sequence[int],
) -> dict[str, Any]:
    """``params`` / ``suppress`` built from ``decode_branches``' scalar shortcuts."""
    out: dict[str, Any] = {}
    given = (("temperature", temperature), ("top_p", top_p), ("top_k", top_k))
    scalars = {k: v for k, v in given if v is not None}
    if scalars:
        if "params" in kwargs:
            msg = "pass either params=SamplingParams(...) or temperature/top_p/top_k, not both"
            raise ValueError(msg)
        out["params"] = SamplingParams(**scalars)
    if min_new_tokens > 0:
        if "suppress" in kwargs:
            msg = "pass either suppress=SuppressFirst(...) or min_new_tokens, not both"
            raise ValueError(msg)
        # As generate's min_new_tokens bans EOS: the stop ids too, not only the listed ids.
        banned = [*kwargs.get("stop_token_ids", ()), *suppress_token_ids]
        out["suppress"] = SuppressFirst(banned, min_new_tokens)
    return out


def decode_branches(
    model: torch.nn.Module,
    prefix_ids: Sequence[int] | torch.Tensor,
    branch_prefixes: Sequence[Sequence[int]],
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_new_tokens: int = 0,
    suppress_token_ids: Sequence[int] = (),
    **kwargs: Any,
) -> BranchesOutput:
    """Decode all branches at once and return their tokens (see ``iter_decode_branches``).

    Takes ``iter_decode_branches``' keywords, plus shortcuts for scripts and tests:
    ``temperature`` / ``top_p`` / ``top_k`` build ``params``; ``min_new_tokens`` (with
    ``suppress_token_ids``) builds ``suppress`` banning those ids and the stop ids, as
    ``generate``'s ``min_new_tokens`` bans EOS.

    Example:
        >>> out = decode_branches(model, prefix, [tok("####A:"), tok("####B:")],
        ...                       max_new_tokens=64, stop_token_ids=[tok.eos_token_id])
        >>> [r.token_ids for r in out.branches]
    """
    kwargs |= _shortcuts(kwargs, temperature, top_p, top_k, min_new_tokens, suppress_token_ids)
    return result_of(iter_decode_branches(model, prefix_ids, branch_prefixes, **kwargs))
