"""The engine's whole-batch sampling and stage tags, and the packed one-token attention.

Requests at once sample in one pass per step (``Engine.stats()["sample_passes"]``) and get
the tokens they get alone (the batched-equals-solo tests in test_engine.py cover the text);
every forward row is counted under its request's stage; the half-precision one-token path
attends like the stock sdpa function.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from tiny_models import build_tiny_model, build_tiny_tokenizer

from langchain_parallel_reason import pipeline as pl
from langchain_parallel_reason.runtime.base import Request
from langchain_parallel_reason.runtime.engine import Engine
from langchain_parallel_reason.runtime.ragged import _packed_gqa
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


def test_requests_at_once_sample_in_one_pass_and_are_counted_by_stage() -> None:
    model = build_tiny_model("llama", seed=0)
    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "user", "content": "Compare tea and coffee."}]
    requests = [Request(messages, c) for c in CONFIGS]
    engine = Engine(model, tokenizer)
    try:
        alone = [_done(engine, r).content for r in requests]
        before = engine.stats()
        out: list[Any] = [None] * len(requests)
        threads = [
            threading.Thread(target=lambda i=i: out.__setitem__(i, _done(engine, requests[i])))
            for i in range(len(requests))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
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
        folded = _packed_gqa(q, k, v, mask, 0.125)
        assert folded.shape == stock.shape
        torch.testing.assert_close(folded, stock, atol=1e-2, rtol=1e-2)
