"""`bench profile` on the tiny model: every part is filled, and the model is left as it was."""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from langchain_parallel_reason.bench.profile import PARTS, ProfileConfig, profile_steps
from langchain_parallel_reason.cli import main
from langchain_parallel_reason.decoding import decoder


def test_profile_splits_each_step_into_parts(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    attention_before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    update_before = DynamicCache.update
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        logits_before = tiny_llama(ids).logits

    result = profile_steps(tiny_llama, tiny_tokenizer, ProfileConfig(rows=(1, 3), context=12))

    assert set(result["rows"]) == {"1", "3"}
    for row in result["rows"].values():
        assert set(row["parts_ms"]) == set(PARTS)
        assert row["parts_ms"]["linears"] > 0  # the labels reached the Linear layers
        assert row["parts_ms"]["attention"] > 0
        assert row["parts_ms"]["cache_writes"] > 0
        assert sum(row["parts_pct"].values()) > 99
        assert row["step_ms"] > 0
    # Every label is gone: the model, the caches, the attention functions and the decoder.
    assert "forward" not in vars(tiny_llama)
    assert not any("forward" in vars(m) for m in tiny_llama.modules())
    assert DynamicCache.update is update_before
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == attention_before
    assert decoder.sample_next.__module__.endswith("sampling")
    with torch.inference_mode():
        assert torch.equal(tiny_llama(ids).logits, logits_before)


def test_profile_command_prints_json(tiny_model_dir: Any, capsys: Any) -> None:
    argv = ["bench", "profile", "--model", str(tiny_model_dir), "--rows", "1,2"]
    assert main([*argv, "--context", "8", "--steps", "2", "--dtype", "fp32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dtype"] == "float32"
    assert set(result["rows"]) == {"1", "2"}
