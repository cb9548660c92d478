"""Issue 12 (answers worth reading) and issue 13 defect 5 on tiny random models: budgets that
hold with failing plans, reproducible retries (stream == invoke, with and without a seed), a
conclusion whenever there is budget, and messages without negative numbers."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from langchain_core.messages import AIMessageChunk

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.pipeline import MIN_CONCLUSION_TOKENS, PipelineConfig, answer

MESSAGES = [{"role": "user", "content": "Compare tea and coffee."}]
STEPS = ("Taste", "Price", "Caffeine")

# Plans that fail (unconstrained on a random model) force every retry; sampled ones vary.
FAILING_PLANS = {"constrain_plan": False, "plan_retries": 3, "plan_max_tokens": 12}


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 40, "plan_retries": 20, "mode": "parallel", "constrain_plan": False},
        {"max_tokens": 40, "plan_retries": 20, "mode": "parallel"},
        {"max_tokens": 64, **FAILING_PLANS},
        {"max_tokens": 30, "steps": list(STEPS), "step_max_tokens": 50},
        {"max_tokens": 30, "steps": list(STEPS), "step_max_tokens": 50, "mode": "stepped"},
        {"max_tokens": 50, "steps": list(STEPS), "conclusion_kv": "reuse"},
        {"max_tokens": 7},
        {"max_tokens": 200, "step_max_tokens": 30, "plan_max_tokens": 60, "seed": 3},
        {"max_tokens": 90, "temperature": 0.9, "seed": 1, **FAILING_PLANS},
    ],
)
def test_output_tokens_never_exceed_max_tokens(tiny_llama: Any, tiny_tokenizer: Any, fields):
    chat = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, **fields)
    msg = chat.invoke("Compare tea and coffee.")
    assert msg.usage_metadata["output_tokens"] <= fields["max_tokens"]


def test_huge_plan_retries_are_bounded_by_max_tokens(tiny_llama: Any, tiny_tokenizer: Any):
    # Issue 13, defect 5: plan_retries=10**6 ran for 15 minutes.
    chat = ChatParallelReason.from_model(
        tiny_llama, tiny_tokenizer, plan_retries=10**6, mode="parallel", max_tokens=60,
        constrain_plan=False, plan_max_tokens=8,
    )  # fmt: skip
    start = time.perf_counter()
    msg = chat.invoke("Compare tea and coffee.")
    assert time.perf_counter() - start < 20
    report = msg.response_metadata["parallel"]
    assert report["plan_attempts"] <= 60 // 2 // 8 + 1
    assert msg.usage_metadata["output_tokens"] <= 60


@pytest.mark.parametrize("seed", [None, 5])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
async def test_same_call_same_content_with_retries(
    tiny_llama: Any, tiny_tokenizer: Any, seed, temperature
) -> None:
    if seed is None and temperature > 0:
        pytest.skip("unseeded sampling is random by request")
    chat = ChatParallelReason.from_model(
        tiny_llama, tiny_tokenizer, max_tokens=100, seed=seed, temperature=temperature,
        **FAILING_PLANS,
    )  # fmt: skip
    first = chat.invoke("Compare tea and coffee.")
    assert first.response_metadata["parallel"]["plan_attempts"] == 4  # every retry ran
    again = chat.invoke("Compare tea and coffee.")
    streamed = "".join(str(c.content) for c in chat.stream("Compare tea and coffee."))
    ainvoked = await chat.ainvoke("Compare tea and coffee.")
    chunks: list[AIMessageChunk] = [c async for c in chat.astream("Compare tea and coffee.")]
    assert again.content == first.content
    assert streamed == first.content
    assert ainvoked.content == first.content
    assert "".join(str(c.content) for c in chunks) == first.content


def test_retries_change_the_plan(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    # Each retry samples with its own derived seed and a higher temperature: the attempts'
    # texts differ, so a retry is not the failed attempt again.
    from langchain_parallel_reason.pipeline import run as pipeline_run

    texts: list[str] = []
    original = pipeline_run.parse_plan

    def spy(text: str, **kw: Any):
        texts.append(text)
        return original(text, **kw)

    pipeline_run.parse_plan = spy
    try:
        answer(
            tiny_llama, tiny_tokenizer, MESSAGES, PipelineConfig(max_tokens=100, **FAILING_PLANS)
        )
    finally:
        pipeline_run.parse_plan = original
    assert len(texts) == 4
    assert len(set(texts)) == 4


def test_fallback_reasons_hold_no_negative_numbers(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    for max_tokens in (3, 9, 17, 30):
        config = PipelineConfig(steps=STEPS, max_tokens=max_tokens)
        result = answer(tiny_llama, tiny_tokenizer, MESSAGES, config)
        text = " ".join([result.report.fallback_reason or "", *result.report.notes])
        assert not re.search(r"(?<![\w])-\d", text), text
        assert result.output_tokens <= max_tokens


@pytest.mark.parametrize(
    "settings",
    [{}, {"mode": "stepped"}, {"conclusion_kv": "reuse"}],
    ids=["parallel", "stepped", "reuse"],
)
def test_conclusion_has_a_minimum_length(tiny_llama: Any, tiny_tokenizer: Any, settings) -> None:
    config = PipelineConfig(steps=STEPS, max_tokens=120, step_max_tokens=10, **settings)
    result = answer(tiny_llama, tiny_tokenizer, MESSAGES, config)
    assert result.report.mode_used == settings.get("mode", "parallel")
    assert result.report.conclusion_tokens >= MIN_CONCLUSION_TOKENS


def test_no_conclusion_budget_is_said_in_notes(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    # The steps may take what they like of a tiny budget; when nothing is left, notes say so.
    config = PipelineConfig(steps=STEPS, max_tokens=40, step_max_tokens=10)
    result = answer(tiny_llama, tiny_tokenizer, MESSAGES, config)
    assert result.report.mode_used == "parallel"
    if result.report.conclusion_tokens == 0:
        assert any("conclusion" in note for note in result.report.notes)
    assert result.output_tokens <= 40


def test_titles_copied_from_the_prompt_example_are_dropped(tiny_llama, tiny_tokenizer) -> None:
    from langchain_parallel_reason.pipeline.run import Run
    from langchain_parallel_reason.plan import PlanFormatError
    from langchain_parallel_reason.schemas import Plan

    run = Run(tiny_llama, tiny_tokenizer, MESSAGES, PipelineConfig(), None, None)
    plan = Plan(preamble="p", titles=["Rabbit", "Tea", "Coffee"])
    assert run.drop_copied_titles(plan).titles == ["Tea", "Coffee"]
    with pytest.raises(PlanFormatError, match="copied from the prompt's example"):
        run.drop_copied_titles(Plan(titles=["Rabbit", "Hamster", "Tea"]))
    # A question that names the example's word keeps it.
    asks = [{"role": "user", "content": "Is a rabbit or tea better?"}]
    run = Run(tiny_llama, tiny_tokenizer, asks, PipelineConfig(), None, None)
    assert run.drop_copied_titles(plan).titles == ["Rabbit", "Tea", "Coffee"]


def test_a_step_may_not_open_with_another_steps_title(tiny_tokenizer) -> None:
    from langchain_parallel_reason.pipeline import title_opening_ids

    titles = ["Taste", "Price", "Caffeine"]
    banned = title_opening_ids(tiny_tokenizer, titles)
    firsts = [tiny_tokenizer.encode(" " + t, add_special_tokens=False)[0] for t in titles]
    for b, ids in enumerate(banned):
        assert firsts[b] not in ids
        assert all(firsts[j] in ids for j in range(3) if j != b and firsts[j] != firsts[b])


def test_a_plan_title_may_not_open_like_an_earlier_one(tiny_tokenizer) -> None:
    import torch

    from langchain_parallel_reason.pipeline.render import DistinctTitles

    def feed(guard, text):
        for token in tiny_tokenizer.encode(text, add_special_tokens=False):
            guard.advance(token)

    def first_token(after, title):
        before = tiny_tokenizer.encode(after, add_special_tokens=False)
        return tiny_tokenizer.encode(after + title, add_special_tokens=False)[len(before)]

    vocab = len(tiny_tokenizer)
    text = "Intro\n####Taste:......\n####"
    taste = first_token(text, "Taste")
    logits = torch.zeros(vocab)
    logits[taste] = 5.0  # the model wants to repeat "Taste"
    # One title so far: the repeat is banned, a second title must come.
    guard = DistinctTitles(None, tiny_tokenizer)
    feed(guard, text)
    masked = guard.mask_logits(logits)
    assert masked[taste] == float("-inf")
    assert torch.isfinite(masked).sum() == vocab - 1
    # Two titles: a repeat closes the list instead.
    guard = DistinctTitles(None, tiny_tokenizer)
    text = "Intro\n####Taste:......\n####Price:......\n####"
    feed(guard, text)
    masked = guard.mask_logits(logits)
    assert torch.isfinite(masked).nonzero().flatten().tolist() == guard.close_ids
    # A new title at the top is left alone, and so is every token inside a title.
    assert torch.equal(guard.mask_logits(torch.zeros(vocab)), torch.zeros(vocab))
    guard.advance(first_token(text, "Caffeine"))
    assert torch.equal(guard.mask_logits(logits), logits)


def test_the_title_rule_judges_a_chosen_token_as_it_masks(tiny_tokenizer) -> None:
    # What a server's tokens are judged by: the same rule as the logits mask above.
    from langchain_parallel_reason.pipeline.render import DistinctTitles

    def fed(text):
        guard = DistinctTitles(None, tiny_tokenizer)
        for token in tiny_tokenizer.encode(text, add_special_tokens=False):
            guard.advance(token)
        return guard

    one, two = "Intro\n####Taste:......\n####", "Intro\n####Taste:......\n####Price:......\n####"
    taste = tiny_tokenizer.encode(one + "Taste", add_special_tokens=False)[
        len(tiny_tokenizer.encode(one, add_special_tokens=False))
    ]
    assert fed(one).verdict(taste) == "ban"
    assert fed(two).verdict(taste) == "close"
    assert fed("Intro\n####Taste:").verdict(taste) == "ok"  # inside a title
    assert tiny_tokenizer.decode(fed(two).close_tail_ids()) == "%%%%"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Both are drinks. They", "Both are drinks."),
        ("Both are drinks", "Both are drinks"),
        ("I will compare them:", "I will compare them:"),
        ("", ""),
    ],
)
def test_a_preamble_cut_by_its_bound_showswhole_sentences(text: str, shown: str) -> None:
    from langchain_parallel_reason.pipeline.render import whole_sentences

    assert whole_sentences(text) == shown


def test_resample_settings_are_derived_and_reproducible() -> None:
    from langchain_parallel_reason.pipeline import resample_settings

    assert resample_settings(0.0, None, 1) == (0.0, None)  # the first attempt as asked
    assert resample_settings(0.0, None, 2) == (0.5, 2000)  # greedy, unseeded: still fixed
    assert resample_settings(0.0, 7, 3) == (0.7, 3007)
    assert resample_settings(0.9, None, 2) == (0.9, None)  # unseeded sampling stays random
    assert resample_settings(0.0, 1, 9)[0] == 1.0


def test_a_conclusion_stops_where_it_rewrites_a_step_header(tiny_tokenizer) -> None:
    # The 135M model once ended "...books, podcasts and videos" with "###Books:" lines: the
    # steps again, under a three-'#' header the step marker missed.
    from langchain_parallel_reason.decoding.stops import Stopping
    from langchain_parallel_reason.pipeline.steps import conclusion_stops
    from langchain_parallel_reason.prompts import STEP_MARKER

    stopping = Stopping.build((), conclusion_stops((), ["Books", "Videos"]), tiny_tokenizer, False)

    def end(text):
        ids = tiny_tokenizer.encode(text, add_special_tokens=False)
        for n in range(1, len(ids) + 1):
            if (hit := stopping.check(ids[:n])) is not None:
                return hit
        return None

    assert end("Books teach.\n###Videos: they show.") == ("stop", "###Videos:")
    # A four-'#' header is the step marker (a later block opens with it), found first.
    assert end("Books teach.\n####Videos: they show.") == ("stop", STEP_MARKER)
    assert end("Books teach, ### and Videos: show.") is None


@pytest.mark.parametrize("seed", range(4))
def test_shared_preamble_masks_leave_the_answer_as_it_was(
    tiny_llama: Any, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # The plan's preamble states are named and their masks shared across answers: the same
    # answers as with every mask computed afresh, sampled plans included.
    from langchain_parallel_reason.decoding.constraints import GrammarConstraint

    config = PipelineConfig(mode="parallel", max_tokens=120, temperature=1.0, seed=seed)
    shared = [answer(tiny_llama, tiny_tokenizer, MESSAGES, config).content for _ in range(2)]
    monkeypatch.setattr(GrammarConstraint, "name_state", lambda self, name: None)
    fresh = answer(tiny_llama, tiny_tokenizer, MESSAGES, config).content
    assert shared == [fresh, fresh]
