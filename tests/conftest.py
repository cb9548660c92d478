"""Shared pytest set-up: offline mode, CPU threads, tiny-model fixtures and the `gpu` marker.

Puts `tests/` on `sys.path` so any test can `from tiny_models import ...`. Built models
are cached for the whole session and shared between tests: do not mutate them (train,
resize, change their config); build a private one with `tiny_models.build_tiny_model`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before anything imports transformers or huggingface_hub: never reach for the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Before torch loads OpenMP: with the default (active) wait policy, idle OpenMP threads
# spin, and with another process on these 2 cores a tiny model's step went from 1 ms to
# 35 ms at 2 threads. Passive waiting removes that; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import build_tiny_model, build_tiny_tokenizer, save_tiny_model_dir  # noqa: E402
from transformers import PreTrainedModel, PreTrainedTokenizerFast  # noqa: E402

torch.set_num_threads(int(os.environ.get("PARALLEL_REASON_TEST_THREADS", "2")))

_MODEL_CACHE: dict[tuple[Any, ...], PreTrainedModel] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when CUDA is unavailable."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer with the ChatML template (shared; do not mutate)."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model() -> Callable[..., PreTrainedModel]:
    """Factory `make_tiny_model(arch="llama", attn_implementation="sdpa", **kw)`.

    Takes the arguments of `tiny_models.build_tiny_model` and returns a model cached for
    the session per distinct arguments (shared; do not mutate).
    """

    def make_tiny_model(
        arch: str = "llama", *, attn_implementation: str = "sdpa", **kw: Any
    ) -> PreTrainedModel:
        key = (arch, attn_implementation, *sorted(kw.items()))
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = build_tiny_model(
                arch, attn_implementation=attn_implementation, **kw
            )
        return _MODEL_CACHE[key]

    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama() -> PreTrainedModel:
    """A tiny Llama with sdpa attention, seed 0 (shared; do not mutate)."""
    return build_tiny_model("llama", attn_implementation="sdpa")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a saved tiny Llama (sdpa, seed 0) and the tiny tokenizer."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama")
