"""What an engine's stream carries: the pipeline's event types and its answer (re-exported, so
the faces read a request's items through the runtime's public names only)."""

from __future__ import annotations

from ..pipeline.events import (
    AnswerResult,
    ContentDelta,
    FallbackEvent,
    PlanEvent,
    RouteEvent,
    StageEvent,
    StepDelta,
    StepsDoneEvent,
    StepsRetryEvent,
)

__all__ = [
    "AnswerResult",
    "ContentDelta",
    "FallbackEvent",
    "PlanEvent",
    "RouteEvent",
    "StageEvent",
    "StepDelta",
    "StepsDoneEvent",
    "StepsRetryEvent",
]
