"""Output parsers for structured output that never return partial data as a final answer.

Contract: LangChain's JSON parsers close a cut-off object (``{"a": "x",`` parses as
``{"a": "x"}``) and its tool parsers return None when no call came back. The parsers here keep
LangChain's partial values while streaming, but the final value is the whole object or an
`OutputParserException` (which ``include_raw=True`` returns as ``parsing_error``): a truncated or
invalid answer is an error, never data. A stream is checked the same way when it ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import BaseMessage, BaseMessageChunk
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGenerationChunk, Generation, GenerationChunk

__all__ = [
    "CompleteJsonParser",
    "CompletePydanticParser",
    "CompletePydanticToolParser",
    "CompleteToolArgsParser",
]

_FIX = "raise max_tokens (or shorten what the schema asks for) and call again"


def _finish_reason(result: list[Generation]) -> str | None:
    message = getattr(result[0], "message", None)
    metadata = getattr(message, "response_metadata", None) or {}
    return metadata.get("finish_reason")


def complete_json(result: list[Generation]) -> Any:
    """The answer's text as one whole JSON value, or an `OutputParserException` saying why."""
    text = result[0].text.strip()
    try:
        return json.loads(text)
    except ValueError as e:
        cut = _finish_reason(result) == "length"
        reason = "the token budget ran out" if cut else f"not one JSON value: {e}"
        msg = f"the JSON answer is not complete ({reason}): {_FIX}"
        raise OutputParserException(msg, llm_output=text) from e


def _require_call(result: list[Generation], parsed: Any) -> Any:
    """``parsed`` unless the forced tool call is missing, as an `OutputParserException`."""
    if parsed is not None:
        return parsed
    message = getattr(result[0], "message", None)
    bad = getattr(message, "invalid_tool_calls", None) or []
    reason = bad[0].get("error") if bad else "no tool call came back"
    msg = f"the forced tool call is not complete ({reason}): {_FIX}"
    raise OutputParserException(msg, llm_output=result[0].text)


def _add(acc: Any, chunk: str | BaseMessage) -> Any:
    """The stream so far as one generation (as LangChain's cumulative parsers build it)."""
    gen: GenerationChunk | ChatGenerationChunk
    if isinstance(chunk, BaseMessageChunk):
        gen = ChatGenerationChunk(message=chunk)
    elif isinstance(chunk, BaseMessage):
        gen = ChatGenerationChunk(message=BaseMessageChunk(**chunk.model_dump()))
    else:
        gen = GenerationChunk(text=chunk)
    return gen if acc is None else acc + gen


class _CheckedAtEnd:
    """Streams the parent's partial values, then parses the whole stream as a final answer
    (``partial=False``), so a cut-off stream raises as `invoke` does."""

    def _transform(self, input: Iterator[str | BaseMessage]) -> Iterator[Any]:
        whole: list[Any] = [None]

        def tee() -> Iterator[str | BaseMessage]:
            for chunk in input:
                whole[0] = _add(whole[0], chunk)
                yield chunk

        yield from super()._transform(tee())  # type: ignore[misc]
        if whole[0] is not None:
            self.parse_result([whole[0]], partial=False)  # type: ignore[attr-defined]

    async def _atransform(self, input: AsyncIterator[str | BaseMessage]) -> AsyncIterator[Any]:
        whole: list[Any] = [None]

        async def tee() -> AsyncIterator[str | BaseMessage]:
            async for chunk in input:
                whole[0] = _add(whole[0], chunk)
                yield chunk

        async for value in super()._atransform(tee()):  # type: ignore[misc]
            yield value
        if whole[0] is not None:
            self.parse_result([whole[0]], partial=False)  # type: ignore[attr-defined]


class CompleteJsonParser(_CheckedAtEnd, JsonOutputParser):
    """`JsonOutputParser` whose final value is the whole JSON value or an error."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        """Partial: LangChain's best effort; final: `complete_json`."""
        if partial:
            return super().parse_result(result, partial=True)
        return complete_json(result)


class CompletePydanticParser(_CheckedAtEnd, PydanticOutputParser):
    """`PydanticOutputParser` whose final value is built from the whole JSON object only."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        """Partial: LangChain's best effort; final: `complete_json`, then validated."""
        if partial:
            return super().parse_result(result, partial=True)
        return self._parse_obj(complete_json(result))


class CompleteToolArgsParser(_CheckedAtEnd, JsonOutputKeyToolsParser):
    """`JsonOutputKeyToolsParser` whose final value is the forced call's arguments or an error."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        """Partial: LangChain's best effort; final: the call, or an error when it is missing."""
        parsed = super().parse_result(result, partial=partial)
        return parsed if partial else _require_call(result, parsed)


class CompletePydanticToolParser(_CheckedAtEnd, PydanticToolsParser):
    """`PydanticToolsParser` whose final value is the forced call as an instance or an error."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        """Partial: LangChain's best effort; final: the call, or an error when it is missing."""
        parsed = super().parse_result(result, partial=partial)
        return parsed if partial else _require_call(result, parsed)
