"""Repetition control: transformers' meaning of repetition_penalty / no_repeat_ngram_size, applied
per branch (each branch equals decoding it alone with the same controls), and the loop guard."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import build_tiny_model, generate_alone
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from langchain_parallel_reason.decoding import decode_branches
from langchain_parallel_reason.decoding.repetition import (
    RepetitionControl,
    find_loop,
    trim_loop,
)
from langchain_parallel_reason.decoding.sequential import iter_decode

PREFIX = [5, 17, 99, 230, 41, 8, 300, 77, 12, 150, 61, 19, 203, 88, 4, 250, 33, 120]
BRANCHES = [[40, 41, 42], [7], [300, 301, 302, 303, 304]]


def drive_tokens(gen):
    """Run a decode generator to its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def test_find_loop_needs_three_copies_and_a_span() -> None:
    unit = [11, 12, 13, 14, 15, 16]
    assert find_loop(unit * 2) is None  # two copies: could be a deliberate repeat
    assert find_loop([1, 2] + unit * 3) == 6
    assert find_loop([9] * 15) is None  # shorter than the 16-token span
    assert find_loop([9] * 16) == 1
    assert find_loop([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]) is None


def test_trim_loop_keeps_one_copy() -> None:
    unit = [11, 12, 13, 14, 15, 16]
    assert trim_loop([1, 2, *unit, *unit, *unit, 11, 12]) == [1, 2, *unit]
    assert trim_loop([1, 2, 3]) == [1, 2, 3]


@pytest.mark.parametrize(("penalty", "ngram"), [(1.3, None), (None, 2), (0.8, 3), (1.5, 1)])
def test_logits_equal_transformers_processors(penalty, ngram) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 50
    context = torch.randint(0, vocab, (30,), generator=gen).tolist()
    logits = torch.randn(vocab, generator=gen)
    state = RepetitionControl(penalty, ngram).start(context, vocab)
    ours = state.apply(logits.clone())
    ids = torch.tensor([context])
    expected = logits.clone()[None]
    if penalty is not None:
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, expected)
    if ngram is not None:
        expected = NoRepeatNGramLogitsProcessor(ngram)(ids, expected)
    assert torch.equal(ours, expected[0])
    # Pushing a token updates the state as a longer context would.
    state.push(7)
    longer = RepetitionControl(penalty, ngram).start([*context, 7], vocab)
    assert torch.equal(state.apply(logits.clone()), longer.apply(logits.clone()))


@pytest.mark.parametrize("backend", ["split", "mask"])
@pytest.mark.parametrize(("penalty", "ngram"), [(1.3, None), (None, 2), (1.2, 3)])
def test_every_branch_equals_generate_alone_with_the_same_controls(backend, penalty, ngram):
    model = build_tiny_model("llama", attn_implementation="eager")
    new = 12
    out = decode_branches(
        model,
        PREFIX,
        BRANCHES,
        max_new_tokens=new,
        attention=backend,
        repetition=RepetitionControl(penalty, ngram),
    )
    kw = {}
    if penalty is not None:
        kw["repetition_penalty"] = penalty
    if ngram is not None:
        kw["no_repeat_ngram_size"] = ngram
    for forced, result in zip(BRANCHES, out.branches, strict=True):
        assert result.token_ids == generate_alone(model, PREFIX, forced, new, **kw)


@pytest.mark.parametrize("looping", [False, True])
def test_loop_guard_ends_a_branch_as_sequential_decoding_does(looping) -> None:
    model = build_tiny_model("llama", attn_implementation="eager")
    if looping:  # every logit 0: greedy decoding writes token 0 forever
        with torch.no_grad():
            model.lm_head.weight.zero_()
    new = 40
    free = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=new)
    guarded = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=new, loop_guard=True)
    for forced, a, b in zip(BRANCHES, free.branches, guarded.branches, strict=True):
        # The guard cuts the free text where a loop first shows, and nowhere else.
        cut = next((k for k in range(1, new + 1) if find_loop(a.token_ids[:k]) is not None), None)
        assert b.token_ids == a.token_ids[:cut]
        assert b.finish_reason == ("repetition" if cut else "length")
        # The sequential decoder applies the same guard to the same tokens.
        cache = DynamicCache()
        seq = drive_tokens(
            iter_decode(model, PREFIX + forced, cache, start=0, max_new_tokens=new, loop_guard=True)
        )
        assert seq.token_ids == b.token_ids
        assert seq.finish_reason == b.finish_reason
    if looping:
        assert all(r.finish_reason == "repetition" for r in guarded.branches)


def test_opening_bans_apply_to_the_first_token_only() -> None:
    model = build_tiny_model("llama", attn_implementation="eager")
    free = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=4)
    first = free.branches[0].token_ids[0]
    out = decode_branches(
        model, PREFIX, BRANCHES, max_new_tokens=4, opening_banned_ids=[[first], [], []]
    )
    assert out.branches[0].token_ids[0] != first
    assert [r.token_ids for r in out.branches[1:]] == [r.token_ids for r in free.branches[1:]]


def test_no_past_key_values_deprecation_warning() -> None:
    model = build_tiny_model("llama", attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        decode_branches(model, PREFIX, BRANCHES, max_new_tokens=3, attention="split")
        decode_branches(model, PREFIX, BRANCHES, max_new_tokens=3, attention="mask")
        drive_tokens(iter_decode(model, PREFIX, DynamicCache(), start=0, max_new_tokens=3))
