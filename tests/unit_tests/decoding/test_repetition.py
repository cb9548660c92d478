"""Repetition control: transformers' meaning of repetition_penalty / no_repeat_ngram_size, applied
per branch (each branch equals decoding it alone with the same controls), and the loop guard."""

from __future__ import annotations

import warnings
from typing import Any

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
    counting_run,
    find_loop,
    find_patterned_loop,
    loop_cut,
    trim_loop,
)
from langchain_parallel_reason.decoding.sequential import iter_decode
from langchain_parallel_reason.decoding.stops import Stopping

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


# Word ids for patterned loops: 1 "a", 2 "is", 3 ",", 4 "great", 5 "way", 6 "to", 7 ".", 8 "R"
# (a capitalised first word), 20.. slot words; a two-token slot word is (30, 31).
CAT, DOG, RABBIT, HAM = [20], [21], [22], [30, 31]


def _copy(slot: list[int]) -> list[int]:
    """ "a X is a X," : the slot twice in one template."""
    return [1, *slot, 2, 1, *slot, 3]


def test_a_template_with_a_changing_slot_is_a_loop_after_three_copies() -> None:
    first = [8, *CAT, 2, 1, *CAT, 3]  # "A cat is a cat," (capitalised)
    two = first + _copy(DOG)
    three = two + _copy(RABBIT)
    assert find_loop(two) is None  # two copies: could be a deliberate parallel
    assert find_loop(three) is not None
    assert trim_loop(three) == first  # one copy kept
    assert loop_cut(three) == len(first)
    # A slot word of two tokens, and a fourth copy: still one copy kept.
    four = three + _copy(HAM)
    assert trim_loop(four) == first
    # Sentences with one changing word at the end ("Reading is a great way to X.").
    sentence = [[8, 2, 1, 4, 5, 6, w, 7] for w in (40, 41, 42)]
    text = [50, 51, *sentence[0], *sentence[1], *sentence[2]]
    assert find_patterned_loop(text) == (2, 10)
    assert trim_loop(text) == [50, 51, *sentence[0]]


def test_ordinary_text_is_not_a_patterned_loop() -> None:
    # A list: one fixed token per item ("apples, pears, plums, figs, ...").
    assert find_loop([w for k in range(40, 52) for w in (k, 3)]) is None
    # Two slots that differ ("Trains are fast and cheap. Buses are slow and ...").
    assert find_loop([w for k in range(5) for w in (60 + k, 2, 70 + k, 90, 91, 7)]) is None
    # Sentences sharing a start but not their shape.
    text = [8, 2, 1, 4, 5, 6, 40, 7, 8, 2, 1, 55, 56, 57, 58, 7, 8, 2, 61, 62, 63, 7]
    assert find_loop(text) is None
    assert loop_cut(text) is None
    assert trim_loop(text) == text


def test_the_guard_ends_a_patterned_branch_in_the_decoder_contract() -> None:
    """Checked after every token as a decoder does: it fires on the first token that
    completes the third copy, and never before."""
    text = [8, *CAT, 2, 1, *CAT, 3, *_copy(DOG), *_copy(RABBIT), *_copy(HAM)]
    fired = next(k for k in range(1, len(text) + 1) if find_loop(text[:k]) is not None)
    assert fired == 3 * 6


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


@pytest.mark.parametrize(
    ("text", "run"),
    [
        ("1.1.1.1.2.3.4.5.6.7.", True),  # the 135M model's step on "Item 6"
        ("1,2,3,4,5,6,7,8,9,10,11", True),
        ("1.2.3.4.5.6.7.8.9", False),  # nine numbers: a short count stays
        ("GPA 3.45, 3.12, 2.98, 3.67, 3.01, 2.50", False),  # numbers in prose
        ("1. Tea 2. Coffee 3. Milk 4. Water 5. Juice 6. Cola", False),
        ("on 2026-12-04 at 10:30", False),
    ],
)
def test_counting_run(text: str, run: bool) -> None:
    assert counting_run(text) is run


def test_stopping_ends_a_counting_run_as_a_loop(tiny_tokenizer: Any) -> None:
    ids = tiny_tokenizer.encode("1.1.1.1.2.3.4.5.6.7.8.", add_special_tokens=False)
    stop = Stopping.build((), (), tiny_tokenizer, loop_guard=True)
    ended = [k for k in range(1, len(ids) + 1) if stop.check(ids[:k]) is not None]
    assert ended
    assert stop.check(ids[: ended[0]]) == ("repetition", None)
    assert Stopping.build((), (), tiny_tokenizer, loop_guard=False).check(ids) is None


def _bans_from(out: Any) -> list[tuple[int, ...]]:
    """Bad words built from an unbanned run: each branch's 2nd new token alone, and the pair of
    its 5th and 6th new tokens (so the ban changes what every branch writes)."""
    bans = []
    for result in out.branches:
        ids = result.token_ids
        bans += [(ids[1],), (ids[4], ids[5])]
    return bans


@pytest.mark.parametrize("backend", ["split", "mask"])
def test_bad_words_equal_generate_alone_with_bad_words_ids(backend) -> None:
    """Banned id sequences mean what transformers' ``bad_words_ids`` mean, on every branch."""
    model = build_tiny_model("llama", attn_implementation="eager")
    new = 12
    free = decode_branches(model, PREFIX, BRANCHES, max_new_tokens=new, attention=backend)
    bans = _bans_from(free)
    control = RepetitionControl(bad_word_ids=tuple(bans))
    out = decode_branches(
        model, PREFIX, BRANCHES, max_new_tokens=new, attention=backend, repetition=control
    )
    for forced, result, before in zip(BRANCHES, out.branches, free.branches, strict=True):
        assert result.token_ids != before.token_ids  # the ban changed something
        expected = generate_alone(model, PREFIX, forced, new, bad_words_ids=[list(b) for b in bans])
        assert result.token_ids == expected
        ids = result.token_ids
        for ban in bans:  # and no banned sequence is in the output
            assert all(tuple(ids[i : i + len(ban)]) != ban for i in range(len(ids)))


def test_bad_words_match_new_tokens_only() -> None:
    """A banned pair whose first token ends the context is not banned until it is written."""
    vocab = 50
    control = RepetitionControl(bad_word_ids=((7, 9), (3,)))
    state = control.start([1, 2, 7], vocab)
    logits = torch.zeros(vocab)
    out = state.apply(logits)
    assert out[3] == float("-inf")
    assert out[9] == 0
    state.push(7)
    assert state.apply(logits)[9] == float("-inf")
    assert torch.equal(logits, torch.zeros(vocab))  # the input is never written


def test_banning_tokenizes_words_as_vllm_and_bans_one_token_forms(tiny_tokenizer: Any) -> None:
    words = ["rabbit", "Hamster", "cage"]
    control = RepetitionControl(1.2).banning(words, tiny_tokenizer)
    assert control.penalty == 1.2
    assert control.bad_words == tuple(words)
    for word in words:
        bare = tuple(tiny_tokenizer.encode(word, add_special_tokens=False))
        spaced = tuple(tiny_tokenizer.encode(" " + word, add_special_tokens=False))
        assert bare in control.bad_word_ids
        same_shape = spaced[0] != bare[0] and len(spaced) == len(bare)
        assert (spaced in control.bad_word_ids) == (same_shape or len(spaced) == 1)
    singles = {seq[0] for seq in control.bad_word_ids if len(seq) == 1}
    assert control.single_token_bans() == sorted(singles)
    assert control.active
    assert not RepetitionControl().active
