"""Pydantic models for the Stage-1 plan and the per-call parallel report.

Contract: a `Plan` that validates is safe to decode in parallel (2..max_branches distinct,
single-line titles free of format markers); a `ParallelReport` dumps to plain JSON for
``response_metadata["parallel"]``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

__all__ = [
    "DEFAULT_MAX_BRANCHES",
    "DEFAULT_MAX_TITLE_CHARS",
    "MAX_PREAMBLE_CHARS",
    "BlockReport",
    "ParallelReport",
    "Plan",
]

DEFAULT_MAX_BRANCHES = 8
"""Most steps a `Plan` may hold unless the validation context says otherwise."""

DEFAULT_MAX_TITLE_CHARS = 80
"""Longest title (in characters, after stripping) unless the validation context says otherwise."""

MAX_PREAMBLE_CHARS = 400
"""Longest preamble (after stripping)."""

# Kept here rather than imported from prompts.py so that schemas stay free of file I/O.
_STEP_MARKER = "####"
# Characters a title cannot hold: the marker would start a new step, a newline would end the
# title line and a colon separates the title from the placeholder and from the branch text.
_FORBIDDEN_IN_TITLE = (_STEP_MARKER, "\n", ":")
# The end marker is the step marker and this: a title line "####%%%%..." would end the plan.
_END_TAIL = "%%%%"


def _context_int(info: ValidationInfo, key: str, default: int) -> int:
    """Read a positive integer limit from the validation context, else `default`."""
    context = info.context if isinstance(info.context, dict) else {}
    value = context.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        # A wrong context is a programming error, not bad model output: say so plainly.
        msg = f"validation context {key!r} must be a positive integer, got {value!r}"
        raise TypeError(msg)
    return value


class Plan(BaseModel):
    """A Stage-1 plan: the preamble line and the titles of the independent steps.

    Validation strips whitespace and enforces the format's rules: 2..``max_branches`` titles,
    each non-empty, at most ``max_title_chars`` long, free of ``"####"``, newlines and colons,
    not starting with ``"%%%%"`` and distinct ignoring case; a preamble of at most 400
    characters without ``"####"``.
    The limits come from the validation context, e.g.
    ``Plan.model_validate(data, context={"max_branches": 4, "max_title_chars": 60})``;
    they default to 8 and 80. Error messages are short and meant for humans (they end up
    in ``ParallelReport.fallback_reason``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preamble: str = ""
    """The one-line introduction written before the first step title (may be empty)."""

    titles: list[str]
    """The step titles in order, without markers, colon or placeholder."""

    @field_validator("preamble")
    @classmethod
    def _check_preamble(cls, value: str) -> str:
        """Strip the preamble; reject markers and overlong text."""
        value = value.strip()
        if _STEP_MARKER in value:
            msg = f"preamble contains {_STEP_MARKER!r}"
            raise ValueError(msg)
        if len(value) > MAX_PREAMBLE_CHARS:
            msg = f"preamble too long ({len(value)} > {MAX_PREAMBLE_CHARS} chars)"
            raise ValueError(msg)
        return value

    @field_validator("titles")
    @classmethod
    def _check_titles(cls, titles: list[str], info: ValidationInfo) -> list[str]:
        """Strip titles and check their count, content, length and distinctness."""
        max_branches = _context_int(info, "max_branches", DEFAULT_MAX_BRANCHES)
        max_chars = _context_int(info, "max_title_chars", DEFAULT_MAX_TITLE_CHARS)
        titles = [title.strip() for title in titles]
        # The count first: it is the most useful reason when a plan is wrong overall.
        if not titles:
            msg = "no step titles"
            raise ValueError(msg)
        if len(titles) == 1:
            msg = "only 1 step"
            raise ValueError(msg)
        if len(titles) > max_branches:
            msg = f"too many steps ({len(titles)} > {max_branches})"
            raise ValueError(msg)
        for number, title in enumerate(titles, start=1):
            if not title:
                msg = f"step {number} has an empty title"
                raise ValueError(msg)
            for forbidden in _FORBIDDEN_IN_TITLE:
                if forbidden in title:
                    msg = f"step {number} title contains {forbidden!r}"
                    raise ValueError(msg)
            if title.startswith(_END_TAIL):
                msg = f"step {number} title starts with {_END_TAIL!r} (the end marker)"
                raise ValueError(msg)
            if len(title) > max_chars:
                msg = f"step {number} title too long ({len(title)} > {max_chars} chars)"
                raise ValueError(msg)
        seen: set[str] = set()
        for title in titles:
            key = title.casefold()
            if key in seen:
                msg = f"duplicate titles ({title!r})"
                raise ValueError(msg)
            seen.add(key)
        return titles


class BlockReport(BaseModel):
    """One parallel block of an answer: its plan, its parallel steps and its conclusion."""

    model_config = ConfigDict(extra="forbid")

    steps: list[str]
    """The block's step titles, in order."""

    branch_tokens: list[int] = Field(default_factory=list)
    """Tokens each of the block's steps generated (one entry per step)."""

    decode_steps: int = Field(default=0, ge=0)
    """The block's Stage-2 forward passes (its steps decoded in parallel)."""

    conclusion_tokens: int = Field(default=0, ge=0)
    """Tokens of the block's conclusion (cut where the model opened the next block)."""

    plan_attempts: int = Field(default=0, ge=0)
    """Stage-1 attempts of the block's plan (0 when the caller gave the steps)."""

    timings: dict[str, float] = Field(default_factory=dict)
    """Wall-clock seconds of the block's ``"plan"``, ``"steps"`` and ``"conclusion"``."""


class ParallelReport(BaseModel):
    """What one call did, for ``AIMessage.response_metadata["parallel"]``.

    ``model_dump()`` gives plain JSON types only. ``branch_tokens`` and
    ``branch_finish_reasons`` are either empty or hold one entry per item of ``steps``.
    """

    model_config = ConfigDict(extra="forbid")

    mode_used: Literal["parallel", "sequential", "stepped"]
    """``"parallel"`` when Stage 2 decoded the steps as branches, ``"stepped"`` when it wrote
    them one after another in one sequence (mode "stepped", the paper's baseline), else
    ``"sequential"``."""

    fallback_reason: str | None = None
    """Why the call fell back to sequential decoding (e.g. a `PlanFormatError` reason)."""

    steps: list[str] = Field(default_factory=list)
    """The step titles of the plan, in order (empty when no plan was accepted)."""

    branch_tokens: list[int] = Field(default_factory=list)
    """Tokens each branch generated in Stage 2, its forced title prefix excluded."""

    branch_finish_reasons: list[str] = Field(default_factory=list)
    """Why each branch stopped: ``"stop"`` (next ``####``, EOS or a stop string), ``"length"``
    (its token budget) or ``"repetition"`` (the loop guard: the step began repeating itself;
    its text keeps one copy of the repeated part)."""

    decode_steps: int = Field(default=0, ge=0)
    """Stage-2 forward passes; sequential decoding would have needed ``sum(branch_tokens)``
    (which is what mode "stepped" reports)."""

    tokens_per_forward: float | None = Field(default=None, ge=0)
    """Stage-2 tokens generated per forward pass (``sum(branch_tokens) / decode_steps``)."""

    plan_attempts: int = Field(default=0, ge=0)
    """How many times Stage 1 was run to get a valid plan (0 when it was skipped)."""

    conclusion_tokens: int = Field(default=0, ge=0)
    """Tokens of the Stage-3 conclusion (0 when there was none; ``notes`` then says why)."""

    conclusion_kv: Literal["reprefill", "reuse"] | None = None
    """How Stage 3 of a parallel answer got the steps into the cache: ``"reprefill"`` (their
    text prefilled after the prefix) or ``"reuse"`` (their Stage-2 KV laid out in a row);
    None in the other modes."""

    timings: dict[str, float] = Field(default_factory=dict)
    """Wall-clock seconds per stage: ``"plan"``, ``"steps"``, ``"conclusion"``, ``"total"``;
    ``"merge"`` is the part of ``"conclusion"`` before its first token (the steps laid out in
    the cache and the cue prefilled: the cost ``conclusion_kv`` changes)."""

    attention: str | None = None
    """The Stage-2 attention backend that ran (None when Stage 2 did not run)."""

    notes: list[str] = Field(default_factory=list)
    """Other things worth knowing, e.g. steps decoded in smaller groups after out-of-memory."""

    route: Literal["plan", "direct"] | None = None
    """How the call began: ``"plan"`` (Stage 1 ran or the caller gave the steps) or
    ``"direct"`` (answered by ordinary decoding from the start; not a fallback)."""

    route_reason: str | None = None
    """Why that route: the model's own choice in ``mode="auto"`` (with its yes/no log-odds),
    or what forced it (``mode="parallel"``, ``steps=``, ``mode="sequential"``, tools...)."""

    titles: Literal["question", "free"] | None = None
    """Where the plan's step titles came from: ``"question"`` (the Stage-1 grammar offered
    only spans of the user's message, the items it lists, and the model chose among them) or
    ``"free"`` (the question lists fewer than 2 parts, or the plan was unconstrained: the
    model named the steps). None when the model wrote no plan (direct answer, ``steps=``)."""

    step_kind: Literal["check", "paragraph"] | None = None
    """How the steps were written: ``"check"`` (every title is a record of the user's
    material, e.g. a student named in a list of records: each step opens with its title as the
    message writes it and is one line long) or ``"paragraph"`` (a step after its header, up to
    its budget). None when no steps were decoded."""

    blocks: list[BlockReport] = Field(default_factory=list)
    """One entry per parallel block, in order (empty when no steps were decoded in parallel).
    The top-level ``steps``, ``branch_tokens``, ``branch_finish_reasons``, ``decode_steps``,
    ``plan_attempts``, ``conclusion_tokens`` and the stage ``timings`` are totals over the
    blocks (lists concatenated in block order)."""

    engine: dict[str, float | int] = Field(default_factory=dict)
    """How the engine served the call: ``queue_wait_s`` (seconds queued before it ran),
    ``queued_ahead`` (requests queued before it), ``forwards`` (forward passes it took part
    in), ``mean_batch_rows`` (tokens per such forward, all requests together) and
    ``prefix_hit_tokens`` (prompt tokens served from the engine's prefix cache)."""

    batch_invariant: bool | None = None
    """Whether this answer equals its solo run whatever other requests shared its forward
    passes: True in float32 (the exact dtype), False in bfloat16/float16 (their rounding
    depends on the batch's row count); None when the backend did not say (a remote server)."""

    @field_validator("timings")
    @classmethod
    def _check_timings(cls, timings: dict[str, float]) -> dict[str, float]:
        """Reject negative durations, which can only come from a bookkeeping bug."""
        for stage, seconds in timings.items():
            if seconds < 0:
                msg = f"timing {stage!r} is negative ({seconds})"
                raise ValueError(msg)
        return timings

    @model_validator(mode="after")
    def _check_branch_lengths(self) -> ParallelReport:
        """Per-branch lists must line up with ``steps`` when they are filled."""
        for name in ("branch_tokens", "branch_finish_reasons"):
            values: list[Any] = getattr(self, name)
            if values and len(values) != len(self.steps):
                msg = f"{name} has {len(values)} entries for {len(self.steps)} steps"
                raise ValueError(msg)
        return self
