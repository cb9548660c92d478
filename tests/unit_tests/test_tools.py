"""Tool calling and structured output: parsing, rendering, and grammar-forced output on tiny models.

A random model writes gibberish, so forced output is checked for its invariants (one call,
a bound tool's name, arguments valid for that tool's schema, a valid schema instance), and
parsing is checked on hand-written strings in every supported format.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any, TypedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field, ValidationError

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason import pipeline as pl
from langchain_parallel_reason.messages import convert_messages
from langchain_parallel_reason.output_forms import OutputForm
from langchain_parallel_reason.schemas import ParallelReport
from langchain_parallel_reason.tools import (
    HERMES,
    SMOLLM2,
    ToolCallStream,
    forced_call_schema,
    grammar_safe_schema,
    normalize_tool_choice,
    parallel_reasoner_tool,
    parse_tool_calls,
    render_tool_messages,
    structured_output_instruction,
    tool_call_format,
)

SEEDS = range(4)


class Unit(StrEnum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class WeatherArgs(BaseModel):
    city: str = Field(description="City name")
    unit: Unit = Unit.celsius
    days: int = Field(default=1, ge=1, le=7)


@tool(args_schema=WeatherArgs)
def get_weather(city: str, unit: Unit = Unit.celsius, days: int = 1) -> str:
    """Get the weather forecast for a city."""
    return f"Sunny in {city} for {days} day(s)."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def no_args() -> int:
    """Return a magic number."""
    return 5


TOOLS: list[BaseTool] = [get_weather, add]


class Color(StrEnum):
    red = "red"
    green = "green"


class Record(BaseModel):
    """A small record with one field of each kind."""

    count: int = Field(ge=0, le=99, description="How many")
    name: str = Field(max_length=12, description="A short name")
    color: Color
    tags: Annotated[list[Annotated[int, Field(ge=0, le=9)]], Field(max_length=3)]


class RecordDict(TypedDict):
    """The same record as a TypedDict."""

    count: int
    color: Annotated[str, ..., "red or green"]


@pytest.fixture
def chat(tiny_llama: Any, tiny_tokenizer: Any) -> ChatParallelReason:
    # Strings are capped short so a random model's JSON completes well inside the budget.
    return ChatParallelReason.from_model(
        tiny_llama,
        tiny_tokenizer,
        max_tokens=120,
        step_max_tokens=12,
        plan_max_tokens=24,
        json_string_max_chars=12,
    )


def _join(chunks: Iterator[AIMessageChunk]) -> AIMessageChunk:
    full: AIMessageChunk | None = None
    for chunk in chunks:
        full = chunk if full is None else full + chunk
    assert full is not None
    return full


def _calls(message: AIMessage) -> list[tuple[str, dict[str, Any]]]:
    """(name, args) of each call: ids are random, so comparisons leave them out."""
    return [(call["name"], call["args"]) for call in message.tool_calls]


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (  # Hermes / Qwen2.5: one object per block, text around it kept as content
            'Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n'
            "</tool_call>",
            "Let me check.",
            [("add", {"a": 2, "b": 3})],
        ),
        (  # two Hermes blocks
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            "",
            [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Paris"})],
        ),
        (  # SmolLM2: a JSON list of calls in one block
            '<tool_call>[\n{"name": "add", "arguments": {"a": 2, "b": 3}},\n'
            '{"name": "no_args", "arguments": {}}\n]</tool_call>',
            "",
            [("add", {"a": 2, "b": 3}), ("no_args", {})],
        ),
        ("<tool_call>[]</tool_call>", "", []),  # SmolLM2's "no call"
        (  # a bare object, with Llama-style "parameters"
            '{"name": "add", "parameters": {"a": 2, "b": 3}}',
            "",
            [("add", {"a": 2, "b": 3})],
        ),
        (  # a bare list in a code fence, arguments as a JSON string (OpenAI style)
            '```json\n[{"name": "add", "arguments": "{\\"a\\": 4, \\"b\\": 5}"}]\n```',
            "",
            [("add", {"a": 4, "b": 5})],
        ),
        (  # the OpenAI tool-call shape inside a block, its id kept
            '<tool_call>{"id": "call_9", "type": "function", "function": {"name": "add", '
            '"arguments": {"a": 1, "b": 1}}}</tool_call>',
            "",
            [("add", {"a": 1, "b": 1})],
        ),
        ('{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON that is no call stays content
        ("Just text, no calls.", "Just text, no calls.", []),
    ],
)
def test_parse_formats(text: str, content: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.content == content
    assert [(call["name"], call["args"]) for call in parsed.tool_calls] == calls
    assert parsed.invalid_tool_calls == []
    ids = [call["id"] for call in parsed.tool_calls]
    assert all(ids)
    assert len(set(ids)) == len(ids)


def test_parse_keeps_a_given_id() -> None:
    text = '<tool_call>{"id": "call_9", "name": "add", "arguments": {}}</tool_call>'
    assert parse_tool_calls(text).tool_calls[0]["id"] == "call_9"


@pytest.mark.parametrize(
    ("text", "name", "error"),
    [
        ("<tool_call>{not json}</tool_call>", None, "not valid JSON"),
        (  # cut off by the budget: the name is still recovered
            'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 2',
            "add",
            "unterminated",
        ),
        ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "add", "JSON object"),
        ('<tool_call>{"name": "add", "arguments": "{oops"}</tool_call>', "add", "not valid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', None, "no 'name'"),
    ],
)
def test_unparsable_calls_become_invalid_tool_calls(
    text: str, name: str | None, error: str
) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == []
    [bad] = parsed.invalid_tool_calls
    assert bad["name"] == name
    assert error in (bad["error"] or "")
    assert (bad["args"] or "").startswith("<tool_call>")
    assert bad["id"]
    # An AIMessage takes them as they are.
    message = AIMessage(content=parsed.content, invalid_tool_calls=parsed.invalid_tool_calls)
    assert message.invalid_tool_calls[0]["error"] == bad["error"]


def test_valid_and_invalid_calls_side_by_side() -> None:
    text = (
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        "<tool_call>{broken</tool_call>"
    )
    parsed = parse_tool_calls(text)
    assert [call["name"] for call in parsed.tool_calls] == ["add"]
    assert len(parsed.invalid_tool_calls) == 1


_FRAGMENTS = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        "<tool",
        '{"name": "add", "arguments": {"a": 1}}',
        '{"name": ',
        "[",
        "]",
        "```",
        "\n",
        " text ",
        '"',
        "{",
        "}",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_FRAGMENTS, st.text(max_size=8)), max_size=12), st.randoms())
def test_parse_never_raises_and_streaming_agrees(pieces: list[str], rnd: random.Random) -> None:
    text = "".join(pieces)
    parsed = parse_tool_calls(text)
    assert isinstance(parsed.content, str)
    # Streamed in random pieces, the shown text plus the rest is the parsed content.
    stream = ToolCallStream()
    shown = ""
    i = 0
    while i < len(text):
        j = i + rnd.randint(1, 6)
        shown += stream.push(text[i:j])
        i = j
    rest, streamed = stream.finish()
    assert shown + rest == parsed.content
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [
        (c["name"], c["args"]) for c in parsed.tool_calls
    ]


def test_stream_shows_text_before_a_call_at_once() -> None:
    stream = ToolCallStream()
    assert stream.push("I will add ") == "I will add"
    assert stream.push("them. <tool") == " them."
    assert stream.push('_call>{"name": "add", "arguments": {}}</tool_call>') == ""
    rest, parsed = stream.finish()
    assert rest == ""
    assert parsed.content == "I will add them."
    assert [call["name"] for call in parsed.tool_calls] == ["add"]


def test_call_chunks_merge_into_the_same_calls() -> None:
    text = (
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        '<tool_call>\n{"name": "add", "arguments": {"a": 1'
    )
    parsed = parse_tool_calls(text)
    chunk = AIMessageChunk(content="", tool_call_chunks=parsed.tool_call_chunks())
    assert chunk.tool_calls == parsed.tool_calls
    # The cut-off call stays invalid after a merge: its raw text keeps the tag.
    assert [bad["id"] for bad in chunk.invalid_tool_calls] == [
        bad["id"] for bad in parsed.invalid_tool_calls
    ]


# -------------------------------------------------------------------- choice and schemas


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", "auto"),
        ("none", "none"),
        ("any", "any"),
        ("required", "any"),
        (True, "any"),
        ("add", "add"),
        ({"type": "function", "function": {"name": "add"}}, "add"),
        ({"type": "tool", "name": "add"}, "add"),
    ],
)
def test_normalize_tool_choice(choice: Any, expected: str | None) -> None:
    assert normalize_tool_choice(choice, ["add", "get_weather"]) == expected


@pytest.mark.parametrize("choice", ["subtract", {"type": "function", "function": {}}, 3])
def test_unknown_tool_choice_raises(choice: Any) -> None:
    with pytest.raises(ValueError, match="not a bound tool"):
        normalize_tool_choice(choice, ["add"])


def test_bind_tools_checks_the_choice(chat: ChatParallelReason) -> None:
    with pytest.raises(ValueError, match="not a bound tool"):
        chat.bind_tools(TOOLS, tool_choice="subtract")


def test_grammar_safe_schema_bounds_strings() -> None:
    schema = {
        "type": "object",
        "properties": {
            "short": {"type": "string", "minLength": 2, "maxLength": 5},
            "free": {"type": "string"},
            "kind": {"type": "string", "enum": ["a", "b"]},
            "coded": {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 3},
        },
    }
    safe = grammar_safe_schema(schema, max_string_chars=40)["properties"]
    assert safe["short"] == {"type": "string", "pattern": "^.{2,5}$"}
    assert safe["free"] == {"type": "string", "pattern": "^.{0,40}$"}
    assert safe["kind"] == {"type": "string", "enum": ["a", "b"]}
    assert safe["coded"] == {"type": "string", "pattern": "^[A-Z]+$"}
    assert grammar_safe_schema(schema)["properties"]["free"] == {"type": "string"}


def test_grammar_safe_schema_resolves_refs() -> None:
    class Inner(BaseModel):
        x: int

    class Outer(BaseModel):
        inner: Inner

    safe = grammar_safe_schema(Outer.model_json_schema())
    assert "$defs" not in safe
    assert safe["properties"]["inner"]["properties"]["x"]["type"] == "integer"


def test_forced_call_schema_is_one_of_the_tools() -> None:
    tools = [convert_to_openai_tool(t) for t in (*TOOLS, add)]  # a duplicate name is merged
    schema = forced_call_schema(tools)
    assert [case["properties"]["name"] for case in schema["anyOf"]] == [
        {"const": "get_weather"},
        {"const": "add"},
    ]
    only = forced_call_schema(tools, "add")
    assert only["properties"]["name"] == {"const": "add"}
    with pytest.raises(ValueError, match="no tool named"):
        forced_call_schema(tools, "subtract")


# ------------------------------------------------------------------------------ rendering

# A ChatML template with no tool support at all, like SmolLM2-135M-Instruct's.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

HISTORY: list[BaseMessage] = [
    SystemMessage("Be brief."),
    HumanMessage("Add 2 and 3, and 4 and 5."),
    AIMessage(
        content="",
        tool_calls=[
            {"name": "add", "args": {"a": 2, "b": 3}, "id": "c1"},
            {"name": "add", "args": {"a": 4, "b": 5}, "id": "c2"},
        ],
    ),
    ToolMessage("5", tool_call_id="c1", name="add"),
    ToolMessage("9", tool_call_id="c2", name="add"),
]


def _prompt_text(tokenizer: Any, messages: list[BaseMessage], **kwargs: Any) -> str:
    """The prompt a call would decode from: messages prepared for this tokenizer, rendered."""
    output = OutputForm.from_kwargs(kwargs, max_string_chars=None)
    prepared, tools, _ = output.prepare(tokenizer, convert_messages(messages), pl.PipelineConfig())
    return tokenizer.decode(
        pl.render_prompt(tokenizer, prepared, **({"tools": tools} if tools else {}))
    )


def test_tool_history_renders_through_a_template_with_tools(tiny_tokenizer: Any) -> None:
    text = _prompt_text(tiny_tokenizer, HISTORY, tools=[add])
    assert tool_call_format(tiny_tokenizer.chat_template) == HERMES
    assert '"name": "add"' in text.split("\n<tools>\n")[1]  # the tool list, from the template
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in text
    # Both results in one user turn, then the assistant's turn: no "last must be human" rule.
    assert "<tool_response>\n5\n</tool_response>\n<tool_response>\n9\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_history_renders_as_text_for_a_template_without_tools(tiny_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = PLAIN_TEMPLATE
    assert tool_call_format(PLAIN_TEMPLATE) == SMOLLM2
    text = _prompt_text(tokenizer, HISTORY, tools=[add])
    system = text.split("<|im_end|>")[0]
    assert '<tools>[{"name": "add"' in system
    assert system.endswith("Be brief.")
    assert (
        '<|im_start|>assistant\n<tool_call>[\n{"name": "add", "arguments": {"a": 2, "b": 3}},\n'
        '{"name": "add", "arguments": {"a": 4, "b": 5}}\n]</tool_call><|im_end|>'
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\n5\n</tool_response>\n"
        "<tool_response>\n9\n</tool_response><|im_end|>"
    ) in text
    assert "<|im_start|>tool" not in text
    # Without tools bound the history still renders as text, with no tool list.
    plain = _prompt_text(tokenizer, HISTORY)
    assert "<tools>" not in plain
    assert "<tool_response>\n5" in plain


def test_render_tool_messages_adds_a_system_message() -> None:
    tools = [convert_to_openai_tool(add)]
    out = render_tool_messages([{"role": "user", "content": "hi"}], tools)
    assert [m["role"] for m in out] == ["system", "user"]
    assert "<tools>" in out[0]["content"]


def test_history_ending_in_a_tool_message_is_answered(chat: ChatParallelReason) -> None:
    message = chat.bind_tools([add]).invoke(HISTORY, max_tokens=8)
    assert isinstance(message, AIMessage)
    assert message.usage_metadata is not None


# --------------------------------------------------------------- forced calls, tiny model


@pytest.mark.parametrize("seed", SEEDS)
def test_forced_call_has_schema_valid_arguments(chat: ChatParallelReason, seed: int) -> None:
    # Sampling at temperature 1 explores the grammar; every answer must still be one call.
    message = chat.bind_tools(TOOLS, tool_choice="any").invoke(
        "What is the weather in Paris?", temperature=1.0, seed=seed
    )
    assert message.invalid_tool_calls == []
    [call] = message.tool_calls
    by_name = {t.name: t for t in TOOLS}
    assert call["name"] in by_name
    by_name[call["name"]].args_schema.model_validate(call["args"])  # type: ignore[union-attr]
    assert message.content == ""
    report = message.response_metadata["parallel"]
    assert report["mode_used"] == "sequential"
    assert "tool_choice='any'" in report["fallback_reason"]


@pytest.mark.parametrize("choice", ["add", {"type": "function", "function": {"name": "add"}}])
def test_forced_call_of_a_named_tool(chat: ChatParallelReason, choice: Any) -> None:
    message = chat.bind_tools(TOOLS, tool_choice=choice).invoke("Hi", temperature=1.0, seed=1)
    [call] = message.tool_calls
    assert call["name"] == "add"
    assert set(call["args"]) == {"a", "b"}
    assert all(isinstance(v, int) for v in call["args"].values())


def test_forced_call_without_arguments(chat: ChatParallelReason) -> None:
    message = chat.bind_tools([no_args], tool_choice="any").invoke("Call it.")
    assert _calls(message) == [("no_args", {})]


def test_forced_call_streams_tool_call_chunks(chat: ChatParallelReason) -> None:
    bound = chat.bind_tools(TOOLS, tool_choice="any")
    invoked = bound.invoke("Weather in Rome?", seed=3, temperature=1.0)
    chunks = list(bound.stream("Weather in Rome?", seed=3, temperature=1.0))
    full = _join(iter(chunks))
    assert _calls(full) == _calls(invoked)
    assert full.content == invoked.content == ""
    [call_chunk] = [c for c in chunks if c.tool_call_chunks]
    assert call_chunk.chunk_position == "last"
    (part,) = call_chunk.tool_call_chunks
    assert part["index"] == 0
    assert json.loads(part["args"] or "") == invoked.tool_calls[0]["args"]


async def test_forced_call_async(chat: ChatParallelReason) -> None:
    bound = chat.bind_tools([add], tool_choice="any")
    message = await bound.ainvoke("Add 1 and 2.")
    chunks = [chunk async for chunk in bound.astream("Add 1 and 2.")]
    assert _calls(_join(iter(chunks))) == _calls(message)
    assert [name for name, _ in _calls(message)] == ["add"]


def test_budget_cut_forced_call_is_invalid_not_an_error(chat: ChatParallelReason) -> None:
    message = chat.bind_tools(TOOLS, tool_choice="any").invoke("Weather?", max_tokens=4)
    assert message.tool_calls == []
    [bad] = message.invalid_tool_calls
    assert "unterminated" in (bad["error"] or "")
    assert message.response_metadata["finish_reason"] == "length"


def test_tools_auto_decodes_sequentially_unless_parallel_is_asked(
    chat: ChatParallelReason,
) -> None:
    bound = chat.bind_tools(TOOLS)
    report = bound.invoke("What is 2 + 3?").response_metadata["parallel"]
    assert report["mode_used"] == "sequential"
    assert report["fallback_reason"].startswith("tools bound: decoded sequentially")
    forced = bound.invoke("What is 2 + 3?", steps=["Add", "Check"], mode="parallel")
    assert forced.response_metadata["parallel"]["mode_used"] == "parallel"


def test_tool_choice_none_neither_offers_nor_parses(chat: ChatParallelReason) -> None:
    message = chat.bind_tools(TOOLS, tool_choice="none").invoke("Hi", mode="sequential")
    assert message.tool_calls == []
    assert message.invalid_tool_calls == []


def test_response_format_with_tools_raises(chat: ChatParallelReason) -> None:
    with pytest.raises(ValueError, match="cannot be combined"):
        chat.bind_tools([add]).invoke("Hi", response_format={"type": "json_object"})


def _fake_answer(text: str, mode: str) -> Any:
    """An `iter_answer` stand-in that streams ``text`` in small pieces."""

    def iter_answer(*args: Any, **kwargs: Any) -> Any:
        for i in range(0, len(text), 5):
            yield pl.ContentDelta(text[i : i + 5])
        steps = ["A", "B"] if mode == "parallel" else []
        report = ParallelReport(mode_used=mode, steps=steps)  # type: ignore[arg-type]
        return pl.AnswerResult(text, report, 10, 20)

    return iter_answer


def test_a_call_inside_parallel_steps_is_parsed(
    chat: ChatParallelReason, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        "**A**: I need the sum.\n\n**B**: <tool_call>\n"
        '{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n\nDone.'
    )
    monkeypatch.setattr(pl, "iter_answer", _fake_answer(text, "parallel"))
    bound = chat.bind_tools([add], mode="parallel")
    message = bound.invoke("Add 2 and 3.")
    assert _calls(message) == [("add", {"a": 2, "b": 3})]
    assert message.content == "**A**: I need the sum.\n\n**B**: \n\nDone."
    full = _join(bound.stream("Add 2 and 3."))
    assert full.content == message.content
    assert _calls(full) == _calls(message)


# --------------------------------------------------------------------- structured output


@pytest.mark.parametrize("seed", SEEDS)
def test_structured_output_gives_a_valid_instance(chat: ChatParallelReason, seed: int) -> None:
    record = chat.with_structured_output(Record).invoke(
        "Make a record.", temperature=1.0, seed=seed
    )
    assert isinstance(record, Record)
    Record.model_validate(record.model_dump())


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_methods(chat: ChatParallelReason, method: str) -> None:
    record = chat.with_structured_output(Record, method=method).invoke("Make a record.")  # type: ignore[arg-type]
    assert isinstance(record, Record)


@pytest.mark.parametrize("schema", [RecordDict, Record.model_json_schema()])
def test_structured_output_dict_schemas(chat: ChatParallelReason, schema: Any) -> None:
    result = chat.with_structured_output(schema).invoke("Make a record.")
    assert isinstance(result, dict)
    assert set(result) <= {"count", "name", "color", "tags"}
    assert isinstance(result["count"], int)


def test_structured_output_json_mode_without_schema(
    chat: ChatParallelReason, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any object: the random model writes one string until the budget ends, an error.
    result = chat.with_structured_output(None, method="json_mode", include_raw=True).invoke("?")
    assert result["raw"].response_metadata["finish_reason"] == "length"
    assert isinstance(result["parsing_error"], OutputParserException)
    monkeypatch.setattr(pl, "iter_answer", _fake_answer('{"x": [1, 2]}', "sequential"))
    assert chat.with_structured_output(None, method="json_mode").invoke("?") == {"x": [1, 2]}


def test_structured_output_include_raw(chat: ChatParallelReason) -> None:
    result = chat.with_structured_output(Record, include_raw=True).invoke("Make a record.")
    assert set(result) == {"raw", "parsed", "parsing_error"}
    assert isinstance(result["raw"], AIMessage)
    assert isinstance(result["parsed"], Record)
    assert result["parsing_error"] is None
    assert json.loads(result["raw"].content) == result["parsed"].model_dump(mode="json")
    report = result["raw"].response_metadata["parallel"]
    assert report["fallback_reason"].startswith("structured output")


def test_structured_output_include_raw_reports_a_parsing_error(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    # Two tokens cannot hold a record: the error is returned, not raised.
    chat = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, max_tokens=2)
    result = chat.with_structured_output(Record, include_raw=True).invoke("Hi")
    assert result["parsed"] is None
    assert isinstance(result["parsing_error"], OutputParserException)
    assert result["raw"].response_metadata["finish_reason"] == "length"
    with pytest.raises(OutputParserException):
        chat.with_structured_output(Record).invoke("Hi")


class Pair(BaseModel):
    """Two optional strings: a cut-off object would still validate if it were closed."""

    a: str | None = None
    b: str | None = None


_PAIR_DICT = {
    "title": "Pair",
    "type": "object",
    "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
    "required": ["a", "b"],
}


@pytest.mark.parametrize(
    ("schema", "method"),
    [
        (_PAIR_DICT, "json_schema"),
        (Pair, "json_schema"),
        (_PAIR_DICT, "function_calling"),
        (Pair, "function_calling"),
    ],
)
def test_structured_output_cut_off_is_a_parsing_error_never_partial_data(
    tiny_llama: Any, tiny_tokenizer: Any, schema: Any, method: str
) -> None:
    # Eight tokens cut the object inside its first string: LangChain's own parsers closed
    # it ({"a": "..."}) or returned None; here it is a parsing error, returned or raised.
    chat = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, max_tokens=8)
    runnable = chat.with_structured_output(schema, method=method, include_raw=True)  # type: ignore[arg-type]
    result = runnable.invoke("Name two cats.")
    assert result["raw"].response_metadata["finish_reason"] == "length"
    assert result["parsed"] is None
    assert isinstance(result["parsing_error"], OutputParserException)
    assert "max_tokens" in str(result["parsing_error"])
    strict = chat.with_structured_output(schema, method=method)  # type: ignore[arg-type]
    with pytest.raises(OutputParserException, match="not complete"):
        strict.invoke("Name two cats.")
    with pytest.raises(OutputParserException, match="not complete"):
        list(strict.stream("Name two cats."))


async def test_structured_output_cut_off_stream_raises_async(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    chat = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, max_tokens=8)
    with pytest.raises(OutputParserException, match="not complete"):
        async for _ in chat.with_structured_output(_PAIR_DICT).astream("Name two cats."):
            pass


class TreeNode(BaseModel):
    """A recursive model: a grammar for it would have no finite shape."""

    name: str
    children: list[TreeNode] = []


_RECURSIVE_DICT = {
    "title": "A",
    "type": "object",
    "properties": {"b": {"$ref": "#/$defs/B"}},
    "$defs": {
        "A": {"type": "object", "properties": {"b": {"$ref": "#/$defs/B"}}},
        "B": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}},
    },
}


@pytest.mark.parametrize(
    ("schema", "match"),
    [
        ({"type": "banana", "title": "X"}, "'banana', which is not a JSON Schema type"),
        (
            {"title": "X", "type": "object", "properties": {"a": {"type": ["string", "pear"]}}},
            "#/properties/a has type 'pear'",
        ),
        (_RECURSIVE_DICT, r"recursive \(#/\$defs/B -> #/\$defs/A -> #/\$defs/B\)"),
        (TreeNode, r"recursive \(#/\$defs/TreeNode -> #/\$defs/TreeNode\)"),
        ({"title": "X", "properties": {"a": {"$ref": "other.json#/A"}}}, "does not point into"),
    ],
)
@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_refuses_a_schema_the_grammar_cannot_enforce(
    chat: ChatParallelReason, schema: Any, match: str, method: str
) -> None:
    with pytest.raises(ValueError, match=match):
        chat.with_structured_output(schema, method=method)  # type: ignore[arg-type]


def test_a_forced_call_of_a_tool_the_grammar_cannot_enforce_is_refused(
    chat: ChatParallelReason,
) -> None:
    # Converting TreeNode to a tool resolved its recursion to "any value": the forced call's
    # grammar then constrained nothing below the first level.
    with pytest.raises(ValueError, match="recursive"):
        chat.bind_tools([TreeNode], tool_choice="any")
    banana = {"type": "function", "function": {"name": "f", "parameters": {"type": "banana"}}}
    with pytest.raises(ValueError, match="banana"):
        chat.bind_tools([add, banana], tool_choice="f")
    # Not forced, the model writes the call freely: nothing to enforce, nothing refused.
    chat.bind_tools([TreeNode])
    chat.bind_tools([add, banana], tool_choice="add")


def test_response_format_refuses_a_schema_the_grammar_cannot_enforce(
    chat: ChatParallelReason,
) -> None:
    # Bound by hand, the check runs when the call starts, before anything is decoded.
    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "banana"}}}
    with pytest.raises(ValueError, match="banana"):
        chat.bind(response_format=bad).invoke("Hi")
    with pytest.raises(ValueError, match="recursive"):
        chat.bind(response_format=TreeNode).invoke("Hi")


def test_schema_check_accepts_property_names_that_are_keywords() -> None:
    # Names such as "type" or "enum" are property names here, not keywords.
    schema = {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "enum": {"$ref": "#/$defs/E"},
        },
        "$defs": {"E": {"enum": ["a", "b"]}},
    }
    assert grammar_safe_schema(schema)["properties"]["enum"] == {"enum": ["a", "b"]}


def test_a_huge_enum_is_enforced_without_writing_it_into_the_prompt(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    # Written out, 1,000 values made the prompt overflow the tiny model's 2,048-token window
    # and the error said to shorten the messages; the prompt's schema is a hint, kept short.
    values = [f"v{i}" for i in range(1000)]
    schema = {
        "title": "Code",
        "type": "object",
        "properties": {"code": {"enum": values}},
        "required": ["code"],
    }
    chat = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, max_tokens=12)
    result = chat.with_structured_output(schema, include_raw=True).invoke("Pick a code.")
    assert result["parsing_error"] is None
    assert result["parsed"]["code"] in values
    assert result["raw"].usage_metadata["input_tokens"] < 400


def test_tools_written_as_text_show_long_enums_shortened() -> None:
    codes = [f"v{i}" for i in range(1000)]
    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a code up.",
            "parameters": {"type": "object", "properties": {"code": {"enum": codes}}},
        },
    }
    system = render_tool_messages([{"role": "user", "content": "Hi"}], [tool])[0]["content"]
    assert '"v11", "... (988 more allowed values)"' in system
    assert len(system) < 2000


def test_the_schema_hint_is_bounded() -> None:
    wide = {"type": "object", "properties": {f"f{i}": {"type": "integer"} for i in range(2000)}}
    hint = structured_output_instruction(wide)
    assert len(hint) < 300
    assert "top-level fields are: f0, f1" in hint
    small = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}}
    assert json.dumps(small) in structured_output_instruction(small)


def test_structured_output_streams_valid_instances(chat: ChatParallelReason) -> None:
    runnable = chat.with_structured_output(Record)
    parts = list(runnable.stream("Make a record."))
    assert parts
    assert all(isinstance(part, Record) for part in parts)
    assert parts[-1] == runnable.invoke("Make a record.")


def test_structured_output_bad_arguments_raise(chat: ChatParallelReason) -> None:
    with pytest.raises(ValueError, match="not supported"):
        chat.with_structured_output(Record, method="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a schema"):
        chat.with_structured_output(None)


def test_structured_output_instance_fails_validation_when_not_forced() -> None:
    # The schema really constrains: a record outside it is rejected by Pydantic.
    with pytest.raises(ValidationError):
        Record(count=100, name="x", color=Color.red, tags=[])


# ------------------------------------------------------------------ tools for other agents


def test_parallel_reasoner_tool_answers_a_question(chat: ChatParallelReason) -> None:
    reasoner = parallel_reasoner_tool(chat, name="reasoner", description="Thinks hard.")
    assert reasoner.name == "reasoner"
    assert set(reasoner.args) == {"question"}
    answer = reasoner.invoke({"question": "What is 2 + 3?"})
    assert answer == chat.invoke("What is 2 + 3?").text


async def test_parallel_reasoner_tool_async(chat: ChatParallelReason) -> None:
    reasoner = parallel_reasoner_tool(chat)
    assert await reasoner.ainvoke({"question": "Why?"}) == chat.invoke("Why?").text


def test_parallel_reasoner_tool_can_be_called_by_another_model(
    chat: ChatParallelReason,
) -> None:
    reasoner = parallel_reasoner_tool(chat)
    call = chat.bind_tools([reasoner], tool_choice="any").invoke("Ask the reasoner.")
    [tool_call] = call.tool_calls
    assert tool_call["name"] == "parallel_reasoner"
    result = reasoner.invoke(tool_call)
    assert isinstance(result, ToolMessage)
    assert result.tool_call_id == tool_call["id"]


def test_agent_loop_with_a_forced_first_call(chat: ChatParallelReason) -> None:
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRequest, wrap_model_call

    @wrap_model_call
    def call_a_tool_first(request: ModelRequest, handler: Any) -> Any:
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request if answered else request.override(tool_choice="any"))

    agent = create_agent(chat, tools=[add], middleware=[call_a_tool_first])
    state = agent.invoke({"messages": [HumanMessage("What is 2 + 3?")]})
    kinds = [type(m).__name__ for m in state["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    first, result = state["messages"][1], state["messages"][2]
    [call] = first.tool_calls
    assert result.content == str(call["args"]["a"] + call["args"]["b"])
    assert state["messages"][-1].tool_calls == []
