"""The engine's whole-batch sampling and stage tags, and the packed one-token attention.

Requests at once sample in one pass per step (``Engine.stats()["sample_passes"]``) and get
the tokens they get alone (the batched-equals-solo tests in test_engine.py cover the text);
every forward row is counted under its request's stage; the half-precision one-token path
attends like the stock sdpa function.
"""

from __future__ import annotations

import gc
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_tiny_model, build_tiny_tokenizer
from transformers.cache_utils import DynamicCache

from langchain_parallel_reason import pipeline as pl
from langchain_parallel_reason.decoding.lean import lean_forward
from langchain_parallel_reason.decoding.masks import to_additive
from langchain_parallel_reason.runtime.base import Request
from langchain_parallel_reason.runtime.engine import Engine
from langchain_parallel_reason.runtime.kv import KVPool, adopt_slabs
from langchain_parallel_reason.runtime.ragged import (
    Segment,
    _fold_mask,
    _packed_gqa,
    attend_pooled,
    forward_step,
    pack_step,
)
from langchain_parallel_reason.runtime.stage_tags import STAGES

CONFIGS = [
    pl.PipelineConfig(mode="sequential", max_tokens=12, temperature=0.9, seed=5),
    pl.PipelineConfig(steps=("Alpha", "Beta", "Gamma"), max_tokens=70, step_max_tokens=9),
    pl.PipelineConfig(max_tokens=60, step_max_tokens=10, plan_max_tokens=24),
    pl.PipelineConfig(mode="sequential", max_tokens=12),
]


def _done(engine: Engine, request: Request) -> Any:
    *_, (kind, value) = engine.stream(request)
    assert kind == "done"
    return value


def _at_once(engine: Engine, requests: list[Request]) -> list[Any]:
    """Every request's result, all submitted at once (one thread each)."""
    out: list[Any] = [None] * len(requests)
    threads = [
        threading.Thread(target=lambda i=i: out.__setitem__(i, _done(engine, requests[i])))
        for i in range(len(requests))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_requests_at_once_sample_in_one_pass_and_are_counted_by_stage() -> None:
    model = build_tiny_model("llama", seed=0)
    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "user", "content": "Compare tea and coffee."}]
    requests = [Request(messages, c) for c in CONFIGS]
    engine = Engine(model, tokenizer)
    try:
        alone = [_done(engine, r).content for r in requests]
        before = engine.stats()
        out = _at_once(engine, requests)
        after = engine.stats()
    finally:
        engine.close()
    assert [r.content for r in out] == alone
    passes = after["sample_passes"] - before["sample_passes"]
    rows = after["sampled_rows"] - before["sampled_rows"]
    assert passes > 0
    assert rows > passes  # several requests' rows per pass
    assert set(after["rows_by_stage"]) == set(STAGES)
    assert sum(after["rows_by_stage"].values()) == after["rows"]
    for stage in STAGES:
        assert after["rows_by_stage"][stage] > 0, stage
    assert sum(after["running_by_stage"].values()) == 0  # nothing left running


def test_packed_one_token_attention_matches_stock_sdpa_in_half_precision() -> None:
    gen = torch.Generator().manual_seed(0)
    for length in (1, 7, 300):
        q = torch.randn(1, 9, 1, 64, generator=gen).bfloat16()
        k = torch.randn(1, 3, length, 64, generator=gen).bfloat16()
        v = torch.randn(1, 3, length, 64, generator=gen).bfloat16()
        stock = F.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True)
        packed = _packed_gqa(q, k, v, None, 0.125)  # [1, 1, H, d]
        torch.testing.assert_close(packed, stock.transpose(1, 2), atol=1e-2, rtol=1e-2)


def test_folded_masked_attention_matches_stock_sdpa_in_half_precision() -> None:
    # The masked path (belt rows, prefill chunks): the stock function repeats K/V per group.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    gen = torch.Generator().manual_seed(0)
    for rows, length in ((2, 9), (5, 300), (64, 600)):
        q = torch.randn(1, 9, rows, 64, generator=gen).bfloat16()
        k = torch.randn(1, 3, length, 64, generator=gen).bfloat16()
        v = torch.randn(1, 3, length, 64, generator=gen).bfloat16()
        allowed = torch.rand(rows, length, generator=gen) > 0.5
        allowed[:, 0] = True  # every row sees a key
        mask = torch.zeros(1, 1, rows, length).masked_fill(~allowed, float("-inf")).bfloat16()
        stock, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)  # [1, S, H, d]
        folded = _packed_gqa(q, k, v, _fold_mask(mask, 3), 0.125)
        assert folded.shape == stock.shape
        torch.testing.assert_close(folded, stock, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_rows_attend_to_their_own_cache_only(dtype: torch.dtype) -> None:
    # Caches in scattered slots of one pool (idle and foreign slots between them), of very
    # different lengths, with one-token rows, Stage-2 belt rows (a mask of their own) and short
    # causal feeds: one call per run must give each row its own call's attention.
    gen = torch.Generator().manual_seed(0)
    pool = KVPool(max_slots=16, max_capacity=1024)
    caches = []
    for length in (40, 3, 700, 41, 1, 260, 5, 90):
        cache = DynamicCache()
        adopt_slabs(cache, pool)
        k = torch.randn(1, 3, length, 64, generator=gen).to(dtype)
        cache.update(k, torch.randn(1, 3, length, 64, generator=gen).to(dtype), 0)
        caches.append(cache)
    members = caches[::2] + caches[1::4]  # not in slot order; slots 1, 3, 7 idle in between
    sizes = [1, 3, 1, 2, 6, 1]  # rows of each member's segment
    total = sum(sizes) + 2  # and 2 columns of others, first and last
    query = torch.randn(1, 9, total, 64, generator=gen).to(dtype)
    key = torch.randn(1, 3, total, 64, generator=gen).to(dtype)
    value = torch.randn(1, 3, total, 64, generator=gen).to(dtype)
    segs, want, at = [], [], 1
    for i, (cache, rows) in enumerate(zip(members, sizes, strict=True)):
        layer = cache.layers[0]
        have = layer.keys.shape[-2]
        k = torch.cat([layer.keys, key[:, :, at : at + rows]], dim=2)
        v = torch.cat([layer.values, value[:, :, at : at + rows]], dim=2)
        positions = torch.arange(have, have + rows)
        mask = None
        allowed = torch.ones(rows, have + rows, dtype=torch.bool)
        if i % 2:  # a belt: every row sees the prefix and a random part of the new keys
            allowed[:, have:] = torch.rand(rows, rows, generator=gen) > 0.5
            allowed[:, have:].fill_diagonal_(True)
            mask = torch.zeros(1, 1, rows, have + rows).masked_fill(~allowed, float("-inf"))
            mask = mask.to(dtype)
        elif rows > 1:  # causal rows of a plain call
            allowed = torch.arange(have + rows) <= positions[:, None]
        q = query[:, :, at : at + rows]
        blocked = torch.zeros(rows, have + rows).masked_fill(~allowed, float("-inf")).to(dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=blocked, scale=0.125, enable_gqa=True
        )  # [1, H, rows, d]
        want.append(out[0].transpose(0, 1))  # [rows, H, d]
        segs.append(Segment(at, at + rows, cache, positions, mask))
        at += rows
    layers = [cache.layers[0] for cache in members]
    got = attend_pooled(query, key, value, segs, layers, 0.125, {})
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, torch.cat(want), atol=tol, rtol=tol)
    for seg, cache in zip(segs, members, strict=True):  # each row's key/value went to its cache
        rows = seg.stop - seg.start
        assert torch.equal(cache.layers[0].keys[:, :, -rows:], key[:, :, seg.start : seg.stop])
        assert torch.equal(cache.layers[0].values[:, :, -rows:], value[:, :, seg.start : seg.stop])


def test_half_precision_requests_at_once_share_the_pool_and_give_it_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import langchain_parallel_reason.runtime.ragged as ragged

    rows = []
    real = ragged.attend_pooled

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        rows.append(len(args[4]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ragged, "attend_pooled", counted)
    model = build_tiny_model("llama", seed=0, attn_implementation="sdpa").to(torch.bfloat16)
    messages = [{"role": "user", "content": "Compare tea and coffee."}]
    requests = [Request(messages, c) for c in CONFIGS]
    engine = Engine(model, build_tiny_tokenizer())
    try:
        out = _at_once(engine, requests)
        gc.collect()
        stats = engine.stats()
        engine._core.kv_pool.keep_s = 0.0
        with engine._core.cond:
            engine._core.cond.notify_all()  # the idle scheduler trims the pool
        deadline = time.monotonic() + 30
        while engine.stats()["kv_pool_bytes"] and time.monotonic() < deadline:
            time.sleep(0.01)
        trimmed = engine.stats()
    finally:
        engine.close()
    assert all(r is not None and r.content for r in out)
    assert max(rows, default=0) >= 2  # one-token rows of several requests in one call
    assert stats["kv_pool_leases"] == 0  # every request's caches gave their slots back
    assert trimmed["kv_pool_bytes"] == 0  # an engine idle for keep_s holds no KV


def test_float32_engines_keep_their_caches_apart() -> None:
    # float32 answers equal their solo runs bit for bit: no pool, one attention per segment.
    engine = Engine(build_tiny_model("llama", seed=0), build_tiny_tokenizer())
    try:
        assert "kv_pool_bytes" not in engine.stats()
    finally:
        engine.close()


def test_a_pooled_step_gives_the_logits_of_one_call_per_segment() -> None:
    # A real bfloat16 Llama: three calls prefilled alone (5, 40 and 90 tokens), then one packed
    # step of all three (a Stage-2 belt of 3 branches at one position, 2 causal tokens, 1
    # token), with caches in a KV pool (one attention call per run) and with private caches
    # (one call per segment): the same logits up to bfloat16 rounding, measured against the
    # float32 model's (the pooled rows may take the decode kernel, which rounds less than
    # sdpa: it is held to sdpa's own error, not to sdpa's values).
    exact = build_tiny_model("llama", seed=0, attn_implementation="sdpa")
    model = build_tiny_model("llama", seed=0, attn_implementation="sdpa").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (n,), generator=gen) for n in (5, 40, 90)]
    sizes = (3, 2, 1)
    nxt = [torch.randint(3, 90, (r,), generator=gen) for r in sizes]
    logits = {}
    for name, pool in (("pooled", KVPool()), ("private", None), ("exact", None)):
        net = exact if name == "exact" else model
        lean = lean_forward(net)
        calls = []
        for ids in prompts:
            cache = DynamicCache()
            adopt_slabs(cache, pool)
            call = SimpleNamespace(ids=ids, positions=torch.arange(len(ids)), cache=cache, ran=0)
            call.mask = call.split = call.keep = None
            forward_step(net, pack_step([(call, len(ids))], "sdpa"), lean, [], "", None)
            calls.append(call)
        for call, tokens in zip(calls, nxt, strict=True):
            n, r = call.ids.shape[0], tokens.shape[0]
            call.ids, call.ran = tokens, 0
            call.positions = torch.arange(n, n + r)
            if r == 3:  # branches share the position and see the prefix and themselves
                call.positions = torch.full((r,), n)
                allowed = torch.ones(r, n + r, dtype=torch.bool)
                allowed[:, n:] = torch.eye(r, dtype=torch.bool)
                call.mask = to_additive(allowed, net.dtype)
        step = pack_step([(call, call.ids.shape[0]) for call in calls], "sdpa")
        logits[name] = forward_step(net, step, lean, [], "", None).float()
        if pool is not None:
            # the rows went through attend_pooled (its plan is keyed by the slots)
            assert any(isinstance(key[0], tuple) for key in step.layout.plans)
    assert logits["pooled"].shape[0] == sum(sizes)
    pooled = (logits["pooled"] - logits["exact"]).abs()
    private = (logits["private"] - logits["exact"]).abs()
    # bfloat16 rounding through the whole model dominates both (mean 0.075, max 0.58 here)
    assert pooled.mean() <= 1.25 * private.mean()
    assert pooled.max() <= 1.5 * private.max()
