"""The chat model's settings: which fields a call may override, their checks, and the ONE
mapping from those settings to the pipeline's ``PipelineConfig`` (``pipeline_config``).

Contract: ``pipeline_config`` is the only place outside ``pipeline/`` that builds a
``PipelineConfig``; the chat model, ``parallel-reason ask`` and the benchmarks all go through it,
so a field added to the chat model reaches the pipeline the same way everywhere.
"""

from __future__ import annotations

import difflib
import functools
import reprlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from .schemas import Plan

if TYPE_CHECKING:
    from .pipeline import PipelineConfig

__all__ = [
    "CALL_OPTIONS",
    "IGNORED_KWARGS",
    "OUTPUT_KWARGS",
    "STEP_TITLE_CHARS",
    "TIMEOUT_MAX_S",
    "call_overrides",
    "check_field_names",
    "check_timeout",
    "field_adapter",
    "pipeline_config",
    "validate_steps",
]

# The pipeline accepts caller-given titles up to this length (longer than Stage 1's own).
STEP_TITLE_CHARS = 200

# Fields a call may override through `invoke(..., name=value)` or `.bind(name=value)`.
CALL_OPTIONS = (
    "mode",
    "steps",
    "max_branches",
    "max_tokens",
    "step_max_tokens",
    "plan_max_tokens",
    "plan_retries",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "attention",
    "conclusion_kv",
    "constrain_plan",
    "timeout",
    "max_blocks",
    "route_bias",
)
# Call kwargs that shape the answer's form (set by bind_tools / with_structured_output).
OUTPUT_KWARGS = frozenset({"tools", "tool_choice", "response_format", "parallel_tool_calls"})
# Call kwargs LangChain itself may pass down; they carry nothing for this model.
IGNORED_KWARGS = frozenset({"stream", "ls_structured_output_format", "structured_output_format"})

TIMEOUT_MAX_S = 86400.0


def check_timeout(timeout: float | None) -> float | None:
    """A finite `timeout` of at most a day (a deadline past the clock's range cannot be set)."""
    if timeout is not None and not timeout <= TIMEOUT_MAX_S:
        msg = (
            f"timeout={timeout!r} is not a usable number of seconds: pass a finite number up "
            f"to {TIMEOUT_MAX_S:.0f} (one day), or None for no time limit"
        )
        raise ValueError(msg)
    return timeout


def call_overrides(
    cls: type[BaseModel], kwargs: Mapping[str, Any], models: Sequence[str | None]
) -> dict[str, Any]:
    """This call's overrides of ``cls``'s fields from its kwargs, validated as the fields are.

    Kwargs LangChain passes down and the answer's form (``OUTPUT_KWARGS``, read by
    `OutputForm`) are skipped; ``model`` may only repeat one of ``models``. Raises ValueError
    naming the option for an invalid value or an unknown keyword.
    """
    overrides: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in IGNORED_KWARGS or name in OUTPUT_KWARGS:
            continue
        if name == "model":
            if value not in models:
                msg = (
                    f"model={value!r} cannot be changed per call: ChatParallelReason "
                    "runs one local model; create another ChatParallelReason for it"
                )
                raise ValueError(msg)
        elif name in CALL_OPTIONS:
            try:
                overrides[name] = field_adapter(cls, name).validate_python(value)
            except ValidationError as e:
                msg = f"invalid per-call {name}={value!r}: {e.errors()[0]['msg']}"
                raise ValueError(msg) from e
        else:
            msg = (
                f"unknown keyword argument {name!r}; per-call options are stop, "
                f"{', '.join(CALL_OPTIONS)}"
            )
            raise ValueError(msg)
    return overrides


def check_field_names(cls: type[BaseModel], values: Any) -> Any:
    """``values`` unchanged, or ValueError for a key that is no field of ``cls``.

    Pydantic would drop a misspelled field silently (``temprature=1.0`` left temperature at
    0); the error names the closest field so the fix is one edit.
    """
    if not isinstance(values, Mapping):
        return values
    fields = cls.model_fields
    for name in values:
        if name in fields:
            continue
        close = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(fields)}"
        msg = f"{cls.__name__} has no field {name!r}: {hint}"
        raise ValueError(msg)
    return values


def validate_steps(steps: list[str], max_branches: int, mode: str = "auto") -> None:
    """Raise ValueError unless ``steps`` form a valid plan for ``max_branches`` in ``mode``
    ("sequential" never plans, so it cannot take steps)."""
    if mode == "sequential":
        msg = (
            f"mode='sequential' never plans, so it cannot decode steps={reprlib.repr(steps)}: "
            "pass steps=None for a sequential answer, or mode='auto', 'parallel' or 'stepped' "
            "to use the steps"
        )
        raise ValueError(msg)
    for title in steps:
        if isinstance(title, str) and not title.isascii():
            try:
                title.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: tokenizers raise a bare TypeError
                msg = (
                    f"steps={reprlib.repr(steps)} cannot be decoded in parallel: the title "
                    f"{title!r} is not valid Unicode text (a lone surrogate); decode it with "
                    "errors='replace' or remove it"
                )
                raise ValueError(msg) from None
    try:
        Plan.model_validate(
            {"titles": list(steps)},
            context={"max_branches": max_branches, "max_title_chars": STEP_TITLE_CHARS},
        )
    except ValidationError as e:
        reason = str(e.errors()[0]["msg"]).removeprefix("Value error, ")
        if reason.startswith("too many steps"):
            reason += f": pass at most max_branches={max_branches} titles or raise max_branches"
        elif "too long" in reason:
            reason += f": shorten it to {STEP_TITLE_CHARS} characters at most"
        msg = f"steps={reprlib.repr(steps)} cannot be decoded in parallel: {reason}"
    else:
        return
    raise ValueError(msg)  # outside the except block: see plan.parse_plan


@functools.cache
def field_adapter(cls: type[BaseModel], name: str) -> TypeAdapter[Any]:
    """A validator for one field of ``cls``, constraints included, for per-call overrides."""
    info = cls.model_fields[name]
    if not info.metadata:
        return TypeAdapter(info.annotation)
    return TypeAdapter(Annotated[info.annotation, *info.metadata])


def pipeline_config(
    values: Mapping[str, Any],
    *,
    stop: Sequence[str] | None = None,
    parse_special_tokens: bool = False,
) -> PipelineConfig:
    """The one mapping from the chat model's settings to a ``PipelineConfig``.

    ``values`` holds any of ``CALL_OPTIONS`` by field name (the chat model passes all of them;
    the CLI and the benchmarks pass what their flags set, the rest keep ``PipelineConfig``'s
    defaults); ``timeout`` is not the pipeline's (the engine keeps it) and is left out. ``steps``
    is validated against ``max_branches`` (the plan rules), empty stop strings are dropped.
    Raises ValueError, naming the setting, for an unknown name or unusable steps.
    """
    from .pipeline import PipelineConfig

    unknown = sorted(set(values) - set(CALL_OPTIONS))
    if unknown:
        msg = f"unknown settings {unknown}; the settings are {', '.join(CALL_OPTIONS)}"
        raise ValueError(msg)
    fields = {k: v for k, v in values.items() if k != "timeout"}
    steps = fields.pop("steps", None)
    if steps is not None:
        validate_steps(
            list(steps),
            fields.get("max_branches", PipelineConfig.max_branches),
            fields.get("mode", PipelineConfig.mode),
        )
    return PipelineConfig(
        **fields,
        steps=None if steps is None else tuple(steps),
        stop=tuple(s for s in stop or () if s),
        parse_special_tokens=parse_special_tokens,
    )
