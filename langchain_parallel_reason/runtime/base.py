"""The contract every engine serves (no LangChain here).

Contract: an engine runs the three-stage pipeline for ``Request`` objects and reports each as a
stream of items: ``("event", e)`` for every pipeline event (``ContentDelta``, ``StepDelta``,
``StageEvent`` from ``pipeline``), then exactly one ``("done", AnswerResult)``; a failure is
raised from the iterator instead. ``stream`` is a plain iterator, ``astream`` an async one that
never blocks the event loop. Closing either early (or cancelling the awaiting task) cancels the
request: its rows leave the batch at the next step and its KV is freed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = ["Engine", "Item", "Prepare", "Request"]

Item = tuple[Literal["event", "done"], Any]

# (tokenizer or None) -> (messages, tools for the chat template, config): adapts one call's
# output form (tools, forced call, structured output) to the model's chat template. Remote
# engines, which have no tokenizer, pass None.
Prepare = Callable[[Any], tuple[list[dict[str, Any]], list[dict[str, Any]] | None, Any]]


@dataclass
class Request:
    """One call: messages plus its settings.

    Attributes:
        messages: ``{"role", "content", ...}`` dicts as the chat template takes them.
        config: the call's ``pipeline.PipelineConfig``.
        tools: tools for the chat template (OpenAI format), when ``prepare`` is None.
        prepare: adapts messages/tools/config to the model once it is loaded (see ``Prepare``).
        timeout: seconds the call may take, waiting in the queue included; None = no limit.
        max_retries: re-runs of a call that failed with a runtime error before any text.
        num_threads: CPU threads for the model's forwards (None = the engine's choice).
    """

    messages: list[dict[str, Any]]
    config: Any
    tools: list[dict[str, Any]] | None = None
    prepare: Prepare | None = None
    timeout: float | None = None
    max_retries: int = 0
    num_threads: int | None = None


class Engine(Protocol):
    """What ``ChatParallelReason`` needs from a runtime (local batching engine or a server)."""

    name: str
    """Model name for metadata."""

    def stream(self, request: Request) -> Iterator[Item]:
        """Run ``request``; yield its items (see the module docstring)."""
        ...

    def astream(self, request: Request) -> AsyncIterator[Item]:
        """Async ``stream``: awaits the engine without a thread per call."""
        ...

    def stats(self) -> dict[str, Any]:
        """Live counters: requests running and queued, steps, rows per step, KV bytes..."""
        ...
