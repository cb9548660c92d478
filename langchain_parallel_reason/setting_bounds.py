"""The bounds of the integer decoding settings, stated once (no torch, no LangChain here).

Contract: ``INT_BOUNDS`` maps an integer setting to ``(lowest, highest or None)``,
``FLOAT_BOUNDS`` a float setting to ``(lowest, highest)``. ``PipelineConfig`` checks its values
against them, and ``ChatParallelReason`` declares its fields with ``Field(**bounds(name))``, so
a bound changes in one place.
"""

from __future__ import annotations

__all__ = ["FLOAT_BOUNDS", "INT_BOUNDS", "bounds"]

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


# Float settings that scale or shift logits: values past these are refused, not clamped. They
# already make the outcome certain, and far beyond them the float32 logits overflow to inf
# (route_bias=1e308 or repetition_penalty=1e-308 made the sampler's probabilities NaN).
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {
    "route_bias": (-1e4, 1e4),  # a logit offset: +-1e4 forces the choice on any model
    "repetition_penalty": (0.01, 100.0),  # a logit divisor: 1.1-1.3 is the useful range
}


def bounds(name: str) -> dict[str, float]:
    """The bounds of ``name`` as pydantic ``Field`` keywords (``ge`` and, if any, ``le``)."""
    low, high = FLOAT_BOUNDS[name] if name in FLOAT_BOUNDS else INT_BOUNDS[name]
    return {"ge": low} if high is None else {"ge": low, "le": high}
