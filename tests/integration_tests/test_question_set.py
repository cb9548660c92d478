"""Issues 11 and 12's bars on the embedded SmolLM2-135M: its route and its own plans.

Routing: on the labelled question set (``bench/questions.txt``) the router sends at least 80%
of the questions the labelled way and at least 90% of the parallelizable ones to a plan (so the
own-plan rate below cannot collapse through routing); a single-answer question answered
directly equals plain sequential decoding. ``parallel-reason bench questions --route-only``
prints the same figures.

Own plans: the first 22 parallelizable questions are answered with the model's own plan
(``mode="parallel"``: the plan, not the router, is under test here), greedy, with small budgets
to keep the run short: at least 90% of the plans validate, no step is left stuck in a loop,
every answer with budget left has a conclusion, and no call writes more than ``max_tokens``.
``parallel-reason bench questions --label plan --mode parallel`` prints the same figures.
"""

from __future__ import annotations

import math

import pytest

from langchain_parallel_reason.bench.questions import (
    load_labeled_questions,
    load_questions,
    run_question_bench,
    run_route_bench,
)
from langchain_parallel_reason.loading import load_model_and_tokenizer
from langchain_parallel_reason.pipeline import PipelineConfig, answer

pytestmark = pytest.mark.slow

MAX_TOKENS = 256


@pytest.fixture(scope="module")
def embedded() -> tuple:
    return load_model_and_tokenizer(device="cpu", dtype="float32", progress=False)


def test_own_plans_validate_and_answers_end_well(embedded) -> None:
    model, tokenizer = embedded
    questions = load_questions()[:22]  # the set before issue 11 (the rest keeps CI short)
    assert len(questions) == 22
    config = PipelineConfig(mode="parallel", max_tokens=MAX_TOKENS, step_max_tokens=48)
    result = run_question_bench(model, tokenizer, questions, config)
    failed = [(r["question"], r["fallback_reason"]) for r in result["rows"] if not r["validated"]]
    assert result["validated"] >= math.ceil(0.9 * len(questions)), failed
    assert result["stuck_in_loop"] == 0
    assert result["empty_conclusions"] == 0
    assert result["max_output_tokens"] <= MAX_TOKENS


def test_the_router_sends_most_questions_the_labelled_way(embedded) -> None:
    model, tokenizer = embedded
    questions = load_labeled_questions()
    result = run_route_bench(model, tokenizer, questions, PipelineConfig())
    route = result["route"]
    wrong = [(r["label"], r["question"]) for r in result["rows"] if r["route"] != r["label"]]
    assert route["rate"] >= 0.8, wrong
    assert route["plan"]["routed"] >= math.ceil(0.9 * route["plan"]["questions"]), wrong
    assert route["direct"]["routed"] >= route["direct"]["questions"] // 2, wrong


def test_auto_plans_a_comparison_and_answers_a_fact_directly(embedded) -> None:
    model, tokenizer = embedded
    config = PipelineConfig(max_tokens=96, step_max_tokens=32)
    plan = answer(
        model, tokenizer, [{"role": "user", "content": "Compare tea and coffee."}], config
    )
    assert (plan.report.route, plan.report.mode_used) == ("plan", "parallel")
    fact = [{"role": "user", "content": "What is the capital of France?"}]
    direct = answer(model, tokenizer, fact, config)
    plain = answer(model, tokenizer, fact, PipelineConfig(mode="sequential", max_tokens=96))
    assert direct.report.route == "direct"
    assert direct.report.fallback_reason is None
    assert direct.content == plain.content
    assert "Paris" in direct.content
