"""A Llama model's forward as one plain loop over its own modules (gpt-fast style).

Contract: ``lean_forward(model)`` returns a ``LeanForward`` for a stock transformers
``LlamaForCausalLM`` (SmolLM2, the embedded model, is one) and None for any other model, with
the reason in ``lean_problem(model)``. ``lean.hidden(ids, positions, attention, **kw)`` runs the
decoder over ``ids`` ``[1, T]`` at ``positions`` ``[1, T]`` and returns the final-norm hidden
states ``[1, T, D]``; ``attention(module, q, k, v, None, scaling=..., dropout=0.0, **kw)`` is an
attention function of transformers' interface (queries ``[1, H, T, d]``, keys/values
``[1, kvh, T, d]`` of this step only: the function owns the cache) returning ``[1, T, H, d]``.
The caller applies the head to the rows it keeps.

It runs the very modules transformers' forward runs, in the same order, on the same tensors,
so its hidden states equal the stock forward's bit for bit (tested in float32 and bfloat16).
What it leaves out is the per-layer Python around them: keyword plumbing, deprecation and
output-capture decorators, mask building (the attention function brings its own masks), cache
objects, and each module's ``__call__`` (their ``forward`` runs directly: a module with a forward
hook makes ``hooked()`` true, and then the caller runs the model's own forward). On the 2-core
CPU that is 6-10 ms of a 36-58 ms forward of the embedded model at 1-24 rows in bfloat16
(docs/profile.md), and the ``__call__``s another 0.9 ms of a 47 ms 12-row step.

RoPE: ``rotate_half(x) * sin`` is ``roll(x, d/2) * sin'`` where ``sin'`` is ``sin`` with its first
half negated (a sign flip is exact), so each layer rotates with a roll instead of two slices, a
negation and a concatenation, bit for bit; where q/k/v come from one fused GEMM
(``decoding/packing.FusedLinear``) q and k are rotated together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["LeanForward", "lean_forward", "lean_problem"]


def lean_problem(model: Any) -> str | None:
    """Why ``lean_forward`` does not apply to ``model`` (None when it does)."""
    try:
        from transformers.models.llama import modeling_llama as llama
    except ImportError:  # pragma: no cover - transformers always ships Llama
        return "transformers has no Llama module"
    if type(model) is not llama.LlamaForCausalLM:
        return f"{type(model).__name__} is not a stock LlamaForCausalLM"
    if model.training:
        return "the model is in training mode"
    if getattr(model.config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1 splits the linears"
    expected = {
        "layer": llama.LlamaDecoderLayer,
        "attention": llama.LlamaAttention,
        "mlp": llama.LlamaMLP,
    }
    for layer in model.model.layers:
        found = {"layer": layer, "attention": layer.self_attn, "mlp": layer.mlp}
        for part, cls in expected.items():
            if type(found[part]) is not cls:
                return f"a {part} is {type(found[part]).__name__}, not {cls.__name__}"
    for name, module in model.named_modules():
        # accelerate's placement hooks and any forward hook would be skipped by a direct loop.
        if getattr(module, "_hf_hook", None) is not None:
            return f"{name or 'the model'} has an accelerate hook (device_map placement)"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{name or 'the model'} has forward hooks"
    return None


def lean_forward(model: Any) -> LeanForward | None:
    """A ``LeanForward`` over ``model``, or None where ``lean_problem`` names a reason."""
    return None if lean_problem(model) is not None else LeanForward(model)


class LeanForward:
    """The decoder of a stock ``LlamaForCausalLM`` as a loop (see the module docstring).

    Args:
        model: the model (``lean_problem(model)`` must be None); its modules are shared, not
            copied.
    """

    def __init__(self, model: Any) -> None:
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.layers = list(inner.layers[: model.config.num_hidden_layers])
        self.modules = list(model.modules())
        # Per layer, the fused q/k/v GEMM when the loader packed one, else None.
        self.fused_qkv = [_fused_qkv(layer.self_attn) for layer in self.layers]

    def hooked(self) -> bool:
        """Whether a forward hook now sits on the model or any of its modules (or globally):
        ``hidden`` would skip it, so the caller runs the model's own forward instead."""
        from torch.nn.modules import module as nn_module

        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)

    def hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        attention: Callable[..., tuple[torch.Tensor, Any]],
        **kwargs: Any,
    ) -> torch.Tensor:
        """Final-norm hidden states ``[1, T, D]`` of ``ids`` ``[1, T]`` at ``positions``."""
        h = self.embed.forward(ids)  # [1, T, D]
        cos, sin = self.rotary.forward(h, position_ids=positions)  # [1, T, d] each
        half = cos.shape[-1] // 2
        # [1, T, 1, d]: broadcast over the heads of a [1, T, heads, d] view.
        cos, sin = cos[:, :, None], torch.cat([-sin[..., :half], sin[..., half:]], -1)[:, :, None]
        shape = (*ids.shape, -1)
        for layer, fused in zip(self.layers, self.fused_qkv, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm.forward(h)
            heads = (*ids.shape, -1, attn.head_dim)
            if fused is not None:
                q_size, k_size, _ = fused.sizes
                qkv = fused.forward(x)  # [1, T, (H + 2 kvh) d]
                qk = qkv[..., : q_size + k_size].view(heads)  # [1, T, H + kvh, d]
                qk = _rotate(qk, cos, sin)  # q and k together
                q = qk[:, :, : q_size // attn.head_dim].transpose(1, 2)  # [1, H, T, d]
                k = qk[:, :, q_size // attn.head_dim :].transpose(1, 2)  # [1, kvh, T, d]
                v = qkv[..., q_size + k_size :].view(heads).transpose(1, 2)
            else:
                q = _rotate(attn.q_proj.forward(x).view(heads), cos, sin).transpose(1, 2)
                k = _rotate(attn.k_proj.forward(x).view(heads), cos, sin).transpose(1, 2)
                v = attn.v_proj.forward(x).view(heads).transpose(1, 2)
            out, _ = attention(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling, **kwargs)
            h = h + attn.o_proj.forward(out.reshape(shape).contiguous())  # out: [1, T, H, d]
            x = layer.post_attention_layernorm.forward(h)
            gate, up = mlp.gate_proj.forward(x), mlp.up_proj.forward(x)
            h = h + mlp.down_proj.forward(mlp.act_fn.forward(gate) * up)
        return self.norm.forward(h)


def _fused_qkv(attn: Any) -> Any:
    """The ``FusedLinear`` whose parts are ``attn``'s q, k and v in that order, or None."""
    from .packing import LinearPart

    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    if not all(isinstance(p, LinearPart) for p in parts):
        return None
    fused = parts[0].fused
    same = all(p.fused is fused for p in parts) and [p.index for p in parts] == [0, 1, 2]
    return fused if same else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``[1, T, heads, d]`` with ``cos`` and the sign-flipped ``sin`` ``[1, T, 1,
    d]`` (see the module docstring): ``rotate_half(x) * sin`` as ``roll(x, d/2) * sin'``."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
