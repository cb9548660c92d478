"""LangChain's standard unit tests for ChatParallelReason (construction only: no weights load)."""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_parallel_reason import ChatParallelReason


class TestChatParallelReasonStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatParallelReason]:
        return ChatParallelReason

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"temperature": 0.0, "seed": 0}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True
