"""Validation rules of `Plan` and the JSON shape of `ParallelReport`."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from langchain_parallel_reason.schemas import ParallelReport, Plan


def test_plan_strips_and_keeps_order() -> None:
    plan = Plan(preamble="  Intro.  ", titles=[" Taste ", "Price"])
    assert plan.preamble == "Intro."
    assert plan.titles == ["Taste", "Price"]


def test_plan_is_frozen_and_strict() -> None:
    plan = Plan(titles=["A", "B"])
    with pytest.raises(ValidationError):
        plan.titles = ["C", "D"]  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        Plan(titles=["A", "B"], steps=[])  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("titles", "message"),
    [
        ([], "no step titles"),
        (["A"], "only 1 step"),
        ([f"T{i}" for i in range(9)], r"too many steps \(9 > 8\)"),
        (["A", ""], "step 2 has an empty title"),
        (["A", "b:c"], "step 2 title contains ':'"),
        (["A", "b\nc"], r"step 2 title contains '\\n'"),
        (["A####", "B"], "step 1 title contains '####'"),
        (["A", "x" * 81], r"too long \(81 > 80 chars\)"),
        (["Straße", "STRASSE"], "duplicate titles"),  # casefold, not just lower()
    ],
)
def test_plan_title_rules(titles: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Plan(titles=titles)


@pytest.mark.parametrize(
    ("preamble", "message"),
    [("a ####b", "preamble contains '####'"), ("x" * 401, r"too long \(401 > 400")],
)
def test_plan_preamble_rules(preamble: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Plan(preamble=preamble, titles=["A", "B"])


def test_plan_limits_from_context() -> None:
    data = {"titles": ["Alpha", "Beta", "Gamma"]}
    with pytest.raises(ValidationError, match=r"too many steps \(3 > 2\)"):
        Plan.model_validate(data, context={"max_branches": 2})
    with pytest.raises(ValidationError, match=r"too long \(5 > 4 chars\)"):
        Plan.model_validate(data, context={"max_title_chars": 4})
    many = {"titles": [f"T{i}" for i in range(12)]}
    assert len(Plan.model_validate(many, context={"max_branches": 12}).titles) == 12


def test_plan_bad_context_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="max_branches"):
        Plan.model_validate({"titles": ["A", "B"]}, context={"max_branches": "8"})


def _report(**overrides: object) -> ParallelReport:
    fields: dict[str, object] = {
        "mode_used": "parallel",
        "steps": ["Taste", "Price"],
        "branch_tokens": [12, 30],
        "branch_finish_reasons": ["marker", "length"],
        "decode_steps": 30,
        "tokens_per_forward": 42 / 30,
        "plan_attempts": 1,
        "timings": {"plan": 0.5, "steps": 1.25, "conclusion": 0.75, "total": 2.5},
        "attention": "split",
    }
    fields.update(overrides)
    return ParallelReport.model_validate(fields)


def test_report_dumps_to_plain_json() -> None:
    dumped = _report().model_dump()
    assert json.loads(json.dumps(dumped)) == dumped
    assert dumped["mode_used"] == "parallel"
    assert dumped["fallback_reason"] is None
    assert ParallelReport.model_validate(dumped) == _report()


def test_sequential_report_defaults() -> None:
    report = ParallelReport(mode_used="sequential", fallback_reason="only 1 step")
    assert report.model_dump() == {
        "mode_used": "sequential",
        "fallback_reason": "only 1 step",
        "steps": [],
        "branch_tokens": [],
        "branch_finish_reasons": [],
        "decode_steps": 0,
        "tokens_per_forward": None,
        "plan_attempts": 0,
        "conclusion_tokens": 0,
        "conclusion_kv": None,
        "timings": {},
        "attention": None,
        "notes": [],
        "route": None,
        "route_reason": None,
        "titles": None,
        "step_kind": None,
        "blocks": [],
        "engine": {},
        "batch_invariant": None,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode_used": "batched"}, "mode_used"),
        ({"branch_tokens": [1]}, "branch_tokens has 1 entries for 2 steps"),
        ({"branch_finish_reasons": ["eos"] * 3}, "branch_finish_reasons has 3 entries"),
        ({"decode_steps": -1}, "decode_steps"),
        ({"timings": {"plan": -0.1}}, "negative"),
        ({"unknown": 1}, "extra"),
    ],
)
def test_report_rejects_inconsistent_values(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _report(**overrides)
