"""Ragged attention: one forward pass over the tokens of many requests, each with its own cache.

Contract: the engine concatenates the query tokens of every call in a step into one sequence
``[1, T]`` and passes ``ragged_layout=RaggedLayout(...)`` to the model's forward while the model's
attention implementation is ``"parallel_reason_ragged"``. ``ragged_attention`` then, per layer,
cuts queries/keys/values into the calls' segments and runs each segment exactly as that call would
run alone: the segment's own cache is updated with its keys, and attention is computed over that
cache only (a stock ``DynamicCache`` with a causal, sliding or belt mask, or a ``BranchCache``
with split attention). No token ever sees another call's keys. The linear layers (most of the
work) run once for all T tokens: that is where batching pays.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..decoding.attention import SplitLayout, split_attention
from ..decoding.masks import to_additive

__all__ = [
    "RAGGED_ATTENTION",
    "PackedStep",
    "RaggedCache",
    "RaggedLayout",
    "Segment",
    "forward_step",
    "pack_step",
    "ragged_attention",
]

RAGGED_ATTENTION = "parallel_reason_ragged"


@dataclass
class Segment:
    """One call's slice of the step.

    Attributes:
        start, stop: token range ``[start, stop)`` in the step's sequence.
        cache: the call's own cache (``DynamicCache`` or ``BranchCache``).
        positions: ``[S]`` position ids of the segment's tokens.
        mask: the call's own 4D additive mask (tensor, or dict per layer type), or None for
            plain causal attention over its cache.
        split: the call's ``SplitLayout`` when it decodes branches with split attention.
    """

    start: int
    stop: int
    cache: Any
    positions: torch.Tensor
    mask: torch.Tensor | dict[str, torch.Tensor] | None = None
    split: SplitLayout | None = None


@dataclass
class RaggedLayout:
    """Every segment of the step, and the attention function the model was loaded with."""

    segments: list[Segment]
    base: str


@dataclass
class PackedStep:
    """One forward's inputs for a batch of calls (``pack_step``).

    Attributes:
        ids, positions: ``[1, T]`` every call's tokens of this step, call after call.
        keep: ``[K]`` rows whose logits come back (the rows of calls that end in this step).
        spans: per call, its ``[a, b)`` range of the kept logits, or None (a prefill chunk that
            does not end its prompt).
        layout: the segments, for ``ragged_attention``.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    keep: torch.Tensor
    spans: list[tuple[int, int] | None]
    layout: RaggedLayout


def forward_step(
    model: Any, step: PackedStep, lean: Any, configs: list[Any], cache_kw: str, mask: Any
) -> torch.Tensor:
    """The kept logits ``[K, V]`` of one packed step.

    ``lean``: the model's ``LeanForward`` (decoding/lean.py: its own modules without
    transformers' per-layer plumbing; not used while the model has forward hooks), or None:
    then ``model``'s own forward runs, with this module's attention switched on for the call
    in ``configs`` (`attention_configs`), ``mask`` a dummy 4D mask (transformers then builds
    none) and a ``RaggedCache`` under ``cache_kw``.
    """
    with torch.inference_mode():
        # A hook put on the model later (a test's spy, a profiler) needs the model's own call.
        if lean is not None and not (model._forward_pre_hooks or model._forward_hooks):
            hidden = lean.hidden(
                step.ids, step.positions, ragged_attention, ragged_layout=step.layout
            )
            return model.lm_head(hidden[:, step.keep])[0]
        saved = [cfg._attn_implementation for cfg in configs]
        for cfg in configs:
            cfg._attn_implementation = RAGGED_ATTENTION
        try:
            out = model(
                input_ids=step.ids,
                position_ids=step.positions,
                attention_mask=mask,
                use_cache=True,
                logits_to_keep=step.keep,
                ragged_layout=step.layout,
                **{cache_kw: RaggedCache()},
            )
        finally:
            for cfg, impl in zip(configs, saved, strict=True):
                cfg._attn_implementation = impl
    return out.logits[0]


def pack_step(batch: list[tuple[Any, int]], base: str) -> PackedStep:
    """Pack ``(call, take)`` pairs (runtime/calls.Call: the next ``take`` of its tokens) into
    one sequence with a segment per call."""
    segments, ids, pos, keep, spans = [], [], [], [], []
    at = 0
    for call, take in batch:
        a, b = call.ran, call.ran + take
        ids.append(call.ids[a:b])
        pos.append(call.positions[a:b])
        segments.append(
            Segment(at, at + take, call.cache, call.positions[a:b], call.mask, call.split)
        )
        if b == call.ids.shape[0]:  # the call ends here: its kept rows come back
            rows = torch.arange(take) if call.keep is None else call.keep - a
            spans.append((len(keep), len(keep) + rows.numel()))
            keep.extend((rows + at).tolist())
        else:
            spans.append(None)
        at += take
    device = ids[0].device
    return PackedStep(
        ids=torch.cat(ids)[None],
        positions=torch.cat(pos)[None],
        keep=torch.tensor(keep or [0], device=device),
        spans=spans,
        layout=RaggedLayout(segments, base),
    )


class RaggedCache(Cache):
    """The cache object handed to the model: keys stay with their segments' own caches.

    ``update`` returns the new keys unchanged; ``ragged_attention`` writes each segment's slice to
    its own cache (it must cut them anyway).
    """

    is_compileable = False

    def __init__(self) -> None:
        super().__init__(layers=[])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Pass ``[1, kv_heads, T, d]`` keys/values through (see the class docstring)."""
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """0: positions come from ``position_ids``, masks from the segments."""
        return 0


def _base_function(module: torch.nn.Module, base: str) -> Callable[..., Any]:
    # Eager attention is defined per model file (Gemma2's applies its softcap there); the others
    # are registered by name.
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _causal_mask(
    q_pos: torch.Tensor, kv_len: int, window: int | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """``[1, 1, S, K]`` additive mask for a plain sequence (key j at position j), or None when
    every key is visible (one query token, no window in reach)."""
    if q_pos.shape[0] == 1 and (window is None or kv_len <= window):
        return None
    k_pos = torch.arange(kv_len, device=q_pos.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < window
    return to_additive(allowed, dtype)


def _segment_mask(seg: Segment, sliding_window: int | None) -> torch.Tensor | None:
    mask = seg.mask
    if isinstance(mask, dict):
        key = "sliding_attention" if sliding_window is not None else "full_attention"
        return mask.get(key, mask.get("full_attention"))
    return mask


def _packed_gqa(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Queries ``[1, H, S, d]`` over their own cache ``[1, kvh, K, d]``, with no mask or an
    additive mask shared by all heads ``[1, 1, S, K]``, the query heads folded into rows of
    their KV head (``[1, kvh, g*S, d]``, the mask tiled g times): returns ``[1, S, H, d]``.

    Why: the stock sdpa function runs GQA the slow way in half precision on this CPU.
    - One query token, no mask: it passes ``enable_gqa=True``, a kernel 5-7x slower than the
      group's heads as query rows: 58 vs 319 us at 300 keys in bfloat16.
    - With a mask (Stage-2 belt rows, prefill chunks, forced feeds: 4710 calls, 1.52 s of a 12 s
      all-at-once ``bench serve`` phase) it copies every key and value g times (``repeat_kv``)
      on each call; folded, a call copies only the S x K mask: 199 -> 135 us at 4 rows, 1051 ->
      829 us at 64 rows over 600 keys in bfloat16, the same values bit for bit there.
    Half precision only: in float32 the paths cost the same and differ by rounding (1e-7 to
    3e-7), and float32 answers keep their exact logits.
    """
    _, heads, rows, dim = query.shape
    groups = heads // keys.shape[1]
    packed = query.reshape(1, keys.shape[1], groups * rows, dim)  # a view: heads in kvh groups
    tiled = mask.repeat(1, 1, groups, 1) if mask is not None and groups > 1 else mask
    out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=tiled, scale=scaling)
    return out.reshape(1, heads, rows, dim).transpose(1, 2).contiguous()


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    ragged_layout: RaggedLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of ``[1, H, T, d]`` queries, segment by segment. Returns ``[1, T, H, d]``."""
    if ragged_layout is None:
        msg = "parallel_reason_ragged attention needs ragged_layout; only the engine calls it"
        raise RuntimeError(msg)
    layer = module.layer_idx
    base = _base_function(module, ragged_layout.base)
    extra = {"softcap": softcap} if softcap is not None else {}
    if sliding_window is not None:
        extra["sliding_window"] = sliding_window
    segments = ragged_layout.segments
    fold_heads = (
        ragged_layout.base == "sdpa"
        and query.dtype in (torch.bfloat16, torch.float16)
        and softcap is None
        and not (dropout and module.training)
    )
    outs: list[torch.Tensor] = []
    # One small attention per segment, on the function the model was loaded with (so each
    # segment computes exactly what its call computes alone). A padded batch of the one-token
    # segments was tried: padding copies every call's KV at every layer, 3x slower per step.
    for seg in segments:
        a, b = seg.start, seg.stop
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        if seg.split is not None:
            seg.cache.update(k, v, layer)  # scatter into the branch slots set by the decoder
            out, _ = split_attention(
                module, q, k, v, None, scaling, dropout, softcap, sliding_window, seg.split
            )
        else:
            keys, values = seg.cache.update(k, v, layer)  # [1, kvh, K, d], this call's only
            if seg.mask is not None:
                mask = _segment_mask(seg, sliding_window)
                mask = None if mask is None else mask[..., : keys.shape[-2]]
            else:
                mask = _causal_mask(seg.positions, keys.shape[-2], sliding_window, query.dtype)
            # No mask: one query token (several without a mask are causal in the base call).
            shared = b - a == 1 if mask is None else mask.dim() == 4 and mask.shape[1] == 1
            if fold_heads and shared:
                outs.append(_packed_gqa(q, keys, values, mask, scaling))
                continue
            out, _ = base(module, q, keys, values, mask, scaling=scaling, dropout=dropout, **extra)
        outs.append(out)  # [1, S, H, d]
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], None


AttentionInterface.register(RAGGED_ATTENTION, ragged_attention)
