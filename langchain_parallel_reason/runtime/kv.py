"""KV layers the engine gives the caches it serves: written in place, no copy per step.

Contract: a stock ``DynamicLayer`` concatenates every step's keys onto the whole cache, so a
decode step copies each live request's entire KV once per layer; with 16 requests that is
hundreds of MB per step on a CPU. ``SlabLayer`` keeps ``keys``/``values`` as ``[1, kvh, L, d]``
views of a buffer with room to grow (capacity doubles when full, so a sequence of length L is
copied O(log L) times in all): an update writes only the new tokens. ``adopt_slabs(cache)`` makes
an empty ``DynamicCache`` grow slab layers; the pipeline's code sees an ordinary DynamicCache.

Views handed out earlier stay valid for the tokens they cover, except after ``crop``: tokens
written after a crop overwrite the cropped ones in place (the pipeline never reads a view of
cropped tokens; the prefix cache copies what it stores).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["SlabLayer", "adopt_slabs"]

_MIN_CAPACITY = 64


class SlabLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of a growing buffer (see module)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k: torch.Tensor | None = None  # [1, kvh, capacity, d]
        self._v: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[1, kvh, S, d]`` new keys/values after the cached ones; return all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        have = self.get_seq_length()
        need = have + key_states.shape[-2]
        if self._k is None or need > self._k.shape[-2]:
            capacity = max(_MIN_CAPACITY, 1 << (need - 1).bit_length())
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
            k = key_states.new_empty(shape)
            v = value_states.new_empty((*shape[:3], value_states.shape[-1]))
            if have:
                k[:, :, :have] = self.keys
                v[:, :, :have] = self.values
            self._k, self._v = k, v
        self._k[:, :, have:need] = key_states
        self._v[:, :, have:need] = value_states
        self.keys = self._k[:, :, :need]
        self.values = self._v[:, :, :need]
        return self.keys, self.values

    def reset(self) -> None:
        """Drop the buffers too."""
        self._k = self._v = None
        super().reset()


def adopt_slabs(cache: DynamicCache) -> None:
    """Make an empty, config-less ``DynamicCache`` create ``SlabLayer`` layers (else no-op)."""
    if (
        type(cache) is DynamicCache
        and not cache.layers
        and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer
    ):
        cache.layer_class_to_replicate = SlabLayer
