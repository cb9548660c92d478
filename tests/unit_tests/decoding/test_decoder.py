"""The belt decoder's contract, checked as invariants on tiny random models of every architecture.

The central invariant: under greedy float32 decoding, every branch equals what ``generate``
produces for ``prefix + branch_prefix`` alone, for both Stage-2 backends, eager and sdpa, and
sliding-window models whose window is smaller than the prefix.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import ARCH_ATTN_PAIRS, build_tiny_model, generate_alone
from transformers.cache_utils import DynamicCache

from langchain_parallel_reason.decoding import (
    choose_attention,
    decode_branches,
    iter_decode_branches,
    prefill,
)
from langchain_parallel_reason.decoding.masks import belt_allowed
from langchain_parallel_reason.decoding.sequential import Cancelled

BACKENDS = ("split", "mask")
PREFIX = [5, 17, 99, 230, 41, 8, 300, 77, 12, 150, 61, 19, 203, 88, 4, 250, 33, 120]
# Forced prefixes of different lengths, one of them empty.
BRANCHES = [[40, 41, 42], [7], [300, 301, 302, 303, 304], []]
NEW = 10


CASES = [(arch, attn, None) for arch, attn in ARCH_ATTN_PAIRS] + [
    # A window (in positions) shorter than the prefix, on models that take one mask for all
    # layers (mistral, phi3) and a per-layer-type mask dict (qwen2).
    ("mistral", "sdpa", 6),
    ("phi3", "eager", 6),
    ("qwen2", "sdpa", 6),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("arch", "attn", "window"), CASES)
def test_every_branch_equals_decoding_itgenerate_alone(arch, attn, window, backend) -> None:
    kw = {"sliding_window": window} if window else {}
    model = build_tiny_model(arch, attn_implementation=attn, **kw)
    out = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=NEW, attention=backend)
    assert out.attention == backend
    for forced, result in zip(BRANCHES, out.branches, strict=True):
        assert result.token_ids == generate_alone(model, PREFIX, forced, NEW), (arch, attn, forced)
        assert result.finish_reason == "length"


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_one_branch_changes_no_other(tiny_model, backend) -> None:
    model = tiny_model("qwen3")
    a = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=NEW, attention=backend)
    other = [BRANCHES[0], [9, 9, 9, 9, 9, 9, 9], BRANCHES[2], BRANCHES[3]]
    b = decode_branches(model, PREFIX, other, max_new_tokens=NEW, attention=backend)
    assert a.branches[1].token_ids != b.branches[1].token_ids
    for i in (0, 2, 3):
        assert a.branches[i].token_ids == b.branches[i].token_ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_sampling_is_reproducible_and_per_branch(tiny_model, backend) -> None:
    model = tiny_model("llama")
    kw = {"max_new_tokens": NEW, "temperature": 1.0, "top_p": 0.95, "attention": backend}
    a = decode_branches(model, PREFIX, BRANCHES, seed=7, **kw)
    b = decode_branches(model, PREFIX, BRANCHES, seed=7, **kw)
    c = decode_branches(model, PREFIX, BRANCHES, seed=8, **kw)
    assert [r.token_ids for r in a.branches] == [r.token_ids for r in b.branches]
    assert [r.token_ids for r in a.branches] != [r.token_ids for r in c.branches]
    # Branch b draws from its own generator (seed + b): alone, with that seed, it is the same.
    alone = decode_branches(model, PREFIX, [BRANCHES[2]], seed=9, **kw)
    assert alone.branches[0].token_ids == a.branches[2].token_ids


def test_stop_ids_stop_strings_and_budgets(tiny_model, tiny_tokenizer) -> None:
    model = tiny_model("llama")
    free = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=NEW)
    # Stop on the 4th token of branch 0: it ends there (the stop id included), others go on
    # unless they produce that id too.
    stop_id = free.branches[0].token_ids[3]
    out = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=NEW, stop_token_ids=[stop_id])
    assert out.branches[0].token_ids == free.branches[0].token_ids[:4]
    assert (out.branches[0].finish_reason, out.branches[0].stop) == ("stop", stop_id)
    for full, got in zip(free.branches, out.branches, strict=True):
        cut = full.token_ids.index(stop_id) + 1 if stop_id in full.token_ids else NEW
        assert got.token_ids == full.token_ids[:cut]

    # A stop string taken from branch 2's text stops branch 2 only, at the token completing it.
    text2 = tiny_tokenizer.decode(free.branches[2].token_ids[:5])
    needle = text2[-3:] if len(text2.strip()) >= 3 else text2
    out = decode_branches(
        model,
        PREFIX,
        BRANCHES,
        max_new_tokens=NEW,
        stop_strings=[needle],
        tokenizer=tiny_tokenizer,
    )
    got = out.branches[2]
    assert got.finish_reason == "stop"
    assert got.stop == needle
    assert needle in tiny_tokenizer.decode(got.token_ids)
    assert needle not in tiny_tokenizer.decode(got.token_ids[:-1])

    # Per-branch budgets.
    out = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=[1, 2, 3, 4])
    assert [len(r.token_ids) for r in out.branches] == [1, 2, 3, 4]
    assert all(r.finish_reason == "length" for r in out.branches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retired_branches_cost_no_forward_tokens(tiny_model, backend) -> None:
    model = tiny_model("llama")
    fed: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda _m, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    budgets = [2, 10, 5, 1]
    try:
        out = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=budgets, attention=backend)
    finally:
        handle.remove()
    # fed[0] is the prefix prefill. Afterwards each forward carries one token per LIVE branch:
    # all forced tokens once, then (new tokens - 1) per branch (the last token is never fed).
    stage2 = fed[1:]
    assert sum(stage2) == sum(map(len, BRANCHES)) + sum(b - 1 for b in budgets)
    assert out.forward_passes == len(stage2) == max(budgets)
    # After branch 0 (2 tokens) and 3 (1 token) end, steps carry at most 2 tokens.
    assert stage2[-1] == 1
    assert [r.forward_passes for r in out.branches] == [2, 10, 5, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cache_is_reused_and_restored(tiny_model, backend) -> None:
    model = tiny_model("gemma3", attn_implementation="eager")
    ref = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=NEW, attention=backend)
    cache = DynamicCache()
    with torch.inference_mode():
        logits = prefill(model, torch.tensor(PREFIX), cache)
    out = decode_branches(
        model,
        PREFIX,
        BRANCHES,
        max_new_tokens=NEW,
        prefix_cache=cache,
        prefix_logits=logits,
        attention=backend,
    )
    assert [r.token_ids for r in out.branches] == [r.token_ids for r in ref.branches]
    assert cache.get_seq_length() == len(PREFIX)
    # Reused twice: same again (nothing leaked into the cache).
    again = decode_branches(
        model, PREFIX, BRANCHES, max_new_tokens=NEW, prefix_cache=cache, attention=backend
    )
    assert [r.token_ids for r in again.branches] == [r.token_ids for r in ref.branches]


def test_streaming_events_rebuild_the_result(tiny_model) -> None:
    model = tiny_model("llama")
    gen = iter_decode_branches(model, PREFIX, BRANCHES, max_new_tokens=[3, 6, 4, 5])
    seen: dict[int, list[int]] = {b: [] for b in range(len(BRANCHES))}
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            out = stop.value
            break
        assert len(event.branch_ids) == len(set(event.branch_ids))
        for b, t in zip(event.branch_ids, event.token_ids, strict=True):
            seen[b].append(t)
    assert [seen[b] for b in range(len(BRANCHES))] == [r.token_ids for r in out.branches]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_stops_and_restores_the_cache(tiny_model, backend) -> None:
    model = tiny_model("llama")
    cache = DynamicCache()
    with torch.inference_mode():
        prefill(model, torch.tensor(PREFIX), cache)
    cancel = threading.Event()
    gen = iter_decode_branches(
        model,
        PREFIX,
        BRANCHES,
        max_new_tokens=NEW,
        prefix_cache=cache,
        attention=backend,
        cancel=cancel,
    )
    next(gen)
    cancel.set()
    with pytest.raises(Cancelled):
        next(gen)
    assert cache.get_seq_length() == len(PREFIX)


def test_bad_input_gets_clear_errors(tiny_model) -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prefix_ids is empty"):
        decode_branches(model, [], BRANCHES, max_new_tokens=2)
    with pytest.raises(ValueError, match="branch_prefixes is empty"):
        decode_branches(model, PREFIX, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode_branches(model, PREFIX, BRANCHES, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        decode_branches(model, PREFIX, BRANCHES, max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        decode_branches(model, PREFIX, BRANCHES, max_new_tokens=2, stop_strings=["x"])
    cache = DynamicCache()
    with torch.inference_mode():
        prefill(model, torch.tensor(PREFIX[:-2]), cache)
    with pytest.raises(ValueError, match="prefix_cache holds"):
        decode_branches(model, PREFIX, BRANCHES, max_new_tokens=2, prefix_cache=cache)


def test_flash_attention_is_refused_for_the_mask_backend() -> None:
    model = build_tiny_model("llama", attn_implementation="sdpa")
    # Only the config is changed: the refusal must come before any forward pass.
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        decode_branches(model, PREFIX, BRANCHES, max_new_tokens=2, attention="mask")
    # The split backend owns its Stage-2 attention, so it accepts such a model.
    assert choose_attention(model, "split") == "split"


def test_sliding_cache_built_with_config_is_refused(tiny_model) -> None:
    model = tiny_model("mistral", sliding_window=6)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        prefill(model, torch.tensor(PREFIX), cache)
    with pytest.raises(ValueError, match="without config"):
        decode_branches(model, PREFIX, BRANCHES, max_new_tokens=2, prefix_cache=cache)


def test_belt_mask_semantics() -> None:
    # Columns: 2 prefix tokens, then branch 0 at pos 2, branch 1 at pos 2, branch 0 at pos 3.
    col_branch = torch.tensor([-1, -1, 0, 1, 0])
    col_pos = torch.tensor([0, 1, 2, 2, 3])
    allowed = belt_allowed(col_branch, col_pos, torch.tensor([0, 1]), torch.tensor([3, 2]))
    assert allowed.tolist() == [
        [True, True, True, False, True],
        [True, True, False, True, False],
    ]
    windowed = belt_allowed(col_branch, col_pos, torch.tensor([0]), torch.tensor([3]), 2)
    assert windowed.tolist() == [[False, False, True, False, True]]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_on_cuda(backend) -> None:
    model = build_tiny_model("qwen3", attn_implementation="sdpa").cuda()
    out = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=NEW, attention=backend)
    for forced, result in zip(BRANCHES, out.branches, strict=True):
        assert result.token_ids == generate_alone(model, PREFIX, forced, NEW)


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_new_tokens_bans_stops_and_suppressed_ids_early(tiny_model, backend) -> None:
    model = tiny_model("llama")
    free = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=NEW, attention=backend)
    first = [r.token_ids[0] for r in free.branches]
    # Each branch's own first greedy token is a stop id: without min_new_tokens they stop at once.
    out = decode_branches(
        model, PREFIX, BRANCHES, max_new_tokens=NEW, stop_token_ids=first, attention=backend
    )
    assert all(len(r.token_ids) == 1 for r in out.branches)
    out = decode_branches(
        model,
        PREFIX,
        BRANCHES,
        max_new_tokens=NEW,
        stop_token_ids=first[:1],
        suppress_token_ids=first[1:],
        min_new_tokens=3,
        attention=backend,
    )
    for r in out.branches:
        assert not set(r.token_ids[:3]) & set(first)


def test_auto_attention_is_the_mask_in_half_precision_on_a_cpu() -> None:
    # Split's small per-branch matmuls run slow bf16 CPU kernels; float32 keeps split.
    model = build_tiny_model("llama", attn_implementation="sdpa")
    assert choose_attention(model, "auto") == "split"
    half = build_tiny_model("llama", attn_implementation="sdpa").to(torch.bfloat16)
    assert choose_attention(half, "auto") == "mask"
    assert choose_attention(half, "split") == "split"  # asked for explicitly
    out = decode_branches(half, PREFIX, BRANCHES, max_new_tokens=3)
    assert out.attention == "mask"
    # An implementation that takes no 4D mask keeps split in half precision too.
    half.config._attn_implementation_internal = "flash_attention_2"
    assert choose_attention(half, "auto") == "split"
