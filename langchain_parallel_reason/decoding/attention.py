"""Split (shared-prefix + per-branch) attention, plugged into stock models by name.

Contract: ``split_attention`` is registered in transformers' ``AttentionInterface`` as
``"parallel_reason_split"``. During Stage 2 the decoder swaps a model's attention implementation
to it (``use_split_attention``) and passes ``belt_layout=SplitLayout(...)`` to the forward; the
function then attends each query to the shared prefix (keys read once for all queries) and to its
own branch's contiguous keys, joined in one softmax, so no masked key is ever scanned. It honours
``scaling``, ``softcap`` and ``sliding_window`` (in positions) as the stock functions do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from .cache import BranchCache, prefix_kv

__all__ = [
    "SPLIT_ATTENTION",
    "SplitLayout",
    "attention_configs",
    "split_attention",
    "use_split_attention",
]

SPLIT_ATTENTION = "parallel_reason_split"


@dataclass
class SplitLayout:
    """Where this forward's queries sit.

    Attributes:
        cache: the Stage-2 BranchCache.
        q_slot: ``[Q]`` slot of each query token. q_idx: ``[Q]`` index inside its branch.
        q_pos: ``[Q]`` position id (prefix_len + q_idx).
        span: keys to read per branch (max branch length after this step's writes).
        contiguous: True when query i is the single token of slot i (a plain decode step), so the
            branch keys are a view of the buffer instead of a gather.
    """

    cache: BranchCache
    q_slot: torch.Tensor
    q_idx: torch.Tensor
    q_pos: torch.Tensor
    span: int
    contiguous: bool


def split_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    belt_layout: SplitLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``[1, H, Q, d]`` queries over prefix + own branch. Returns ``[1, Q, H, d]``."""
    if belt_layout is None:
        msg = "parallel_reason_split attention needs belt_layout; it is only valid during Stage 2"
        raise RuntimeError(msg)
    lay = belt_layout
    cache = lay.cache
    layer = module.layer_idx
    heads, q_len, dim = query.shape[1], query.shape[2], query.shape[3]
    kp, vp = prefix_kv(cache.prefix, layer)  # [1, kvh, P, d]
    kvh, plen = kp.shape[1], kp.shape[2]
    group = heads // kvh
    scale = dim**-0.5 if scaling is None else scaling

    # Prefix part: all Q queries share the prefix keys -> one batched matmul per KV head.
    q = query[0].reshape(kvh, group, q_len, dim)  # [kvh, g, Q, d]
    s_pre = torch.matmul(q.reshape(kvh, group * q_len, dim), kp[0].transpose(-1, -2))
    s_pre = s_pre.view(kvh, group, q_len, plen).permute(2, 0, 1, 3)  # [Q, kvh, g, P]

    # Branch part: each query against its own branch's keys [span].
    k_buf, v_buf = cache.keys[layer], cache.values[layer]
    if lay.contiguous:
        kb, vb = k_buf[:q_len, :, : lay.span], v_buf[:q_len, :, : lay.span]  # views
    else:
        kb, vb = k_buf[lay.q_slot, :, : lay.span], v_buf[lay.q_slot, :, : lay.span]
    qb = q.permute(2, 0, 1, 3)  # [Q, kvh, g, d]
    s_br = torch.matmul(qb, kb.transpose(-1, -2))  # [Q, kvh, g, span]

    scores = torch.cat([s_pre, s_br], dim=-1).float() * scale  # [Q, kvh, g, P + span]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    idx = torch.arange(lay.span, device=query.device)
    allowed_br = idx[None, :] <= lay.q_idx[:, None]  # [Q, span] causal inside the branch
    if sliding_window is not None:
        # Positions, not columns: branch key j sits at prefix_len + j.
        allowed_br &= (lay.q_pos[:, None] - (plen + idx)[None, :]) < sliding_window
        pre_pos = torch.arange(plen, device=query.device)
        allowed_pre = (lay.q_pos[:, None] - pre_pos[None, :]) < sliding_window  # [Q, P]
    else:
        allowed_pre = torch.ones(q_len, plen, dtype=torch.bool, device=query.device)
    allowed = torch.cat([allowed_pre, allowed_br], dim=-1)[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).to(vp.dtype)

    p_pre = probs[..., :plen].permute(1, 2, 0, 3).reshape(kvh, group * q_len, plen)
    out_pre = torch.matmul(p_pre, vp[0]).view(kvh, group, q_len, dim).permute(2, 0, 1, 3)
    out_br = torch.matmul(probs[..., plen:], vb)  # [Q, kvh, g, d]
    out = (out_pre + out_br).reshape(q_len, heads, dim)
    return out.unsqueeze(0), None


AttentionInterface.register(SPLIT_ATTENTION, split_attention)


def attention_configs(model: torch.nn.Module) -> list:
    """Every distinct config object an attention module may read `_attn_implementation` from."""
    seen: dict[int, object] = {id(model.config): model.config}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextlib.contextmanager
def use_split_attention(model: torch.nn.Module) -> Iterator[None]:
    """Route the model's attention through ``split_attention`` inside the block, then restore.

    Callers must not run other forwards on the same model concurrently. A model that batches
    its forwards (an engine's view, ``batches_forwards``) is left alone: its scheduler selects
    the attention of each call.
    """
    if getattr(model, "batches_forwards", False):
        # An engine's view of the model: its scheduler picks the attention per call.
        yield
        return
    configs = attention_configs(model)
    saved = [cfg._attn_implementation for cfg in configs]
    try:
        for cfg in configs:
            cfg._attn_implementation = SPLIT_ATTENTION
        yield
    finally:
        for cfg, impl in zip(configs, saved, strict=True):
            cfg._attn_implementation = impl
