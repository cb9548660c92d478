"""Slab and pool layers hold exactly what a stock DynamicCache holds, through any updates and
crops; pool slots come back when their caches go."""

from __future__ import annotations

import copy
import gc
import random

import pytest
import torch
from transformers.cache_utils import DynamicCache

from langchain_parallel_reason.decoding.cache import crop_to
from langchain_parallel_reason.runtime.kv import KVPool, PoolLayer, SlabLayer, adopt_slabs


def _pooled_cache(pool: KVPool | None) -> DynamicCache:
    cache = DynamicCache()
    adopt_slabs(cache, pool)
    return cache


@pytest.mark.parametrize("kind", ["slab", "pool"])
def test_slab_and_pooled_caches_equal_a_dynamic_cache_through_random_updates_and_crops(
    kind: str,
) -> None:
    rng = random.Random(0)
    pool = KVPool(max_slots=4, max_capacity=4096) if kind == "pool" else None
    stock = DynamicCache()
    caches = [_pooled_cache(pool) for _ in range(3)]  # pooled neighbours share the buffers
    most = 0
    for _ in range(60):
        if rng.random() < 0.2 and stock.get_seq_length():
            length = rng.randrange(stock.get_seq_length())
            for cache in (stock, *caches):
                crop_to(cache, length)
        else:
            s = rng.randrange(1, 40)
            for layer in range(3):
                k, v = torch.randn(1, 2, s, 4), torch.randn(1, 2, s, 4)
                want = stock.update(k, v, layer)
                for cache in caches:
                    got = cache.update(k.clone(), v.clone(), layer)
                    assert torch.equal(want[0], got[0])
                    assert torch.equal(want[1], got[1])
        for cache in caches:
            assert cache.get_seq_length() == stock.get_seq_length()
            for mine, theirs in zip(cache.layers, stock.layers, strict=True):
                assert torch.equal(mine.keys, theirs.keys)
                assert torch.equal(mine.values, theirs.values)
        most = max(most, stock.get_seq_length())
    if pool is None:
        assert all(type(layer) is SlabLayer for layer in caches[0].layers)
        # Capacity doubles: the buffer never exceeds twice the most it held (or the minimum).
        assert caches[0].layers[0]._k.shape[-2] <= max(64, 2 * most)
    else:
        assert all(type(layer) is PoolLayer and layer.pooled for layer in caches[0].layers)
        assert len({cache.layers[0].slot for cache in caches}) == 3


def test_only_empty_config_less_caches_adopt_slabs() -> None:
    used = DynamicCache()
    used.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0)
    adopt_slabs(used)
    used.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 1)
    assert not any(isinstance(layer, SlabLayer) for layer in used.layers)


def test_pool_slots_come_back_when_caches_go_and_idle_pools_hold_nothing() -> None:
    pool = KVPool(max_slots=2, max_capacity=64)
    a, b = _filled(pool), _filled(pool)
    full = _pooled_cache(pool)  # no slot left: a private slab
    full.update(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4), 0)
    assert type(full.layers[0]) is SlabLayer
    assert pool.stats()["kv_pool_leases"] == 2
    slot = a.layers[0].slot
    del a
    gc.collect()
    again = _pooled_cache(pool)
    again.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), 0)
    assert again.layers[0].slot == slot
    assert torch.equal(again.layers[0].keys, torch.zeros(1, 2, 1, 4))  # nothing of a's shows
    del b, again
    gc.collect()
    assert pool.stats()["kv_pool_leases"] == 0
    assert pool.stats()["kv_pool_bytes"] > 0  # kept for the next burst ...
    assert 0 < pool.trim() <= pool.keep_s
    pool.keep_s = 0.0
    assert pool.trim() is None
    assert pool.stats() == {"kv_pool_leases": 0, "kv_pool_bytes": 0}  # ... until idle for long


def test_a_cache_too_long_for_the_pool_or_copied_leaves_it_with_its_tokens() -> None:
    pool = KVPool(max_slots=4, max_capacity=64)
    cache, stock = _pooled_cache(pool), DynamicCache()
    for s in (40, 20, 30):  # the third update passes 64 tokens
        k, v = torch.randn(1, 2, s, 4), torch.randn(1, 2, s, 4)
        cache.update(k, v, 0)
        stock.update(k, v, 0)
    layer = cache.layers[0]
    assert not layer.pooled
    assert torch.equal(layer.keys, stock.layers[0].keys)
    copied = copy.deepcopy(_filled(pool))
    assert type(copied.layers[0]) is SlabLayer
    copied.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 1)  # a new layer: private too
    assert type(copied.layers[1]) is SlabLayer


def _filled(pool: KVPool) -> DynamicCache:
    cache = _pooled_cache(pool)
    cache.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 0)
    return cache
