"""KV caches for Stage 2.

Contract: ``BranchCache`` is the split-attention cache. It *references* the prefix keys/values of
an existing ``DynamicCache`` (stored once, never copied) and keeps each branch's own keys in a
preallocated, contiguous ``[slots, kv_heads, max_len, head_dim]`` buffer per layer, so a decode
step neither concatenates nor copies the growing cache. Before each forward the decoder sets the
write targets (slot and index of every query token); ``update`` scatters the new keys there.
Helpers ``prefix_kv``, ``kv_bytes`` and ``crop_to`` work on stock ``DynamicCache`` objects;
``cache_kwarg`` names the forward argument a cache is passed in.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache

__all__ = ["BranchCache", "cache_kwarg", "crop_to", "kv_bytes", "prefix_kv"]


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


def prefix_kv(cache: DynamicCache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[1, kv_heads, P, head_dim]`` keys and values a DynamicCache holds for one layer."""
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values


def kv_bytes(cache: Cache | None) -> int:
    """Bytes held by the key/value tensors of a cache (0 for None or an empty cache)."""
    if cache is None:
        return 0
    if isinstance(cache, BranchCache):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def crop_to(cache: DynamicCache, length: int) -> None:
    """Drop every cached token after the first ``length`` (no-op when already that short)."""
    # transformers 5.x crop() takes a negative count of tokens to drop from the end.
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


class BranchCache(Cache):
    """Prefix (shared, by reference) + per-branch contiguous buffers, for split attention.

    Args:
        prefix: a DynamicCache holding exactly the prefix in every layer (built without
            ``config`` so sliding layers keep every token; checked here).
        num_slots: branches decoded at once.
        max_len: most tokens any branch holds (forced prefix + new tokens).
    """

    is_compileable = False

    def __init__(self, prefix: DynamicCache, num_slots: int, max_len: int) -> None:
        # No stock layers: attention reads our buffers through the layout, never via layers.
        super().__init__(layers=[])
        self.prefix = prefix
        self.prefix_len = prefix.get_seq_length()
        for i, layer in enumerate(prefix.layers):
            n = layer.keys.shape[-2] if getattr(layer, "keys", None) is not None else 0
            if n != self.prefix_len:
                msg = (
                    f"prefix cache layer {i} holds {n} tokens, expected {self.prefix_len}: a cache "
                    "built with a sliding-window config drops old tokens; create it as "
                    "DynamicCache() without config"
                )
                raise ValueError(msg)
        self.num_slots = num_slots
        self.max_len = max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # Write targets of the current forward: [Q] slot and [Q] index inside the branch.
        self.write_slot: torch.Tensor | None = None
        self.write_idx: torch.Tensor | None = None

    def _buffers(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # like: [1, kv_heads, Q, head_dim]; buffers are allocated at the first write per layer.
        if layer_idx not in self.keys:
            shape = (self.num_slots, like.shape[1], self.max_len, like.shape[3])
            self.keys[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.values[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.keys[layer_idx], self.values[layer_idx]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Scatter this forward's ``[1, kv_heads, Q, d]`` keys/values to their branch slots.

        Returns the inputs unchanged: the split attention reads the buffers directly.
        """
        k_buf, v_buf = self._buffers(layer_idx, key_states)
        # k_buf[slot, :, idx] addresses [Q, kv_heads, d]; key_states[0] is [kv_heads, Q, d].
        k_buf[self.write_slot, :, self.write_idx] = key_states[0].transpose(0, 1)
        v_buf[self.write_slot, :, self.write_idx] = value_states[0].transpose(0, 1)
        return key_states, value_states

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` tokens of slot ``src`` into slot ``dst`` in every layer."""
        for buf in (*self.keys.values(), *self.values.values()):
            buf[dst, :, :length] = buf[src, :, :length]

    def slot_kv(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the first ``length`` keys/values of ``slot``: per layer ``[1, kv_heads,
        length, head_dim]`` each (a copy: the slot is reused once its branch has finished)."""
        return [
            (
                self.keys[i][slot, :, :length][None].clone(),
                self.values[i][slot, :, :length][None].clone(),
            )
            for i in sorted(self.keys)
        ]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Prefix length (branches do not extend the shared sequence)."""
        return self.prefix_len

    def nbytes(self) -> int:
        """Bytes of the branch buffers plus the referenced prefix."""
        own = sum(
            t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values())
        )
        return own + kv_bytes(self.prefix)
