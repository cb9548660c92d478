"""What an engine's stream carries: the pipeline's event types and its answer (``AnswerResult``,
``ContentDelta``, ``StepDelta``, ``StageEvent`` and its kinds), re-exported so the faces read a
request's items through the runtime's public names only."""

from __future__ import annotations

from ..pipeline.events import *  # noqa: F403 - the same names, by design
from ..pipeline.events import __all__  # noqa: F401 - and the same list
