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
