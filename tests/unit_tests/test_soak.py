"""Soak: 64 mixed requests on one model from asyncio tasks and threads at once (issue 13).

Modes (auto, parallel, sequential, given steps, a forced tool call, seeded sampling) are mixed
with requests that are cancelled at a random moment, run out of time, or carry bad input. The
test holds the runtime to its contract through the public API only, so it runs unchanged on any
engine behind ``ChatParallelReason``: nothing hangs, every request that completes equals the same
request run alone, every failure is the documented one (``ValueError`` for bad input,
``TimeoutError``, ``asyncio.CancelledError``), and live tensors, threads and RSS come back to
their level before the soak. The schedule is random but seeded, so a failure replays.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
import torch
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.tools import tool

from langchain_parallel_reason import ChatParallelReason

pytestmark = pytest.mark.slow

REQUESTS = 64
SOAK_LIMIT_S = 150  # the whole soak; a deadlock fails here instead of hanging CI
QUESTIONS = [
    "How far does a train go in 3 hours at 60 miles per hour?",
    "Compare tea and coffee.",
    "Plan a three-day trip to Rome.",
    "What is 12 times 7?",
]
STEPS = [["Taste", "Price"], ["Speed", "Time", "Distance"], ["Pros", "Cons"]]
BAD = [
    ("", {}),  # no question
    ("Hi", {"temperature": -1.0}),
    ("Hi", {"steps": ["Only one"]}),
    ("Hi", {"top_p": 2.0}),
    ("Hi", {"timeout": float("inf")}),
    ("Hi \ud800", {}),
]


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@dataclass
class Request:
    """One soak request: what to ask, how, and what may happen to it."""

    index: int
    question: str
    options: dict[str, Any]
    tools: bool = False
    driver: str = "ainvoke"  # ainvoke | astream | invoke | stream
    fate: str = "complete"  # complete | cancel | timeout | bad
    cancel_after_s: float = 0.0
    outcome: str = ""
    result: tuple[Any, ...] | None = None
    errors: list[BaseException] = field(default_factory=list)


def _schedule(rng: random.Random) -> list[Request]:
    kinds = [
        {"mode": "sequential"},
        {"mode": "auto"},
        {"mode": "parallel"},
        {"steps": "given"},
        {"tools": True},
        {"mode": "sequential", "temperature": 0.8, "seed": "given"},
        {"steps": "given", "temperature": 0.8, "seed": "given"},
    ]
    requests = []
    for i in range(REQUESTS):
        kind = dict(rng.choice(kinds))
        use_tools = bool(kind.pop("tools", False))
        if kind.get("steps") == "given":
            kind["steps"] = rng.choice(STEPS)
        if kind.get("seed") == "given":
            kind["seed"] = rng.randrange(100)
        request = Request(i, rng.choice(QUESTIONS), kind, tools=use_tools)
        request.driver = rng.choice(["ainvoke", "ainvoke", "astream", "invoke", "stream"])
        request.fate = rng.choices(["complete", "cancel", "timeout", "bad"], [10, 3, 2, 2])[0]
        if request.fate == "bad":
            request.question, request.options = rng.choice(BAD)
            request.tools = False
        elif request.fate == "timeout":
            request.options["timeout"] = rng.choice([0.001, 0.02, 0.2])
        elif request.fate == "cancel":
            request.cancel_after_s = rng.uniform(0.0, 0.4)
        requests.append(request)
    return requests


def _runnable(chat: ChatParallelReason, request: Request) -> Any:
    if request.tools:
        return chat.bind_tools([multiply], tool_choice="multiply")
    return chat


def _summary(message: BaseMessage) -> tuple[Any, ...]:
    """What must equal the solo run: content, tool calls (name, args) and the mode used."""
    calls = [(c["name"], c["args"]) for c in getattr(message, "tool_calls", [])]
    return message.content, calls, message.response_metadata["parallel"]["mode_used"]


def _join(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


# -- drivers: each records "done" with its result, or the error it ended with ----------------


async def _run_async(chat: ChatParallelReason, request: Request) -> None:
    runnable = _runnable(chat, request)

    async def call() -> tuple[Any, ...]:
        if request.driver == "astream":
            chunks = [c async for c in runnable.astream(request.question, **request.options)]
            return _summary(_join(chunks))
        return _summary(await runnable.ainvoke(request.question, **request.options))

    task = asyncio.create_task(call())
    if request.fate == "cancel":
        await asyncio.sleep(request.cancel_after_s)
        task.cancel()
    try:
        request.result = await task
        request.outcome = "done"
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # the soak itself was cancelled
        request.outcome = "cancelled"
    except Exception as e:
        request.outcome = type(e).__name__
        request.errors.append(e)


def _run_sync(chat: ChatParallelReason, request: Request) -> None:
    runnable = _runnable(chat, request)
    try:
        if request.driver == "stream":
            stream = runnable.stream(request.question, **request.options)
            chunks: list[AIMessageChunk] = []
            started = time.monotonic()
            try:
                for chunk in stream:
                    chunks.append(chunk)
                    if request.fate == "cancel" and (
                        time.monotonic() - started >= request.cancel_after_s
                    ):
                        request.outcome = "cancelled"
                        break
            finally:
                stream.close()  # closing a sync stream early cancels the request
            if request.outcome != "cancelled":
                request.result = _summary(_join(chunks))
                request.outcome = "done"
        else:  # a blocking invoke cannot be cancelled from outside; it completes
            request.result = _summary(runnable.invoke(request.question, **request.options))
            request.outcome = "done"
    except Exception as e:
        request.outcome = type(e).__name__
        request.errors.append(e)


# -- what the process holds --------------------------------------------------------------


def _live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): some torch objects warn when their __class__ is read.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _callers() -> int:
    """Threads other than the engine's own (its scheduler and its bounded worker pool)."""
    return sum(not t.name.startswith("parallel-reason") for t in threading.enumerate())


def _settle(threads: int, limit_s: float = 10.0) -> int:
    """Wait (bounded) until no more caller threads run than ``threads``; return the count."""
    deadline = time.monotonic() + limit_s
    while _callers() > threads and time.monotonic() < deadline:
        time.sleep(0.02)
    return _callers()


async def test_64_mixed_requests_from_tasks_and_threads(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    chat = ChatParallelReason.from_model(
        tiny_llama, tiny_tokenizer, max_tokens=40, step_max_tokens=8, plan_max_tokens=24
    )
    requests = _schedule(random.Random(13))
    fates = {fate: sum(r.fate == fate for r in requests) for fate in ("cancel", "timeout", "bad")}
    assert all(fates.values()), fates  # the seed gives every kind of trouble
    assert any(r.options.get("timeout") == 0.001 for r in requests if r.fate == "timeout")

    # Solo runs, one at a time and unhurried: the reference for each request that completes.
    # They also warm every cache (grammars, token tables), so the baseline below is steady.
    solo: dict[int, tuple[Any, ...]] = {}
    for request in requests:
        if request.fate != "bad":
            options = {k: v for k, v in request.options.items() if k != "timeout"}
            solo[request.index] = _summary(
                await asyncio.to_thread(
                    _runnable(chat, request).invoke, request.question, **options
                )
            )
    process = psutil.Process()
    threads = _settle(_callers())
    tensors = _live_tensors()
    rss = process.memory_info().rss

    # The soak: every request at once, async ones as tasks, sync ones on their own threads.
    started = time.monotonic()
    workers = [
        threading.Thread(target=_run_sync, args=(chat, r), daemon=True)
        for r in requests
        if r.driver in ("invoke", "stream")
    ]
    for worker in workers:
        worker.start()
    await asyncio.wait_for(
        asyncio.gather(
            *(_run_async(chat, r) for r in requests if r.driver in ("ainvoke", "astream"))
        ),
        timeout=SOAK_LIMIT_S,
    )
    for worker in workers:
        left = max(1.0, SOAK_LIMIT_S - (time.monotonic() - started))
        await asyncio.to_thread(worker.join, left)
        assert not worker.is_alive(), "a thread's request hung"
    elapsed = time.monotonic() - started

    # Every request ended, the way its fate allows.
    allowed = {
        "complete": {"done"},
        "cancel": {"done", "cancelled"},
        "timeout": {"done", "TimeoutError"},
        "bad": {"ValueError"},
    }
    for request in requests:
        assert request.outcome in allowed[request.fate], (request, request.errors)
        if request.outcome == "done":
            assert request.result == solo[request.index], request
        if request.outcome == "ValueError":
            assert type(request.errors[0]) is ValueError, request.errors
    outcomes = [r.outcome for r in requests]
    assert outcomes.count("TimeoutError") >= 1
    assert outcomes.count("ValueError") == fates["bad"]

    # The model is free and gives the same answers afterwards.
    first = next(r for r in requests if r.fate == "complete" and not r.tools)
    again = await chat.ainvoke(first.question, **first.options)
    assert _summary(again) == solo[first.index]

    # Nothing is left behind: threads, tensors (KV caches, logits), memory.
    assert _settle(threads) <= threads
    engine = chat._get_engine()
    # This engine's threads: its scheduler and its pool, bounded whatever the load.
    assert engine.stats()["threads"] <= 1 + engine.limits.max_concurrent_requests
    assert engine.stats()["running"] == engine.stats()["queued"] == 0
    assert _live_tensors() <= tensors
    assert process.memory_info().rss - rss < 64 * 2**20
    modes = [r.result[2] for r in requests if r.result is not None]
    print(
        f"soak: {REQUESTS} requests in {elapsed:.1f} s; "
        f"outcomes { {o: outcomes.count(o) for o in set(outcomes)} }; "
        f"modes { {m: modes.count(m) for m in set(modes)} }; "
        f"drivers { {d: sum(r.driver == d for r in requests) for d in ('ainvoke', 'astream', 'invoke', 'stream')} }"
    )
