"""What an engine's stream carries: the pipeline's event types and its answer (``AnswerResult``,
``ContentDelta``, ``StepDelta``, ``StageEvent`` and its kinds), re-exported so the faces read a
request's items through the runtime's public names only."""

from __future__ import annotations

from ..pipeline import events as _events
from ..pipeline.events import *  # noqa: F403 - the same names, by design

__all__ = list(_events.__all__)
