"""What ``iter_answer`` yields and returns, and the generator plumbing the stages share.

Contract: ``ContentDelta`` texts concatenate to ``AnswerResult.content``; ``StepDelta`` is live
text of a parallel step (not content); the stage events, one dataclass per kind under the
``StageEvent`` base (``RouteEvent``, ``PlanEvent``, ``StepsRetryEvent``, ``StepsDoneEvent`` with
the step bodies, ``FallbackEvent``), report a stage with its facts as fields. ``drive`` runs a
stage generator to its return value; ``TextStream`` turns token ids into text pieces that never
split a character.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from ..decoding.stops import cut_at_stop
from ..schemas import ParallelReport

__all__ = [
    "AnswerResult",
    "BlockEnd",
    "ContentDelta",
    "Event",
    "FallbackEvent",
    "PlanEvent",
    "RouteEvent",
    "StageEvent",
    "StepDelta",
    "StepsDoneEvent",
    "StepsRetryEvent",
    "TextStream",
    "drive",
    "first_timed",
    "stream_content",
]


@dataclass(frozen=True)
class ContentDelta:
    """The next piece of the final content, in order."""

    text: str


@dataclass(frozen=True)
class StepDelta:
    """Live text of parallel step ``step`` (0-based) as it is decoded; not part of content."""

    step: int
    title: str
    text: str


@dataclass(frozen=True)
class StageEvent:
    """Base of the stage events, one dataclass per kind: dispatch on the class
    (``isinstance`` / ``match``); ``stage`` names the kind and ``data`` gives the fields as a
    dict (for logs and JSON)."""

    stage: ClassVar[str] = ""

    @property
    def data(self) -> dict[str, Any]:
        """The event's fields, by name."""
        return asdict(self)


@dataclass(frozen=True)
class RouteEvent(StageEvent):
    """The router chose: ``route`` is "plan" or "direct", ``reason`` says why."""

    stage: ClassVar[str] = "route"
    route: str
    reason: str


@dataclass(frozen=True)
class PlanEvent(StageEvent):
    """A plan was accepted: its ``titles`` (one step each) and ``preamble``; ``block`` counts
    the later blocks before it (0 for the first)."""

    stage: ClassVar[str] = "plan"
    titles: list[str]
    preamble: str = ""
    block: int = 0


@dataclass(frozen=True)
class StepsRetryEvent(StageEvent):
    """The steps are decoded again, ``width`` at a time, from scratch (live text so far is void)."""

    stage: ClassVar[str] = "steps_retry"
    reason: str
    width: int


@dataclass(frozen=True)
class StepsDoneEvent(StageEvent):
    """Stage 2 ended: tokens per step, and each step's final ``bodies`` (plan order; empty when
    the engine does not report them); the next ``ContentDelta`` holds the merged steps."""

    stage: ClassVar[str] = "steps_done"
    branch_tokens: list[int]
    bodies: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FallbackEvent(StageEvent):
    """The answer falls back to sequential decoding for ``reason``; what came before is void."""

    stage: ClassVar[str] = "fallback"
    reason: str


@dataclass(frozen=True)
class AnswerResult:
    """The merged answer and what happened."""

    content: str
    report: ParallelReport
    input_tokens: int
    output_tokens: int
    finish_reason: Literal["stop", "length"] = "stop"
    """Why the answer ended: EOS or a stop string ("stop"), or its token budget ("length")."""


Event = ContentDelta | StepDelta | StageEvent


class TextStream:
    """Incremental detokenizer that never emits half a character or a possible stop string.

    ``push(token)`` returns the newly final text; text that could still become the start of a
    stop string (or is an incomplete UTF-8 sequence) is held back until ``finish()``, which cuts
    the whole text before the first stop string and returns the remainder.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), *, lstrip: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.lstrip = lstrip
        self.tokens: list[int] = []
        self.emitted = 0

    def _text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return text.lstrip() if self.lstrip else text

    def push(self, token: int) -> str:
        """Add one token; return text that is now final."""
        self.tokens.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        text, hit = cut_at_stop(text, self.stops)
        safe = len(text) if hit else max(self.emitted, len(text) - self.hold)
        delta = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def reset(self) -> None:
        """Forget every token (the text is being decoded again)."""
        self.tokens.clear()
        self.emitted = 0

    def _final(self) -> str:
        # A budget can cut the text inside a character: its first bytes decode to U+FFFD, which
        # is no part of the answer (push never emits it either), so it is dropped; a U+FFFD
        # that was emitted already (it was inside the text then) stays.
        text = cut_at_stop(self._text(), self.stops)[0]
        return text[: max(len(text.rstrip("\ufffd")), min(self.emitted, len(text)))]

    def finish(self) -> str:
        """Return the held-back tail (stop strings and a cut-off last character removed)."""
        text = self._final()
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta

    @property
    def text(self) -> str:
        """Everything final so far after ``finish()``."""
        return self._final()


def drive(gen: Generator, sink: list | None = None) -> Any:
    """Run a generator to its return value, collecting yielded items into ``sink`` if given."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if sink is not None:
            sink.append(item)


def stream_content(gen: Generator[int, None, Any], stream: TextStream) -> Generator:
    """Push each token of ``gen`` into ``stream``, yield its final text as ContentDelta, and
    return ``gen``'s result (the held-back tail is the caller's to ``finish()``)."""
    while True:
        try:
            token = next(gen)
        except StopIteration as stop:
            return stop.value
        if delta := stream.push(token):
            yield ContentDelta(delta)


def first_timed(gen: Generator, timings: dict[str, float], key: str, since: float) -> Generator:
    """``gen`` passed through; ``timings[key]`` = seconds from ``since`` to its first item."""
    first = True
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if first:
            timings[key] = time.perf_counter() - since
            first = False
        yield item


@dataclass(frozen=True)
class BlockEnd:
    """How a block's conclusion ended: ``context`` is the sequence before the conclusion
    (prefix, merged steps, cue), ``conclusion_ids`` its tokens, ``stop`` what stopped it."""

    context: list[int]
    conclusion_ids: list[int]
    stop: str | int | None
