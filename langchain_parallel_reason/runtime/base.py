"""The contract every engine serves (no LangChain here).

Contract: an engine runs the three-stage pipeline for ``Request`` objects and reports each as a
stream of items: ``("event", e)`` for every pipeline event (``ContentDelta``, ``StepDelta``,
``StageEvent`` from ``pipeline``), then exactly one ``("done", AnswerResult)``; a failure is
raised from the iterator instead. ``stream`` is a plain iterator, ``astream`` an async one that
never blocks the event loop. Closing either early (or cancelling the awaiting task) cancels the
request: its rows leave the batch at the next step and its KV is freed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = ["Engine", "EngineLimits", "Item", "Prepare", "Request"]

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
        tokenizer: the tokenizer this call renders and reads text with (None = the engine's);
            callers sharing one model may bring their own (e.g. another chat template).
    """

    messages: list[dict[str, Any]]
    config: Any
    tools: list[dict[str, Any]] | None = None
    prepare: Prepare | None = None
    timeout: float | None = None
    max_retries: int = 0
    num_threads: int | None = None
    tokenizer: Any = None


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


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    """How much one engine takes on at once.

    Attributes:
        max_concurrent_requests: requests running at once (each holds a worker and its KV);
            the rest wait in a FIFO queue.
        max_batch_rows: most tokens in one forward; prefills beyond it are chunked.
        kv_budget_bytes: KV bytes the running requests may reserve together (each reserves
            an upper bound of its own at admission); None = no budget.
        prefix_cache_bytes: KV bytes of prompt prefixes kept across requests, so a prompt
            that starts like an earlier one (a shared system prompt, the planning
            instructions, a tool list) prefills only what differs; 0 turns it off.
    """

    max_concurrent_requests: int = 32
    max_batch_rows: int = 512
    kv_budget_bytes: int | None = None
    prefix_cache_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        if self.max_concurrent_requests < 1:
            msg = f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}"
            raise ValueError(msg)
        if self.max_batch_rows < 1:
            msg = f"max_batch_rows must be >= 1, got {self.max_batch_rows}"
            raise ValueError(msg)
        if self.kv_budget_bytes is not None and self.kv_budget_bytes < 1:
            msg = f"kv_budget_bytes must be >= 1 or None, got {self.kv_budget_bytes}"
            raise ValueError(msg)
        if self.prefix_cache_bytes < 0:
            msg = f"prefix_cache_bytes must be >= 0 (0 turns it off), got {self.prefix_cache_bytes}"
            raise ValueError(msg)
