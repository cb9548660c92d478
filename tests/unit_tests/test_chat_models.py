"""ChatParallelReason over tiny random models: metadata, overrides, streaming, async, errors.

A random model writes gibberish, so the tests check invariants (stream == invoke, batch ==
serial, same seed same answer, budgets and errors), never the wording of an answer.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from pydantic import ValidationError

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.messages import convert_messages

QUESTIONS = [
    "What is 2 + 3?",
    "Why is the sky blue?",
    "Name three fruits.",
    "How far does a train go in 3 hours at 60 miles per hour?",
    "What is the capital of France?",
    "Compare apples and oranges.",
    "Plan a day in the park.",
    "Alice has 5 apples and gives 2 to Bob. How many are left?",
]
STEPS = ["Find the speed", "Find the time"]
REPORT_KEYS = {
    "mode_used",
    "fallback_reason",
    "steps",
    "branch_tokens",
    "branch_finish_reasons",
    "decode_steps",
    "tokens_per_forward",
    "plan_attempts",
    "timings",
    "attention",
}


def _join(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


# ---------------------------------------------------------------------------- metadata


def test_invoke_sets_usage_and_parallel_metadata(chat: ChatParallelReason) -> None:
    message = chat.invoke(QUESTIONS[0])
    assert isinstance(message, AIMessage)
    assert isinstance(message.content, str)
    usage = message.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] > 0
    # Discarded plan attempts count as output too, so only sequential mode stays in budget.
    assert usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    meta = message.response_metadata
    assert meta["model_name"]
    assert meta["finish_reason"] in ("stop", "length")
    assert set(meta["parallel"]) >= REPORT_KEYS
    assert meta["parallel"]["mode_used"] in ("parallel", "sequential")


def test_steps_field_gives_parallel_mode_with_those_titles(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    chat = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, max_tokens=40, steps=STEPS)
    report = chat.invoke(QUESTIONS[3]).response_metadata["parallel"]
    assert report["mode_used"] == "parallel"
    assert report["steps"] == STEPS
    assert len(report["branch_tokens"]) == len(STEPS)
    assert report["decode_steps"] > 0


def test_steps_per_call_override_does_not_leak(chat: ChatParallelReason) -> None:
    steps = ["Pros", "Cons", "Verdict"]
    parallel = chat.invoke(QUESTIONS[5], steps=steps, mode="parallel")
    assert parallel.response_metadata["parallel"]["mode_used"] == "parallel"
    assert parallel.response_metadata["parallel"]["steps"] == steps
    bound = chat.bind(steps=steps).invoke(QUESTIONS[5])
    assert bound.content == parallel.content
    # The next plain call uses the fields again: sequential mode writes no steps.
    plain = chat.invoke(QUESTIONS[5], mode="sequential")
    assert plain.response_metadata["parallel"]["mode_used"] == "sequential"
    assert plain.response_metadata["parallel"]["steps"] == []
    assert chat.steps is None


def test_steps_with_sequential_mode_are_conflicting_options(chat: ChatParallelReason) -> None:
    # The steps were silently ignored: the answer came back sequential, without them.
    conflict = r"mode='sequential' never plans, so it cannot decode steps=.*pass steps=None"
    with pytest.raises(ValueError, match=conflict):
        chat.invoke(QUESTIONS[5], mode="sequential", steps=["Pros", "Cons"])
    with pytest.raises(ValueError, match=conflict):
        ChatParallelReason(mode="sequential", steps=["Pros", "Cons"])
    with pytest.raises(ValueError, match=conflict):
        chat.bind(steps=["Pros", "Cons"]).invoke(QUESTIONS[5], mode="sequential")
    # Steps with any mode that plans are fine; so is sequential without steps.
    stepped = chat.invoke(QUESTIONS[5], mode="stepped", steps=["Pros", "Cons"])
    assert stepped.response_metadata["parallel"]["steps"] == ["Pros", "Cons"]


def test_max_tokens_override_is_respected(chat: ChatParallelReason) -> None:
    short = chat.invoke(QUESTIONS[1], mode="sequential", max_tokens=5)
    assert short.usage_metadata is not None
    assert short.usage_metadata["output_tokens"] <= 5
    assert short.response_metadata["finish_reason"] == "length"
    default = chat.invoke(QUESTIONS[1], mode="sequential")
    assert default.usage_metadata is not None
    assert default.usage_metadata["output_tokens"] > 5


def test_stop_sequence_cuts_the_answer(chat: ChatParallelReason) -> None:
    full = chat.invoke(QUESTIONS[2], mode="sequential").content
    assert isinstance(full, str)
    assert len(full) > 12
    stop = full[8:11]
    cut = chat.invoke(QUESTIONS[2], mode="sequential", stop=[stop]).content
    assert cut == full[: full.index(stop)]


def test_ls_params(chat: ChatParallelReason) -> None:
    params = chat._get_ls_params(stop=["x"], temperature=0.5)
    assert params["ls_provider"] == "parallel-reason"
    assert params["ls_model_type"] == "chat"
    assert params["ls_model_name"] == chat._model_name
    assert params["ls_temperature"] == 0.5
    assert params["ls_max_tokens"] == 40
    assert params["ls_stop"] == ["x"]
    assert chat._llm_type == "parallel-reason"


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    "options",
    [
        {"steps": STEPS},
        {"mode": "sequential"},
        {"steps": STEPS, "temperature": 0.9, "seed": 7},
        {"mode": "sequential", "temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 3},
    ],
    ids=["parallel-greedy", "sequential-greedy", "parallel-seeded", "sequential-seeded"],
)
def test_stream_equals_invoke(chat: ChatParallelReason, options: dict[str, Any]) -> None:
    invoked = chat.invoke(QUESTIONS[3], **options)
    chunks = list(chat.stream(QUESTIONS[3], **options))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    full = _join(chunks)  # adding chunks must never raise (parallel_steps lists concatenate)
    assert full.content == invoked.content
    assert full.usage_metadata == invoked.usage_metadata
    assert chunks[-1].chunk_position == "last"
    assert (
        full.response_metadata["parallel"]["steps"]
        == invoked.response_metadata["parallel"]["steps"]
    )


def test_stream_carries_live_step_text(chat: ChatParallelReason) -> None:
    chunks = list(chat.stream(QUESTIONS[3], steps=STEPS))
    parts = [p for c in chunks for p in c.additional_kwargs.get("parallel_steps", [])]
    assert {p["step"] for p in parts} == {0, 1}
    assert all(p["title"] == STEPS[p["step"]] for p in parts)
    # Step chunks are not content: the content gets the ordered steps later.
    assert all(c.content == "" for c in chunks if c.additional_kwargs.get("parallel_steps"))
    full = _join(chunks)
    assert full.additional_kwargs["parallel_steps"] == parts
    content = full.content
    assert isinstance(content, str)
    for step in (0, 1):
        text = "".join(p["text"] for p in parts if p["step"] == step).strip()
        assert text in content


async def test_astream_equals_ainvoke_and_invoke(chat: ChatParallelReason) -> None:
    invoked = chat.invoke(QUESTIONS[0], steps=STEPS, temperature=0.7, seed=11)
    ainvoked = await chat.ainvoke(QUESTIONS[0], steps=STEPS, temperature=0.7, seed=11)
    chunks = [c async for c in chat.astream(QUESTIONS[0], steps=STEPS, temperature=0.7, seed=11)]
    assert ainvoked.content == invoked.content
    assert _join(chunks).content == invoked.content
    assert chunks[-1].chunk_position == "last"


def test_streaming_field_streams_invoke_through_callbacks(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.tokens.append(token)

    chat = ChatParallelReason.from_model(
        tiny_llama, tiny_tokenizer, max_tokens=40, steps=STEPS, streaming=True
    )
    handler = Tokens()
    message = chat.invoke(QUESTIONS[4], config={"callbacks": [handler]})
    # Each content token reaches the handler exactly once (step chunks come as "").
    assert "".join(handler.tokens) == message.content
    assert len([t for t in handler.tokens if t]) > 1
    assert message.response_metadata["parallel"]["mode_used"] == "parallel"


async def test_astream_events_yields_chat_model_stream(chat: ChatParallelReason) -> None:
    events = [event async for event in chat.astream_events(QUESTIONS[0], version="v2", steps=STEPS)]
    streamed = [e for e in events if e["event"] == "on_chat_model_stream"]
    assert streamed
    text = "".join(str(e["data"]["chunk"].content) for e in streamed)
    end = next(e for e in events if e["event"] == "on_chat_model_end")
    assert text == end["data"]["output"].content


def test_lcel_chain(chat: ChatParallelReason) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a helpful assistant."), ("human", "{question}")]
    )
    chain = prompt | chat.bind(steps=STEPS) | StrOutputParser()
    text = chain.invoke({"question": QUESTIONS[3]})
    assert isinstance(text, str)
    assert text == "".join(chain.stream({"question": QUESTIONS[3]}))


# ------------------------------------------------------------------------- concurrency


def test_batch_and_threads_equal_serial(chat: ChatParallelReason) -> None:
    sampled = chat.bind(temperature=0.8, seed=5, steps=STEPS)
    serial = [sampled.invoke(q).content for q in QUESTIONS]
    assert [m.content for m in sampled.batch(QUESTIONS, config={"max_concurrency": 8})] == serial
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda q: sampled.invoke(q).content, QUESTIONS))
    assert threaded == serial


async def test_abatch_and_gather_equal_serial(chat: ChatParallelReason) -> None:
    sampled = chat.bind(temperature=0.8, seed=5, mode="sequential")
    serial = [sampled.invoke(q).content for q in QUESTIONS]
    assert [m.content for m in await sampled.abatch(QUESTIONS)] == serial
    gathered = await asyncio.gather(*(sampled.ainvoke(q) for q in QUESTIONS))
    assert [m.content for m in gathered] == serial


async def test_async_call_does_not_block_the_event_loop(chat: ChatParallelReason) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        await chat.ainvoke(QUESTIONS[1], mode="sequential", max_tokens=200)
    finally:
        ticker.cancel()
    assert ticks > 5


async def test_cancelling_a_task_frees_the_model(chat: ChatParallelReason) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in chat.astream(QUESTIONS[6], mode="sequential", max_tokens=2000):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The worker stops at its next forward pass and releases the lock promptly.
    t0 = time.monotonic()
    message = await chat.ainvoke(QUESTIONS[0], mode="sequential", max_tokens=5)
    assert time.monotonic() - t0 < 10
    assert message.usage_metadata is not None


def test_closing_a_stream_early_frees_the_model(chat: ChatParallelReason) -> None:
    stream = chat.stream(QUESTIONS[6], mode="sequential", max_tokens=2000)
    next(stream)
    stream.close()
    t0 = time.monotonic()
    chat.invoke(QUESTIONS[0], mode="sequential", max_tokens=5)
    assert time.monotonic() - t0 < 10


# ----------------------------------------------------------------------------- timeout


@pytest.mark.parametrize(
    "options",
    [{"mode": "sequential"}, {"steps": STEPS, "step_max_tokens": 2000}],
    ids=["sequential", "parallel-steps"],
)
def test_timeout_raises_and_the_next_call_works(
    tiny_llama: Any, tiny_tokenizer: Any, options: dict[str, Any]
) -> None:
    chat = ChatParallelReason.from_model(
        tiny_llama, tiny_tokenizer, max_tokens=2000, timeout=0.05, **options
    )
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timeout=0\.05"):
        chat.invoke(QUESTIONS[6])
    assert time.monotonic() - t0 < 10
    message = chat.invoke(QUESTIONS[0], max_tokens=40, timeout=60)
    assert message.usage_metadata is not None


async def test_async_timeout(chat: ChatParallelReason) -> None:
    with pytest.raises(TimeoutError):
        await chat.ainvoke(QUESTIONS[6], mode="sequential", max_tokens=2000, timeout=0.05)
    assert (await chat.ainvoke(QUESTIONS[0], max_tokens=5, mode="sequential")).content is not None


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("max_retries", "succeeds"), [(0, False), (1, True)])
def test_max_retries_retries_a_runtime_failure_before_any_text(
    monkeypatch: pytest.MonkeyPatch,
    tiny_llama: Any,
    tiny_tokenizer: Any,
    max_retries: int,
    succeeds: bool,
) -> None:
    from langchain_parallel_reason import pipeline

    real = pipeline.iter_answer
    failures = [RuntimeError("out of memory (simulated)")]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "iter_answer", flaky)
    chat = ChatParallelReason.from_model(
        tiny_llama, tiny_tokenizer, mode="sequential", max_tokens=5, max_retries=max_retries
    )
    if succeeds:
        assert chat.invoke(QUESTIONS[0]).usage_metadata is not None
    else:
        with pytest.raises(RuntimeError, match="simulated"):
            chat.invoke(QUESTIONS[0])


def test_empty_messages_raise(chat: ChatParallelReason) -> None:
    with pytest.raises(ValueError, match="no messages"):
        chat.invoke([])


def test_image_block_raises_text_only(chat: ChatParallelReason) -> None:
    message = HumanMessage(
        content=[
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image", "url": "https://example.com/cat.png"},
        ]
    )
    with pytest.raises(ValueError, match="text-only"):
        chat.invoke([message])


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"temperature": -0.1},
        {"max_branches": 1},
        {"top_p": 0.0},
        {"timeout": 0},
        {"steps": ["Only one"]},
        {"steps": ["Same", "same"]},
    ],
)
def test_bad_fields_raise(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatParallelReason(**fields)


@pytest.mark.parametrize(
    "options",
    [
        {"max_tokens": 0},
        {"temperature": -1.0},
        {"max_branches": 1},
        {"mode": "fast"},
        {"steps": ["Only one"]},
    ],
)
def test_bad_call_options_raise(chat: ChatParallelReason, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"invalid per-call|cannot be decoded"):
        chat.invoke(QUESTIONS[0], **options)


def test_unknown_call_option_raises(chat: ChatParallelReason) -> None:
    with pytest.raises(ValueError, match="unknown keyword argument 'max_new_tokens'"):
        chat.invoke(QUESTIONS[0], max_new_tokens=5)
    with pytest.raises(ValueError, match="cannot be changed per call"):
        chat.invoke(QUESTIONS[0], model="another/model")


@pytest.mark.parametrize(
    ("fields", "named", "closest"),
    [
        ({"temprature": 1.0}, "temprature", "temperature"),
        ({"max_token": 5}, "max_token", "max_tokens"),
        ({"temperature": 0.5, "stepz": ["A", "B"]}, "stepz", "steps"),
    ],
)
def test_misspelled_constructor_field_raises_naming_the_closest(
    fields: dict[str, Any], named: str, closest: str
) -> None:
    # Pydantic's default drops unknown fields: the setting silently kept its default.
    with pytest.raises(ValueError, match=f"no field '{named}': did you mean '{closest}'"):
        ChatParallelReason(**fields)


def test_unknown_constructor_field_without_a_close_one_lists_the_fields(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    with pytest.raises(ValueError, match=r"no field 'zzz': the fields are .*max_tokens"):
        ChatParallelReason(zzz=1)
    with pytest.raises(ValueError, match="no field 'max_new_tokens'"):
        ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, max_new_tokens=5)
    # LangChain's own fields are fields too.
    chat = ChatParallelReason(temperature=0.5, tags=["t"], metadata={"k": 1}, verbose=False)
    assert (chat.temperature, chat.tags) == (0.5, ["t"])


def test_tokenizer_without_chat_template_raises(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        ChatParallelReason.from_model(tiny_llama, tokenizer)


def test_errors_leave_the_model_usable(chat: ChatParallelReason) -> None:
    with pytest.raises(ValueError, match="text-only"):
        chat.invoke([HumanMessage(content=[{"type": "audio", "base64": "AAAA"}])])
    assert chat.invoke(QUESTIONS[0], mode="sequential", max_tokens=5).usage_metadata


# -------------------------------------------------------------------- message conversion


def test_convert_messages_roles_and_tool_calls() -> None:
    messages: list[BaseMessage] = [
        SystemMessage("Be brief."),
        HumanMessage("Add 2 and 3."),
        AIMessage(
            content="",
            tool_calls=[{"name": "add", "args": {"a": 2, "b": 3}, "id": "call_1"}],
        ),
        ToolMessage("5", tool_call_id="call_1", name="add"),
        ChatMessage(role="assistant", content="It is 5."),
    ]
    assert convert_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "id": "call_1",
                    "function": {"name": "add", "arguments": {"a": 2, "b": 3}},
                }
            ],
        },
        {"role": "tool", "content": "5", "tool_call_id": "call_1", "name": "add"},
        {"role": "assistant", "content": "It is 5."},
    ]


def test_convert_messages_joins_text_blocks() -> None:
    human = HumanMessage(content=["Hello", {"type": "text", "text": "world"}])
    ai = AIMessage(
        content=[
            {"type": "text", "text": "Let me add."},
            {"type": "tool_use", "id": "t1", "name": "add", "input": {}},
        ]
    )
    assert convert_messages([human, ai]) == [
        {"role": "user", "content": "Hello\nworld"},
        {"role": "assistant", "content": "Let me add."},
    ]


def test_tool_history_renders_through_the_template(chat: ChatParallelReason) -> None:
    messages: list[BaseMessage] = [
        HumanMessage("Add 2 and 3."),
        AIMessage(content="", tool_calls=[{"name": "add", "args": {"a": 2, "b": 3}, "id": "c1"}]),
        ToolMessage("5", tool_call_id="c1"),
    ]
    message = chat.invoke(messages, mode="sequential", max_tokens=5)
    assert message.usage_metadata is not None


# ----------------------------------------------------------------- loading and sharing


def test_default_model_name_is_the_embedded_model() -> None:
    from langchain_parallel_reason import loading

    assert ChatParallelReason()._model_name == loading.EMBEDDED_MODEL_NAME


def test_importing_the_package_stays_light() -> None:
    code = (
        "import sys, langchain_parallel_reason as p; "
        "assert 'torch' not in sys.modules and 'langchain_core' not in sys.modules; "
        "from langchain_parallel_reason import ChatParallelReason; "
        "ChatParallelReason(); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_construction_loads_nothing() -> None:
    chat = ChatParallelReason(model="/nonexistent/model/folder")
    assert chat._engine is None


def test_from_model_chats_share_one_engine(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    first = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer)
    second = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, temperature=0.5)
    assert first._get_engine() is second._get_engine()
    clone = copy.deepcopy(first)
    assert clone._get_engine() is first._get_engine()


def test_lazy_load_happens_once(
    monkeypatch: pytest.MonkeyPatch, tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    from langchain_parallel_reason import loading

    calls: list[str | None] = []

    def fake_load(model: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
        calls.append(model)
        time.sleep(0.2)  # a slow load, so racing first calls overlap
        return tiny_llama, tiny_tokenizer

    monkeypatch.setattr(loading, "load_model_and_tokenizer", fake_load)
    chat = ChatParallelReason(model="tiny-lazy-test", max_tokens=5, mode="sequential")
    assert calls == []
    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(lambda q: chat.invoke(q).content, QUESTIONS[:4]))
    assert calls == ["tiny-lazy-test"]
    assert len(outputs) == 4
    assert chat.invoke(QUESTIONS[0]).response_metadata["model_name"] == "tiny-lazy-test"


def test_loads_a_model_folder(tiny_model_dir: Any) -> None:
    chat = ChatParallelReason(model=str(tiny_model_dir), max_tokens=8, steps=["A", "B"])
    message = chat.invoke(QUESTIONS[0], max_tokens=30)
    assert message.response_metadata["model_name"] == str(tiny_model_dir)
    assert message.response_metadata["parallel"]["mode_used"] == "parallel"


def _request_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("parallel-reason")]


def test_no_threads_per_call(chat: ChatParallelReason) -> None:
    chat.invoke(QUESTIONS[0], mode="sequential", max_tokens=5)
    before = _request_threads()
    for _ in range(3):
        chat.invoke(QUESTIONS[0], mode="sequential", max_tokens=5)
        list(chat.stream(QUESTIONS[0], mode="sequential", max_tokens=5))
    # The engine's scheduler and its worker pool are reused: calls add no threads.
    assert len(_request_threads()) <= max(len(before), 2)
    assert chat._get_engine().stats()["running"] == 0


def test_token_counts_use_the_models_own_tokenizer(
    tiny_llama: Any, tiny_tokenizer: Any, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LangChain's default is GPT-2's tokenizer: offline it gave 0 (or retried downloads).
    import langchain_core.language_models.base as lc_base

    def no_gpt2() -> Any:
        raise AssertionError("GPT-2's tokenizer was used")

    monkeypatch.setattr(lc_base, "get_tokenizer", no_gpt2)
    text = "Hello world, this is a test."
    expected = tiny_tokenizer.encode(text, add_special_tokens=False)
    for chat in (
        ChatParallelReason.from_model(tiny_llama, tiny_tokenizer),
        ChatParallelReason(model=str(tiny_model_dir), progress=False),
    ):
        assert chat.get_token_ids(text) == expected
        assert chat.get_num_tokens(text) == len(expected) > 0
    # A special token's spelling is plain text unless parse_special_tokens says otherwise.
    end = "<|im_end|>"
    end_id = tiny_tokenizer.convert_tokens_to_ids(end)
    assert end_id not in ChatParallelReason.from_model(tiny_llama, tiny_tokenizer).get_token_ids(
        end
    )
    trusted = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, parse_special_tokens=True)
    assert trusted.get_token_ids(end) == [end_id]


def test_token_counts_of_a_remote_model_can_be_given() -> None:
    # (Counted by the served model's own tokenizer otherwise: test_remote_hostile.py.)
    counted = ChatParallelReason(base_url="http://127.0.0.1:9/v1", custom_get_token_ids=list)
    assert counted.get_num_tokens("Hello") == 5


@pytest.mark.parametrize("max_tokens", [3, 4, 13])
def test_an_answer_cut_inside_a_character_drops_its_first_bytes(
    tiny_llama: Any, tiny_tokenizer: Any, max_tokens: int
) -> None:
    # The tiny model's greedy answer has multi-byte characters split over tokens: cut at
    # these budgets, it ended in U+FFFD (the first bytes of a character, decoded alone).
    chat = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, mode="sequential")
    question = "Write something in Japanese."
    cut = chat.invoke(question, max_tokens=max_tokens)
    assert cut.response_metadata["finish_reason"] == "length"
    assert not cut.text.endswith("\ufffd")
    assert chat.invoke(question, max_tokens=24).text.startswith(cut.text)
    assert "".join(c.text for c in chat.stream(question, max_tokens=max_tokens)) == cut.text


def test_the_report_says_whether_answers_are_batch_invariant(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    import copy

    import torch

    exact = ChatParallelReason.from_model(
        tiny_llama, tiny_tokenizer, max_tokens=4, mode="sequential"
    )
    assert exact.invoke("Hi").response_metadata["parallel"]["batch_invariant"] is True
    half = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    fast = ChatParallelReason.from_model(half, tiny_tokenizer, max_tokens=4, mode="sequential")
    assert fast.invoke("Hi").response_metadata["parallel"]["batch_invariant"] is False
