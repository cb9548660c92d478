"""LangChain messages -> chat-template dicts (the form `tokenizer.apply_chat_template` takes).

Contract: `convert_messages` keeps each message's role and text (content blocks other than text
dropped, tool calls and tool results kept as template fields) and refuses, with the fix, what
the pipeline cannot answer (`pipeline.check_question`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

if TYPE_CHECKING:
    from types import ModuleType


__all__ = ["convert_messages"]

# Content blocks an assistant message may carry besides text; the text is what the template
# needs (tool calls travel in `AIMessage.tool_calls`).
AI_SKIPPED_BLOCKS = frozenset(
    {
        "tool_call",
        "tool_call_chunk",
        "invalid_tool_call",
        "tool_use",
        "server_tool_call",
        "server_tool_call_chunk",
        "server_tool_result",
        "reasoning",
        "thinking",
    }
)
CHAT_MESSAGE_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant"}


def content_text(content: str | list[Any], role: str) -> str:
    """Join a message's text; reject images, audio, files and other non-text blocks."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type") if isinstance(block, dict) else type(block).__name__
        if kind == "text":
            parts.append(block.get("text") or "")
        elif role == "assistant" and kind in AI_SKIPPED_BLOCKS:
            continue
        else:
            msg = (
                f"ChatParallelReason is text-only: the {role} message holds a {kind!r} content "
                "block; pass text only (a string or {'type': 'text', 'text': ...} blocks)"
            )
            raise ValueError(msg)
    return "\n".join(parts)


def template_tool_call(tool_call: dict[str, Any]) -> dict[str, Any]:
    """A LangChain `ToolCall` in the OpenAI shape chat templates expect."""
    return {
        "type": "function",
        "id": tool_call.get("id"),
        "function": {"name": tool_call["name"], "arguments": tool_call.get("args", {})},
    }


def convert_message(message: BaseMessage) -> dict[str, Any]:
    """One LangChain message as a chat-template dict."""
    if isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
    elif isinstance(message, ToolMessage):
        role = "tool"
    elif isinstance(message, ChatMessage):
        role = CHAT_MESSAGE_ROLES.get(message.role, message.role)
        if role not in ("system", "user", "assistant", "tool"):
            msg = (
                f"ChatMessage role {message.role!r} is not supported; use system, user, "
                "assistant or tool"
            )
            raise ValueError(msg)
    else:
        msg = (
            f"unsupported message type {type(message).__name__}; use SystemMessage, "
            "HumanMessage, AIMessage or ToolMessage"
        )
        raise ValueError(msg)
    converted: dict[str, Any] = {"role": role, "content": content_text(message.content, role)}
    if isinstance(message, AIMessage) and message.tool_calls:
        converted["tool_calls"] = [template_tool_call(tc) for tc in message.tool_calls]
    if isinstance(message, ToolMessage):
        converted["tool_call_id"] = message.tool_call_id
        if message.name:
            converted["name"] = message.name
    return converted


def convert_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as chat-template dicts (``[{"role": ..., "content": ...}, ...]``)."""
    if not messages:
        msg = "no messages: pass at least one message (e.g. a HumanMessage)"
        raise ValueError(msg)
    converted = [convert_message(message) for message in messages]
    # Here, before tools are written as text (which turns tool results into user turns).
    _pipeline().check_question(converted)
    return converted


def _pipeline() -> ModuleType:
    """The pipeline package, imported on first use: it pulls in torch and transformers, which
    `import langchain_parallel_reason` (and the CLI's `--help`) should not pay for."""
    from . import pipeline

    return pipeline
