"""LangChain's standard integration tests against the embedded SmolLM2-135M-Instruct.

The first run converts the embedded GGUF once (about 20-35 s); later loads take about 1 s.
Budgets are small so the module stays quick on a CPU. Tool calling and structured output
come with another change, so their tests are switched off by the capability flags.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_parallel_reason import ChatParallelReason

pytestmark = pytest.mark.slow


class TestChatParallelReasonIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatParallelReason]:
        return ChatParallelReason

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # One plan attempt of at most 32 tokens, then the answer: a few seconds per call.
        return {"max_tokens": 48, "plan_max_tokens": 32, "plan_retries": 0, "seed": 0}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        # One local model per instance: a per-call `model=` is refused with a ValueError.
        return False


def test_given_steps_decode_in_parallel_on_the_embedded_model() -> None:
    chat = ChatParallelReason(max_tokens=48, step_max_tokens=16, steps=["Tea", "Coffee"])
    question = "Compare tea and coffee."
    message = chat.invoke(question)
    report = message.response_metadata["parallel"]
    assert report["mode_used"] == "parallel"
    assert report["steps"] == ["Tea", "Coffee"]
    assert report["attention"] in ("split", "mask")
    assert message.usage_metadata is not None
    chunks = list(chat.stream(question))
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.content == message.content
