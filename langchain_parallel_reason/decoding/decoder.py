"""The belt-mask parallel decoder: N branches after one shared prefix, in ONE sequence.

Contract: ``iter_decode_branches`` takes a stock transformers causal LM, prefix token ids and one
forced token list per branch, and yields a ``StepEvent`` per forward pass (which branch produced
which token) before returning a ``BranchesOutput``; ``decode_branches`` collects it. Token k of
branch b (forced tokens included) has position ``len(prefix) + k`` and attends to the prefix and
to tokens ``0..k`` of branch b only, so under greedy float32 decoding each branch equals decoding
``prefix + branch_prefix`` alone. Finished branches leave the batch at once. Two backends:

* ``"split"``: prefix referenced once, each branch's keys contiguous in a preallocated buffer,
  attention split into a shared-prefix part and a per-branch part (no masked key scanned, no
  cache copy per step). Used by ``"auto"`` for the architectures it is tested on.
* ``"mask"``: the branches are appended to a stock ``DynamicCache`` and a float 4D belt mask is
  passed to the model's own eager/sdpa attention. Works for any model that accepts 4D masks.

The prefix cache a caller passes in is returned holding exactly the prefix again.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers.cache_utils import DynamicCache

from .attention import SplitLayout, use_split_attention
from .cache import BranchCache, crop_to, kv_bytes
from .masks import ColumnLayout, model_mask_kind
from .repetition import RepetitionControl, find_loop
from .sampling import SamplingParams, make_generator, sample_next
from .sequential import Cancelled, cache_kwarg, forward_tokens
from .stops import StopStrings

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

FinishReason = Literal["stop", "length", "repetition"]
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


def iter_decode_branches(
    model: torch.nn.Module,
    prefix_ids: Sequence[int] | torch.Tensor,
    branch_prefixes: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    prefix_cache: DynamicCache | None = None,
    prefix_logits: torch.Tensor | None = None,
    attention: Attention = "auto",
    cancel: threading.Event | None = None,
    min_new_tokens: int = 0,
    suppress_token_ids: Sequence[int] = (),
    opening_banned_ids: Sequence[Sequence[int]] | None = None,
    repetition: RepetitionControl | None = None,
    loop_guard: bool = False,
    keep_kv: bool = False,
) -> Generator[StepEvent, None, BranchesOutput]:
    """Decode every branch at once; yield one ``StepEvent`` per forward; return the results.

    Args:
        model: a stock transformers causal LM (eval mode).
        prefix_ids: ``[P]`` shared prefix token ids (P >= 1).
        branch_prefixes: forced token ids per branch (e.g. the step title); may be empty lists.
        max_new_tokens: new tokens per branch (one int, or one per branch).
        temperature, top_p, top_k: sampling; temperature 0 is greedy.
        seed: branch b samples from its own generator seeded ``seed + b``, so a branch's draws do
            not depend on the other branches (None: unseeded).
        stop_token_ids: ids that end a branch (e.g. EOS); included in its ``token_ids``.
        stop_strings: strings that end a branch once its generated text contains one (needs
            ``tokenizer``). Only that branch stops.
        prefix_cache: a DynamicCache holding exactly ``prefix_ids`` (e.g. from Stage 1), reused
            instead of a new prefill; it holds exactly the prefix again when this returns.
        prefix_logits: ``[V]`` logits after the last prefix token, if the caller has them (only
            needed when a branch has an empty forced prefix).
        attention: "auto", "split" or "mask" (see the module docstring).
        cancel: checked before every forward; ``decoding.sequential.Cancelled`` is raised when
            it is set (the prefix cache is restored first).
        min_new_tokens: a branch cannot produce a stop id or one of ``suppress_token_ids``
            before it has this many tokens (e.g. keeps a small model from ending a step at
            once with the next step marker).
        suppress_token_ids: tokens banned until ``min_new_tokens`` (see above).
        opening_banned_ids: per branch, tokens its first new token may not be (e.g. the start
            of another step's title), or None.
        repetition: transformers' ``repetition_penalty`` / ``no_repeat_ngram_size``, applied
            per branch over that branch's own context (prefix + its forced and new tokens),
            as ``generate`` would over ``prefix + branch_prefix`` alone.
        loop_guard: end a branch whose new tokens end in a loop (``repetition.find_loop``),
            finish reason "repetition".
        keep_kv: return each branch's keys/values (``BranchesOutput.branch_kv``), e.g. for a
            Stage 3 that reuses them (``decoding.merge``) instead of prefilling the steps again.
    """
    params = SamplingParams(temperature, top_p, top_k)
    device = model_device(model)
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
    backend = choose_attention(model, attention)
    stops = StopStrings(tokenizer, stop_strings)
    stop_ids = frozenset(int(t) for t in stop_token_ids)
    # Tokens a branch may not produce before min_new_tokens: the stop ids and the caller's.
    banned = sorted(stop_ids | {int(t) for t in suppress_token_ids}) if min_new_tokens > 0 else []
    suppress = torch.tensor(banned, device=device) if banned else None
    plen = prefix.shape[0]

    # Phase 1: the prefix KV (reused when given) and, if some branch has no forced token, the
    # logits after the last prefix token.
    own_cache = prefix_cache is None
    cache = DynamicCache() if own_cache else prefix_cache
    with torch.inference_mode():
        if own_cache:
            prefix_logits = prefill(model, prefix, cache)
        else:
            _check_full_prefix(cache, plen)
            if prefix_logits is None and any(not f for f in forced):
                crop_to(cache, plen - 1)
                prefix_logits = prefill(model, prefix[-1:], cache, start=plen - 1)

    gens = [make_generator(None if seed is None else seed + b, device) for b in range(n)]
    vocab = model.get_output_embeddings().weight.shape[0]
    prefix_list = prefix.tolist()
    # One repetition state per branch: its context is the prefix and its own tokens only, as
    # if the branch were decoded alone.
    rep = (
        [repetition.start(prefix_list + forced[b], vocab) for b in range(n)]
        if repetition is not None and repetition.active
        else None
    )
    opening = (
        [
            torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)
            for ids in opening_banned_ids
        ]
        if opening_banned_ids is not None
        else None
    )
    generated: list[list[int]] = [[] for _ in range(n)]
    passes = [0] * n
    finish: list[tuple[FinishReason, str | int | None] | None] = [None] * n
    live = list(range(n))  # branch ids; in the split backend, live[i] occupies slot i
    kept_kv: list = [None] * n  # with keep_kv: branch b's KV, per layer (split: copied at its end)
    forwards = 0
    peak = kv_bytes(cache)

    max_len = max(len(f) + b for f, b in zip(forced, budgets, strict=True))
    kind, window = model_mask_kind(model)
    if backend == "split":
        stage_cache = BranchCache(cache, num_slots=n, max_len=max_len)
        slot_of = list(range(n))
        cols = None
        dummy = torch.zeros(1, 1, 1, 1, device=device)
        split_mask = (
            {"full_attention": dummy, "sliding_attention": dummy} if kind == "dict" else dummy
        )
    else:
        stage_cache = cache
        slot_of = None
        capacity = plen + sum(len(f) for f in forced) + sum(budgets)
        cols = ColumnLayout.for_prefix(plen, capacity, device)

    cache_kw = cache_kwarg(model)

    def forward(q_branch: list[int], q_idx: list[int], tokens: list[int]) -> torch.Tensor:
        # One Stage-2 forward over Q tokens (any mix of branches); returns logits [Q, V].
        nonlocal forwards, peak
        if cancel is not None and cancel.is_set():
            raise Cancelled("decoding cancelled")
        qb = torch.tensor(q_branch, device=device)
        qi = torch.tensor(q_idx, device=device)
        qpos = qi + plen
        ids = torch.tensor(tokens, device=device)[None]
        if backend == "split":
            q_slot = torch.tensor([slot_of[b] for b in q_branch], device=device)
            stage_cache.write_slot, stage_cache.write_idx = q_slot, qi
            contiguous = len(q_branch) == len(live) and all(
                slot_of[b] == i for i, b in enumerate(q_branch)
            )
            layout = SplitLayout(stage_cache, q_slot, qi, qpos, max(q_idx) + 1, contiguous)
            with use_split_attention(model):
                out = model(
                    input_ids=ids,
                    position_ids=qpos[None],
                    attention_mask=split_mask,
                    use_cache=True,
                    belt_layout=layout,
                    **{cache_kw: stage_cache},
                )
        else:
            cols.append(qb, qpos)
            dtype = model.get_input_embeddings().weight.dtype
            mask = cols.masks(qb, qpos, dtype, kind, window)
            out = model(
                input_ids=ids,
                position_ids=qpos[None],
                attention_mask=mask,
                use_cache=True,
                **{cache_kw: stage_cache},
            )
        forwards += 1
        peak = max(peak, kv_bytes(stage_cache))
        return out.logits[0]

    try:
        with torch.inference_mode():
            # Phase 2: every forced token of every branch in one forward; branches without a
            # forced prefix start from the prefix logits.
            pending: dict[int, torch.Tensor] = {}
            qb, qi, toks, last_at = [], [], [], {}
            for b in range(n):
                for k, tok in enumerate(forced[b]):
                    qb.append(b)
                    qi.append(k)
                    toks.append(tok)
                if forced[b]:
                    last_at[b] = len(toks) - 1
                    passes[b] += 1
                else:
                    pending[b] = prefix_logits
            if toks:
                logits = forward(qb, qi, toks)
                for b, i in last_at.items():
                    pending[b] = logits[i]

            # Phase 3: one token per live branch per forward until every branch has finished.
            step = 0
            while live:
                logits = torch.stack([pending[b] for b in live])  # [L, V]
                if suppress is not None:
                    young = [i for i, b in enumerate(live) if len(generated[b]) < min_new_tokens]
                    if young:
                        rows = torch.tensor(young, device=device)
                        logits[rows[:, None], suppress[None, :]] = float("-inf")
                for i, b in enumerate(live):  # per-branch rules: row i is branch b's logits
                    if opening is not None and not generated[b] and opening[b].numel():
                        logits[i, opening[b]] = float("-inf")
                    if rep is not None:
                        logits[i] = rep[b].apply(logits[i])
                if params.greedy:
                    new = sample_next(logits, params).tolist()
                else:
                    new = [
                        int(sample_next(logits[i : i + 1], params, gens[b])[0])
                        for i, b in enumerate(live)
                    ]
                ended: list[tuple[int, FinishReason]] = []
                for b, tok in zip(live, new, strict=True):
                    generated[b].append(tok)
                    if rep is not None:
                        rep[b].push(tok)
                    if tok in stop_ids:
                        finish[b] = ("stop", tok)
                    elif stops and (hit := stops.find(generated[b])) is not None:
                        finish[b] = ("stop", hit)
                    elif loop_guard and find_loop(generated[b]) is not None:
                        finish[b] = ("repetition", None)
                    elif len(generated[b]) >= budgets[b]:
                        finish[b] = ("length", None)
                    if finish[b] is not None:
                        ended.append((b, finish[b][0]))
                yield StepEvent(step, tuple(live), tuple(new), tuple(ended))
                step += 1
                if ended and keep_kv and backend == "split":
                    for b, _ in ended:  # its slot is reused by a survivor from now on
                        fed = len(forced[b]) + len(generated[b]) - 1
                        kept_kv[b] = stage_cache.slot_kv(slot_of[b], fed)
                if ended:
                    live = _retire(
                        live,
                        {b for b, _ in ended},
                        backend,
                        stage_cache,
                        slot_of,
                        forced,
                        generated,
                    )
                if not live:
                    break
                logits = forward(
                    live,
                    [len(forced[b]) + len(generated[b]) - 1 for b in live],
                    [generated[b][-1] for b in live],
                )
                for i, b in enumerate(live):
                    passes[b] += 1
                    pending[b] = logits[i]
            if keep_kv and backend != "split":
                # Branch b's columns, in the order they were appended (= by position).
                col_branch = cols.col_branch[: cols.length]
                for b in range(n):
                    idx = (col_branch == b).nonzero().squeeze(1)
                    kept_kv[b] = [
                        (layer.keys.index_select(-2, idx), layer.values.index_select(-2, idx))
                        for layer in stage_cache.layers
                    ]
    finally:
        # The caller's cache holds exactly the prefix again, whatever happened.
        crop_to(cache, plen)
        if backend == "split":
            stage_cache.keys.clear()
            stage_cache.values.clear()

    results = [BranchResult(generated[b], finish[b][0], passes[b], finish[b][1]) for b in range(n)]
    return BranchesOutput(
        results,
        forwards,
        peak,
        backend,
        sum(len(g) for g in generated),
        kept_kv if keep_kv else None,
    )


def _retire(
    live: list[int],
    done: set[int],
    backend: str,
    cache,
    slot_of: list[int] | None,
    forced: list[list[int]],
    generated: list[list[int]],
) -> list[int]:
    """Drop finished branches from the live list.

    In the split backend live branch i must sit in slot i (so a decode step reads the buffers
    as views): the survivors are packed to the front by moving their slots, one copy per
    branch that changes slot (not per step).
    """
    survivors = [b for b in live if b not in done]
    if backend == "split":
        for i, b in enumerate(survivors):
            if slot_of[b] != i:
                cache.move_slot(slot_of[b], i, len(forced[b]) + len(generated[b]))
                slot_of[b] = i
    return survivors


def decode_branches(
    model: torch.nn.Module,
    prefix_ids: Sequence[int] | torch.Tensor,
    branch_prefixes: Sequence[Sequence[int]],
    **kwargs,
) -> BranchesOutput:
    """Decode all branches at once and return their tokens (see ``iter_decode_branches``).

    Example:
        >>> out = decode_branches(model, prefix, [tok("####A:"), tok("####B:")],
        ...                       max_new_tokens=64, stop_token_ids=[tok.eos_token_id])
        >>> [r.token_ids for r in out.branches]
    """
    gen = iter_decode_branches(model, prefix_ids, branch_prefixes, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
