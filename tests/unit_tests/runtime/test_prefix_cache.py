"""The prefix cache: what ``match`` returns is exactly the stored KV of the matched tokens.

Tensors here are tagged by position (value at token j = the token id at j), so any KV served
for the wrong token, in the wrong order or from a stale node shows up as a wrong number.
"""

from __future__ import annotations

import random

import pytest
import torch

from langchain_parallel_reason.runtime.base import EngineLimits
from langchain_parallel_reason.runtime.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 3, 2, 4


def _kv(ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer [1, H, S, D] keys/values whose every entry at token j is ids[j] (+ layer)."""
    base = torch.tensor(ids, dtype=torch.float32)[None, None, :, None]
    return [
        (base.expand(1, HEADS, -1, DIM) + i, -base.expand(1, HEADS, -1, DIM) - i)
        for i in range(LAYERS)
    ]


def _check(kv: list[tuple[torch.Tensor, torch.Tensor]], ids: list[int]) -> None:
    want = _kv(ids)
    assert len(kv) == LAYERS
    for (k, v), (wk, wv) in zip(kv, want, strict=True):
        assert torch.equal(k, wk)
        assert torch.equal(v, wv)


def test_match_returns_the_kv_of_the_longest_stored_prefix() -> None:
    cache = PrefixCache(max_bytes=10**9, min_tokens=2)
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    cache.insert(a, _kv(a))
    b = [1, 2, 3, 4, 9, 9, 9]  # splits a's node after 4 tokens
    cache.insert(b, _kv(b))
    hit, kv = cache.match([1, 2, 3, 4, 5, 6, 0, 0])
    assert hit == 6
    _check(kv, [1, 2, 3, 4, 5, 6])
    hit, kv = cache.match([1, 2, 3, 4, 9, 9, 9, 9, 9])
    assert hit == 7
    _check(kv, b)
    assert cache.match([7, 7, 7]) == (0, None)
    hit, kv = cache.match(a, limit=len(a) - 1)  # the last token must run: its logits are needed
    assert hit == 7
    _check(kv, a[:7])


def test_matches_shorter_than_min_tokens_are_ignored() -> None:
    cache = PrefixCache(max_bytes=10**9, min_tokens=5)
    cache.insert([1, 2, 3, 4, 5, 6], _kv([1, 2, 3, 4, 5, 6]))
    assert cache.match([1, 2, 3, 4, 0]) == (0, None)
    assert cache.match([1, 2, 3, 4, 5, 0])[0] == 5


def test_served_kv_is_a_copy_the_caller_may_change() -> None:
    cache = PrefixCache(max_bytes=10**9, min_tokens=1)
    ids = [5, 6, 7]
    stored = _kv(ids)
    cache.insert(ids, stored)
    stored[0][0].add_(100.0)  # the prefilled cache changes after insert: the store does not
    _, kv = cache.match(ids)
    kv[0][0].add_(100.0)  # nor when a request writes into what it was served
    _check(cache.match(ids)[1], ids)


def test_random_inserts_and_matches_agree_with_a_brute_force_store() -> None:
    rng = random.Random(0)
    cache = PrefixCache(max_bytes=10**9, min_tokens=1)
    stored: list[list[int]] = []
    for _ in range(200):
        ids = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
        if rng.random() < 0.5:
            cache.insert(ids, _kv(ids))
            stored.append(ids)
        best = 0
        for s in stored:
            n = 0
            while n < min(len(s), len(ids)) and s[n] == ids[n]:
                n += 1
            best = max(best, n)
        hit, kv = cache.match(ids)
        assert hit == best
        if hit:
            _check(kv, ids[:hit])


def test_least_recently_used_prefixes_are_evicted_within_the_byte_limit() -> None:
    one = 2 * LAYERS * HEADS * DIM * 4  # bytes per token
    cache = PrefixCache(max_bytes=20 * one, min_tokens=1)
    old, new = list(range(10, 20)), list(range(30, 40))
    cache.insert(old, _kv(old))
    cache.insert(new, _kv(new))
    cache.match(old)  # old is used again: new is now the least recently used
    third = list(range(50, 60))
    cache.insert(third, _kv(third))
    assert cache.nbytes <= 20 * one
    assert cache.match(new) == (0, None)
    assert cache.match(old)[0] == 10
    assert cache.match(third)[0] == 10
    assert cache.stats()["prefix_cache_bytes"] == cache.nbytes


def test_zero_bytes_turns_the_cache_off() -> None:
    cache = PrefixCache(max_bytes=0)
    ids = list(range(40))
    cache.insert(ids, _kv(ids))
    assert cache.match(ids) == (0, None)
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        EngineLimits(prefix_cache_bytes=-1)
