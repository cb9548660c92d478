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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..decoding.attention import SplitLayout, split_attention
from ..decoding.masks import to_additive
from .decode_kernel import DecodeKernel, decode_kernel
from .kv import PoolLayer

__all__ = [
    "RAGGED_ATTENTION",
    "PackedStep",
    "RaggedCache",
    "RaggedLayout",
    "Segment",
    "attend_pooled",
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
    """Every segment of the step, and the attention function the model was loaded with.

    ``plans``: what ``attend_pooled`` works out once per step and reuses at every layer.
    """

    segments: list[Segment]
    base: str
    plans: dict[Any, Any] = field(default_factory=dict)


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
        # A hook put on the model or a module later (a test's spy, a profiler) needs the
        # model's own call.
        if lean is not None and not lean.hooked():
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


def _causal_allowed(q_pos: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor | None:
    """``[S, K]`` bool: which keys each query sees in a plain sequence (key j at position j), or
    None when every key is visible (one query token, no window in reach)."""
    if q_pos.shape[0] == 1 and (window is None or kv_len <= window):
        return None
    k_pos = torch.arange(kv_len, device=q_pos.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < window
    return allowed


def _causal_mask(
    q_pos: torch.Tensor, kv_len: int, window: int | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """``_causal_allowed`` as a ``[1, 1, S, K]`` additive mask (None: every key visible)."""
    allowed = _causal_allowed(q_pos, kv_len, window)
    return None if allowed is None else to_additive(allowed, dtype)


def _segment_mask(seg: Segment, sliding_window: int | None) -> torch.Tensor | None:
    mask = seg.mask
    if isinstance(mask, dict):
        key = "sliding_attention" if sliding_window is not None else "full_attention"
        return mask.get(key, mask.get("full_attention"))
    return mask


def _mask(
    seg: Segment, kv_len: int, sliding_window: int | None, dtype: torch.dtype, fold: int | None
) -> tuple[torch.Tensor | None, bool]:
    """A segment's attention mask over ``kv_len`` keys, and whether ``_packed_gqa`` runs it
    (``fold``: the query heads per KV head when the heads may be folded, half precision on
    sdpa, else None): then the mask comes folded for it (``_fold_mask``)."""
    if seg.mask is not None:
        mask = _segment_mask(seg, sliding_window)
        mask = None if mask is None else mask[..., :kv_len]
    else:
        mask = _causal_mask(seg.positions, kv_len, sliding_window, dtype)
    # No mask: one query token (several without a mask are causal in the base call).
    rows = seg.stop - seg.start
    shared = rows == 1 if mask is None else mask.dim() == 4 and mask.shape[1] == 1
    if fold is None or not shared:
        return mask, False
    return _fold_mask(mask, fold), True


def _fold_mask(mask: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """A mask shared by all heads ``[1, 1, S, K]`` tiled for ``groups`` query heads folded into
    rows of their KV head (``[1, 1, groups*S, K]``, as ``_packed_gqa`` lays the rows out)."""
    return mask.repeat(1, 1, groups, 1) if mask is not None and groups > 1 else mask


def _packed_gqa(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Queries ``[1, H, S, d]`` over their own cache ``[1, kvh, K, d]``, with no mask or an
    additive mask shared by all heads and tiled for the fold (``_fold_mask``: ``[1, 1, g*S,
    K]``), the query heads folded into rows of their KV head (``[1, kvh, g*S, d]``): returns
    ``[1, S, H, d]``.

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
    packed = query.reshape(
        1, keys.shape[1], heads // keys.shape[1] * rows, dim
    )  # a view: heads in kvh groups
    out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(1, heads, rows, dim).transpose(1, 2).contiguous()


def _poolable(seg: Segment) -> bool:
    """Whether ``attend_pooled`` can take the segment: at most ``POOL_ROWS`` rows, no split
    attention, and no mask or one shared by all heads with a row per query row."""
    rows = seg.stop - seg.start
    if seg.split is not None or rows > POOL_ROWS:
        return False
    mask = _segment_mask(seg, None)
    return mask is None or (mask.dim() == 4 and mask.shape[:3] == (1, 1, rows))


def _pooled(seg: Segment, layer: int) -> PoolLayer | None:
    """The segment's layer ``layer`` when it lives in a ``KVPool`` slot with room for its
    rows, else None."""
    layers = getattr(seg.cache, "layers", None)
    if not layers or len(layers) <= layer:
        return None
    got = layers[layer]
    if type(got) is not PoolLayer or not got.pooled or not got.is_initialized:
        return None
    fits = got.length + seg.stop - seg.start <= got._lease.pool.max_capacity
    return got if fits else None


# What one attention call costs on this 2-core CPU in bfloat16 (sdpa, one query token folded
# to 3 rows per KV head), in us: alone, a call costs about 20 plus 10 a slot and 0.13 a key per
# slot, and one segment by itself about 65 plus 0.13 a key. Inside a step the caches are cold
# (the linears just streamed 270 MB of weights) and every call wakes the thread pool: with the
# alone figures, a 12-segment step split into 5 runs and its attention took 34 ms (33.8 one
# call per segment); priced at 150 a call and 200 a lone segment, runs merge (idle slots and
# padding included) and it took 26 ms. Padding or an idle slot is still not free. More query
# rows a slot cost a fifth more per row (12 slots of 400 keys: 437, 443, 598, 758 us at 1, 2,
# 3 and 6 rows). Since the engine thread's workers spin instead of sleeping (threads.py), call
# and lone-segment prices of 20/65, 60/100, 150/200 and 300/400 give the same all-at-once
# phase within noise (medians 6.86-7.05 s, interleaved): kept.
_CALL_US, _SLOT_US, _KEY_US, _ALONE_US, _ROW_SHARE = 150.0, 10.0, 0.13, 200.0, 0.2
# Segments of at most this many rows join a pooled call (one-token decode rows, Stage-2 belt
# rows, forced feeds); a longer prefill chunk keeps a call of its own. (The decode kernel is
# faster than the folded sdpa call alone at any size: us, 9 heads over 3, causal rows after 300
# cached keys, 8 rows 60 vs 94, 64 rows 425 vs 611, 512 rows 5611 vs 7596; but taking every
# pooled segment, and a lone request's rows, left bench serve's phases where they were: 4.8-5.3
# vs 5.0-5.3 s all at once, 23.4-23.8 vs 22.9-23.0 s one at a time.)
POOL_ROWS = 8


def _keys_us(keys: int, rows: int) -> float:
    return _KEY_US * keys * (1.0 + _ROW_SHARE * (rows - 1))


def _run_cost(slots: int, span: int, rows: int = 1) -> float:
    return _CALL_US + slots * (_SLOT_US + _keys_us(span, rows))


def _allowed(seg: Segment, have: int) -> torch.Tensor | None:
    """Which of the ``have + S`` keys each of the segment's S rows sees (``[S, have + S]``
    bool), or None when every row sees all of them (one row, no mask)."""
    need = have + seg.stop - seg.start
    mask = _segment_mask(seg, None)
    if mask is None:  # a plain call: as the per-segment path's causal mask
        return _causal_allowed(seg.positions, need, None)
    mask = mask[0, 0, :, :need]
    return mask if mask.dtype == torch.bool else mask == 0


def _plan(
    slots: list[int], have: list[int], segs: list[Segment], groups: int, device: torch.device
) -> Any:
    """One step's plan for ``attend_pooled`` (the same at every layer): segments grouped by
    pool slot into runs of nearby slots, each one attention call.

    Segments are taken in slot order; one joins the current run when that costs less than a
    call of its own (``_run_cost``: idle slots between, padding to the run's longest cache and
    to its most rows per slot). A run lays ``r`` query rows out per slot (its most); an idle
    slot, or a row past a segment's own, gets a copy of a member's first query and sees its
    slot's first key only: its output is dropped. Returns ``(slot_t, pos_t, col_t, q_cols,
    runs, pick, reach)``: where the new keys go (``[n]`` slots and positions, a row per new
    token) and come from (``[n]`` columns), ``q_cols`` ``[R]`` the query column of every run row,
    per run ``(i, j, a, b, r, L, mask)`` (run rows ``[i, j)``, slots ``[a, b)``, ``r`` rows a
    slot, keys ``[:L]``, a ``[b - a, 1, groups * r or 1, L]`` bool mask or None when every row
    sees all L keys), ``pick`` ``[n]`` the run rows of the segments' rows in their order (None:
    the same), and ``reach``, the highest slot and longest cache after the step (how far the
    buffers must reach).
    """
    rows = [seg.stop - seg.start for seg in segs]
    need = [h + r for h, r in zip(have, rows, strict=True)]
    order = sorted(range(len(slots)), key=slots.__getitem__)
    members_of: list[list[int]] = []
    for i in order:
        if members_of:
            run = members_of[-1]
            a, span, most = slots[run[0]], max(need[k] for k in run), max(rows[k] for k in run)
            joined = _run_cost(slots[i] - a + 1, max(span, need[i]), max(most, rows[i]))
            alone = _ALONE_US + _keys_us(need[i], rows[i])
            if joined - _run_cost(slots[run[-1]] - a + 1, span, most) < alone:
                run.append(i)
                continue
        members_of.append([i])
    slot_l, pos_l, col_l, q_cols = [], [], [], []
    pick = [[] for _ in segs]
    runs = []
    for members in members_of:
        a, b = slots[members[0]], slots[members[-1]] + 1
        r = max(rows[i] for i in members)
        span = max(need[i] for i in members)
        first = segs[members[0]].start
        col = [first] * ((b - a) * r)
        seen = torch.zeros(b - a, r, span, dtype=torch.bool, device=device)
        seen[:, :, 0] = True  # idle slots and padding rows: their slot's first key
        for i in members:
            k, seg = slots[i] - a, segs[i]
            for s in range(rows[i]):
                col[k * r + s] = seg.start + s
                pick[i].append(len(q_cols) + k * r + s)
                slot_l.append(slots[i])
                pos_l.append(have[i] + s)
                col_l.append(seg.start + s)
            allowed = _allowed(seg, have[i])
            seen[k, : rows[i]] = False
            seen[k, : rows[i], : need[i]] = True if allowed is None else allowed
        mask = None
        if not bool(seen.all()):
            mask = seen[:, None]  # [b - a, 1, r, L]
            if r > 1:  # rows of each folded query head: head-major, as _fold_mask lays them
                mask = mask.repeat(1, groups, 1, 1).reshape(b - a, 1, groups * r, span)
        runs.append((len(q_cols), len(q_cols) + len(col), a, b, r, span, mask))
        q_cols += col
    picked = [row for rows_of in pick for row in rows_of]

    def as_tensor(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, device=device)

    same = picked == list(range(len(q_cols)))
    return (
        as_tensor(slot_l),
        as_tensor(pos_l),
        as_tensor(col_l),
        as_tensor(q_cols),
        runs,
        None if same else as_tensor(picked),
        (max(slots), max(need)),
    )


def _kernel_plan(
    slots: list[int], have: list[int], segs: list[Segment], device: torch.device
) -> Any:
    """One step's plan for the decode kernel (the same at every layer): a kernel row per
    segment row, in the segments' order. Returns ``(slot_t, pos_t, col_t, lens, mask, reach)``:
    where the new keys go and come from as in ``_plan`` (``[n]`` each; here also each row's
    slot and query column), ``lens`` ``[n]`` the keys each row reads (up to the last key it
    sees), ``mask`` ``[n, L]`` bool or None when every row sees all of its ``lens`` keys (a
    plain or causal row; a Stage-2 belt row does not), and ``reach`` as in ``_plan``.
    """
    slot_l, pos_l, col_l, lens_l, seen = [], [], [], [], []
    masked = False
    for slot, h, seg in zip(slots, have, segs, strict=True):
        rows = seg.stop - seg.start
        slot_l.append(torch.full((rows,), slot))
        pos_l.append(torch.arange(h, h + rows))
        col_l.append(torch.arange(seg.start, seg.stop))
        allowed = _allowed(seg, h)  # [rows, h + rows] bool, or None: every key
        if allowed is None:
            lens_l.append(torch.full((rows,), h + rows))
            seen.append(None)
            continue
        reach = (allowed * torch.arange(1, allowed.shape[1] + 1)).amax(1)  # last key seen + 1
        lens_l.append(reach)
        seen.append(allowed)
        # A row is a prefix of the keys when it sees as many keys as its reach.
        masked = masked or not bool((allowed.sum(1) == reach).all())
    lens = torch.cat(lens_l)
    mask = None
    if masked:
        mask = torch.zeros(lens.shape[0], int(lens.max()), dtype=torch.bool)
        at = 0
        for allowed, rows in zip(seen, (seg.stop - seg.start for seg in segs), strict=True):
            if allowed is None:
                mask[at : at + rows] = torch.arange(mask.shape[1]) < lens[at : at + rows, None]
            else:
                width = min(allowed.shape[1], mask.shape[1])
                mask[at : at + rows, :width] = allowed[:, :width]
            at += rows
        mask = mask.to(device)
    need = max(h + seg.stop - seg.start for h, seg in zip(have, segs, strict=True))
    return (
        torch.cat(slot_l).to(device),
        torch.cat(pos_l).to(device),
        torch.cat(col_l).to(device),
        lens.to(device),
        mask,
        (max(slots), need),
    )


def _attend_kernel(
    kernel: DecodeKernel,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: Any,
    layers: list[PoolLayer],
    segs: list[Segment],
    scaling: float | None,
) -> torch.Tensor:
    """``attend_pooled`` on the decode kernel (runtime/decode_kernel.py), with the step's
    ``_kernel_plan``: every row of every segment in one call, each over exactly its own slot's
    keys (no runs, no padding); the kernel writes the step's keys and values first."""
    slot_t, pos_t, col_t, lens, mask, (top, most) = plan
    k_buf, v_buf = layers[0]._lease.pool.room(layers[0].index, top, most, key, value)
    for pl, seg in zip(layers, segs, strict=True):
        pl.length += seg.stop - seg.start
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    new = (key[0], value[0], pos_t)
    return kernel.attend(query[0], k_buf, v_buf, col_t, slot_t, lens, mask, scale, new)


def attend_pooled(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segs: list[Segment],
    layers: list[PoolLayer],
    scaling: float | None,
    plans: dict[Any, Any],
) -> torch.Tensor:
    """Short segments (at most ``POOL_ROWS`` rows) of several caches in one ``KVPool``:
    returns ``[n, H, d]``, the segments' rows in order. In bfloat16 on a CPU, where the decode
    kernel is had (runtime/decode_kernel.py), one kernel call takes every row over its own keys
    (``_attend_kernel``); otherwise, as described below, one sdpa call per run of slots.

    ``query`` ``[1, H, T, d]`` and ``key``/``value`` ``[1, kvh, T, d]`` are the step's; ``segs``
    the segments (their columns, rows and masks: none, causal or a Stage-2 belt), ``layers``
    their caches' ``PoolLayer`` at this layer (same pool, same layer index). Each new key/value
    is written to its slot after the cached ones (one indexed write for all), then each run
    attends over the view ``[a:b, :, :L]`` of the pool, query heads folded into rows of their
    KV head as in ``_packed_gqa``. A row sees exactly the keys it sees in its own call (the
    mask hides the rest of the padded view); the result equals one call per segment up to the
    kernel's rounding. ``plans`` keeps the step's plan (``_plan``) across layers.
    """
    # The kernel reads host memory: bfloat16 on the CPU only (a GPU's pool stays on sdpa).
    on_cpu = query.device.type == "cpu"
    kernel = decode_kernel() if query.dtype == torch.bfloat16 and on_cpu else None
    pool = layers[0]._lease.pool
    slots = [pl._lease.slot for pl in layers]
    have = [pl.length for pl in layers]
    kvh, heads, dim = key.shape[1], query.shape[1], query.shape[-1]
    groups = heads // kvh
    plan_key = (tuple(slots), tuple(have), tuple((seg.start, seg.stop) for seg in segs))
    plan = plans.get(plan_key)
    if plan is None:
        plan = plans[plan_key] = (
            _plan(slots, have, segs, groups, query.device)
            if kernel is None
            else _kernel_plan(slots, have, segs, query.device)
        )
    if kernel is not None:
        return _attend_kernel(kernel, query, key, value, plan, layers, segs, scaling)
    slot_t, pos_t, col_t, q_cols, runs, pick, (top, most) = plan
    k_buf, v_buf = pool.room(layers[0].index, top, most, key, value)
    k_buf[slot_t, :, pos_t] = key[0].index_select(1, col_t).transpose(0, 1)  # [n, kvh, d]
    v_buf[slot_t, :, pos_t] = value[0].index_select(1, col_t).transpose(0, 1)
    for pl, seg in zip(layers, segs, strict=True):
        pl.length += seg.stop - seg.start
    q = query[0].index_select(1, q_cols).transpose(0, 1)  # [R, H, d]
    outs = []
    for i, j, a, b, r, span, mask in runs:
        # [(b - a) * r, H, d] -> [b - a, kvh, g * r, d]: a slot's rows of each KV head's
        # query heads, head-major.
        qr = q[i:j].reshape(b - a, r, kvh, groups, dim).permute(0, 2, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qr.reshape(b - a, kvh, groups * r, dim),
            k_buf[a:b, :, :span],
            v_buf[a:b, :, :span],
            attn_mask=mask,
            scale=scaling,
        )  # [b - a, kvh, g * r, d]
        out = out.reshape(b - a, kvh, groups, r, dim).permute(0, 3, 1, 2, 4)
        outs.append(out.reshape((b - a) * r, heads, dim))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out if pick is None else out.index_select(0, pick)


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
    # Short segments whose caches share a KVPool: one attention call per run of slots.
    by_pool: dict[int, dict[int, PoolLayer]] = {}
    if fold_heads and sliding_window is None and len(segments) > 1:
        for i, seg in enumerate(segments):
            if _poolable(seg) and (got := _pooled(seg, layer)) is not None:
                by_pool.setdefault(id(got._lease.pool), {})[i] = got
    groups = [group for group in by_pool.values() if len(group) > 1]
    pooled = {i for group in groups for i in group}
    outs: list[torch.Tensor | None] = []
    # Every other segment: one small attention each, on the function the model was loaded with
    # (so each segment computes exactly what its call computes alone).
    for i, seg in enumerate(segments):
        if i in pooled:
            outs.append(None)
            continue
        a, b = seg.start, seg.stop
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        if seg.split is not None:
            seg.cache.update(k, v, layer)  # scatter into the branch slots set by the decoder
            out, _ = split_attention(
                module, q, k, v, None, scaling, dropout, softcap, sliding_window, seg.split
            )
        else:
            keys, values = seg.cache.update(k, v, layer)  # [1, kvh, K, d], this call's only
            # The same at every layer of the step (of one kind): made once.
            fold = query.shape[1] // key.shape[1] if fold_heads else None  # heads per KV head
            memo = (i, keys.shape[-2], sliding_window, fold)
            got = ragged_layout.plans.get(memo)
            if got is None:
                got = ragged_layout.plans[memo] = _mask(
                    seg, keys.shape[-2], sliding_window, query.dtype, fold
                )
            mask, folded = got
            if folded:
                outs.append(_packed_gqa(q, keys, values, mask, scaling))
                continue
            out, _ = base(module, q, keys, values, mask, scaling=scaling, dropout=dropout, **extra)
        outs.append(out)  # [1, S, H, d]
    for group in groups:
        segs = [segments[i] for i in group]
        layers = list(group.values())
        got = attend_pooled(query, key, value, segs, layers, scaling, ragged_layout.plans)
        if len(group) == len(segments):
            return got[None], None  # the segments' rows in column order: every row
        sizes = [seg.stop - seg.start for seg in segs]
        for i, rows in zip(group, got.split(sizes), strict=True):
            outs[i] = rows[None]  # [1, S, H, d]
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], None


AttentionInterface.register(RAGGED_ATTENTION, ragged_attention)
