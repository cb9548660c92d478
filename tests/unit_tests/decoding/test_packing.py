"""bfloat16 Linear weights packed once for oneDNN: the same logits bit for bit, no extra memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import ARCH_ATTN_PAIRS, build_tiny_model, save_tiny_model_dir
from transformers import DynamicCache

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.decoding.packing import PackedLinear, can_pack, pack_linears
from langchain_parallel_reason.loading import load_model_and_tokenizer

needs_bf16 = pytest.mark.skipif(
    not can_pack(torch.nn.Linear(2, 2, dtype=torch.bfloat16)),
    reason="this CPU's oneDNN has no bfloat16 kernels: nothing is packed",
)


def _bf16(arch: str, attn: str = "sdpa") -> Any:
    return build_tiny_model(arch, attn_implementation=attn).to(torch.bfloat16)


def _logits(model: Any, ids: list[list[int]]) -> list[torch.Tensor]:
    """A prefill, then chunks of 1 and of several tokens through the cache."""
    cache, out = DynamicCache(), []
    with torch.inference_mode():
        for chunk in ids:
            step = model(input_ids=torch.tensor([chunk]), past_key_values=cache, use_cache=True)
            out.append(step.logits)
    return out


@needs_bf16
@pytest.mark.parametrize(("arch", "attn"), ARCH_ATTN_PAIRS)
def test_packed_model_gives_the_same_logits_bit_for_bit(arch: str, attn: str) -> None:
    model = _bf16(arch, attn)
    ids = [[5, 9, 33, 7, 100, 3, 64], [12], [40, 41, 42, 43], [7]]
    before = _logits(model, ids)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert pack_linears(model) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    for a, b in zip(before, _logits(model, ids), strict=True):
        assert torch.equal(a, b)


@needs_bf16
def test_packing_keeps_no_dense_copy_and_keeps_a_tied_head_shared() -> None:
    model = _bf16("llama")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    dense = sum(p.numel() for p in model.parameters())
    pack_linears(model)
    head = model.get_output_embeddings()
    assert isinstance(head, PackedLinear)
    assert isinstance(head, torch.nn.Linear)
    # Shape and dtype still read as before (vocab size, dtype checks).
    assert head.weight.shape == (model.config.vocab_size, model.config.hidden_size)
    assert head.weight.dtype == torch.bfloat16
    assert (head.weight is model.get_input_embeddings().weight) == tied
    proj = model.model.layers[0].self_attn.q_proj
    assert proj.weight.device.type == "meta"  # the packed copy is the only one
    left = sum(p.numel() for p in model.parameters())
    assert left < dense
    assert not any("proj" in name for name, _ in model.named_parameters())


def test_float32_and_non_cpu_models_are_left_as_they_are() -> None:
    model = build_tiny_model("llama", attn_implementation="sdpa")  # float32
    assert not can_pack(model)
    assert pack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


@needs_bf16
def test_the_loader_packs_a_bf16_model_and_answers_as_the_unpacked_one(tmp_path: Path) -> None:
    folder = str(save_tiny_model_dir(tmp_path / "tiny", "llama"))
    packed, tokenizer = load_model_and_tokenizer(folder, dtype="bfloat16", progress=False)
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    plain, _ = load_model_and_tokenizer(folder, dtype="bfloat16", progress=False, pack=False)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    for settings in (
        {"mode": "sequential", "max_tokens": 24, "seed": 0},
        {"mode": "parallel", "steps": ["One", "Two"], "max_tokens": 24, "seed": 0},
    ):
        a = ChatParallelReason.from_model(packed, tokenizer).invoke("Say hi.", **settings)
        b = ChatParallelReason.from_model(plain, tokenizer).invoke("Say hi.", **settings)
        assert a.content == b.content
        assert a.response_metadata["parallel"]["mode_used"] == settings["mode"]


@needs_bf16
def test_a_packed_model_cast_later_says_how_to_fix() -> None:
    model = _bf16("llama")
    pack_linears(model)
    model.to(torch.float32)
    with pytest.raises(RuntimeError, match="pack=False"), torch.inference_mode():
        model(input_ids=torch.tensor([[5, 9, 33]]))
