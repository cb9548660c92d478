"""A Llama model's forward as one plain loop over its own modules (gpt-fast style).

Contract: ``lean_forward(model)`` returns a ``LeanForward`` for a stock transformers
``LlamaForCausalLM`` (SmolLM2, the embedded model, is one) and None for any other model, with
the reason in ``lean_problem(model)``. ``lean.hidden(ids, positions, attention, **kw)`` runs the
decoder over ``ids`` ``[1, T]`` at ``positions`` ``[1, T]`` and returns the final-norm hidden
states ``[1, T, D]``; ``attention(module, q, k, v, None, scaling=..., dropout=0.0, **kw)`` is an
attention function of transformers' interface (queries ``[1, H, T, d]``, keys/values
``[1, kvh, T, d]`` of this step only: the function owns the cache) returning ``[1, T, H, d]``.
The caller applies the head to the rows it keeps.

It calls the very modules transformers' forward calls, in the same order, on the same tensors,
so its hidden states equal the stock forward's bit for bit (tested in float32 and bfloat16).
What it leaves out is the per-layer Python around them: keyword plumbing, deprecation and
output-capture decorators, mask building (the attention function brings its own masks), cache
objects. On the 2-core CPU that is 6-10 ms of a 36-58 ms forward of the embedded model at 1-24
rows in bfloat16 (docs/profile.md).
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
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.layers = list(inner.layers[: model.config.num_hidden_layers])
        self.rope = apply_rotary_pos_emb

    def hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        attention: Callable[..., tuple[torch.Tensor, Any]],
        **kwargs: Any,
    ) -> torch.Tensor:
        """Final-norm hidden states ``[1, T, D]`` of ``ids`` ``[1, T]`` at ``positions``."""
        h = self.embed(ids)  # [1, T, D]
        cos, sin = self.rotary(h, position_ids=positions)  # [1, T, d] each
        shape = (*ids.shape, -1)
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(h)
            heads = (*ids.shape, -1, attn.head_dim)
            q = attn.q_proj(x).view(heads).transpose(1, 2)  # [1, H, T, d]
            k = attn.k_proj(x).view(heads).transpose(1, 2)  # [1, kvh, T, d]
            v = attn.v_proj(x).view(heads).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            out, _ = attention(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling, **kwargs)
            h = h + attn.o_proj(out.reshape(shape).contiguous())  # out: [1, T, H, d]
            x = layer.post_attention_layernorm(h)
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.norm(h)
