"""One table of bounds: the chat model's fields and PipelineConfig accept and reject alike."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.pipeline import PipelineConfig
from langchain_parallel_reason.setting_bounds import INT_BOUNDS


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
