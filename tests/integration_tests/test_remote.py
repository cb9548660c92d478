"""The remote engine against a real vLLM server (CPU build) serving the embedded SmolLM2-135M.

The first test here installs vLLM in ``.vllm-venv/`` (once, about 5 min) and starts the server
on 127.0.0.1 (about 65-110 s); it serves every test of the run and is stopped by its pid at the
end. Sockets stay blocked except to 127.0.0.1. ``PARALLEL_REASON_TEST_SERVER=<base_url>``
points the tests at a server you already run (it must serve the embedded model as "smollm2").
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from vllm_server import SERVED_NAME, free_port

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.pipeline import PipelineConfig
from langchain_parallel_reason.runtime.base import Request
from langchain_parallel_reason.runtime.remote import RemoteEngine

pytestmark = [pytest.mark.remote, pytest.mark.allow_hosts(["127.0.0.1"])]

STEPS = ["Taste", "Caffeine", "Price"]


def _llm(server: Any, **kw: Any) -> ChatParallelReason:
    return ChatParallelReason(base_url=server.base_url, model=server.model, **kw)


def _question(text: str = "Compare tea and coffee.") -> str:
    # A fresh first line per test: no test is served from an earlier test's prefix cache.
    return f"[{uuid.uuid4().hex[:8]}] {text}"


def _running(server: Any) -> float:
    return server.metrics().get("vllm:num_requests_running", 0.0)


def _finished(server: Any) -> float:
    """Requests the server finished (EOS, stop string, length); aborted ones do not count."""
    return server.metrics().get("vllm:request_success_total", 0.0)


def _assert_aborted(server: Any, running: float, finished: float) -> None:
    """The ``running`` requests seen before a cancel end within seconds, most unfinished."""
    deadline = time.monotonic() + 5
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(server) == 0
    assert _finished(server) - finished < running  # at least one was aborted, not finished


def test_given_steps_run_in_parallel_on_the_server(server: Any) -> None:
    before = server.metrics()
    msg = _llm(server, steps=STEPS, max_tokens=200, seed=0).invoke(_question())
    after = server.metrics()
    report = msg.response_metadata["parallel"]
    assert report["mode_used"] == "parallel", report
    assert report["steps"] == STEPS
    assert all(n > 0 for n in report["branch_tokens"])
    # The steps were decoded concurrently: about one pass per token of the longest step.
    assert report["decode_steps"] == max(report["branch_tokens"])
    for title in STEPS:
        assert f"**{title}**:" in msg.content
    assert not any(f"**{title}**: ....." in msg.content for title in STEPS)  # no copied "......"
    usage = msg.usage_metadata
    assert usage["input_tokens"] > 200  # the Stage-1 instructions + the question
    assert usage["output_tokens"] >= sum(report["branch_tokens"])
    assert msg.response_metadata["model_name"] == SERVED_NAME
    # Every step request continued the same prefix: the server's prefix cache served it.
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    assert hits >= (len(STEPS) - 1) * 128, hits


def test_prefix_cache_hits_grow_during_stage_2(server: Any) -> None:
    """Read the server's counter between the steps' end and the conclusion's start."""
    engine = RemoteEngine(server.base_url, server.model)
    config = PipelineConfig(steps=tuple(STEPS), max_tokens=200, seed=0)
    messages = [{"role": "user", "content": _question()}]
    seen: dict[str, float] = {}
    hits = "vllm:prefix_cache_hits_total"
    for kind, value in engine.stream(Request(messages, config)):
        if kind == "event" and getattr(value, "stage", None) == "plan":
            seen["start"] = server.metrics()[hits]
        if kind == "event" and getattr(value, "stage", None) == "steps_done":
            seen["steps_done"] = server.metrics()[hits]
        if kind == "done":
            assert value.report.mode_used == "parallel"
    # Stage 3 may have started meanwhile, so this is an upper bound on Stage 2 alone; the
    # lower bound: every step after the first reuses at least the instructions' 128 tokens.
    assert seen["steps_done"] - seen["start"] >= (len(STEPS) - 1) * 128, seen


def test_model_writes_its_plan_under_the_server_grammar(server: Any) -> None:
    # Room for the longest plan the grammar allows (a 160-character preamble, 6 titles of 60),
    # so a plan is never cut off: only duplicate titles could fail it (then re-sampled).
    llm = _llm(server, max_tokens=800, plan_max_tokens=600, step_max_tokens=24, seed=0)
    msg = llm.invoke("Compare tea and coffee.")
    report = msg.response_metadata["parallel"]
    # The 135M model cannot write the format unaided: the grammar reached the server.
    assert report["mode_used"] == "parallel", report
    assert 1 <= report["plan_attempts"] <= 3
    assert 2 <= len(report["steps"]) <= 6
    # Nothing failed (a loop cut by the guard is noted, and is no failure).
    assert not [n for n in report["notes"] if "failed" in n or "validate" in n], report["notes"]


def test_stream_equals_invoke_for_a_seed(server: Any) -> None:
    # Greedy and seeded on a float32 server (see the fixture): a server's sums depend a
    # little on its batching, which can flip a sampled token at the sampling boundary.
    llm = _llm(server, steps=STEPS, max_tokens=160, seed=3)
    question = _question()
    # The server in the same state both times: its prefix cache holds the prompt (a cached
    # prefix is read back instead of recomputed).
    llm.invoke(question)
    chunks = list(llm.stream(question))
    invoked = llm.invoke(question)
    content = "".join(c.content for c in chunks)
    assert content == invoked.content
    parts = [p for c in chunks for p in c.additional_kwargs.get("parallel_steps", [])]
    assert {p["step"] for p in parts} == {0, 1, 2}  # live step text arrived while decoding
    reasons = invoked.response_metadata["parallel"]["branch_finish_reasons"]
    for b, title in enumerate(STEPS):
        live = "".join(p["text"] for p in parts if p["step"] == b)
        if reasons[b] != "repetition":  # a loop cut by the guard keeps one copy in the answer
            assert f"**{title}**: {live.strip()}" in content
    final = chunks[-1]
    assert final.usage_metadata == invoked.usage_metadata
    assert final.response_metadata["parallel"]["steps"] == STEPS


async def test_async_matches_sync(server: Any) -> None:
    # One call at a time: the server's batch then holds the same requests each time (bf16
    # sums change with the batch's composition, and so may a greedy token).
    llm = _llm(server, steps=STEPS, max_tokens=120, seed=1)
    question = _question()
    await llm.ainvoke(question)  # warms the server's prefix cache (see the test above)
    a = await llm.ainvoke(question)
    b = await llm.ainvoke(question)
    assert a.content == b.content == llm.invoke(question).content
    assert a.response_metadata["parallel"]["mode_used"] == "parallel"


async def test_concurrent_async_calls(server: Any) -> None:
    llm = _llm(server, steps=STEPS, max_tokens=120, seed=1)
    answers = await asyncio.gather(*(llm.ainvoke(_question()) for _ in range(3)))
    for msg in answers:
        assert msg.response_metadata["parallel"]["mode_used"] == "parallel"
        assert all(f"**{title}**:" in msg.content for title in STEPS)


async def test_cancelling_closes_the_server_requests(server: Any) -> None:
    llm = _llm(server, steps=["A", "B", "C", "D"], max_tokens=2000, step_max_tokens=400)
    first_step = asyncio.Event()

    async def consume() -> None:
        async for chunk in llm.astream(_question("Write four long essays about the sea.")):
            if chunk.additional_kwargs.get("parallel_steps"):
                first_step.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_step.wait(), 120)
    running, finished = _running(server), _finished(server)
    assert running >= 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The HTTP streams were closed: the server aborts the steps at once, long before 400
    # tokens each would have taken (about 15 s at the server's single-stream speed).
    _assert_aborted(server, running, finished)


def test_closing_a_sync_stream_closes_the_server_requests(server: Any) -> None:
    llm = _llm(server, steps=["A", "B", "C"], max_tokens=2000, step_max_tokens=400)
    stream = llm.stream(_question("Write three long essays about the sea."))
    for chunk in stream:
        if chunk.additional_kwargs.get("parallel_steps"):
            break
    running, finished = _running(server), _finished(server)
    assert running >= 1
    stream.close()
    _assert_aborted(server, running, finished)


def test_timeout_raises_and_frees_the_server(server: Any) -> None:
    llm = _llm(server, steps=["A", "B"], max_tokens=2000, step_max_tokens=400, timeout=1.5)
    with pytest.raises(TimeoutError, match=r"timeout=1\.5"):
        llm.invoke(_question("Write two long essays about the sea."))
    deadline = time.monotonic() + 5
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(server) == 0


def test_sequential_mode(server: Any) -> None:
    msg = _llm(server, mode="sequential", max_tokens=24, seed=0).invoke(_question())
    report = msg.response_metadata["parallel"]
    assert report["mode_used"] == "sequential"
    assert report["fallback_reason"] is None
    assert msg.content.strip()
    assert msg.usage_metadata["output_tokens"] <= 24


def test_stepped_mode_writes_the_steps_one_after_another(server: Any) -> None:
    llm = _llm(server, steps=STEPS, max_tokens=200, seed=0)
    stepped = llm.invoke(_question(), mode="stepped")
    parallel = llm.invoke(_question())
    report = stepped.response_metadata["parallel"]
    assert report["mode_used"] == "stepped", report
    assert report["steps"] == STEPS
    assert report["decode_steps"] == sum(report["branch_tokens"])
    # Every step under its title, in plan order, each with a body. (Not the parallel run's
    # text: the server decodes those steps in one batch, and its bf16 numerics, hence its
    # greedy tokens, depend on the batch: CI saw step 1 differ.)
    at = [stepped.content.find(f"**{title}**: ") for title in STEPS]
    assert -1 not in at, stepped.content
    assert at[0] == 0
    assert at == sorted(at)
    assert all(n > 0 for n in report["branch_tokens"])
    assert parallel.response_metadata["parallel"]["mode_used"] == "parallel"
    assert "reuse" not in str(report["notes"])


def test_forced_tool_call_through_the_server_grammar(server: Any) -> None:
    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    msg = (
        _llm(server, max_tokens=64)
        .bind_tools([multiply], tool_choice="any")
        .invoke("What is 12 times 7?")
    )
    assert len(msg.tool_calls) == 1, msg
    call = msg.tool_calls[0]
    assert call["name"] == "multiply"
    assert isinstance(call["args"]["a"], int)
    assert isinstance(call["args"]["b"], int)


def test_structured_output_through_the_server(server: Any) -> None:
    class City(BaseModel):
        name: str = Field(max_length=40)
        population: int

    city = (
        _llm(server, max_tokens=64)
        .with_structured_output(City)
        .invoke("Name a large city and its population.")
    )
    assert isinstance(city, City)
    assert city.name


def test_wrong_model_name_lists_the_served_ones(server: Any) -> None:
    llm = ChatParallelReason(base_url=server.base_url, model="no-such-model")
    with pytest.raises(ValueError, match=r"not served.*'smollm2'"):
        llm.invoke("hi")


def test_no_model_name_takes_the_only_served_one(server: Any) -> None:
    msg = ChatParallelReason(base_url=server.base_url, mode="sequential", max_tokens=4).invoke("hi")
    assert msg.response_metadata["model_name"] == SERVED_NAME


def test_server_down_says_how_to_fix() -> None:
    llm = ChatParallelReason(base_url=f"http://127.0.0.1:{free_port()}/v1", max_tokens=8)
    t = time.monotonic()
    with pytest.raises(ConnectionError, match=r"cannot reach the server.*start it"):
        llm.invoke("hi")
    assert time.monotonic() - t < 30  # a few retries with backoff, not a hang


def test_context_overflow_says_how_to_fix(server: Any) -> None:
    llm = _llm(server, mode="sequential", max_tokens=8)
    with pytest.raises(ValueError, match=r"context window.*--max-model-len"):
        llm.invoke("tea " * 6000)


def test_steps_at_once_beat_steps_one_after_another(server: Any) -> None:
    """`bench decode --base-url`: 6 steps of 32 tokens after one prefix, at once vs in a row."""
    from langchain_parallel_reason.bench.remote import run_remote_decode_bench

    result = run_remote_decode_bench(
        server.base_url, server.model, branches=6, new_tokens=32, prefix_tokens=300, repeats=1
    )
    # Measured here about 6.6x (64 tokens, 800-token prefix); the machine is shared, so the
    # test asks for less than the 2.5x target, which the README's quoted run shows.
    assert result["speedup"] >= 2.0, result
    assert result["prefix_cache_hit_tokens"]["parallel"] >= 5 * 128, result


def test_the_server_cache_set_up_is_read_and_streams_are_counted(server: Any) -> None:
    """The test server runs 32-token blocks with prefix caching: no advice in the report;
    while the steps stream, the engine counts their completions."""
    engine = RemoteEngine(server.base_url, server.model)
    config = PipelineConfig(steps=tuple(STEPS), max_tokens=120, seed=0)
    messages = [{"role": "user", "content": _question()}]
    during = []
    for kind, value in engine.stream(Request(messages, config)):
        if kind == "event" and type(value).__name__ == "StepDelta":
            during.append(engine.stats()["completions_running"])
        if kind == "done":
            report = value.report
    stats = engine.stats()
    assert (stats["block_size"], stats["prefix_caching"]) == (32, True)
    assert not any("block" in note for note in report.notes), report.notes
    assert max(during) == len(STEPS)  # the three step streams were open at once
    assert stats["completions_running"] == 0
