"""Issue 12's bar on the embedded SmolLM2-135M: the model's own plans on the question set.

Every question of ``bench/questions.txt`` is answered with the model's own plan (no ``steps``),
greedy, with small budgets to keep the run short: at least 90% of the plans validate, no step is
left stuck in a loop, every answer with budget left has a conclusion, and no call writes more
than ``max_tokens``. ``parallel-reason bench questions`` prints the same figures.
"""

from __future__ import annotations

import math

import pytest

from langchain_parallel_reason.bench.questions import load_questions, run_question_bench
from langchain_parallel_reason.loading import load_model_and_tokenizer
from langchain_parallel_reason.pipeline import PipelineConfig

pytestmark = pytest.mark.slow

MAX_TOKENS = 256


def test_own_plans_validate_and_answers_end_well() -> None:
    model, tokenizer = load_model_and_tokenizer(device="cpu", dtype="float32", progress=False)
    questions = load_questions()
    assert len(questions) >= 20
    config = PipelineConfig(max_tokens=MAX_TOKENS, step_max_tokens=48)
    result = run_question_bench(model, tokenizer, questions, config)
    failed = [(r["question"], r["fallback_reason"]) for r in result["rows"] if not r["validated"]]
    assert result["validated"] >= math.ceil(0.9 * len(questions)), failed
    assert result["stuck_in_loop"] == 0
    assert result["empty_conclusions"] == 0
    assert result["max_output_tokens"] <= MAX_TOKENS
