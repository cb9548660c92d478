"""Both decode loops take their rules the same way; the Stage-2 backends keep their contract.

Invariants on tiny random models: a branch decoded in the belt equals ``iter_decode`` over
``prefix + forced`` under the same ``params`` / ``suppress`` / stop ids / repetition control, on
both backends; ``SuppressFirst`` bans its ids for exactly ``count`` new tokens; a decode call
walks the model's modules a fixed number of times however many forwards it runs (the split
backend collects the attention configs once per call); ``forward_tokens`` gives a batch the
logits each row gets alone.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model
from transformers.cache_utils import DynamicCache

from langchain_parallel_reason.decoding import (
    SamplingParams,
    SuppressFirst,
    decode_branches,
    iter_decode_branches,
)
from langchain_parallel_reason.decoding.repetition import RepetitionControl
from langchain_parallel_reason.decoding.sequential import forward_tokens, iter_decode, result_of

BACKENDS = ("split", "mask")
PREFIX = [5, 17, 99, 230, 41, 8, 300, 77, 12, 150, 61, 19, 203, 88]
BRANCHES = [[40, 41, 42], [7], [300, 301, 302, 303], []]
NEW = 8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("arch", "attn"), [("llama", "sdpa"), ("qwen3", "sdpa"), ("gemma2", "eager")]
)
def test_a_branch_equals_sequential_decoding_under_the_same_rules(
    tiny_model, arch, attn, backend
) -> None:
    model = tiny_model(arch, attn_implementation=attn)
    free = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=NEW, attention=backend)
    # Ban every branch's first two free tokens for three tokens; stop on a later token.
    banned = sorted({t for r in free.branches for t in r.token_ids[:2]})
    rules = {
        "params": SamplingParams(),
        "suppress": SuppressFirst(banned, 3),
        "stop_token_ids": [free.branches[0].token_ids[5]],
        "repetition": RepetitionControl(1.2, 0),
    }
    out = result_of(
        iter_decode_branches(
            model, PREFIX, BRANCHES, max_new_tokens=NEW, attention=backend, **rules
        )
    )
    for forced, got, before in zip(BRANCHES, out.branches, free.branches, strict=True):
        alone = result_of(
            iter_decode(
                model, PREFIX + forced, DynamicCache(), start=0, max_new_tokens=NEW, **rules
            )
        )
        assert got.token_ids == alone.token_ids, (arch, forced)
        assert (got.finish_reason, got.stop) == (alone.finish_reason, alone.stop)
        assert not set(got.token_ids[:3]) & set(banned)
        assert got.token_ids[0] != before.token_ids[0]  # the rule did change the branch


def test_suppress_first_bans_for_exactly_count_tokens(tiny_llama) -> None:
    free = result_of(iter_decode(tiny_llama, PREFIX, DynamicCache(), start=0, max_new_tokens=NEW))
    first = free.token_ids[0]
    for count in (0, 1, 3):
        out = result_of(
            iter_decode(
                tiny_llama,
                PREFIX,
                DynamicCache(),
                start=0,
                max_new_tokens=NEW,
                suppress=SuppressFirst([first], count),
            )
        )
        assert first not in out.token_ids[:count]
        assert (out.token_ids == free.token_ids) == (count == 0)
    rule = SuppressFirst([9, 3, 9], 2)
    assert rule.token_ids == (3, 9)
    assert [rule.active(n) for n in range(3)] == [True, True, False]
    assert not SuppressFirst([], 5).active(0)


def test_suppress_first_ids_ban_the_first_token_only(tiny_llama) -> None:
    free = result_of(iter_decode(tiny_llama, PREFIX, DynamicCache(), start=0, max_new_tokens=NEW))
    first = free.token_ids[0]
    rule = SuppressFirst([], 0, first_ids=[first])
    out = result_of(
        iter_decode(tiny_llama, PREFIX, DynamicCache(), start=0, max_new_tokens=NEW, suppress=rule)
    )
    assert out.token_ids[0] != first
    # The same rule in the branch loop equals a per-branch opening ban.
    kwargs = {"max_new_tokens": NEW, "attention": "mask"}
    ruled = decode_branches(tiny_llama, PREFIX, BRANCHES, suppress=rule, **kwargs)
    opened = decode_branches(
        tiny_llama, PREFIX, BRANCHES, opening_banned_ids=[[first]] * len(BRANCHES), **kwargs
    )
    assert [r.token_ids for r in ruled.branches] == [r.token_ids for r in opened.branches]
    both = SuppressFirst([9, 3], 2, first_ids=[5, 5, 1])
    assert both.first_ids == (1, 5)
    assert [both.banned(n) for n in range(3)] == [(1, 3, 5, 9), (3, 9), ()]
    assert [rule.active(n) for n in range(2)] == [True, False]


def test_rules_given_the_wrong_way_get_clear_errors(tiny_llama) -> None:
    with pytest.raises(ValueError, match="count must be >= 0"):
        SuppressFirst([1], -1)
    with pytest.raises(TypeError, match="suppress="):
        result_of(
            iter_decode(
                tiny_llama,
                PREFIX,
                DynamicCache(),
                start=0,
                max_new_tokens=2,
                constraint=SuppressFirst([1], 1),
            )
        )
    with pytest.raises(ValueError, match="either params"):
        decode_branches(
            tiny_llama, PREFIX, BRANCHES, max_new_tokens=2, params=SamplingParams(), top_k=5
        )
    with pytest.raises(ValueError, match="either suppress"):
        decode_branches(
            tiny_llama,
            PREFIX,
            BRANCHES,
            max_new_tokens=2,
            suppress=SuppressFirst([1], 1),
            min_new_tokens=2,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_walks_do_not_grow_with_the_forwards(backend) -> None:
    model = build_tiny_model("llama")  # own model: its `modules` is instrumented below
    walks: list[int] = []
    modules = model.modules

    def counted():
        walks.append(1)
        return modules()

    model.modules = counted
    counts = []
    for new in (2, 12):
        walks.clear()
        out = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=new, attention=backend)
        assert out.forward_passes == new
        counts.append(len(walks))
    assert counts[0] == counts[1] <= 1


def test_forward_tokens_gives_a_batch_what_each_row_gets_alone(tiny_llama) -> None:
    ids = torch.tensor([[5, 6, 7, 8], [90, 91, 92, 93]])  # [B, S]
    with torch.inference_mode():
        last = forward_tokens(tiny_llama, ids, DynamicCache(), 0)  # [B, V]
        every = forward_tokens(tiny_llama, ids, DynamicCache(), 0, every_token=True)  # [B, S, V]
        for row in range(ids.shape[0]):
            alone = forward_tokens(tiny_llama, ids[row], DynamicCache(), 0)  # [V]
            torch.testing.assert_close(last[row], alone)
            torch.testing.assert_close(every[row, -1], alone)
    assert every.shape[:2] == ids.shape
