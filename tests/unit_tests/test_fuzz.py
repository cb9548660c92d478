"""Property tests with arbitrary text: message rendering, caller-given steps, whole calls.

Whatever the text (format markers, special-token strings, template syntax, lone surrogates,
right-to-left text, control characters), the outcome is a rendered prompt, a valid plan or an
answer with its fallback recorded, or a ValueError that says what to fix; never another
exception. Example counts stay small so the suite stays fast.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from pydantic import ValidationError

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.messages import convert_messages
from langchain_parallel_reason.pipeline import render_prompt
from langchain_parallel_reason.plan import format_plan, is_placeholder_title, parse_plan
from langchain_parallel_reason.schemas import Plan

# Pieces that have a meaning somewhere on the way from messages to tokens.
_FRAGMENTS = [
    "####",
    "####%%%%",
    "%%%%",
    ":......",
    "\n",
    "\r\n",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "{{ x }}",
    "{% if %}",
    "\u202e",
    "\u200d",
    "مرحبا",
    "שלום",
    "🍵",
    "👨\u200d👩\u200d👧",
    "\x00",
    "\ud800",  # a lone surrogate: not valid Unicode text
    " ",
    ":",
]
TEXT = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=8)), max_size=12).map(
    "".join
)
_BLOCK = st.one_of(
    TEXT,
    st.builds(lambda t: {"type": "text", "text": t}, TEXT),
    st.just({"type": "image", "url": "https://example.com/cat.png"}),
    st.just({"type": "tool_use", "id": "t1", "name": "add", "input": {}}),
)
CONTENT = st.one_of(TEXT, st.lists(_BLOCK, max_size=3))
MESSAGE = st.one_of(
    st.builds(SystemMessage, content=CONTENT),
    st.builds(HumanMessage, content=CONTENT),
    st.builds(AIMessage, content=CONTENT),
    st.builds(ToolMessage, content=TEXT, tool_call_id=st.just("call_1")),
    st.builds(
        ChatMessage,
        content=TEXT,
        role=st.sampled_from(["user", "assistant", "system", "human", "ai", "wizard", ""]),
    ),
)
FAST = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FAST
@given(messages=st.lists(MESSAGE, max_size=4))
def test_any_messages_render_or_raise_value_error(
    tiny_tokenizer: Any, messages: list[BaseMessage]
) -> None:
    try:
        converted = convert_messages(messages)
        ids = render_prompt(tiny_tokenizer, converted)
    except ValueError:
        return
    assert ids
    assert all(0 <= i < len(tiny_tokenizer) for i in ids)
    # Nothing is lost or mangled: every message's text is in the prompt the model reads.
    text = tiny_tokenizer.decode(ids)
    for message in converted:
        assert message["content"] in text


# Titles biased towards the format's own pieces and odd text.
TITLE = st.lists(
    st.one_of(st.sampled_from([*_FRAGMENTS, "Taste", "Price", "a", "A"]), st.text(max_size=6)),
    min_size=1,
    max_size=5,
).map("".join)


@FAST
@given(titles=st.lists(TITLE, max_size=8))
def test_any_steps_give_a_usable_plan_or_a_value_error(titles: list[str]) -> None:
    try:
        chat = ChatParallelReason(steps=titles, max_branches=6)
    except ValidationError as e:  # a ValueError
        error = str(e)
    else:
        error = None
    if error is not None:
        assert "cannot be decoded in parallel" in error
        return
    plan = Plan.model_validate(
        {"titles": chat.steps}, context={"max_branches": 6, "max_title_chars": 200}
    )
    assert 2 <= len(plan.titles) <= 6
    # The plan text the model is shown parses back to exactly these steps (steps are used as
    # given; only a model-written plan drops placeholder titles).
    if not any(is_placeholder_title(t) for t in plan.titles):
        assert parse_plan(format_plan(plan), max_branches=6, max_title_chars=200) == plan


@settings(max_examples=200, deadline=None)
@given(titles=st.lists(TITLE, min_size=2, max_size=8), preamble=TEXT)
def test_every_valid_plan_round_trips_through_its_text(titles: list[str], preamble: str) -> None:
    try:
        plan = Plan.model_validate({"preamble": preamble, "titles": titles})
    except ValidationError:
        return
    if any(is_placeholder_title(t) for t in plan.titles):
        return  # a model-written plan drops those (a caller's steps are used as given)
    assert parse_plan(format_plan(plan)) == plan


@pytest.fixture
def fuzz_chat(tiny_llama: Any, tiny_tokenizer: Any) -> ChatParallelReason:
    return ChatParallelReason.from_model(
        tiny_llama, tiny_tokenizer, max_tokens=30, step_max_tokens=8, plan_max_tokens=8
    )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=TEXT,
    options=st.sampled_from(
        [
            {"mode": "sequential", "max_tokens": 2},
            {"steps": ["Speed", "Time"]},
            {"constrain_plan": False, "plan_retries": 0},
            {"stop": ["####", ":"], "steps": ["A", "B"]},
        ]
    ),
)
def test_any_user_text_gives_an_answer_or_a_value_error(
    fuzz_chat: ChatParallelReason, text: str, options: dict[str, Any]
) -> None:
    try:
        message = fuzz_chat.invoke([HumanMessage(text)], **options)
    except ValueError as e:
        error = str(e)
    else:
        error = None
    if error is not None:
        # The only things wrong with a text of this size: a lone surrogate, or no text at all.
        blank = not text.strip()
        assert "not valid Unicode" in error or (blank and "question is empty" in error)
        return
    report = message.response_metadata["parallel"]
    if "steps" in options:
        assert report["mode_used"] == "parallel"
        assert report["steps"] == options["steps"]
    elif report["mode_used"] == "sequential" and report["route"] == "plan":
        assert report["fallback_reason"]  # a plan was tried: why it fell back
    elif report["mode_used"] == "sequential":
        assert report["route_reason"]  # answered directly by choice (router or mode)
