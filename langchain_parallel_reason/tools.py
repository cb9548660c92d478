"""Tool calling and structured output for ChatParallelReason: formats, prompts, grammars, parsing.

Contract: pure text and JSON work, no torch. `parse_tool_calls` turns any model output into
content plus LangChain `tool_calls` / `invalid_tool_calls` and never raises; `ToolCallStream`
does the same incrementally, holding back text that may belong to a call. `forced_call_schema`
gives the JSON schema a forced call's JSON must match, and `ToolCallFormat` the text around it.
Templates that cannot render tools (SmolLM2's) get them from `render_tool_messages`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langchain_core.messages import InvalidToolCall, ToolCall, ToolCallChunk
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.utils.json_schema import dereference_refs

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.tools import BaseTool

__all__ = [
    "BARE_JSON",
    "HERMES",
    "SMOLLM2",
    "ParsedOutput",
    "ToolCallFormat",
    "ToolCallStream",
    "check_schema",
    "forced_call_schema",
    "grammar_safe_schema",
    "normalize_tool_choice",
    "parallel_reasoner_tool",
    "parse_tool_calls",
    "render_tool_messages",
    "structured_output_instruction",
    "template_renders_tools",
    "tool_call_format",
    "tool_names",
    "with_system_text",
]


# ------------------------------------------------------------------------------ formats


@dataclass(frozen=True)
class ToolCallFormat:
    """How one model writes a tool call: ``prefix`` + call JSON + ``suffix``.

    A forced call prefills ``prefix`` (the model never has to find the tag), decodes one
    ``{"name": ..., "arguments": ...}`` object under a grammar, then appends ``suffix``.
    """

    name: str
    prefix: str
    suffix: str


HERMES = ToolCallFormat("hermes", "<tool_call>\n", "\n</tool_call>")
"""Hermes / Qwen2.5 / SmolLM3: one JSON object per ``<tool_call>`` block."""
SMOLLM2 = ToolCallFormat("smollm2", "<tool_call>[\n", "\n]</tool_call>")
"""SmolLM2's tool-use format: a JSON list of calls inside one ``<tool_call>`` block."""
BARE_JSON = ToolCallFormat("json", "", "")
"""A template that renders tools without tags (e.g. Llama 3.1): a bare JSON object."""

_TAG_OPEN = "<tool_call>"
_TAG_CLOSE = "</tool_call>"


def template_renders_tools(chat_template: Any) -> bool:
    """True when a chat template renders ``tools=`` and assistant ``tool_calls`` itself."""
    return (
        isinstance(chat_template, str)
        and "tools" in chat_template
        and "tool_calls" in (chat_template)
    )


def tool_call_format(chat_template: Any) -> ToolCallFormat:
    """The call format a model expects, read from its chat template.

    A template that renders tools and mentions ``<tool_call>`` means Hermes-style blocks; one
    that renders tools without the tag means a bare JSON object; a template without tool
    support gets our SmolLM2-style prompt (`render_tool_messages`), so the SmolLM2 format.
    """
    if not template_renders_tools(chat_template):
        return SMOLLM2
    return HERMES if _TAG_OPEN in chat_template else BARE_JSON


# ---------------------------------------------------------------- prompts without tools


def _tools_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    # Long enums and descriptions shortened as in the structured-output hint (`_hint`): a
    # forced call's grammar enforces the whole schema, a free one is checked when parsed.
    functions = json.dumps([_hint(tool["function"]) for tool in tools], ensure_ascii=False)
    return (
        "You can call functions to answer the user. The functions you may call are listed "
        f"as JSON inside <tools></tools>:\n<tools>{functions}</tools>\n"
        "To call functions, reply with nothing but a JSON list of calls inside "
        "<tool_call></tool_call> tags, with arguments of the right types, e.g.\n"
        '<tool_call>[\n{"name": "function_name", "arguments": {"argument": "value"}}\n]'
        "</tool_call>\nWhen a function result (<tool_response>) answers the question, or "
        "no function fits, answer in plain text."
    )


def _call_text(calls: Sequence[dict[str, Any]]) -> str:
    """Assistant tool calls (OpenAI template shape) in the SmolLM2 format."""
    items = []
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        items.append(f'{{"name": {json.dumps(function["name"])}, "arguments": {arguments}}}')
    return SMOLLM2.prefix + ",\n".join(items) + SMOLLM2.suffix


def render_tool_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Chat-template messages with tools written as text, for templates without tool support.

    The tool list goes into the system message (before the caller's own system text),
    assistant tool calls become ``<tool_call>[...]</tool_call>`` text, and tool results
    become user turns of ``<tool_response>`` blocks (consecutive results share one turn).
    Plain user/assistant/system messages pass through unchanged.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            text = _call_text(message["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{text}" if content else text})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
        else:
            out.append({k: v for k, v in message.items() if k not in ("tool_calls",)})
    for message in out:
        message.pop("_tool_turn", None)
    if tools:
        prompt = _tools_system_prompt(tools)
        if out and out[0].get("role") == "system":
            caller = out[0].get("content") or ""
            out[0] = {**out[0], "content": f"{prompt}\n\n{caller}" if caller else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def with_system_text(messages: Sequence[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Messages with ``text`` appended to the first system message (or one added first)."""
    out = list(messages)
    if out and out[0].get("role") == "system":
        own = out[0].get("content") or ""
        out[0] = {**out[0], "content": f"{own}\n\n{text}" if own else text}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


# The schema shown to the model is a hint (the grammar enforces the whole schema), so it is
# kept short: a 20,000-value enum written out made the prompt overflow the context window.
SCHEMA_HINT_CHARS = 4000
_HINT_ITEMS = 12
_HINT_TEXT_CHARS = 200


def structured_output_instruction(
    schema: dict[str, Any] | None, max_chars: int = SCHEMA_HINT_CHARS
) -> str:
    """The system-prompt line that tells the model what JSON to write.

    The schema is shown as JSON of at most about ``max_chars`` characters: long enums show
    their first values and a count of the rest, long descriptions are cut, and a schema still
    too long is named by its top-level fields only. The output grammar enforces all of it.
    """
    if schema is None:
        return "Reply with one JSON object and nothing else."
    lead = "Reply with one JSON object and nothing else. It must match this JSON schema"
    text = json.dumps(schema, ensure_ascii=False)
    if len(text) > max_chars:
        text = json.dumps(_hint(schema), ensure_ascii=False)
    if len(text) <= max_chars:
        return f"{lead}, with short, sensible values for the user's request:\n{text}"
    fields = list(schema.get("properties") or {})
    shown = ", ".join(fields[:_HINT_ITEMS]) + (", ..." if len(fields) > _HINT_ITEMS else "")
    return f"{lead} (too long to show); its top-level fields are: {shown or 'none'}."


def _hint(node: Any) -> Any:
    """``node`` with long enums and texts shortened (for the prompt, not the grammar)."""
    if isinstance(node, list):
        return [_hint(item) for item in node]
    if isinstance(node, str) and len(node) > _HINT_TEXT_CHARS:
        return node[:_HINT_TEXT_CHARS] + "..."
    if not isinstance(node, dict):
        return node
    out = {key: _hint(value) for key, value in node.items() if key != "enum"}
    enum = node.get("enum")
    if isinstance(enum, list) and len(enum) > _HINT_ITEMS:
        rest = len(enum) - _HINT_ITEMS
        out["enum"] = [*enum[:_HINT_ITEMS], f"... ({rest} more allowed values)"]
    elif enum is not None:
        out["enum"] = enum
    return out


# ------------------------------------------------------------------------- tool choice


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str | None:
    """Map a LangChain/OpenAI ``tool_choice`` to None, "auto", "none", "any" or a tool name.

    Accepted: None, "auto", "none", "any", "required", True (any tool), a tool name, or a
    dict ``{"type": "function", "function": {"name": ...}}`` / ``{"name": ...}``.

    Raises:
        ValueError: An unknown choice or a name that is not among the bound tools.
    """
    if tool_choice is None or tool_choice == "auto":
        return None if tool_choice is None else "auto"
    if tool_choice is True or tool_choice in ("any", "required"):
        return "any"
    if tool_choice is False or tool_choice == "none":
        return "none"
    name = tool_choice
    if isinstance(tool_choice, dict):
        inner = tool_choice.get("function", tool_choice)
        name = inner.get("name") if isinstance(inner, dict) else None
        if name is None and tool_choice.get("type") in ("any", "required", "auto", "none"):
            return normalize_tool_choice(tool_choice["type"], names)
    if not isinstance(name, str) or name not in names:
        msg = (
            f"tool_choice={tool_choice!r} is not a bound tool; use None, 'auto', 'none', "
            f"'any', 'required' or one of {list(names)}"
        )
        raise ValueError(msg)
    return name


# ----------------------------------------------------------------------------- grammars

# JSON schema keywords xgrammar 0.2.8 mishandles on strings: minLength/maxLength let raw
# control characters into the string (json.loads rejects them). A length-bounded `pattern`
# is exact, so the bounds become one.
_LENGTH_KEYS = ("minLength", "maxLength")


_JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})


def check_schema(schema: Any) -> None:
    """Raise ValueError, naming the place, where the output grammar cannot enforce ``schema``.

    Refused: a ``type`` that is not a JSON Schema type (``{"type": "banana"}``), a ``$ref``
    that does not point into the schema itself, and recursion (a ``$ref`` reached again while
    it is being expanded: a tree or a linked list), which resolving the references would
    otherwise loosen silently to "any value".
    """
    if not isinstance(schema, dict):
        msg = f"the schema must be a JSON schema dict, got {type(schema).__name__}"
        raise ValueError(msg)
    _check_node(schema, schema, "#", ())


# Keywords whose value is a schema, a list of schemas, or a map of names to schemas
# (``items`` is a schema or, in older drafts, a list).
_SUBSCHEMA = frozenset(
    {"additionalProperties", "not", "contains", "propertyNames", "if", "then", "else"}
    | {"additionalItems", "unevaluatedItems", "unevaluatedProperties"}
)
_SUBSCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SUBSCHEMA_MAPS = frozenset({"properties", "patternProperties", "dependentSchemas"})


def _check_node(node: Any, root: dict[str, Any], path: str, expanding: tuple[str, ...]) -> None:
    """Check one (sub)schema at ``path``; ``expanding`` holds the $refs being expanded."""
    if not isinstance(node, dict):
        return  # true / false schemas
    kinds = node.get("type")
    for kind in kinds if isinstance(kinds, list) else [] if kinds is None else [kinds]:
        if kind not in _JSON_TYPES:
            msg = (
                f"the schema cannot be enforced: {path} has type {kind!r}, which is not a JSON "
                f"Schema type; use one of {sorted(_JSON_TYPES)}"
            )
            raise ValueError(msg)
    ref = node.get("$ref")
    if isinstance(ref, str):
        if ref in expanding:
            cycle = " -> ".join([*expanding[expanding.index(ref) :], ref])
            msg = (
                f"the schema cannot be enforced: it is recursive ({cycle}); a grammar for "
                "structured output needs a finite shape: write the nesting out to the depth "
                "you need (e.g. a Node with a list of Leaf children)"
            )
            raise ValueError(msg)
        _check_node(_resolve(ref, root), root, ref, (*expanding, ref))
    for key, value in node.items():
        if key in _SUBSCHEMA or (key == "items" and isinstance(value, dict)):
            _check_node(value, root, f"{path}/{key}", expanding)
        elif key in _SUBSCHEMA_LISTS or (key == "items" and isinstance(value, list)):
            for i, item in enumerate(value if isinstance(value, list) else []):
                _check_node(item, root, f"{path}/{key}/{i}", expanding)
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, item in value.items():
                _check_node(item, root, f"{path}/{key}/{name}", expanding)


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    """The part of ``root`` a local ``$ref`` ("#/$defs/Name") points to."""
    target: Any = root
    if ref == "#" or ref.startswith("#/"):
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        if target is not None:
            return target
    msg = (
        f"the schema cannot be enforced: $ref {ref!r} does not point into the schema; "
        "put the definition under $defs and refer to it as '#/$defs/Name'"
    )
    raise ValueError(msg)


def grammar_safe_schema(schema: Any, max_string_chars: int | None = None) -> Any:
    """A copy of a JSON schema that xgrammar turns into a correct, bounded grammar.

    Raises ValueError where the grammar cannot enforce it (`check_schema`).
    ``$ref``s are resolved, and string length bounds become an equivalent ``pattern``
    (``^.{min,max}$``, which admits no escapes, quotes or control characters) unless the
    string already has a pattern, in which case the bounds are dropped. With
    ``max_string_chars``, plain strings without bounds get ``^.{0,max_string_chars}$``: a
    small model that loops inside a string then closes it instead of spending the whole
    token budget (the output still matches the original schema).
    """
    check_schema(schema)
    if isinstance(schema, dict) and ("$defs" in schema or "definitions" in schema):
        schema = dereference_refs(schema)
        schema = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    return _safe(schema, max_string_chars)


# A string with any of these is already bounded or shaped; the default cap leaves it alone.
_SHAPED_STRING_KEYS = frozenset({"pattern", "enum", "const", "format", *_LENGTH_KEYS})


def _safe(node: Any, cap: int | None) -> Any:
    if isinstance(node, list):
        return [_safe(item, cap) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _safe(value, cap) for key, value in node.items() if key not in _LENGTH_KEYS}
    low, high = node.get("minLength"), node.get("maxLength")
    if (low is not None or high is not None) and "pattern" not in node:
        low = int(low or 0)
        out["pattern"] = f"^.{{{low},{'' if high is None else int(high)}}}$"
    elif cap is not None and node.get("type") == "string" and not _SHAPED_STRING_KEYS & node.keys():
        out["pattern"] = f"^.{{0,{int(cap)}}}$"
    return out


def _call_schema(tool: dict[str, Any], max_string_chars: int | None) -> dict[str, Any]:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": grammar_safe_schema(parameters, max_string_chars),
        },
        "required": ["name", "arguments"],
    }


def forced_call_schema(
    tools: Sequence[dict[str, Any]], name: str | None = None, max_string_chars: int | None = None
) -> dict[str, Any]:
    """The JSON schema of one call ``{"name": <tool>, "arguments": <its parameters>}``.

    Args:
        tools: OpenAI-format tools (`convert_to_openai_tool` output).
        name: Force this tool; None allows any of them (``anyOf`` over the tools).
        max_string_chars: Cap on unbounded string arguments (see `grammar_safe_schema`).

    Raises:
        ValueError: No tools, or ``name`` is not among them.
    """
    chosen: dict[str, dict[str, Any]] = {}
    for tool in tools:
        tool_name = tool["function"]["name"]
        if name is None or tool_name == name:
            chosen.setdefault(tool_name, tool)  # one case per name (duplicates are merged)
    if not chosen:
        msg = f"no tool named {name!r} is bound" if name else "no tools are bound"
        raise ValueError(msg)
    cases = [_call_schema(tool, max_string_chars) for tool in chosen.values()]
    return cases[0] if len(cases) == 1 else {"anyOf": cases}


# ------------------------------------------------------------------------------ parsing


@dataclass
class ParsedOutput:
    """Model output split into text and calls (see `parse_tool_calls`)."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)

    def tool_call_chunks(self) -> list[ToolCallChunk]:
        """The calls as streaming chunks: args as JSON text; an invalid call keeps its raw
        text (tag included), which a chunk merge cannot mistake for arguments."""
        chunks = [
            tool_call_chunk(
                name=call["name"],
                args=json.dumps(call["args"], ensure_ascii=False),
                id=call["id"],
                index=i,
            )
            for i, call in enumerate(self.tool_calls)
        ]
        offset = len(chunks)
        chunks += [
            tool_call_chunk(name=bad["name"], args=bad["args"], id=bad["id"], index=offset + i)
            for i, bad in enumerate(self.invalid_tool_calls)
        ]
        return chunks


_BLOCK_RE = re.compile(re.escape(_TAG_OPEN) + r"(.*?)(?:" + re.escape(_TAG_CLOSE) + r"|\Z)", re.S)
_NAME_RE = re.compile(r'"name"\s*:\s*"([^"\\]+)"')
_FENCE_RE = re.compile(r"\A```[a-zA-Z]*\s*(.*?)\s*```\Z", re.S)


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _unfence(text: str) -> str:
    text = text.strip()
    match = _FENCE_RE.match(text)
    return match.group(1) if match else text


def _call_from(obj: Any) -> tuple[str, dict[str, Any], str | None] | str:
    """(name, args, id) of one decoded call object, or the reason it is not one."""
    if not isinstance(obj, dict):
        return f"a call must be a JSON object, got {type(obj).__name__}"
    if isinstance(obj.get("function"), dict):  # OpenAI shape {"type": "function", ...}
        obj = {**obj["function"], "id": obj.get("id")}
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return "the call has no 'name' string"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            return f"'arguments' is not valid JSON: {e}"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return f"'arguments' must be a JSON object, got {type(args).__name__}"
    call_id = obj.get("id")
    return name, args, call_id if isinstance(call_id, str) and call_id else None


def _calls_in(body: str, raw: str) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """Calls in one ``<tool_call>`` block body (an object or a list of objects)."""
    try:
        decoded = json.loads(_unfence(body))
    except ValueError as e:
        return [], [invalid_tool_call(args=raw, id=_new_id(), error=f"not valid JSON: {e}")]
    items = decoded if isinstance(decoded, list) else [decoded]
    calls: list[ToolCall] = []
    bad: list[InvalidToolCall] = []
    for item in items:
        got = _call_from(item)
        if isinstance(got, str):
            name = item.get("name") if isinstance(item, dict) else None
            bad.append(
                invalid_tool_call(
                    name=name if isinstance(name, str) else None,
                    args=raw,
                    id=_new_id(),
                    error=got,
                )
            )
        else:
            name, args, call_id = got
            calls.append(tool_call(name=name, args=args, id=call_id or _new_id()))
    return calls, bad


def _bare_calls(text: str) -> list[ToolCall] | None:
    """Calls when the whole text is one call object or a list of them, else None."""
    body = _unfence(text)
    if not body.startswith(("{", "[")):
        return None
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    items = decoded if isinstance(decoded, list) else [decoded]
    if not items:
        return None
    calls: list[ToolCall] = []
    for item in items:
        # Only objects that look like calls: a name and arguments (or parameters).
        if not isinstance(item, dict) or not ({"arguments", "parameters"} & item.keys()):
            return None
        got = _call_from(item)
        if isinstance(got, str):
            return None
        name, args, call_id = got
        calls.append(tool_call(name=name, args=args, id=call_id or _new_id()))
    return calls


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split model output into content and tool calls; never raises.

    Recognised: ``<tool_call>{...}</tool_call>`` blocks (Hermes/Qwen, one call each),
    ``<tool_call>[{...}, ...]</tool_call>`` (SmolLM2, a list), and output that is nothing
    but a call object or a list of them (``{"name": ..., "arguments"|"parameters": ...}``,
    optionally in a code fence). ``arguments`` may be an object or a JSON string. A block
    that does not parse, or an unclosed one (the budget ran out), becomes an invalid tool
    call holding the raw block text. Content is the text outside the blocks, stripped.
    """
    calls: list[ToolCall] = []
    bad: list[InvalidToolCall] = []
    pieces: list[str] = []
    last = 0
    for match in _BLOCK_RE.finditer(text):
        pieces.append(text[last : match.start()])
        last = match.end()
        raw = match.group(0)
        body = match.group(1)
        if not raw.endswith(_TAG_CLOSE):
            named = _NAME_RE.search(body)
            bad.append(
                invalid_tool_call(
                    name=named.group(1) if named else None,
                    args=raw,
                    id=_new_id(),
                    error="unterminated <tool_call> block (the token budget ran out?)",
                )
            )
            continue
        got, got_bad = _calls_in(body, raw)
        calls += got
        bad += got_bad
    pieces.append(text[last:])
    content = "".join(pieces).strip()
    if not calls and not bad and (bare := _bare_calls(content)) is not None:
        return ParsedOutput("", bare, [])
    return ParsedOutput(content, calls, bad)


class ToolCallStream:
    """Streams the content of an answer that may hold tool calls, then parses them.

    `push` returns the text that is certainly content: it holds back everything from a
    ``<tool_call>`` tag (or a trailing piece of one), trailing whitespace, and all of an
    answer that starts like bare JSON. `finish` parses the whole text and returns the rest
    of the content with the calls. The pushed-out text plus the rest equals
    ``parse_tool_calls(whole text).content``.
    """

    def __init__(self) -> None:
        self._text = ""
        self._sent = ""

    def push(self, delta: str) -> str:
        """Add streamed text; return the part that can be shown now."""
        self._text += delta
        text = self._text.lstrip()
        if text[:1] in ("{", "[", "`") or not text:
            return ""  # may be a bare JSON call: only the end tells
        end = text.find(_TAG_OPEN)
        if end < 0:
            end = len(text)
            for k in range(min(len(_TAG_OPEN) - 1, len(text)), 0, -1):
                if text.endswith(_TAG_OPEN[:k]):
                    end = len(text) - k
                    break
        safe = text[:end].rstrip()
        if len(safe) <= len(self._sent):
            return ""
        delta_out = safe[len(self._sent) :]
        self._sent = safe
        return delta_out

    def finish(self) -> tuple[str, ParsedOutput]:
        """Parse everything; return (content not yet pushed out, the parsed output)."""
        parsed = parse_tool_calls(self._text)
        rest = parsed.content[len(self._sent) :] if parsed.content.startswith(self._sent) else ""
        return rest, parsed


# ------------------------------------------------------------------ as a tool for agents


def parallel_reasoner_tool(
    llm: BaseChatModel,
    name: str = "parallel_reasoner",
    description: str = (
        "Think a question through in several independent steps and return a reasoned "
        "answer. Input: one self-contained question."
    ),
) -> BaseTool:
    """A LangChain tool that asks `llm` (e.g. a `ChatParallelReason`) one question.

    Give it to another agent (`create_agent(model, tools=[parallel_reasoner_tool(llm)])`):
    the tool takes ``question: str`` and returns the answer text. Sync and async calls both
    work; the async one does not block the event loop.

    Args:
        llm: The chat model that answers (any LangChain chat model works).
        name: The tool name the calling agent sees.
        description: What the calling agent is told the tool does.
    """
    from langchain_core.tools import StructuredTool
    from pydantic import BaseModel, Field

    class ParallelReasonerInput(BaseModel):
        question: str = Field(description="The question to reason about, self-contained.")

    def _text(message: Any) -> str:
        return message.text if hasattr(message, "text") else str(message.content)

    def ask(question: str) -> str:
        return _text(llm.invoke(question))

    async def aask(question: str) -> str:
        return _text(await llm.ainvoke(question))

    return StructuredTool.from_function(
        func=ask,
        coroutine=aask,
        name=name,
        description=description,
        args_schema=ParallelReasonerInput,
    )


def tool_names(tools: Iterable[dict[str, Any]]) -> list[str]:
    """Names of OpenAI-format tools, in order."""
    return [tool["function"]["name"] for tool in tools]
