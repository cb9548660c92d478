"""Fixtures shared by the chat-model unit tests."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def chat(tiny_llama: Any, tiny_tokenizer: Any) -> Any:
    """A ChatParallelReason over the tiny Llama; small budgets keep each call to tens of ms.

    Modules that need other budgets (e.g. test_tools.py) define their own ``chat``.
    """
    from langchain_parallel_reason import ChatParallelReason

    return ChatParallelReason.from_model(
        tiny_llama, tiny_tokenizer, max_tokens=40, step_max_tokens=12, plan_max_tokens=24
    )
