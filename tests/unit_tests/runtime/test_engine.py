"""The batching engine: every request's output equals the same request run alone.

Requests of different lengths, stages, step counts, stop times, grammars and cancellations run
at once on tiny random models of several architectures (greedy, fp32); seeded sampling gives the
same text alone or batched. Also: limits and the FIFO queue, chunked prefill interleaved with
decoding, faults that fail one request only, out-of-memory splits, and the report.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from tiny_models import ARCHITECTURES, build_tiny_model, build_tiny_tokenizer

from langchain_parallel_reason import pipeline as pl
from langchain_parallel_reason.runtime.base import EngineLimits, Request
from langchain_parallel_reason.runtime.engine import Engine

LONG = "def add(a, b): return a + b. Explain this code in detail, line by line. " * 6
QUESTIONS = ["Compare tea and coffee.", LONG, "hello", "Why is the sky blue?", "Name two rivers."]

TOOL_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"const": "add"}, "arguments": {"type": "object"}},
        "required": ["name", "arguments"],
    }
)

# A mix of every stage: plain sequential, given steps (split and mask backends, 2 and 4 steps,
# different budgets and stop strings), a model-written plan, an output grammar, sampling,
# stepped mode and a conclusion over reused KV.
CONFIGS: list[pl.PipelineConfig] = [
    pl.PipelineConfig(mode="sequential", max_tokens=30),
    pl.PipelineConfig(steps=("Alpha", "Beta", "Gamma", "Delta"), max_tokens=70, step_max_tokens=9),
    pl.PipelineConfig(max_tokens=60, step_max_tokens=10, plan_max_tokens=24),
    pl.PipelineConfig(steps=("One", "Two"), max_tokens=50, step_max_tokens=12, attention="mask"),
    pl.PipelineConfig(mode="sequential", max_tokens=25, stop=("e",)),
    pl.PipelineConfig(grammar=pl.OutputGrammar(json_schema=TOOL_SCHEMA), max_tokens=40),
    pl.PipelineConfig(mode="sequential", max_tokens=20, temperature=0.9, seed=7),
    pl.PipelineConfig(
        steps=("Up", "Down"), max_tokens=40, step_max_tokens=8, temperature=0.8, seed=3
    ),
    # The paper's baseline (steps one after another) and Stage 3 over the steps' own KV.
    pl.PipelineConfig(mode="stepped", steps=("Red", "Blue"), max_tokens=40, step_max_tokens=8),
    pl.PipelineConfig(
        steps=("East", "West", "North"), max_tokens=50, step_max_tokens=8, conclusion_kv="reuse"
    ),
]


def _messages(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def _result(engine: Engine, request: Request) -> Any:
    *_, (kind, value) = engine.stream(request)
    assert kind == "done"
    return value


def _key(result: Any) -> tuple[Any, ...]:
    report = result.report
    # conclusion_kv: a KV reuse that failed under the engine re-prefills, with the same steps.
    return (
        result.content,
        result.output_tokens,
        report.mode_used,
        tuple(report.branch_tokens),
        report.conclusion_kv,
    )


def _run_all_at_once(engine: Engine, requests: list[Request]) -> list[Any]:
    out: list[Any] = [None] * len(requests)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            out[i] = _result(engine, requests[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a request hung"
    assert not errors, errors
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


# Every architecture with its default attention, and Llama with eager attention too.
PAIRS = [(a, "eager" if a == "gemma2" else "sdpa") for a in ARCHITECTURES] + [("llama", "eager")]


@pytest.mark.parametrize(("arch", "attn"), PAIRS)
def test_every_request_equals_its_solo_run_whatever_its_batch_mates(
    arch: str, attn: str, tokenizer: Any
) -> None:
    model = build_tiny_model(arch, attn_implementation=attn)
    configs = CONFIGS if arch == "llama" else CONFIGS[:4]  # the full mix on one architecture
    requests = [Request(_messages(i), c) for i, c in enumerate(configs)]
    # The reference: the pipeline on the bare model, no engine at all.
    reference = [_key(pl.answer(model, tokenizer, r.messages, r.config)) for r in requests]
    engine = Engine(model, tokenizer)
    try:
        alone = [_key(_result(engine, r)) for r in requests]
        together = [_key(r) for r in _run_all_at_once(engine, requests)]
        stats = engine.stats()
    finally:
        engine.close()
    assert alone == reference
    assert together == reference
    # They really shared forwards: more rows per forward than any request alone takes.
    assert stats["mean_rows_per_step"] > 1
    # And prompt KV: the second run found every prompt in the prefix cache (so "together"
    # above also says a request served from stored KV equals its own prefill).
    assert stats["prefix_cache_hit_tokens"] > 0


def test_cancelled_batch_mates_do_not_change_the_others(tiny_llama: Any, tokenizer: Any) -> None:
    keep = [Request(_messages(i), c) for i, c in enumerate(CONFIGS[:4])]
    reference = [_key(pl.answer(tiny_llama, tokenizer, r.messages, r.config)) for r in keep]
    engine = Engine(tiny_llama, tokenizer)
    try:
        doomed = []
        for i in range(4):  # long answers, abandoned after a few tokens
            stream = engine.stream(Request(_messages(i), pl.PipelineConfig(mode="sequential")))
            next(stream)
            doomed.append(stream)
        timed_out = Request(_messages(1), pl.PipelineConfig(mode="sequential"), timeout=0.001)
        results: list[Any] = []
        for i, stream in enumerate(doomed):
            if i == 2:
                results = _run_all_at_once(engine, keep)
            stream.close()
        with pytest.raises(TimeoutError, match=r"timeout=0\.001"):
            _result(engine, timed_out)
        assert [_key(r) for r in results] == reference
        deadline = time.monotonic() + 5
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = engine.stats()
        assert stats["running"] == stats["queued"] == 0
        assert stats["failed"] == 0
        # The timed-out one, and every abandoned stream that had not ended by itself.
        assert stats["cancelled"] >= 1
        assert stats["cancelled"] + stats["completed"] == stats["submitted"]
    finally:
        engine.close()


def test_limits_queue_requests_in_fifo_order(tiny_llama: Any, tokenizer: Any) -> None:
    engine = Engine(tiny_llama, tokenizer, limits=EngineLimits(max_concurrent_requests=2))
    config = pl.PipelineConfig(mode="sequential", max_tokens=15)
    requests = [Request(_messages(i), config) for i in range(6)]
    try:
        reference = [_key(_result(engine, r)) for r in requests]
        seen_queued: list[int] = []
        watcher_stop = threading.Event()

        def watch() -> None:
            while not watcher_stop.is_set():
                seen_queued.append(engine.stats()["queued"])
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        results = _run_all_at_once(engine, requests)
        watcher_stop.set()
        watcher.join()
        assert [_key(r) for r in results] == reference
        assert max(seen_queued) >= 1  # some waited
        assert max(r.report.engine["queued_ahead"] for r in results) >= 1
        assert engine.stats()["max_concurrent_requests"] == 2
    finally:
        engine.close()


def test_kv_budget_admits_what_fits_and_refuses_what_never_can(
    tiny_llama: Any, tokenizer: Any
) -> None:
    config = pl.PipelineConfig(mode="sequential", max_tokens=10)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head dim x fp32 bytes
    request = Request(_messages(0), config)
    engine = Engine(tiny_llama, tokenizer, limits=EngineLimits(kv_budget_bytes=per_token * 600))
    try:
        results = _run_all_at_once(engine, [request] * 3)  # one at a time fits
        assert len({_key(r) for r in results}) == 1
        assert engine.stats()["kv_reserved_bytes"] == 0  # every reservation was returned
    finally:
        engine.close()
    tight = Engine(tiny_llama, tokenizer, limits=EngineLimits(kv_budget_bytes=per_token * 10))
    try:
        with pytest.raises(ValueError, match="raise kv_budget_bytes or lower max_tokens"):
            _result(tight, request)
    finally:
        tight.close()


@contextmanager
def _pre_hook(model: Any, hook: Callable[..., None]) -> Iterator[None]:
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps(tokenizer: Any) -> None:
    model = build_tiny_model("llama", seed=0)
    engine = Engine(model, tokenizer, limits=EngineLimits(max_batch_rows=16))
    short = Request(_messages(2), pl.PipelineConfig(mode="sequential", max_tokens=40))
    long = Request([{"role": "user", "content": LONG * 2}], pl.PipelineConfig(mode="sequential"))
    steps: list[int] = []

    def record(_m: Any, _a: Any, kwargs: dict[str, Any]) -> None:
        steps.append(len(kwargs["ragged_layout"].segments))
        assert kwargs["input_ids"].shape[1] <= 16  # no forward over the row cap

    try:
        reference = [_key(_result(engine, r)) for r in (short, long)]
        stream = engine.stream(short)
        next(stream)  # the short request is decoding
        with _pre_hook(model, record):
            results = _run_all_at_once(engine, [long])
            rest = list(stream)
        assert _key(rest[-1][1]) == reference[0]
        assert _key(results[0]) == reference[1]
        # The long prompt took many forwards, most of them shared with the decoding request.
        assert len(steps) > 10
        assert sum(n == 2 for n in steps) >= 5
    finally:
        engine.close()


def test_a_failing_request_fails_alone(tokenizer: Any) -> None:
    model = build_tiny_model("llama", seed=0)
    poison = tokenizer.encode("zebra", add_special_tokens=False)[0]

    def fail_on_poison(_m: Any, _a: Any, kwargs: dict[str, Any]) -> None:
        if poison in kwargs["input_ids"][0].tolist():
            raise RuntimeError("simulated: a kernel failed")

    good = [Request(_messages(i), c) for i, c in enumerate(CONFIGS[:3])]
    bad = Request([{"role": "user", "content": "zebra"}], pl.PipelineConfig(mode="sequential"))
    engine = Engine(model, tokenizer)
    try:
        reference = [_key(_result(engine, r)) for r in good]
        errors: list[BaseException] = []

        def run_bad() -> None:
            try:
                _result(engine, bad)
            except RuntimeError as e:
                errors.append(e)

        with _pre_hook(model, fail_on_poison):
            t = threading.Thread(target=run_bad)
            t.start()
            results = _run_all_at_once(engine, good)
            t.join(60)
        assert [_key(r) for r in results] == reference
        assert len(errors) == 1
        assert "a kernel failed" in str(errors[0])
        assert engine.stats()["failed"] == 1
    finally:
        engine.close()


def test_out_of_memory_splits_the_batch_and_shrinks_it(tokenizer: Any) -> None:
    model = build_tiny_model("llama", seed=0)

    def oom_when_wide(_m: Any, _a: Any, kwargs: dict[str, Any]) -> None:
        if len(kwargs["ragged_layout"].segments) > 2:
            raise torch.OutOfMemoryError("simulated: out of memory")

    requests = [Request(_messages(i), c) for i, c in enumerate(CONFIGS[:5])]
    engine = Engine(model, tokenizer)
    try:
        reference = [_key(_result(engine, r)) for r in requests]
        with _pre_hook(model, oom_when_wide):
            results = _run_all_at_once(engine, requests)
        assert [_key(r) for r in results] == reference  # retried, not failed
        stats = engine.stats()
        assert stats["split_retries"] >= 1
        assert stats["failed"] == 0
    finally:
        engine.close()


async def test_async_requests_equal_sync_ones(tiny_llama: Any, tokenizer: Any) -> None:
    import asyncio

    engine = Engine(tiny_llama, tokenizer)
    requests = [Request(_messages(i), c) for i, c in enumerate(CONFIGS[:4])]

    async def one(request: Request) -> Any:
        items = [item async for item in engine.astream(request)]
        assert items[-1][0] == "done"
        return items[-1][1]

    try:
        reference = [_key(_result(engine, r)) for r in requests]
        threads_before = threading.active_count()
        results = await asyncio.gather(*(one(r) for r in requests))
        assert [_key(r) for r in results] == reference
        # No thread per call: at most the pool grew to the requests running at once.
        assert threading.active_count() - threads_before <= len(requests)
    finally:
        engine.close()


def test_report_says_how_the_engine_served_the_call(tiny_llama: Any, tokenizer: Any) -> None:
    engine = Engine(tiny_llama, tokenizer)
    try:
        result = _result(engine, Request(_messages(0), CONFIGS[1]))
    finally:
        engine.close()
    info = result.report.engine
    assert set(info) == {
        "queue_wait_s",
        "queued_ahead",
        "forwards",
        "mean_batch_rows",
        "prefix_hit_tokens",
    }
    assert info["forwards"] >= 1
    assert info["mean_batch_rows"] >= 1
    assert result.report.model_dump()["engine"] == info


def test_a_burst_sharing_a_system_prompt_prefills_it_once(tiny_llama: Any, tokenizer: Any) -> None:
    # Eight requests arrive together with one long system prompt: none has stored it yet, so
    # they wait for the first one's prefill and compute only their own questions, and every
    # answer still equals its run on the bare model.
    system = {"role": "system", "content": LONG}
    configs = [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[4]] * 2
    requests = [
        Request([system, {"role": "user", "content": f"{q} ({i})"}], c)
        for i, (q, c) in enumerate(zip(QUESTIONS * 2, configs, strict=False))
    ]
    reference = [_key(pl.answer(tiny_llama, tokenizer, r.messages, r.config)) for r in requests]
    shared = len(
        tokenizer.apply_chat_template([system], tokenize=True, return_dict=True)["input_ids"]
    )
    engine = Engine(tiny_llama, tokenizer)
    try:
        together = _run_all_at_once(engine, requests)
        stats = engine.stats()
    finally:
        engine.close()
    assert [_key(r) for r in together] == reference
    hits = [r.report.engine["prefix_hit_tokens"] for r in together]
    assert shared > 40, shared
    assert sum(h >= shared - 8 for h in hits) >= len(requests) - 2, (shared, hits)
    assert stats["prefix_cache_hit_tokens"] == sum(hits)


@pytest.mark.parametrize("attention", ["split", "mask"])
def test_the_row_cap_holds_for_a_calls_own_steps(
    tiny_llama: Any, tokenizer: Any, attention: str
) -> None:
    # Regression: max_batch_rows=1 ran a 3-step forward of 12 rows (the titles fed at once).
    # The steps' rows now run in forwards of at most the cap, with the same text.
    config = pl.PipelineConfig(
        steps=("Taste", "Caffeine", "Price"), max_tokens=48, attention=attention
    )
    messages = _messages(0)
    alone = pl.answer(tiny_llama, tokenizer, messages, config)
    for cap in (1, 2):
        engine = Engine(tiny_llama, tokenizer, limits=EngineLimits(max_batch_rows=cap))
        try:
            result = _result(engine, Request(messages, config))
            assert _key(result) == _key(alone)
            assert engine.stats()["max_rows_per_step"] <= cap
        finally:
            engine.close()
