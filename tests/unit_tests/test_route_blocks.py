"""Issue 11's router and several parallel blocks, on tiny random models.

The router's choice is the model's yes/no plus ``route_bias``: a bias of +-1e4 forces either
route on any model, and the reported log-odds say where the choice flips. A second block needs
a model that opens one: ``marker_model`` is a tiny Llama whose output head favours the ``####``
token by a fixed logit bias, so its conclusions open blocks (a real model, no mock).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import torch
from tiny_models import build_tiny_model

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.pipeline import (
    ContentDelta,
    PipelineConfig,
    StageEvent,
    StepDelta,
    answer,
    choose_route,
    iter_answer,
)
from langchain_parallel_reason.pipeline.route import LIST_LEAN

QUESTIONS = ["Compare tea and coffee.", "What is 2+3?", "Say hello.", "Plan a picnic."]
FORCE = 1e4  # a route_bias no logit difference overcomes


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _collect(model: Any, tok: Any, question: str, config: PipelineConfig) -> tuple[list, Any]:
    gen = iter_answer(model, tok, _messages(question), config)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


@pytest.fixture(scope="module")
def marker_model(tiny_tokenizer: Any) -> Any:
    """A tiny Llama whose head adds 4.0 to the logit of the ``####`` token (checked single)."""
    model = build_tiny_model("llama", attn_implementation="sdpa")
    (marker,) = tiny_tokenizer.encode("####", add_special_tokens=False)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[marker] = 4.0
    model.lm_head = biased
    return model


# A call whose first block is the caller's steps, leaving the model room to open more.
BLOCKS = {
    "steps": ("Taste", "Price"),
    "max_tokens": 300,
    "step_max_tokens": 12,
    "plan_max_tokens": 60,
}


# -- route ---------------------------------------------------------------------------------


@pytest.mark.parametrize("question", QUESTIONS)
def test_direct_route_equals_plain_sequential_decoding(tiny_llama, tiny_tokenizer, question):
    direct = PipelineConfig(route_bias=-FORCE, max_tokens=40)
    events, result = _collect(tiny_llama, tiny_tokenizer, question, direct)
    plain = answer(
        tiny_llama,
        tiny_tokenizer,
        _messages(question),
        PipelineConfig(mode="sequential", max_tokens=40),
    )
    assert result.content == plain.content
    assert (result.output_tokens, result.finish_reason) == (
        plain.output_tokens,
        plain.finish_reason,
    )
    report = result.report
    assert (report.route, report.mode_used, report.fallback_reason) == (
        "direct",
        "sequential",
        None,
    )
    assert report.route_reason.startswith("the model answered no")
    assert report.blocks == []
    routes = [e.data for e in events if isinstance(e, StageEvent) and e.stage == "route"]
    assert routes == [{"route": "direct", "reason": report.route_reason}]
    assert not any(isinstance(e, StageEvent) and e.stage == "fallback" for e in events)
    # The plain call reports its own route: forced by the mode, no router.
    assert plain.report.route == "direct"
    assert "route" not in plain.report.timings


@pytest.mark.parametrize("question", QUESTIONS)
def test_router_flips_where_its_reported_log_odds_say(tiny_llama, tiny_tokenizer, question):
    _, reason = choose_route(tiny_llama, tiny_tokenizer, _messages(question))
    log_odds = float(re.search(r"log-odds yes-no ([-+]\d+\.\d+)", reason).group(1))
    # A question that lists its parts adds its lean to the bias (issue 21).
    log_odds += LIST_LEAN if "the question lists its parts" in reason else 0.0
    for bias, route in ((-log_odds + 0.02, "plan"), (-log_odds - 0.02, "direct")):
        config = PipelineConfig(route_bias=bias)
        assert choose_route(tiny_llama, tiny_tokenizer, _messages(question), config)[0] == route


@pytest.mark.parametrize("question", QUESTIONS)
def test_plan_route_plans_and_parallel_mode_never_routes(tiny_llama, tiny_tokenizer, question):
    planned = answer(
        tiny_llama,
        tiny_tokenizer,
        _messages(question),
        PipelineConfig(route_bias=FORCE, max_tokens=60),
    )
    assert planned.report.route == "plan"
    assert planned.report.route_reason.startswith("the model answered yes")
    assert "route" in planned.report.timings
    # mode="parallel" and steps= force a plan whatever the bias: the router never runs.
    for config, why in (
        (PipelineConfig(mode="parallel", route_bias=-FORCE, max_tokens=60), "mode='parallel'"),
        (PipelineConfig(steps=("Taste", "Price"), route_bias=-FORCE, max_tokens=60), "steps="),
    ):
        events, result = _collect(tiny_llama, tiny_tokenizer, question, config)
        assert result.report.route == "plan"
        assert why in result.report.route_reason
        assert "route" not in result.report.timings
        assert not any(isinstance(e, StageEvent) and e.stage == "route" for e in events)


def test_a_sampled_route_is_reproducible_with_its_seed(tiny_llama, tiny_tokenizer) -> None:
    config = PipelineConfig(temperature=1.0, seed=5, max_tokens=30)
    routes = {choose_route(tiny_llama, tiny_tokenizer, _messages(q), config) for q in QUESTIONS}
    again = {choose_route(tiny_llama, tiny_tokenizer, _messages(q), config) for q in QUESTIONS}
    assert routes == again


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_blocks must be >= 1"):
        PipelineConfig(max_blocks=0)
    with pytest.raises(ValueError, match="route_bias must be a finite number"):
        PipelineConfig(route_bias=float("nan"))


# -- several blocks ------------------------------------------------------------------------


@pytest.mark.parametrize("max_blocks", [1, 2, 3])
def test_max_blocks_bounds_the_blocks_and_later_steps_run_in_parallel(
    marker_model, tiny_tokenizer, max_blocks
):
    # Room for three blocks of a random model's 28-character titles.
    config = PipelineConfig(max_blocks=max_blocks, **{**BLOCKS, "max_tokens": 420})
    events, result = _collect(marker_model, tiny_tokenizer, QUESTIONS[0], config)
    report = result.report
    # This model opens a block after every conclusion: the bound is what stops it.
    assert len(report.blocks) == max_blocks
    assert report.blocks[0].steps == ["Taste", "Price"]
    for block in report.blocks:
        assert len(block.steps) >= 2
        assert len(block.branch_tokens) == len(block.steps)
        # All of a block's steps advance together: one forward per token of the longest.
        assert block.decode_steps == max(block.branch_tokens)
        assert sum(block.branch_tokens) > block.decode_steps
        assert block.conclusion_tokens > 0
        assert {"steps", "conclusion"} <= set(block.timings)
    for later in report.blocks[1:]:
        assert later.plan_attempts >= 1
        assert "plan" in later.timings
    # The top-level keys are the totals over the blocks.
    assert report.steps == [t for b in report.blocks for t in b.steps]
    assert report.branch_tokens == [n for b in report.blocks for n in b.branch_tokens]
    assert report.decode_steps == sum(b.decode_steps for b in report.blocks)
    assert report.conclusion_tokens == sum(b.conclusion_tokens for b in report.blocks)
    assert report.tokens_per_forward == pytest.approx(
        sum(report.branch_tokens) / report.decode_steps
    )
    # The stream: content deltas rebuild the content, step numbers index report.steps, and each
    # step's live text is its body in the content.
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == result.content
    live = [""] * len(report.steps)
    for e in events:
        if isinstance(e, StepDelta):
            assert e.title == report.steps[e.step]
            live[e.step] += e.text
    for title, text in zip(report.steps, live, strict=True):
        assert f"**{title}**: {text.strip()}" in result.content
    plans = [e.data for e in events if isinstance(e, StageEvent) and e.stage == "plan"]
    assert [p.get("block", 0) for p in plans] == list(range(max_blocks))
    assert "####" not in result.content
    assert result.output_tokens <= config.max_tokens


def test_one_block_cuts_the_conclusion_where_the_model_opens_another(marker_model, tiny_tokenizer):
    one = answer(marker_model, tiny_tokenizer, _messages(QUESTIONS[0]), PipelineConfig(**BLOCKS))
    two = answer(
        marker_model,
        tiny_tokenizer,
        _messages(QUESTIONS[0]),
        PipelineConfig(max_blocks=2, **BLOCKS),
    )
    # The second block continues the first, which is the same text either way.
    assert two.content.startswith(one.content)
    assert len(two.content) > len(one.content)
    assert two.report.blocks[0].steps == one.report.blocks[0].steps


def test_a_later_block_never_outruns_max_tokens(marker_model, tiny_tokenizer) -> None:
    for max_tokens in (90, 120, 160):
        config = PipelineConfig(max_blocks=4, **{**BLOCKS, "max_tokens": max_tokens})
        result = answer(marker_model, tiny_tokenizer, _messages(QUESTIONS[0]), config)
        assert result.output_tokens <= max_tokens
        assert len(result.report.blocks) <= 4


# -- every entry point, through the engine -------------------------------------------------


def _parallel(message: Any) -> dict[str, Any]:
    return message.response_metadata["parallel"]


def _same_answer(message: Any, expected: Any) -> None:
    report = _parallel(message)
    assert message.content == expected.content
    assert report["route"] == expected.report.route
    # The reason quotes the router's log-odds to 2 decimals: batched forwards (and KV served
    # from the engine's prefix cache) may move them by float rounding, never the decision.
    odds = r"[+-]\d+\.\d+"
    got, want = report["route_reason"], expected.report.route_reason
    assert re.sub(odds, "#", got) == re.sub(odds, "#", want)
    for a, b in zip(re.findall(odds, got), re.findall(odds, want), strict=True):
        assert abs(float(a) - float(b)) <= 0.011
    assert [b["steps"] for b in report["blocks"]] == [b.steps for b in expected.report.blocks]
    assert [b["branch_tokens"] for b in report["blocks"]] == [
        b.branch_tokens for b in expected.report.blocks
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"route_bias": -FORCE, "max_tokens": 40},
        {"route_bias": FORCE, "max_tokens": 60, "plan_max_tokens": 24, "step_max_tokens": 10},
        {"max_blocks": 2, **BLOCKS},
    ],
    ids=["direct", "plan", "two-blocks"],
)
def test_every_entry_point_routes_and_reports_blocks_alike(marker_model, tiny_tokenizer, fields):
    config = PipelineConfig(**fields)
    expected = [answer(marker_model, tiny_tokenizer, _messages(q), config) for q in QUESTIONS[:2]]
    assert {e.report.route for e in expected} == {"direct" if config.route_bias < 0 else "plan"}
    if config.max_blocks > 1:
        assert len(expected[0].report.blocks) == config.max_blocks
    chat = ChatParallelReason.from_model(
        marker_model,
        tiny_tokenizer,
        **{k: list(v) if k == "steps" else v for k, v in fields.items()},
    )
    for question, want in zip(QUESTIONS[:2], expected, strict=True):
        _same_answer(chat.invoke(question), want)
        chunks = list(chat.stream(question))
        _same_answer(sum(chunks[1:], chunks[0]), want)
        _same_answer(asyncio.run(chat.ainvoke(question)), want)

        async def astream(q: str = question) -> Any:
            return [chunk async for chunk in chat.astream(q)]

        chunks = asyncio.run(astream())
        _same_answer(sum(chunks[1:], chunks[0]), want)
    # Batched: both questions run in the engine at once, each as it runs alone.
    for message, want in zip(chat.batch(QUESTIONS[:2]), expected, strict=True):
        _same_answer(message, want)
    for message, want in zip(asyncio.run(chat.abatch(QUESTIONS[:2])), expected, strict=True):
        _same_answer(message, want)
    # Per-call overrides reach the pipeline too.
    direct = chat.invoke(QUESTIONS[0], route_bias=-FORCE, steps=None)
    assert _parallel(direct)["route"] == "direct"
