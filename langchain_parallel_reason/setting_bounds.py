"""The bounds of the integer decoding settings, stated once (no torch, no LangChain here).

Contract: ``INT_BOUNDS`` maps a setting to ``(lowest, highest or None)``. ``PipelineConfig``
checks its values against it, and ``ChatParallelReason`` declares its fields with
``Field(**bounds(name))``, so a bound changes in one place.
"""

from __future__ import annotations

__all__ = ["INT_BOUNDS", "bounds"]

# The bounds of the integer settings, stated once: PipelineConfig checks them, and the chat
# model's fields declare them to pydantic (``bounds("max_tokens")`` -> ``{"ge": 1}``).
INT_BOUNDS: dict[str, tuple[int, int | None]] = {
    "max_branches": (2, None),
    "max_tokens": (1, None),
    "step_max_tokens": (1, None),
    "plan_max_tokens": (1, None),
    "plan_retries": (0, None),
    "max_blocks": (1, 16),
}


def bounds(name: str) -> dict[str, int]:
    """``INT_BOUNDS[name]`` as pydantic ``Field`` keywords (``ge`` and, if any, ``le``)."""
    low, high = INT_BOUNDS[name]
    return {"ge": low} if high is None else {"ge": low, "le": high}
