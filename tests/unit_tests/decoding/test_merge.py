"""Stage 3 over the branches' own KV (decoding.merge), checked as invariants on tiny models.

RoPE attention depends on relative positions only, so a sequence run at positions shifted by d
has, in every layer, the keys of the unshifted run rotated by d and the same values: that pins
``rotate_keys``. The laid-out cache must equal a plain prefill of the same row wherever both saw
the same tokens: the prefix, the first branch and the glue right after it (every layer), and
every column's first-layer keys and values.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from langchain_parallel_reason.decoding import iter_decode_branches, prefill
from langchain_parallel_reason.decoding.cache import crop_to
from langchain_parallel_reason.decoding.merge import (
    kv_reuse_problem,
    lay_out_branches,
    rotate_keys,
)
from langchain_parallel_reason.decoding.sequential import forward_tokens

PREFIX = [5, 17, 99, 230, 41, 8, 300, 77, 12, 150, 61, 19]
BRANCHES = [[40, 41, 42], [7], [300, 301, 302, 303]]
GLUE = [[10], [], [11, 12, 13]]  # after branch 0, 1 (none), 2 (a separator and a cue)
SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "phi3")
ATOL = 2e-5


def _partial_phi3() -> torch.nn.Module:
    config = copy.deepcopy(build_tiny_model("phi3").config)
    config.rope_parameters["partial_rotary_factor"] = 0.5  # 8 of 16 head dims rotate
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("arch", [*SUPPORTED, "phi3-partial"])
def test_shifted_run_equals_rotated_keys_in_every_layer(arch) -> None:
    model = _partial_phi3() if arch == "phi3-partial" else build_tiny_model(arch)
    inv_freq = model.get_decoder().rotary_emb.inv_freq
    ids = torch.tensor(PREFIX)
    at0, at9 = DynamicCache(), DynamicCache()
    with torch.inference_mode():
        prefill(model, ids, at0, start=0)
        prefill(model, ids, at9, start=9)
    for (k0, v0), (k9, v9) in zip(_kv(at0), _kv(at9), strict=True):
        torch.testing.assert_close(rotate_keys(k0, inv_freq, 9), k9, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(v0, v9, atol=ATOL, rtol=1e-4)
    if arch == "phi3-partial":  # the unrotated half really is passed through
        k0 = _kv(at0)[0][0]
        assert torch.equal(rotate_keys(k0, inv_freq, 9)[..., 8:], k0[..., 8:])


def _branch_kv(model, backend):
    cache = DynamicCache()
    with torch.inference_mode():
        prefill(model, torch.tensor(PREFIX), cache)
    gen = iter_decode_branches(
        model, PREFIX, BRANCHES, max_new_tokens=5, prefix_cache=cache, attention=backend,
        keep_kv=True,
    )  # fmt: skip
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return cache, stop.value


@pytest.mark.parametrize("backend", ["split", "mask"])
@pytest.mark.parametrize("arch", SUPPORTED)
def test_laid_out_cache_equals_a_plain_prefill_where_both_saw_the_same(arch, backend) -> None:
    model = build_tiny_model(arch)
    assert kv_reuse_problem(model) is None
    cache, out = _branch_kv(model, backend)
    assert cache.get_seq_length() == len(PREFIX)
    # Every fed token: the forced ones and every new one but the last.
    rows = [[*f, *r.token_ids[:-1]] for f, r in zip(BRANCHES, out.branches, strict=True)]
    for row, kv in zip(rows, out.branch_kv, strict=True):
        assert all(k.shape[-2] == v.shape[-2] == len(row) for k, v in kv)
    end, last_logits = lay_out_branches(model, cache, out.branch_kv, GLUE)
    seq = list(PREFIX)
    for row, glue in zip(rows, GLUE, strict=True):
        seq += [*row, *glue]
    assert end == len(seq) == cache.get_seq_length()

    plain = DynamicCache()
    with torch.inference_mode():
        prefill(model, torch.tensor(seq), plain)
    # Where each row position sits in the laid-out cache: prefix, branches, then all glue.
    at, glue_at, pos = list(range(len(PREFIX))), [], len(PREFIX)
    for row, glue in zip(rows, GLUE, strict=True):
        at += range(pos, pos + len(row))
        pos += len(row)
        glue_at += range(pos, pos + len(glue))
        pos += len(glue)
    order = torch.tensor(at + glue_at)  # cache column i holds row position order[i]
    exact = len(PREFIX) + len(rows[0]) + len(GLUE[0])  # prefix, branch 0, its glue
    for layer, ((k, v), (pk, pv)) in enumerate(zip(_kv(cache), _kv(plain), strict=True)):
        k, v = k[..., torch.argsort(order), :], v[..., torch.argsort(order), :]  # row order
        upto = len(seq) if layer == 0 else exact
        torch.testing.assert_close(k[..., :upto, :], pk[..., :upto, :], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(v[..., :upto, :], pv[..., :upto, :], atol=ATOL, rtol=1e-4)
    # The layout is a real approximation: later branches did not see the earlier ones.
    deep_k = _kv(cache)[-1][0][..., torch.argsort(order), :]
    assert not torch.allclose(deep_k[..., exact:, :], _kv(plain)[-1][0][..., exact:, :])

    # The logits after the last glue token are those of a forward over the laid-out cache:
    # re-run that token at its position against the cache without it.
    crop_to(cache, len(seq) - 1)
    with torch.inference_mode():
        again = forward_tokens(model, torch.tensor(seq[-1:]), cache, len(seq) - 1)
    torch.testing.assert_close(last_logits, again, atol=1e-4, rtol=1e-4)
    # Decoding goes on at position len(seq) with a plain forward that sees every column.
    with torch.inference_mode():
        logits = forward_tokens(model, torch.tensor([9]), cache, len(seq))
    assert torch.isfinite(logits).all()


def test_both_backends_keep_the_same_branch_kv() -> None:
    model = build_tiny_model("llama")
    _, split = _branch_kv(model, "split")
    _, mask = _branch_kv(model, "mask")
    for a, b in zip(split.branch_kv, mask.branch_kv, strict=True):
        for (ka, va), (kb, vb) in zip(a, b, strict=True):
            torch.testing.assert_close(ka, kb, atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(va, vb, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize(
    ("arch", "kw", "reason"),
    [
        ("gemma2", {"attn_implementation": "eager"}, "tested for"),
        ("gemma3", {}, "tested for"),
        ("mistral", {"sliding_window": 6}, "sliding window"),
        ("llama", {"attn_implementation": "parallel_reason_ragged"}, "4D mask"),
    ],
)
def test_models_it_cannot_serve_say_why(arch, kw, reason) -> None:
    import langchain_parallel_reason.runtime.ragged  # noqa: F401 - registers the name

    problem = kv_reuse_problem(build_tiny_model(arch, **kw))
    assert problem is not None
    assert reason in problem
