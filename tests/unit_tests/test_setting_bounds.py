"""One table of bounds: the chat model's fields and PipelineConfig accept and reject alike."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.pipeline import PipelineConfig
from langchain_parallel_reason.setting_bounds import FLOAT_BOUNDS, INT_BOUNDS


@pytest.mark.parametrize("name", sorted(INT_BOUNDS))
def test_both_layers_take_the_same_bounds(name: str) -> None:
    low, high = INT_BOUNDS[name]
    ChatParallelReason(**{name: low})  # the edges are allowed in both
    PipelineConfig(**{name: low})
    outside = [low - 1] + ([high + 1] if high is not None else [])
    for value in outside:
        with pytest.raises(ValidationError, match=name):
            ChatParallelReason(**{name: value})
        with pytest.raises(ValueError, match=name):
            PipelineConfig(**{name: value})


@pytest.mark.parametrize("name", sorted(FLOAT_BOUNDS))
def test_both_layers_take_the_same_float_bounds(name: str) -> None:
    low, high = FLOAT_BOUNDS[name]
    for edge in (low, high):
        assert getattr(ChatParallelReason(**{name: edge}), name) == edge
        PipelineConfig(**{name: edge})
    for value in (low / 2 if low > 0 else low * 2, high * 2, 1e308, -1e308, 1e-308):
        if low <= value <= high:
            continue
        with pytest.raises(ValidationError, match=name):
            ChatParallelReason(**{name: value})
        with pytest.raises(ValueError, match=name):
            PipelineConfig(**{name: value})


@pytest.mark.parametrize(
    "options",
    [
        {"route_bias": 1e308, "temperature": 0.7},
        {"repetition_penalty": 1e-308, "temperature": 0.7},
        {"repetition_penalty": 1e-308},
    ],
)
def test_values_that_would_overflow_the_logits_are_refused_per_call(
    tiny_llama: Any, tiny_tokenizer: Any, options: dict[str, Any]
) -> None:
    # These reached torch: "probability tensor contains either inf, nan or element < 0", and
    # greedy with repetition_penalty=1e-308 answered nothing.
    chat = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, max_tokens=8)
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"invalid per-call {name}=.*(less|greater) than"):
        chat.invoke("Hi", **options)
