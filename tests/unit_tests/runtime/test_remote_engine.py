"""RemoteEngine pieces that need no server (the server tests: integration_tests/test_remote.py)."""

from __future__ import annotations

import re

import pytest

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.runtime.http import STEP_OPENING_REGEX
from langchain_parallel_reason.runtime.remote import RemoteEngine


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        (" Tea is bitter and coffee is strong.", True),
        ("Green tea has less caffeine than coffee; black tea has more.\n####", True),
        ("......", False),  # the plan's placeholder, copied
        ("\n####Price:......", False),  # the next title instead of this step
        ("Short.\n####Next", False),  # a marker within the first 30 characters
        ("…", False),
    ],
)
def test_step_opening_regex(text: str, allowed: bool) -> None:
    assert (re.fullmatch(STEP_OPENING_REGEX, text) is not None) is allowed


def test_base_url_needs_a_scheme() -> None:
    with pytest.raises(ValueError, match="http://"):
        RemoteEngine("127.0.0.1:8000/v1")


def test_chat_model_with_base_url_loads_nothing_and_keeps_the_key_secret() -> None:
    llm = ChatParallelReason(base_url="http://127.0.0.1:9/v1", model="m", api_key="sk-secret")
    assert "sk-secret" not in repr(llm)
    engine = llm._get_engine()
    assert isinstance(engine, RemoteEngine)
    assert engine.root_url == "http://127.0.0.1:9"
    assert engine.stats()["requests_running"] == 0
