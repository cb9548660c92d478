"""`parallel-reason ask` end to end on the tiny model folder, and the event folding behind it.

The tiny model writes noise, so only the shape of the output is checked; never speed.
"""

from __future__ import annotations

import io
import json

import pytest

from langchain_parallel_reason import cli
from langchain_parallel_reason.cli_ask import AnswerView, _LiveView, _PlainRenderer
from langchain_parallel_reason.pipeline import (
    ContentDelta,
    FallbackEvent,
    PlanEvent,
    StepDelta,
    StepsDoneEvent,
    StepsRetryEvent,
)

QUESTION = "Compare tea and coffee."


def _ask(model_dir, *extra: str) -> list[str]:
    return ["ask", QUESTION, "--model", str(model_dir), "--max-tokens", "40", *extra]


_STEPS = ("--steps", "Taste", "Price", "--step-max-tokens", "8")

# ----------------------------------------------------------------------------- AnswerView


def _parallel_events():
    return [
        PlanEvent(["Taste", "Price"], "Two views."),
        ContentDelta("Two views.\n\n"),
        StepDelta(1, "Price", "Tea is "),
        StepDelta(0, "Taste", "Mild"),
        StepDelta(1, "Price", "cheaper."),
        StepsDoneEvent([1, 3], ["Mild", "Tea is cheaper."]),
        ContentDelta("**Taste**: Mild\n\n**Price**: Tea is cheaper.\n\n"),
        ContentDelta("Drink "),
        ContentDelta("tea."),
    ]


def test_view_splits_plan_steps_and_conclusion():
    view = AnswerView()
    for event in _parallel_events():
        view.feed(event)
    assert view.titles == ["Taste", "Price"]
    assert view.preamble == "Two views."
    assert view.steps == ["Mild", "Tea is cheaper."]
    assert view.final == "Drink tea."
    assert view.phase == "conclusion"
    assert view.fallback is None


def test_view_takes_exact_step_bodies_from_the_merged_steps():
    # An out-of-memory retry reset the live text; the merged steps still hold the bodies.
    view = AnswerView()
    events = _parallel_events()
    events.insert(4, StepsRetryEvent("out of memory", 1))
    for event in events:
        view.feed(event)
    assert view.steps == ["Mild", "Tea is cheaper."]
    assert view.notes == ["steps retried 1 at a time (out of memory)"]


def test_view_after_a_fallback_keeps_only_the_sequential_answer():
    view = AnswerView()
    for event in [
        PlanEvent(["A", "B"]),
        StepDelta(0, "A", "x"),
        FallbackEvent("parallel decoding failed (boom)"),
        ContentDelta("Plain "),
        ContentDelta("answer."),
    ]:
        view.feed(event)
    assert view.final == "Plain answer."
    assert view.fallback == "parallel decoding failed (boom)"


def test_view_of_a_sequential_answer():
    view = AnswerView()
    for event in [ContentDelta("Just "), ContentDelta("text.")]:
        view.feed(event)
    assert (view.final, view.titles, view.phase) == ("Just text.", [], "answer")


def test_plain_renderer_prints_the_trimmed_body_of_a_looping_step():
    # The step looped ("Tea.\n" over and over) and the pipeline kept one copy; the plain
    # renderer had printed every live line, repeats included, beside "loops cut: 1".
    out = io.StringIO()
    renderer = _PlainRenderer(out)
    events = [
        PlanEvent(["Taste", "Price"], ""),
        StepDelta(0, "Taste", "Mild.\n"),
        *[StepDelta(1, "Price", "Tea.\n") for _ in range(5)],
        StepsDoneEvent([2, 10], ["Mild.", "Tea."]),
        ContentDelta("**Taste**: Mild.\n\n**Price**: Tea.\n\n"),
        ContentDelta("Drink tea."),
    ]
    for event in events:
        renderer.feed(event)
    renderer.close()
    assert out.getvalue().splitlines() == [
        "Plan:",
        "  1. Taste",
        "  2. Price",
        "Steps (decoded in parallel):",
        "[1 Taste] Mild.",
        "[2 Price] Tea.",
        "Conclusion:",
        "Drink tea.",
    ]


def test_live_view_renders_one_panel_per_step():
    from rich.console import Console

    view = AnswerView()
    for event in _parallel_events()[:5]:
        view.feed(event)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    console.print(_LiveView(view, console))
    text = out.getvalue()
    assert "1. Taste" in text
    assert "2. Price" in text
    assert "Tea is cheaper." in text
    assert text.count("╭") == 2  # two panels


# ----------------------------------------------------------------------------- the command


def test_ask_json(tiny_model_dir, capsys):
    assert cli.main([*_ask(tiny_model_dir, *_STEPS), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {"model", "content", "conclusion", "steps", "report", "usage", "dtype", "speedup"}
    assert set(result) == keys
    assert result["report"]["mode_used"] == "parallel"
    # The tiny folder is float32 and --dtype auto may choose bf16: the report says which holds.
    assert result["report"]["batch_invariant"] is result["dtype"].startswith("float32")
    speed = result["speedup"]
    assert speed["speedup"] > 0
    # Each figure is rounded to 3 decimals: on the tiny model a step time of ~0.01 s carries a
    # rounding error of several percent.
    assert speed["stepped_s"] == pytest.approx(
        speed["steps_s"] * speed["speedup"], rel=0.01, abs=2e-3
    )
    assert [s["title"] for s in result["steps"]] == ["Taste", "Price"]
    usage = result["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert 0 < usage["output_tokens"] <= 40
    assert result["content"].endswith(result["conclusion"])


def test_ask_plain_lines_when_not_a_terminal(tiny_model_dir, capsys):
    assert cli.main(_ask(tiny_model_dir, *_STEPS, "--threads", "1")) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[:4] == ["Plan:", "  1. Taste", "  2. Price", "Steps (decoded in parallel):"]
    assert "Conclusion:" in lines
    assert "---" in lines
    assert any(line.startswith("mode: parallel") for line in lines)
    assert any(line.startswith("times: ") for line in lines)
    assert any(line.startswith("speed-up: x") for line in lines)
    assert any(line.startswith("dtype: ") for line in lines)
    assert "\x1b[" not in out  # no terminal control codes in a pipe


def test_ask_stepped_and_reuse(tiny_model_dir, capsys):
    assert cli.main(_ask(tiny_model_dir, *_STEPS, "--mode", "stepped")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3] == "Steps (written one after another):"
    assert any(line.startswith("mode: stepped | steps: 2") for line in lines)
    argv = [*_ask(tiny_model_dir, *_STEPS, "--conclusion-kv", "reuse"), "--json"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert (report["mode_used"], report["conclusion_kv"]) == ("parallel", "reuse")


def test_ask_float32_is_batch_invariant(tiny_model_dir, capsys):
    argv = [*_ask(tiny_model_dir, *_STEPS), "--dtype", "float32", "--no-speedup", "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "float32"
    assert result["report"]["batch_invariant"] is True
    assert result["speedup"] is None
    argv = [*_ask(tiny_model_dir, *_STEPS), "--dtype", "bf16", "--no-speedup", "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["dtype"], result["report"]["batch_invariant"]) == ("bfloat16", False)


def test_ask_sequential(tiny_model_dir, capsys):
    assert cli.main(_ask(tiny_model_dir, "--mode", "sequential", "--seed", "1")) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "Answer:"
    assert any(line.startswith("mode: sequential") for line in out.splitlines())


def test_ask_auto_plans_or_reports_its_fallback(tiny_model_dir, capsys):
    # The random model may or may not write a valid plan; either way the command succeeds and
    # the report says which mode ran.
    assert cli.main([*_ask(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert report["mode_used"] in ("parallel", "sequential")
    if report["mode_used"] == "sequential":
        assert report["fallback_reason"]


def test_ask_in_a_terminal_draws_panels(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats the captured stdout as a terminal
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("TERM", raising=False)
    assert cli.main(_ask(tiny_model_dir, *_STEPS)) == 0
    out = capsys.readouterr().out
    assert "╭" in out
    assert "Taste" in out
    assert "mode: parallel" in out


def test_ask_missing_model_is_one_line_without_traceback(tmp_path, capsys):
    assert cli.main(_ask(tmp_path / "missing")) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("parallel-reason: error: ")
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err


def test_ask_debug_shows_the_traceback(tmp_path, capsys):
    assert cli.main(["--debug", *_ask(tmp_path / "missing")]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("steps", "reason"),
    [(["Only"], "only 1 step"), (["A", "a"], "duplicate titles"), (["A", "B:C"], "contains")],
)
def test_ask_unusable_steps_are_refused_before_loading(tmp_path, capsys, steps, reason):
    assert cli.main(_ask(tmp_path / "never-loaded", "--steps", *steps)) == 1
    err = capsys.readouterr().err
    assert err.startswith("parallel-reason: error: --steps: ")
    assert reason in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "extra",
    [["--mode", "fast"], ["--max-tokens", "0"], ["--threads", "-1"], ["--steps"]],
)
def test_ask_usage_errors(tmp_path, capsys, extra):
    assert cli.main(_ask(tmp_path, *extra)) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_ask_bad_temperature_is_refused_before_loading(tmp_path, capsys):
    assert cli.main(_ask(tmp_path / "never-loaded", "--temperature", "-1")) == 1
    err = capsys.readouterr().err
    assert "does not exist" not in err  # the config was checked first
    assert err.count("\n") == 1


def test_ask_help_describes_the_router_of_mode_auto(capsys):
    # The help described "auto" as the plan-or-fallback of the time before the router.
    assert cli.main(["ask", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "auto (default): the model first chooses between a plan and a direct answer" in help_text
