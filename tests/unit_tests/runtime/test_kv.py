"""Slab layers hold exactly what a stock DynamicCache holds, through any updates and crops."""

from __future__ import annotations

import random

import torch
from transformers.cache_utils import DynamicCache

from langchain_parallel_reason.decoding.cache import crop_to
from langchain_parallel_reason.runtime.kv import SlabLayer, adopt_slabs


def test_a_slab_cache_equals_a_dynamic_cache_through_random_updates_and_crops() -> None:
    rng = random.Random(0)
    stock, slab = DynamicCache(), DynamicCache()
    adopt_slabs(slab)
    most = 0
    for _ in range(60):
        if rng.random() < 0.2 and stock.get_seq_length():
            length = rng.randrange(stock.get_seq_length())
            crop_to(stock, length)
            crop_to(slab, length)
        else:
            s = rng.randrange(1, 40)
            for layer in range(3):
                k, v = torch.randn(1, 2, s, 4), torch.randn(1, 2, s, 4)
                want = stock.update(k, v, layer)
                got = slab.update(k.clone(), v.clone(), layer)
                assert torch.equal(want[0], got[0])
                assert torch.equal(want[1], got[1])
        assert slab.get_seq_length() == stock.get_seq_length()
        most = max(most, slab.get_seq_length())
    assert all(isinstance(layer, SlabLayer) for layer in slab.layers)
    # Capacity doubles: the buffer never exceeds twice the most it held (or the minimum).
    assert slab.layers[0]._k.shape[-2] <= max(64, 2 * most)


def test_only_empty_config_less_caches_adopt_slabs() -> None:
    used = DynamicCache()
    used.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0)
    adopt_slabs(used)
    used.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 1)
    assert not any(isinstance(layer, SlabLayer) for layer in used.layers)
