"""Titles taken from the question (issue 21): enumerated items, content n-grams, folding, and
the plan grammar that offers them, decoded under random logits and on a tiny model."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import build_tiny_tokenizer

from langchain_parallel_reason.bench.questions import echoed_words, titles_from_question
from langchain_parallel_reason.decoding.constraints import GrammarConstraint
from langchain_parallel_reason.pipeline import PipelineConfig, answer, choose_route
from langchain_parallel_reason.pipeline.route import LIST_LEAN
from langchain_parallel_reason.plan import parse_plan, plan_grammar_ebnf
from langchain_parallel_reason.titles import (
    MAX_TITLE_WORDS,
    enumerated_items,
    fold,
    lists_parallel_items,
    phrase_candidates,
    title_candidates,
)

# Questions of the issue and of the bench, with the parts they list.
LISTS = {
    "Compare trains, buses and bicycles for a 10 km daily commute": [
        "Trains",
        "Buses",
        "Bicycles",
    ],
    "Give advice on saving money on food, housing and transport": ["Food", "Housing", "Transport"],
    "Describe the roles of a chef, a waiter and a dishwasher in a restaurant": [
        "Chef",
        "Waiter",
        "Dishwasher",
    ],
    "Compare tea and coffee.": ["Tea", "Coffee"],
    "Compare living in a city and in the countryside.": ["City", "Countryside"],
    "Compare electric cars and petrol cars.": ["Electric cars", "Petrol cars"],
    "How can I stay healthy? Think about food, sleep, and exercise.": ["Food", "Sleep", "Exercise"],
    "Should I take the train or fly from Paris to London?": ["Train", "Fly"],
}


@pytest.mark.parametrize(("question", "items"), LISTS.items())
def test_enumerated_items_are_the_listed_parts(question: str, items: list[str]) -> None:
    assert enumerated_items(question) == items
    assert title_candidates(question) == items


@pytest.mark.parametrize(
    "question", ["What is 2+3?", "Say hello.", "How do I prepare for a job interview?", ""]
)
def test_a_question_that_lists_nothing_has_no_candidates(question: str) -> None:
    assert enumerated_items(question) == []
    assert title_candidates(question) == []


def test_fold_merges_case_and_plural() -> None:
    assert fold("Buses") == fold("bus")
    assert fold("Cities") == fold("city")
    assert fold("Trains") == fold("train")
    assert fold("Bus") != fold("Train")
    # Spellings equal once folded are one candidate, the first spelling kept.
    assert enumerated_items("Compare trains, Train and buses") == ["Trains", "Buses"]


def test_phrase_candidates_are_content_ngrams_longest_first() -> None:
    grams = phrase_candidates("How do I prepare for a job interview?")
    assert grams[0] == "Prepare for a job"
    assert {"Job interview", "Job", "Interview"} <= set(grams)
    assert not any(g.casefold().split()[0] in {"for", "a", "how"} for g in grams)


@given(st.text(max_size=120))
def test_candidates_are_spans_of_the_question(question: str) -> None:
    """Whatever the text: every candidate is a valid title, a span of the question (up to
    the capitalised first letter and runs of spaces), at most 4 words, distinct once folded."""
    found = title_candidates(question)
    low = " ".join(question.casefold().split())
    assert len({fold(t) for t in found}) == len(found)
    for title in found:
        assert title[:1].isalpha()
        assert not set(title) & set("#:")
        assert len(title.split()) <= MAX_TITLE_WORDS
        assert title.casefold() in low
    for gram in phrase_candidates(question):
        assert gram.casefold() in low


def test_grounded_grammar_offers_only_the_candidates() -> None:
    ebnf = plan_grammar_ebnf(5, 28, 60, titles=["Trains", "Buses", "Bicycles"])
    assert '"####Trains:......\\n" used_1' in ebnf
    assert "title_first" not in ebnf  # no free title anywhere
    for bad in (["Only one"], ["A#", "B"], ["Ok", " spaced"], ["Ok", "Step 1"], ["Ok", "%x"]):
        with pytest.raises(ValueError, match="title"):
            plan_grammar_ebnf(5, 28, 60, titles=bad)


@pytest.mark.parametrize("seed", range(6))
def test_grounded_grammar_decodes_plans_of_candidates(seed: int) -> None:
    tok = build_tiny_tokenizer()
    titles = ["Trains", "Buses", "Bicycles", "Electric cars"]
    constraint = GrammarConstraint.from_ebnf(
        tok, plan_grammar_ebnf(3, 28, 40, titles=titles), vocab_size=len(tok)
    )
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    while not constraint.is_terminated():
        assert len(ids) < 500
        token = int(constraint.mask_logits(torch.randn(1, len(tok), generator=gen)).argmax())
        constraint.advance(token)
        ids.append(token)
    text = tok.decode(ids)
    lines = [line for line in text.split("\n") if line.startswith("####")]
    assert 3 <= len(lines) <= 4  # 2..3 steps, then the closing marker
    # Every title is an offered one, none twice, whatever tokens spelled it.
    assert all(line[4:].removesuffix(":......") in titles for line in lines[:-1])
    assert len(set(lines)) == len(lines)
    assert set(parse_plan(text, max_title_chars=28).titles) <= set(titles)


def test_the_pipeline_plans_with_the_question_titles(tiny_llama, tiny_tokenizer) -> None:
    question = "Compare trains, buses and bicycles for a daily commute."
    # Room for a random model's 100-character preamble and the titles.
    config = PipelineConfig(mode="parallel", max_tokens=400, step_max_tokens=8, plan_max_tokens=150)
    result = answer(tiny_llama, tiny_tokenizer, [{"role": "user", "content": question}], config)
    assert result.report.mode_used == "parallel", result.report.fallback_reason
    assert result.report.titles == "question"
    assert 2 <= len(result.report.steps) <= 3
    assert set(result.report.steps) <= {"Trains", "Buses", "Bicycles"}
    # A question that lists nothing plans with free titles.
    free = answer(
        tiny_llama, tiny_tokenizer, [{"role": "user", "content": "Plan a picnic."}], config
    )
    assert free.report.titles == "free"
    # The caller's steps and a direct answer: no plan was written.
    given_steps = PipelineConfig(steps=("Taste", "Price"), max_tokens=60, step_max_tokens=8)
    mine = answer(tiny_llama, tiny_tokenizer, [{"role": "user", "content": question}], given_steps)
    assert mine.report.titles is None


def test_proper_names_are_not_parallel_items() -> None:
    assert lists_parallel_items("Compare tea and coffee.")
    assert lists_parallel_items("Should I take the train or fly from Paris to London?")
    assert not lists_parallel_items("Who wrote Romeo and Juliet?")
    assert not lists_parallel_items("What is 2+3?")


def test_the_router_leans_to_a_plan_when_the_question_lists_its_parts(
    tiny_llama, tiny_tokenizer
) -> None:
    listing = [{"role": "user", "content": "Compare tea and coffee."}]
    _route, reason = choose_route(tiny_llama, tiny_tokenizer, listing, PipelineConfig())
    assert f"the question lists its parts {LIST_LEAN:+.2f}" in reason
    log_odds = float(re.search(r"log-odds yes-no ([-+0-9.]+)", reason).group(1))
    # The choice flips where the model's log-odds plus the bias plus the lean cross 0.
    for bias, expected in (
        (-log_odds - LIST_LEAN + 0.02, "plan"),
        (-log_odds - LIST_LEAN - 0.02, "direct"),
    ):
        assert (
            choose_route(tiny_llama, tiny_tokenizer, listing, PipelineConfig(route_bias=bias))[0]
            == expected
        )
    plain = [{"role": "user", "content": "Say hello."}]
    assert (
        "lists its parts"
        not in choose_route(tiny_llama, tiny_tokenizer, plain, PipelineConfig())[1]
    )


def test_bench_checks_titles_and_echoes() -> None:
    question = "Compare a bus and a train for a commute."
    assert titles_from_question(["Buses", "Train"], question)
    assert not titles_from_question(["Buses", "Drivers"], question)
    assert not titles_from_question(["Bus"], question)
    words = frozenset({"rabbit", "hamster", "cage"})
    assert echoed_words("The hamster in its cage.", question, words) == ["cage", "hamster"]
    assert echoed_words("A hamster cage.", "Is a hamster happy?", words) == ["cage"]
