"""The embedded SmolLM2-135M-Instruct: converted once from its GGUF, faithful to it, chat-ready.

Uses the real cache (`PARALLEL_REASON_CACHE` if set, else the default cache folder), so a run
converts at most once (30-45 s) and later runs reuse the folder. The GGUF comparison loads the
GGUF itself (about 20 s more).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langchain_parallel_reason.loading import (
    default_cache_dir,
    embedded_gguf_path,
    ensure_embedded_model_folder,
    load_model_and_tokenizer,
)

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Write a short poem about the sea."}]
NEW_TOKENS = 16


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    """The converted folder, in the session's one cache (converted here if not there yet)."""
    return ensure_embedded_model_folder(cache_dir=default_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def embedded(embedded_folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_model_and_tokenizer(device="cpu", dtype="float32", progress=False)


def _greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The chat prompt's ids then `NEW_TOKENS` argmax tokens (no cache: a plain reference loop)."""
    ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]  # [1, prompt_len]
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            ids = torch.cat([ids, next_id], dim=-1)
    return ids[0].tolist()


def test_folder_is_complete_and_reused(embedded_folder: Path) -> None:
    assert embedded_folder.parent == default_cache_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (embedded_folder / name).is_file(), name
    start = time.perf_counter()
    again = ensure_embedded_model_folder(cache_dir=default_cache_dir(), progress=False)
    assert time.perf_counter() - start < 0.5
    assert again == embedded_folder


def test_default_load_is_chat_ready(
    embedded: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = embedded
    assert model.config.model_type == "llama"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert not model.training
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")


def test_converted_folder_generates_like_the_gguf(
    embedded: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = embedded
    gguf_model, gguf_tokenizer = load_model_and_tokenizer(
        gguf_file=str(embedded_gguf_path()), device="cpu", dtype="float32", progress=False
    )
    # Same prompt ids (tokenizer and chat template survived) and the same 16 greedy tokens.
    expected = _greedy(gguf_model, gguf_tokenizer)
    got = _greedy(model, tokenizer)
    assert got == expected, (tokenizer.decode(got), gguf_tokenizer.decode(expected))
    assert gguf_tokenizer.eos_token_id not in expected[-NEW_TOKENS:]  # all 16 are content


@pytest.mark.parametrize(
    "settings",
    [{"mode": "stepped"}, {"mode": "parallel", "conclusion_kv": "reuse"}],
    ids=["stepped", "reuse"],
)
def test_stepped_mode_and_kv_reuse_answer_in_words(
    embedded: tuple[PreTrainedModel, PreTrainedTokenizerBase], settings: dict
) -> None:
    from langchain_parallel_reason.pipeline import PipelineConfig, answer

    model, tokenizer = embedded
    question = [{"role": "user", "content": "Compare tea and coffee."}]
    config = PipelineConfig(steps=("Tea", "Coffee"), max_tokens=120, step_max_tokens=32, **settings)
    result = answer(model, tokenizer, question, config)
    report = result.report
    assert report.mode_used == settings["mode"], report.fallback_reason
    assert report.notes == []
    for title in ("Tea", "Coffee"):
        body = result.content.split(f"**{title}**: ")[1].split("\n\n")[0]
        assert len(body.split()) >= 3, body  # a sentence, not a marker or a copied title
    conclusion = result.content.rsplit("\n\n", 1)[-1]
    assert len(conclusion.split()) >= 3, result.content
    assert result.output_tokens <= 120
