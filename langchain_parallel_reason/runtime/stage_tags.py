"""Which stage a request's next forward belongs to, from its settings and its pipeline's events.

Contract: ``initial_stage(config)`` is the stage a request starts in (``"route"``, ``"plan"``,
``"steps"`` or ``"sequential"``), ``after_event(stage, event)`` the stage after the pipeline
yields ``event``; a call with a branch layout is always ``"steps"`` (``call_stage``). The engine
tags every parked call with it, so the scheduler (and ``Engine.stats()``) sees requests by stage,
not only calls. Nothing here changes what runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["STAGES", "after_event", "call_stage", "initial_stage"]

STAGES = ("route", "plan", "steps", "conclusion", "sequential")


def initial_stage(config: Any) -> str:
    """The stage of a request's first forward, from its settings alone."""
    from ..pipeline.settings import forced_route

    route, reason = forced_route(config)
    if route == "direct":
        return "sequential"
    if getattr(config, "steps", None) is not None:
        return "steps"  # the caller's plan: the prefill feeds Stage 2
    return "plan" if reason is not None else "route"


def after_event(stage: str, event: Any) -> str:
    """The stage after the pipeline yielded ``event`` (text events change nothing)."""
    kind = getattr(event, "stage", None)
    if kind == "route":
        return "plan" if event.route == "plan" else "sequential"
    if kind in ("plan", "steps_retry"):
        return "steps"
    if kind == "steps_done":
        return "conclusion"
    if kind == "fallback":
        return "sequential"
    return stage


def call_stage(stage: str, split: Any) -> str:
    """A call's tag: a forward over branches (a split layout) is Stage 2 whatever came before."""
    return "steps" if split is not None else stage
