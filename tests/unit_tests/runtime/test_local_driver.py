"""The in-process driver of request machines: the same answer, report and forwards as the stages
run on the model directly, and a machine's Cancel ends a branch in the decoder itself."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from langchain_parallel_reason import pipeline as pl
from langchain_parallel_reason.decoding.decoder import iter_decode_branches
from langchain_parallel_reason.decoding.sequential import iter_decode
from langchain_parallel_reason.pipeline.backend import LocalBackend
from langchain_parallel_reason.pipeline.machine import RequestMachine
from langchain_parallel_reason.runtime.local_driver import LocalDriver

MESSAGES = [{"role": "user", "content": "Compare tea and coffee."}]
CONFIGS = {
    "auto": pl.PipelineConfig(max_tokens=60, plan_max_tokens=24, step_max_tokens=10),
    "reuse": pl.PipelineConfig(
        steps=("East", "West", "North"), max_tokens=50, step_max_tokens=8, conclusion_kv="reuse"
    ),
    "mask": pl.PipelineConfig(steps=("One", "Two"), max_tokens=40, attention="mask"),
    "sampled": pl.PipelineConfig(
        steps=("Up", "Down"), max_tokens=40, temperature=0.8, seed=3, repetition_penalty=1.3
    ),
    "json": pl.PipelineConfig(
        grammar=pl.OutputGrammar(json_schema='{"type": "object"}'), max_tokens=30
    ),
    "stop": pl.PipelineConfig(mode="sequential", max_tokens=25, stop=("e",)),
}


def _report(result: Any) -> dict[str, Any]:
    report = result.report.model_dump()
    report.pop("timings")
    for block in report.get("blocks") or []:
        block.pop("timings", None)
    return report


def _forwards(model: Any, run: Any) -> tuple[Any, int]:
    """``run()``'s result and the model forwards it made."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        return run(), len(calls)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_driver_answers_as_the_stages_on_the_model(
    tiny_llama: Any, tiny_tokenizer: Any, name: str
) -> None:
    config = CONFIGS[name]
    direct, direct_calls = _forwards(
        tiny_llama, lambda: pl.answer(tiny_llama, tiny_tokenizer, MESSAGES, config)
    )
    driver = LocalDriver(LocalBackend(tiny_llama, tiny_tokenizer), tiny_tokenizer)
    machine = RequestMachine(driver.info, tiny_tokenizer, MESSAGES, config)
    got, calls = _forwards(tiny_llama, lambda: driver.run(machine, lambda event: None))
    assert got.content == direct.content
    assert _report(got) == _report(direct)  # forward counts, attention, conclusion_kv
    assert calls == direct_calls  # not a forward more or less
    if name == "reuse":
        assert got.report.conclusion_kv == "reuse"


def test_sending_branches_ends_them_in_the_decoder(tiny_llama: Any) -> None:
    gen = iter_decode_branches(tiny_llama, [5, 6, 7], [[8], [9], [10]], max_new_tokens=6)
    first = next(gen)
    assert first.branch_ids == (0, 1, 2)
    second = gen.send({1})  # branch 1 ends after its first token
    assert second.branch_ids == (0, 2)
    with pytest.raises(StopIteration) as stop:
        gen.send({0, 2})
    out = stop.value.value
    assert [len(b.token_ids) for b in out.branches] == [2, 1, 2]

    cache = LocalBackend(tiny_llama, None).new_cache()
    one = iter_decode(tiny_llama, [5, 6, 7], cache, start=0, max_new_tokens=6)
    next(one)
    with pytest.raises(StopIteration) as stop:
        one.send(True)
    assert len(stop.value.value.token_ids) == 1
    assert stop.value.value.forward_passes == 1
    assert cache.get_seq_length() == 3  # the last token was never fed


def test_the_router_decides_as_the_model_in_half_precision(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    # The router's logits reach the machine as the model's row (its dtype, its device).
    model = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    config = pl.PipelineConfig(max_tokens=40, temperature=0.7, seed=11, route_bias=0.05)
    direct = pl.answer(model, tiny_tokenizer, MESSAGES, config)
    driver = LocalDriver(LocalBackend(model, tiny_tokenizer), tiny_tokenizer)
    got = driver.run(RequestMachine(driver.info, tiny_tokenizer, MESSAGES, config), id)
    assert got.report.route_reason == direct.report.route_reason
    assert got.content == direct.content
