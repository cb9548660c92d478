"""Stage 3 without re-prefill: the branches' own KV laid out one after another in the cache.

Contract: ``lay_out_branches(model, cache, branch_kv, glue_ids)`` takes a ``DynamicCache`` holding
exactly the prefix (P tokens) and each branch's keys/values as Stage 2 left them (token k of every
branch at position P + k), and leaves the cache holding the row ``prefix, branch 0, glue 0,
branch 1, glue 1, ...`` as if it had been written in that order: each branch's keys are re-rotated
(RoPE is a rotation by position, so R(p + d) k = R(d) R(p) k) from position P + k to their place in
the row, and the glue tokens (separators, the conclusion cue) run in ONE forward whose mask lets
each see exactly what precedes it in the row. The cache's columns are then a permutation of the
positions 0..T-1, so decoding goes on at position T with a plain causal forward (every column is
visible to it), from the logits the glue forward returns. ``kv_reuse_problem(model)`` says why a
model cannot do this (None when it can).

What is not exact: a branch's KV was computed while it saw the prefix and itself only, where a
re-prefill of the row lets step b's tokens attend to steps 0..b-1. Branch 0 and the glue right
after it are exact (they see the same tokens either way); so is every branch's first layer.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicCache

from .cache import cache_kwarg
from .masks import model_mask_kind, to_additive
from .sequential import Cancelled

__all__ = ["BranchKV", "kv_reuse_problem", "lay_out_branches", "rotate_keys"]

BranchKV = list[tuple[torch.Tensor, torch.Tensor]]
"""One branch's cache: per layer, keys and values ``[1, kv_heads, L, head_dim]``."""

# Architectures whose attention applies the rotate-half RoPE from ``model.get_decoder()``'s
# ``rotary_emb`` to every layer (Gemma2/3 slide and Gemma3 has two rotaries: not here).
_ROPE_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3"})
# RoPE kinds whose frequencies do not depend on the sequence length (dynamic NTK and longrope
# change them with the length, so a key's rotation is not a function of its position alone).
_STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})
_MASK_IMPLEMENTATIONS = frozenset({"eager", "sdpa"})


def _text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rotary(model: torch.nn.Module) -> torch.nn.Module | None:
    try:
        decoder = model.get_decoder()
    except (AttributeError, ValueError):
        return None
    return getattr(decoder, "rotary_emb", None)


def kv_reuse_problem(model: torch.nn.Module) -> str | None:
    """Why ``lay_out_branches`` cannot serve ``model``, or None when it can."""
    model_type = getattr(_text_config(model), "model_type", "")
    if model_type not in _ROPE_ARCHITECTURES:
        return f"tested for {sorted(_ROPE_ARCHITECTURES)} only, not {model_type!r}"
    if model_mask_kind(model)[1] is not None:
        return "the model has a sliding window"
    impl = (
        getattr(model, "base_attn_implementation", None)
        or getattr(model.config, "_attn_implementation", None)
        or "eager"
    )
    if impl not in _MASK_IMPLEMENTATIONS:
        return f"attn_implementation={impl!r} cannot take the layout's 4D mask (use sdpa or eager)"
    rotary = _rotary(model)
    if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        return "no rotary embedding found on the model's decoder"
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        return f"rope_type={rope_type!r} changes its frequencies with the sequence length"
    return None


def rotate_keys(keys: torch.Tensor, inv_freq: torch.Tensor, shift: int) -> torch.Tensor:
    """``keys`` ``[..., L, head_dim]`` (RoPE applied at some positions) rotated ``shift``
    positions further, as if they had been computed there.

    ``inv_freq`` ``[R / 2]`` are the rotary frequencies; only the first R dims rotate (partial
    rotary), in the rotate-half layout transformers uses. Computed in float32.
    """
    if shift == 0:
        return keys
    rot = 2 * inv_freq.shape[0]
    angles = shift * inv_freq.to(device=keys.device, dtype=torch.float32)  # [R / 2]
    emb = torch.cat((angles, angles))  # [R]
    cos, sin = emb.cos(), emb.sin()
    k = keys[..., :rot].float()
    half = rot // 2
    rotated_half = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    out = (k * cos + rotated_half * sin).to(keys.dtype)
    return torch.cat((out, keys[..., rot:]), dim=-1) if rot < keys.shape[-1] else out


def lay_out_branches(
    model: torch.nn.Module,
    cache: DynamicCache,
    branch_kv: Sequence[BranchKV],
    glue_ids: Sequence[Sequence[int]],
    *,
    cancel: threading.Event | None = None,
) -> tuple[int, torch.Tensor | None]:
    """Lay the branches and their glue out in ``cache`` as one row (see the module docstring).

    Args:
        model: the model that decoded the branches (``kv_reuse_problem(model)`` must be None).
        cache: holds exactly the prefix (P tokens, positions 0..P-1); extended in place.
        branch_kv: per branch, its keys/values for its first ``L_b`` tokens (positions P..).
        glue_ids: per branch, the tokens that follow it in the row (may be empty).
        cancel: checked before the glue forward.

    Returns:
        (T, logits): the row's length (the cache holds T columns and the next token sits at
        position T) and the ``[V]`` logits after the last glue token (None without glue).
    """
    if len(branch_kv) != len(glue_ids):
        msg = f"one glue list per branch: {len(branch_kv)} branches, {len(glue_ids)} glue lists"
        raise ValueError(msg)
    prefix_len = cache.get_seq_length()
    inv_freq = _rotary(model).inv_freq
    device = model.get_input_embeddings().weight.device
    # Column positions in cache order: the prefix, then every branch moved to its place.
    col_pos = [torch.arange(prefix_len, device=device)]
    glue_pos: list[int] = []
    pos = prefix_len
    for kv, glue in zip(branch_kv, glue_ids, strict=True):
        length = kv[0][0].shape[-2]
        shift = pos - prefix_len  # branch token k moves from P + k to pos + k
        # Inference mode: a cache that grows in place (the engine's) writes into inference
        # tensors, which autograd forbids outside it.
        with torch.inference_mode():
            for layer, (keys, values) in enumerate(kv):
                cache.update(rotate_keys(keys, inv_freq, shift), values, layer)
        col_pos.append(torch.arange(pos, pos + length, device=device))
        pos += length
        glue_pos.extend(range(pos, pos + len(glue)))
        pos += len(glue)
    glue = [int(t) for g in glue_ids for t in g]
    if not glue:
        return pos, None
    if cancel is not None and cancel.is_set():
        raise Cancelled("decoding cancelled")
    q_pos = torch.tensor(glue_pos, device=device)  # [G]
    # Columns after this forward: [K] = the prefix, the branches, then the glue itself.
    cols = torch.cat([*col_pos, q_pos])
    dtype = model.get_input_embeddings().weight.dtype
    mask = to_additive(cols[None, :] <= q_pos[:, None], dtype)  # [1, 1, G, K]
    if model_mask_kind(model)[0] == "dict":
        mask = {"full_attention": mask, "sliding_attention": mask}
    ids = torch.tensor(glue, device=device)
    with torch.inference_mode():
        out = model(
            input_ids=ids[None],
            position_ids=q_pos[None],
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=torch.tensor([ids.shape[0] - 1], device=device),
            **{cache_kwarg(model): cache},
        )
    return pos, out.logits[0, -1]
