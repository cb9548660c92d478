"""Shared set-up of the integration tests: one real vLLM server for the whole run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from vllm_server import SERVED_NAME, VLLMServer

from langchain_parallel_reason.loading import default_cache_dir, ensure_embedded_model_folder


class _External:
    """A server the developer runs (PARALLEL_REASON_TEST_SERVER): never started or stopped."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        self.model = SERVED_NAME

    metrics = VLLMServer.metrics


@pytest.fixture(scope="session")
def server() -> Iterator[Any]:
    """One vLLM server for the whole run, started by the first test that needs it."""
    if url := os.environ.get("PARALLEL_REASON_TEST_SERVER"):
        yield _External(url)
        return
    folder = ensure_embedded_model_folder(cache_dir=default_cache_dir(), progress=False)
    # float32: with bf16 the server's sums depend on how its scheduler batches requests, and
    # identical greedy calls differed in 1 run of 5 here; float32 gave the same text in 6 of 6.
    started = VLLMServer.start(folder, dtype="float32")
    try:
        yield started
    finally:
        started.stop()
