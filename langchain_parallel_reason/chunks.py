"""The pipeline's events and answer as LangChain chunks and messages.

Contract: ``event_chunk`` maps one streamed event to a chunk (content, or a step's live text in
``additional_kwargs["parallel_steps"]``); ``final_chunk`` and ``chat_result`` carry usage,
``finish_reason`` and the report (``response_metadata["parallel"]``) the same way, so a streamed
answer and an invoked one agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from . import tools as _tools

if TYPE_CHECKING:
    from types import ModuleType

    from .output_forms import OutputForm
    from .pipeline import AnswerResult, PipelineConfig

__all__ = ["answer_metadata", "chat_result", "event_chunk", "final_chunk", "finish_reason"]


def finish_reason(result: AnswerResult, config: PipelineConfig) -> str:
    """Why the answer ended: "stop" or "length" (budget spent)."""
    reason = getattr(result, "finish_reason", None)
    if isinstance(reason, str):
        return reason
    # Without a reason from the pipeline: "length" when the new tokens reached the budget.
    # After a plan fallback the discarded plan tokens count too, so this may say "length"
    # for an answer that stopped by itself.
    return "length" if result.output_tokens >= config.max_tokens else "stop"


def event_chunk(
    event: Any, calls: _tools.ToolCallStream | None = None
) -> ChatGenerationChunk | None:
    """The chunk of one pipeline event: content, or a step's live text (`parallel_steps`);
    None for stage events and for text held back while it may be a tool call."""
    pl = _pipeline()
    if isinstance(event, pl.ContentDelta):
        # With tools bound, text that may be part of a call waits for the final chunk.
        text = calls.push(event.text) if calls is not None else event.text
        if not text:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content=text))
    if isinstance(event, pl.StepDelta):
        part = {"step": event.step, "title": event.title, "text": event.text}
        return ChatGenerationChunk(
            message=AIMessageChunk(content="", additional_kwargs={"parallel_steps": [part]})
        )
    return None  # stage boundaries: their facts are in the final report


def answer_metadata(
    result: AnswerResult, config: PipelineConfig, model_name: str
) -> tuple[UsageMetadata, dict[str, Any]]:
    """(usage, response metadata) of an answer; the report is under ``"parallel"``."""
    usage = UsageMetadata(
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        total_tokens=result.input_tokens + result.output_tokens,
    )
    response_metadata = {
        "model_name": model_name,
        "finish_reason": finish_reason(result, config),
        "parallel": result.report.model_dump(),
    }
    return usage, response_metadata


def final_chunk(
    result: AnswerResult,
    config: PipelineConfig,
    model_name: str,
    calls: _tools.ToolCallStream | None = None,
) -> ChatGenerationChunk:
    """The last chunk: held-back content, every tool call, usage and the report."""
    usage, response_metadata = answer_metadata(result, config, model_name)
    content, call_chunks = "", []
    if calls is not None:  # the rest of the content, and every tool call, in one chunk
        content, parsed = calls.finish()
        call_chunks = parsed.tool_call_chunks()
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content=content,
            tool_call_chunks=call_chunks,
            usage_metadata=usage,
            response_metadata=response_metadata,
            chunk_position="last",
        )
    )


def chat_result(
    result: AnswerResult,
    config: PipelineConfig,
    model_name: str,
    output: OutputForm | None = None,
) -> ChatResult:
    """The whole answer as one message, tool calls parsed when tools are bound."""
    usage, response_metadata = answer_metadata(result, config, model_name)
    parsed = _tools.ParsedOutput(result.content)
    if output is not None and output.parses_calls:
        parsed = _tools.parse_tool_calls(result.content)
    message = AIMessage(
        content=parsed.content,
        tool_calls=parsed.tool_calls,
        invalid_tool_calls=parsed.invalid_tool_calls,
        usage_metadata=usage,
        response_metadata=response_metadata,
    )
    return ChatResult(
        generations=[ChatGeneration(message=message)],
        llm_output={"model_name": model_name},
    )


def _pipeline() -> ModuleType:
    """The pipeline package, imported on first use (it pulls in torch and transformers)."""
    from . import pipeline

    return pipeline
