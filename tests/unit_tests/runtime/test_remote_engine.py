"""RemoteEngine pieces that need no server (the server tests: integration_tests/test_remote.py)."""

from __future__ import annotations

import gc
import re
import weakref

import pytest

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.runtime import open_engine
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


def test_cache_advice_names_the_server_flag_to_change() -> None:
    from langchain_parallel_reason.runtime.server import ServerInfo

    def info(block_size: int | None, caching: bool | None) -> ServerInfo:
        return ServerInfo(
            "http://127.0.0.1:9/v1", "m", ["m"], "vllm", 4096, None, block_size, caching
        )

    assert info(None, None).cache_advice() is None  # the server does not say
    assert info(16, True).cache_advice() is None
    assert info(32, True).cache_advice() is None
    advice = info(128, True).cache_advice()
    assert "127 tokens" in advice
    assert "--block-size 32" in advice
    assert "--no-enable-prefix-caching" in info(16, False).cache_advice()


def test_a_remote_engine_outlives_the_chat_model_that_opened_it() -> None:
    # Its tokenizer and the server's card stay loaded: a chat model built per call reuses them.
    llm = ChatParallelReason(base_url="http://127.0.0.1:9/v1", model="kept")
    first = weakref.ref(llm._get_engine())
    del llm
    gc.collect()
    assert first() is not None
    assert open_engine(base_url="http://127.0.0.1:9/v1", model="kept") is first()
    # ... the last few used only: opening it again makes it the last; older engines go once
    # nothing holds them.
    for i in range(7):
        open_engine(base_url="http://127.0.0.1:9/v1", model=f"other-{i}")
    open_engine(base_url="http://127.0.0.1:9/v1", model="kept")
    for i in range(7):
        open_engine(base_url="http://127.0.0.1:9/v1", model=f"newer-{i}")
    gc.collect()
    assert first() is not None
    for i in range(8):
        open_engine(base_url="http://127.0.0.1:9/v1", model=f"other-{i}")
    gc.collect()
    assert first() is None
