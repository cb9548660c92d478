"""The form of one call's answer: free text, tool calls, or JSON forced by a grammar.

Contract: `OutputForm.from_kwargs` reads the call kwargs `bind_tools` and
`with_structured_output` set (`tools`, `tool_choice`, `response_format`) and refuses bad
combinations with the fix; `OutputForm.prepare` adapts messages and the `PipelineConfig` to the
tokenizer's chat template once the model is loaded (tools written as text when the template
cannot render them; a grammar and a sequential reason for forced output).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from . import tools as _tools
from .structured_parsers import (
    CompleteJsonParser,
    CompletePydanticParser,
    CompletePydanticToolParser,
    CompleteToolArgsParser,
)

if TYPE_CHECKING:
    from types import ModuleType

    from .pipeline import PipelineConfig

__all__ = [
    "TOOLS_SEQUENTIAL",
    "OutputForm",
    "bound_tools",
    "enforceable_json_schema",
    "response_schema",
    "structured_output",
]


TOOLS_SEQUENTIAL = "tools bound: decoded sequentially so a tool call is not split across steps"


@dataclass(frozen=True)
class OutputForm:
    """The form one call's answer takes: free text, maybe tool calls, or forced JSON.

    Built from the call's kwargs (`bind_tools`, `with_structured_output`) on the caller's
    thread; `prepare` adapts messages and config to the tokenizer once the model is loaded.
    """

    tools: tuple[dict[str, Any], ...] = ()
    """Bound tools, OpenAI format."""
    tool_choice: str | None = None
    """None/"auto" (the model may call), "none", "any" (forced) or a tool name (forced)."""
    json_schema: dict[str, Any] | None = None
    """Structured output: the answer is JSON for this schema."""
    json_mode: bool = False
    """Structured output without a schema: any JSON object."""
    max_string_chars: int | None = None
    """Cap on unbounded JSON strings in forced output (the chat model's field)."""

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], max_string_chars: int | None) -> OutputForm:
        tools = tuple(convert_to_openai_tool(tool) for tool in kwargs.get("tools") or ())
        choice = _tools.normalize_tool_choice(kwargs.get("tool_choice"), _tools.tool_names(tools))
        if choice not in (None, "auto", "none") and not tools:
            msg = f"tool_choice={choice!r} needs tools: use llm.bind_tools(tools, tool_choice=...)"
            raise ValueError(msg)
        schema, json_mode = response_schema(kwargs.get("response_format"))
        if (schema is not None or json_mode) and tools and choice != "none":
            msg = (
                "response_format and tools cannot be combined: the answer is either JSON or "
                "tool calls; use with_structured_output(method='function_calling') instead"
            )
            raise ValueError(msg)
        return cls(tools, choice, schema, json_mode, max_string_chars)

    @property
    def parses_calls(self) -> bool:
        """True when the answer may hold tool calls to parse."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> bool:
        return self.parses_calls and self.tool_choice not in (None, "auto")

    def prepare(
        self, tokenizer: Any, messages: list[dict[str, Any]], config: PipelineConfig
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, PipelineConfig]:
        """(messages, tools for the template, config) for this tokenizer's chat template."""
        pl = _pipeline()
        template = getattr(tokenizer, "chat_template", None)
        offered = list(self.tools) if self.parses_calls else None
        template_tools = None
        if _tools.template_renders_tools(template):
            template_tools = offered
        else:  # e.g. SmolLM2: tools, calls and results written as text
            messages = _tools.render_tool_messages(messages, offered)
        grammar = reason = None
        if self.forced_tool:
            fmt = _tools.tool_call_format(template)
            name = None if self.tool_choice == "any" else self.tool_choice
            schema = _tools.forced_call_schema(self.tools, name, self.max_string_chars)
            grammar = pl.OutputGrammar(
                json_schema=json.dumps(schema), prefix=fmt.prefix, suffix=fmt.suffix
            )
            reason = (
                f"tool_choice={self.tool_choice!r}: the call is forced by a grammar, "
                "decoded sequentially"
            )
        elif self.json_schema is not None or self.json_mode:
            messages = _tools.with_system_text(
                messages, _tools.structured_output_instruction(self.json_schema)
            )
            schema = (
                {"type": "object"}
                if self.json_schema is None
                else _tools.grammar_safe_schema(self.json_schema, self.max_string_chars)
            )
            grammar = pl.OutputGrammar(json_schema=json.dumps(schema))
            reason = "structured output: the JSON is forced by a grammar, decoded sequentially"
        elif offered and config.mode == "auto":
            reason = TOOLS_SEQUENTIAL
        if grammar is not None or reason is not None:
            config = replace(config, grammar=grammar, sequential_reason=reason)
        return messages, template_tools, config


def response_schema(response_format: Any) -> tuple[dict[str, Any] | None, bool]:
    """(JSON schema, json mode) of a ``response_format`` call kwarg.

    Accepted: None; ``{"type": "json_object"}`` (any JSON object); ``{"type": "json_schema",
    "json_schema": {"schema": ...}}`` (OpenAI) or ``{"type": "json_schema", "schema": ...}``;
    or a schema itself (a Pydantic class, TypedDict or JSON schema dict).
    """
    if response_format is None:
        return None, False
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        return None, True
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        inner = response_format.get("json_schema", response_format)
        schema = inner.get("schema") if isinstance(inner, dict) else None
        if not isinstance(schema, dict):
            msg = "response_format {'type': 'json_schema'} needs a 'schema' dict"
            raise ValueError(msg)
        _tools.check_schema(schema)
        return schema, False
    return enforceable_json_schema(response_format), False


def bound_tools(tools: Sequence[Any], tool_choice: Any) -> tuple[list[dict[str, Any]], str | None]:
    """``bind_tools``' arguments as (OpenAI-format tools, normalized tool choice).

    A forced call is decoded under a grammar from the tool's schema, so each tool it may call
    is checked first (`tools.check_schema`); conversion would resolve a Pydantic model's
    recursive ``$ref`` to "any value" and the grammar would then enforce nothing there.
    """
    formatted = [convert_to_openai_tool(tool) for tool in tools]
    choice = _tools.normalize_tool_choice(tool_choice, _tools.tool_names(formatted))
    if choice not in (None, "auto", "none"):
        for tool, spec in zip(tools, formatted, strict=True):
            if choice == "any" or spec["function"]["name"] == choice:
                _check_before_conversion(tool)
    return formatted, choice


def _check_before_conversion(schema: Any) -> None:
    """Check a schema (or a tool's) as given: conversion drops an unknown top-level type, and
    resolves a Pydantic class's recursive $refs to "any value"."""
    if isinstance(schema, dict) and isinstance(schema.get("function"), dict):  # OpenAI tool
        schema = schema["function"].get("parameters") or {}
    schema = getattr(schema, "args_schema", None) or schema  # a LangChain tool
    if isinstance(schema, dict):
        _tools.check_schema(schema)
    elif isinstance(schema, type) and is_basemodel_subclass(schema):
        # Pydantic 2 classes have model_json_schema; pydantic.v1 classes (still accepted by
        # LangChain) have schema().
        dump = getattr(schema, "model_json_schema", None) or schema.schema
        _tools.check_schema(dump())


def enforceable_json_schema(schema: dict[str, Any] | type) -> dict[str, Any]:
    """``schema`` (a Pydantic class, TypedDict or JSON schema dict) as a JSON schema dict.

    Raises:
        ValueError: It is not a schema, or the output grammar cannot enforce it
            (`tools.check_schema`: an unknown type, recursion).
    """
    _check_before_conversion(schema)
    try:
        converted = convert_to_json_schema(schema)
    except (TypeError, ValueError) as e:
        msg = (
            f"{schema!r} is not a schema; pass a Pydantic class, a TypedDict, a JSON schema "
            "dict (with a 'title') or {'type': 'json_object'}"
        )
        raise ValueError(msg) from e
    _tools.check_schema(converted)
    return converted


def _pipeline() -> ModuleType:
    """The pipeline package, imported on first use: it pulls in torch and transformers, which
    `import langchain_parallel_reason` (and the CLI's `--help`) should not pay for."""
    from . import pipeline

    return pipeline


def structured_output(
    model: BaseChatModel,
    schema: dict[str, Any] | type | None,
    *,
    method: str,
    include_raw: bool,
    strict: bool | None,
) -> Runnable:
    """``model`` bound to answer as ``schema`` (by ``method``), piped into the parser.

    The body of `ChatParallelReason.with_structured_output` (see there): "function_calling"
    forces a call of a tool made from the schema, "json_schema" / "json_mode" bind a
    ``response_format``; ``include_raw`` returns the raw message with the parsed value or the
    parsing error instead of raising.
    """
    if schema is None and method != "json_mode":
        msg = f"method={method!r} needs a schema; pass one or use method='json_mode'"
        raise ValueError(msg)
    json_schema = None if schema is None else enforceable_json_schema(schema)
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
    if schema is None:
        ls_format = {}
    parser: Runnable
    if method == "function_calling":
        tool_name = convert_to_openai_tool(schema)["function"]["name"]
        llm = model.bind_tools(
            [schema], tool_choice=tool_name, ls_structured_output_format=ls_format
        )
        parser = (
            CompletePydanticToolParser(tools=[schema], first_tool_only=True)
            if is_pydantic
            else CompleteToolArgsParser(key_name=tool_name, first_tool_only=True)
        )
    elif method in ("json_schema", "json_mode"):
        response_format: dict[str, Any] = (
            {"type": "json_object"}
            if schema is None
            else {"type": "json_schema", "schema": json_schema}
        )
        llm = model.bind(response_format=response_format, ls_structured_output_format=ls_format)
        parser = (
            CompletePydanticParser(pydantic_object=schema) if is_pydantic else CompleteJsonParser()
        )
    else:
        msg = (
            f"method={method!r} is not supported; use 'json_schema', 'function_calling' "
            "or 'json_mode'"
        )
        raise ValueError(msg)
    if not include_raw:
        return llm | parser
    parse = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    no_parse = RunnablePassthrough.assign(parsed=lambda _: None)
    with_fallback = parse.with_fallbacks([no_parse], exception_key="parsing_error")
    return RunnableMap(raw=llm) | with_fallback
