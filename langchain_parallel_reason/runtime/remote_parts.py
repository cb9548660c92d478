"""Pieces of the remote engine (runtime/remote.py): a request's state, server replies, errors.

Contract: plain data and small functions with no I/O of their own: ``RemoteCall`` (one request's
state), ``Completion`` (one finished completion), ``ServerInfo`` (what the server serves),
``ServerError`` and ``is_transient_http`` (what is worth a retry), ``remote_route`` (the route a
call takes on a server), ``steps_answer`` (the answer and report of a call whose steps ran),
and text helpers. No LangChain here.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..pipeline import AnswerResult, PipelineConfig, forced_route
from ..schemas import ParallelReport, Plan
from .base import Item

__all__ = [
    "CONTEXT_WORDS",
    "GRAMMAR_WORDS",
    "STEP_OPENING_REGEX",
    "Completion",
    "LeadingSpace",
    "RemoteCall",
    "ServerError",
    "ServerInfo",
    "error_text",
    "grammar_body",
    "is_transient_http",
    "remote_route",
    "retrying",
    "steps_answer",
    "unreachable",
    "with_partial",
]

# Server error texts (vLLM, SGLang) that mean "the prompt does not fit the context window".
CONTEXT_WORDS = ("maximum context length", "context length", "max_model_len", "too long")
# ... and that mean "this server cannot use the grammar we sent".
GRAMMAR_WORDS = ("grammar", "structured", "guided", "ebnf", "xgrammar", "regex")
# A step's opening, as the local decoder's banned opening tokens: right after the plan a small
# model tends to copy the placeholder ("......") or start the next title ("\n####..."), so the
# first character is a word character and the first 30 hold no "#" and no newline.
STEP_OPENING_REGEX = "[ ]?[^\\s#.\u2026]([^#\\n]{0,30}|[^#\\n]{30}[\\s\\S]*)"


def remote_route(config: PipelineConfig) -> tuple[str, str | None, list[str]]:
    """(route, reason, notes) of a call on the remote engine, which has neither the router
    nor later blocks yet: mode "auto" plans, and one block runs whatever ``max_blocks``."""
    route, reason = forced_route(config)
    notes = []
    if reason is None:
        reason = (
            "not routed: the remote engine has no router yet, so mode='auto' plans (pass "
            "mode='sequential' for a direct answer)"
        )
    if config.max_blocks > 1 and route == "plan":
        notes.append(f"max_blocks={config.max_blocks}: the remote engine runs one block")
    return route, reason, notes


class ServerError(RuntimeError):
    """The server answered a request with an error (its message is included)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the server answered {status}: {message}")
        self.status = status
        self.message = message


def is_transient_http(error: BaseException) -> bool:
    """Worth retrying: the connection failed, or the server had a 5xx error."""
    if isinstance(error, ServerError):
        return error.status >= 500
    return isinstance(error, httpx.TransportError)


@dataclass
class Completion:
    """One finished completion: its text (stop string excluded) and what the server counted."""

    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ServerInfo:
    model: str
    served: list[str]
    kind: str  # "vllm", "sglang" or another `owned_by`: decides the grammar field
    max_model_len: int | None


@dataclass
class RemoteCall:
    """State of one request (nothing survives it)."""

    cfg: PipelineConfig
    messages: list[dict[str, Any]]
    emit: Callable[[Item], None]
    client: httpx.AsyncClient
    info: ServerInfo
    retries: int
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    plan_attempts: int = 0

    def event(self, event: Any) -> None:
        self.emit(("event", event))


def steps_answer(
    call: RemoteCall,
    mode: str,
    plan: Plan,
    outs: list[Completion],
    attempts: int,
    t0: float,
    content: str,
    finish: str,
    **report: Any,
) -> AnswerResult:
    """The answer of a call whose steps were ``outs``, with its report (``report``: the
    mode's own fields)."""
    call.timings["total"] = time.perf_counter() - t0
    parallel = ParallelReport(
        mode_used=mode,
        steps=list(plan.titles),
        branch_tokens=[out.completion_tokens for out in outs],
        branch_finish_reasons=["length" if o.finish_reason == "length" else "stop" for o in outs],
        plan_attempts=attempts,
        timings=call.timings,
        notes=call.notes,
        **report,
    )
    return AnswerResult(content, parallel, call.input_tokens, call.output_tokens, finish)


class LeadingSpace:
    """Passes text on, leading whitespace of the whole text dropped (as ``TextStream(lstrip)``)."""

    def __init__(self, sink: Callable[[str], None], *, strip: bool = True) -> None:
        self.sink = sink
        self.started = not strip

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.sink(text)


def with_partial(messages: list[dict[str, Any]], partial: str | None) -> list[dict[str, Any]]:
    if partial is None:
        return messages
    return [*messages, {"role": "assistant", "content": partial}]


def error_text(body: str) -> str:
    """The message inside an OpenAI-style error body (or the body itself)."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)
        return str(error)
    return body[:500]


def retrying(retries: int) -> AsyncRetrying:
    """Tenacity retries for HTTP calls: connection errors and 5xx, exponential backoff."""
    return AsyncRetrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait_exponential(multiplier=0.5, max=8),
        retry=retry_if_exception(
            lambda e: is_transient_http(e) or is_transient_http(e.__cause__ or e)
        ),
        reraise=True,
    )


def unreachable(base_url: str, error: httpx.TransportError) -> ConnectionError:
    """The error for a server that cannot be reached, with how to start one."""
    msg = (
        f"cannot reach the server at {base_url} ({type(error).__name__}: {error}); "
        "start it (e.g. `python -m vllm.entrypoints.openai.api_server --model <folder> "
        "--port 8000`) or fix base_url"
    )
    return ConnectionError(msg)


def grammar_body(
    call: RemoteCall,
    ebnf: str | None = None,
    schema: Any = None,
    regex: str | None = None,
) -> dict[str, Any]:
    """The server's structured-output field for an EBNF grammar, a JSON schema or a regex."""
    if call.info.kind == "sglang":  # SGLang's own fields
        if regex is not None:
            return {"regex": regex}
        return {"ebnf": ebnf} if ebnf is not None else {"json_schema": json.dumps(schema)}
    # vLLM: the old guided_grammar / guided_json fields are accepted and silently ignored.
    if regex is not None:
        return {"structured_outputs": {"regex": regex}}
    key, value = ("grammar", ebnf) if ebnf is not None else ("json", schema)
    return {"structured_outputs": {key: value}}
