"""Sequential decoding under a grammar: jump-forward feeds forced text in one pass."""

from __future__ import annotations

import json
from typing import Any

import pytest
from transformers.cache_utils import DynamicCache

from langchain_parallel_reason.decoding.constraints import GrammarConstraint
from langchain_parallel_reason.decoding.sampling import SamplingParams
from langchain_parallel_reason.decoding.sequential import iter_decode

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^.{0,8}$"}},
            "required": ["city"],
        },
    },
    "required": ["name", "arguments"],
}


def _decode(model: Any, tokenizer: Any, *, jump: bool, seed: int) -> tuple[str, int, int]:
    prompt = tokenizer.encode("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n")
    vocab = model.get_output_embeddings().weight.shape[0]
    constraint = GrammarConstraint.from_json_schema(tokenizer, SCHEMA, vocab_size=vocab)
    gen = iter_decode(
        model,
        prompt,
        DynamicCache(),
        start=0,
        max_new_tokens=200,
        params=SamplingParams(temperature=1.0),
        seed=seed,
        tokenizer=tokenizer,
        constraint=constraint,
        jump_forward=jump,
    )
    yielded: list[int] = []
    while True:
        try:
            yielded.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert yielded == result.token_ids
    return tokenizer.decode(result.token_ids), len(result.token_ids), result.forward_passes


@pytest.mark.parametrize("seed", range(3))
def test_jump_forward_saves_passes_and_keeps_the_grammar(
    tiny_llama: Any, tiny_tokenizer: Any, seed: int
) -> None:
    text, tokens, passes = _decode(tiny_llama, tiny_tokenizer, jump=True, seed=seed)
    call = json.loads(text)
    assert call["name"] == "get_weather"
    assert set(call["arguments"]) == {"city"}
    # The name and both keys are forced: far fewer passes than tokens.
    assert passes < tokens
    plain_text, plain_tokens, plain_passes = _decode(
        tiny_llama, tiny_tokenizer, jump=False, seed=seed
    )
    assert json.loads(plain_text)["name"] == "get_weather"
    assert plain_passes == plain_tokens
    assert passes < plain_passes


def test_given_logits_replace_the_first_forward(tiny_llama: Any) -> None:
    # Decoding from the caller's logits after a prefill equals feeding the prompt itself.
    import torch

    from langchain_parallel_reason.decoding import prefill
    from langchain_parallel_reason.pipeline import drive

    prompt = [5, 17, 99, 230, 41, 8, 300, 77]
    plain = drive(iter_decode(tiny_llama, prompt, DynamicCache(), start=0, max_new_tokens=9))
    cache = DynamicCache()
    with torch.inference_mode():
        logits = prefill(tiny_llama, torch.tensor(prompt), cache)
    given = drive(
        iter_decode(tiny_llama, [], cache, start=len(prompt), max_new_tokens=9, logits=logits)
    )
    assert given.token_ids == plain.token_ids
    assert given.forward_passes == plain.forward_passes - 1
