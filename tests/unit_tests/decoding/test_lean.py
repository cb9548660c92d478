"""The lean Llama forward: the stock forward's logits bit for bit, and only where it applies."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import ARCHITECTURES, build_tiny_model, build_tiny_tokenizer
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from langchain_parallel_reason.decoding.lean import lean_forward, lean_problem
from langchain_parallel_reason.decoding.packing import can_pack, pack_linears
from langchain_parallel_reason.runtime.engine import Engine

CHUNKS = [[5, 9, 33, 7, 100, 3, 64], [12], [40, 41, 42, 43], [7]]


def _stock(model: Any) -> list[torch.Tensor]:
    """A prefill, then chunks of 1 and of several tokens through the model's own forward."""
    cache, out = DynamicCache(), []
    with torch.inference_mode():
        for chunk in CHUNKS:
            out.append(model(input_ids=torch.tensor([chunk]), past_key_values=cache).logits)
    return out


def _lean(model: Any) -> list[torch.Tensor]:
    """The same chunks through `LeanForward`, with stock sdpa over a cache it keeps itself."""
    lean, cache, out, at = lean_forward(model), DynamicCache(), [], 0
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module: Any, q: Any, k: Any, v: Any, mask: Any, **kw: Any) -> Any:
        keys, values = cache.update(k, v, module.layer_idx)
        rows, past = q.shape[2], keys.shape[2] - q.shape[2]
        # [1, 1, S, K] additive causal mask: query i sees keys up to past + i.
        seen = torch.arange(keys.shape[2])[None] <= past + torch.arange(rows)[:, None]
        mask = torch.zeros(seen.shape, dtype=q.dtype).masked_fill(~seen, torch.finfo(q.dtype).min)
        return sdpa(module, q, keys, values, mask[None, None] if rows > 1 else None, **kw)

    with torch.inference_mode():
        for chunk in CHUNKS:
            positions = torch.arange(at, at + len(chunk))[None]
            hidden = lean.hidden(torch.tensor([chunk]), positions, attention)
            out.append(model.lm_head(hidden))
            at += len(chunk)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16-packed"])
def test_the_lean_forward_gives_the_stock_logits_bit_for_bit(dtype: str) -> None:
    model = build_tiny_model("llama", attn_implementation="sdpa")
    if dtype != "float32":
        model = model.to(torch.bfloat16)
        if not can_pack(model):
            pytest.skip("this CPU's oneDNN has no bfloat16 kernels: nothing is packed or fused")
        pack_linears(model)  # q/k/v and gate/up fused: one GEMM each
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LinearPart"
    assert lean_problem(model) is None
    for a, b in zip(_stock(model), _lean(model), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "llama"])
def test_other_architectures_keep_the_stock_forward_and_say_why(arch: str) -> None:
    model = build_tiny_model(arch, attn_implementation="eager")
    assert "not a stock LlamaForCausalLM" in lean_problem(model)
    assert lean_forward(model) is None


def test_a_hooked_or_training_model_is_not_run_lean() -> None:
    model = build_tiny_model("llama", attn_implementation="sdpa")
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *_: None)
    assert "forward hooks" in lean_problem(model)
    handle.remove()
    model.train()
    assert "training" in lean_problem(model)


def test_the_engine_says_which_forward_it_runs() -> None:
    tokenizer = build_tiny_tokenizer()
    for arch, expected in (("llama", "lean"), ("qwen2", "transformers")):
        engine = Engine(build_tiny_model(arch, attn_implementation="sdpa"), tokenizer)
        try:
            assert engine.stats()["forward"] == expected
        finally:
            engine.close()


def test_a_hook_put_on_a_module_later_runs_and_the_logits_stay() -> None:
    # The lean loop runs modules' forward directly: a hook put on a module after the engine
    # made its LeanForward must still run, and the step then takes the model's own forward.
    from types import SimpleNamespace

    from langchain_parallel_reason.runtime.ragged import forward_step, pack_step

    model = build_tiny_model("llama", attn_implementation="sdpa")
    engine = Engine(model, build_tiny_tokenizer())
    core = engine._core
    seen: list[int] = []

    def step() -> torch.Tensor:
        ids = torch.tensor([5, 9, 33, 7, 100, 3, 64])
        call = SimpleNamespace(ids=ids, positions=torch.arange(7), cache=DynamicCache(), ran=0)
        call.mask = call.split = call.keep = None
        packed = pack_step([(call, 7)], core.base_impl)
        return forward_step(model, packed, core.lean, core.configs, core.cache_kw, core.dummy_mask)

    try:
        assert core.lean is not None
        assert not core.lean.hooked()
        plain = step()
        handle = model.model.layers[1].mlp.register_forward_hook(lambda *_: seen.append(1))
        assert core.lean.hooked()
        hooked = step()
        handle.remove()
    finally:
        engine.close()
    assert seen == [1]  # the hook ran once, in the model's own forward
    assert torch.equal(plain, hooked)
