"""`parallel-reason bench tasks`: generators, scorers, settings, the command end to end.

Runs on the tiny random model (its answers are noise, so accuracy is never asserted on it);
never asserts on speed. The stepped baseline itself is the product's mode="stepped"
(tests/unit_tests/test_stepped.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from langchain_parallel_reason import cli
from langchain_parallel_reason.bench.task_gen import (
    TASK_KINDS,
    Task,
    final_segment,
    generate_task,
    generate_tasks,
    max_items,
    mentioned,
    score_answer,
    score_plan,
)
from langchain_parallel_reason.bench.tasks import WAYS, TaskBenchConfig

# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_generators_are_deterministic_for_a_seed(kind):
    assert generate_tasks(kind, 6, 3, seed=7) == generate_tasks(kind, 6, 3, seed=7)
    assert generate_tasks(kind, 6, 3, seed=7) != generate_tasks(kind, 6, 3, seed=8)
    tasks = generate_tasks(kind, 6, 3, seed=7)
    assert len({t.prompt for t in tasks}) == 3  # samples differ from each other


def test_generated_prompts_are_pinned():
    # A stable fingerprint: a change of generator silently changes every published figure.
    task = generate_task("retrieval", 4, seed=0, index=0)
    assert task.expected == "Nadia Duarte"
    assert task.steps == ("Mateo Quispe", "Tanya Marino", "Nadia Duarte", "Liam Varga")
    assert "Which student has the lowest GPA?" in task.prompt


@pytest.mark.parametrize("seed", range(5))
def test_retrieval_answer_is_the_one_record_that_fits(seed):
    task = generate_task("retrieval", 12, seed=seed)
    records = re.findall(r"Name: ([^;]+); GPA: ([\d.]+);", task.prompt)
    gpas = {name: float(gpa) for name, gpa in records}
    assert list(gpas) == list(task.steps) == list(task.candidates)
    assert len(set(gpas.values())) == 12  # no ties
    if "highest" in task.prompt:
        assert task.expected == max(gpas, key=gpas.get)
    elif "lowest" in task.prompt:
        assert task.expected == min(gpas, key=gpas.get)
    else:
        value = float(re.search(r"GPA of exactly ([\d.]+)\?", task.prompt).group(1))
        assert [n for n, g in gpas.items() if g == value] == [task.expected]
    firsts = [n.split()[0] for n in task.candidates]
    lasts = [n.split()[1] for n in task.candidates]
    assert len(set(firsts)) == len(set(lasts)) == 12


@pytest.mark.parametrize("seed", range(5))
def test_multidoc_exactly_one_document_holds_the_answer(seed):
    task = generate_task("multidoc", 8, seed=seed)
    landmark = re.search(r"Who designed the (.+)\?", task.prompt).group(1)
    docs = [line for line in task.prompt.splitlines() if line.startswith("Document ")]
    assert len(docs) == 8 == len(task.steps)
    holding = [d for d in docs if f"The {landmark} in" in d]
    assert len(holding) == 1
    assert f"designed by {task.expected} " in holding[0]


def test_planning_lists_every_aspect_and_has_no_steps():
    task = generate_task("planning", 5, seed=3)
    assert task.steps is None
    assert len(set(task.aspects)) == 5
    assert all(a in task.prompt for a in task.aspects)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_items_out_of_range_are_refused(kind):
    with pytest.raises(ValueError, match="items"):
        generate_task(kind, 1)
    with pytest.raises(ValueError, match="items"):
        generate_task(kind, max_items(kind) + 1)
    generate_task(kind, max_items(kind))  # the largest size works


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown task kind"):
        generate_task("poetry", 4)


# ----------------------------------------------------------------------------- scorers

_CANDIDATES = ("Alice Moreno", "Bruno Okafor", "Carmen Petrov")


def _retrieval_task() -> Task:
    return Task("retrieval", 3, "", _CANDIDATES, "Bruno Okafor", _CANDIDATES)


@pytest.mark.parametrize(
    ("final", "right"),
    [
        ("Bruno Okafor has the highest GPA.", True),
        ("The student is bruno okafor", True),  # case-insensitive
        ("Bruno.", True),  # first name alone
        ("It is Okafor.", True),  # last name alone
        ("Alice Moreno compares well, but the answer: Bruno Okafor", True),  # last Answer: wins
        ("Answer: Alice Moreno", False),
        ("Bruno Okafor and Alice Moreno are tied.", False),  # names two candidates
        ("No student matches.", False),
        ("", False),
        ("Brunoson Okafori", False),  # whole words only
    ],
)
def test_retrieval_scorer(final, right):
    assert score_answer(_retrieval_task(), final, content="anything") is right


def test_retrieval_scorer_ignores_the_steps_in_content():
    # Steps name every record; only the final answer is scored.
    content = "**Alice Moreno**: 3.1\n\n**Bruno Okafor**: 3.9\n\n**Carmen Petrov**: 2.5\n\n"
    assert score_answer(_retrieval_task(), "Bruno Okafor.", content)
    assert not score_answer(_retrieval_task(), "Carmen Petrov.", content)


def test_planning_scorer_needs_every_aspect():
    task = generate_task("planning", 3, seed=0)
    a, b, c = task.aspects
    full = f"**{a}**: fine.\n\n**{b.lower()}** is ok. {c.upper()} matters."
    assert score_answer(task, final="", content=full)
    assert not score_answer(task, final=full, content=f"{a} and {b} only")


def test_final_segment_and_mentioned():
    assert final_segment("Steps... Answer: x. ANSWER : y") == " y"
    assert final_segment("no marker") == "no marker"
    assert mentioned("Alice Moreno", "moreno wins")
    assert not mentioned("Alice Moreno", "Alicent won")


def test_plan_score_counts_the_items_some_title_names():
    task = _retrieval_task()  # Alice Moreno, Bruno Okafor, Carmen Petrov
    assert score_plan(task, ["Alice Moreno", "Bruno", "Petrov"]) == 1.0
    assert score_plan(task, ["alice", "Grades", "Summary"]) == pytest.approx(1 / 3)
    assert score_plan(task, ["Student 1", "Student 2", "Student 3"]) == 0.0
    planning = generate_task("planning", 4, seed=0)
    a, b, *_ = planning.aspects
    assert score_plan(planning, [f"The {a.lower()}", b, "Other"]) == 0.5
    doc = generate_task("multidoc", 3, seed=0)
    assert score_plan(doc, ["Document 1", "Doc 2", doc.candidates[2]]) == 1.0
    assert score_plan(doc, ["Document 12"]) == 0.0  # not document 1


# ----------------------------------------------------------------------------- settings


def test_config_budgets_settings_and_validation():
    cfg = TaskBenchConfig(task="retrieval", items=(4,), step_max_tokens=10)
    assert cfg.answer_max_tokens(4) == 50
    assert TaskBenchConfig(task="planning", step_max_tokens=10).answer_max_tokens(3) == 62 + 40
    own = TaskBenchConfig(titles="model", step_max_tokens=10)
    assert own.answer_max_tokens(3) == 62 + 40  # the plan's budget, as for planning
    assert TaskBenchConfig(max_tokens=77).answer_max_tokens(30) == 77
    task = generate_task("retrieval", 4)
    ways = {way: cfg.settings(task, way) for way in WAYS}
    assert ways["sequential"]["mode"] == "sequential"
    assert "steps" not in ways["sequential"]
    assert ways["stepped"]["mode"] == "stepped"
    assert {w["mode"] for k, w in ways.items() if k.startswith("parallel")} == {"parallel"}
    assert ways["parallel"]["conclusion_kv"] == "reprefill"
    assert ways["parallel_reuse"]["conclusion_kv"] == "reuse"
    for way in ("stepped", "parallel", "parallel_reuse"):
        assert ways[way]["steps"] == list(task.steps)
        assert own.settings(task, way)["steps"] is None  # the model plans its own titles
    # Every way shares the budgets, so only the mode differs.
    shared = {
        k: v for k, v in ways["parallel"].items() if k not in ("mode", "steps", "conclusion_kv")
    }
    assert all(ways[w].items() >= shared.items() for w in WAYS)
    planning = generate_task("planning", 4)
    assert TaskBenchConfig(task="planning").settings(planning, "parallel")["steps"] is None
    with pytest.raises(ValueError, match="items"):
        TaskBenchConfig(items=(1,))
    with pytest.raises(ValueError, match="samples"):
        TaskBenchConfig(samples=0)
    with pytest.raises(ValueError, match="titles"):
        TaskBenchConfig(titles="some")


# ----------------------------------------------------------------------------- command

_WAY_KEYS = {
    "mean_wall_s",
    "mean_output_tokens",
    "tokens_per_s",
    "accuracy",
    "stage1_format_ok",
    "plan_score",
    "fallbacks",
    "mean_tokens_per_forward",
    "mean_steps_s",
    "mean_merge_s",
    "mean_stage3_s",
}
_SPEEDUP_KEYS = {
    "wall_vs_sequential",
    "tokens_per_s_vs_sequential",
    "wall_vs_stepped",
    "tokens_per_s_vs_stepped",
}


def _args(model_dir: Path, *extra: str) -> list[str]:
    return ["bench", "tasks", "--model", str(model_dir), "--step-max-tokens", "8", *extra]


def test_bench_tasks_json_and_plot(tiny_model_dir, tmp_path, capsys):
    plot = tmp_path / "bench.png"
    argv = _args(tiny_model_dir, "--items", "2", "3", "--samples", "2", "--json", "--plot")
    assert cli.main([*argv, str(plot), "--no-progress"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result["task"] == "retrieval"
    assert [e["items"] for e in result["by_items"]] == [2, 3]
    for entry in result["by_items"]:
        assert set(entry["ways"]) == set(WAYS)
        for way in WAYS:
            assert set(entry["ways"][way]) == _WAY_KEYS
            assert 0.0 <= entry["ways"][way]["accuracy"] <= 1.0
            assert entry["ways"][way]["stage1_format_ok"] is None  # steps were given
        assert set(entry["speedup"]) == _SPEEDUP_KEYS
        assert len(entry["runs"]) == 2
        for run in entry["runs"]:
            assert run["stepped"]["mode_used"] == "stepped"
            assert run["parallel"]["mode_used"] == "parallel"
            assert run["parallel"]["timings"]["merge"] <= run["parallel"]["timings"]["conclusion"]
            # The same given steps every way: only how they were written differs.
            assert run["stepped"]["titles"] == run["parallel"]["titles"]
        # Stage 3 with the steps re-prefilled vs their KV reused, side by side.
        stage3 = entry["stage3"]
        assert set(stage3) == {
            "merge_s",
            "stage3_s",
            "merge_speedup",
            "accuracy",
            "same_conclusion",
        }
        assert stage3["merge_s"]["reprefill"] == entry["ways"]["parallel"]["mean_merge_s"] > 0
        assert stage3["merge_s"]["reuse"] == entry["ways"]["parallel_reuse"]["mean_merge_s"] > 0
        assert 0.0 <= stage3["same_conclusion"] <= 1.0
        assert entry["ways"]["sequential"]["mean_merge_s"] is None  # no Stage 3
    assert result["titles"] == "given"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra", [["--task", "planning"], ["--task", "retrieval", "--titles", "model"]]
)
def test_bench_tasks_with_own_titles_reports_plan_rate_and_score(tiny_model_dir, capsys, extra):
    argv = _args(tiny_model_dir, *extra, "--items", "2", "--samples", "1")
    assert cli.main([*argv, "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["titles"] == "model"
    entry = result["by_items"][0]
    for way in ("stepped", "parallel", "parallel_reuse"):
        assert entry["ways"][way]["stage1_format_ok"] in (0.0, 1.0)
        assert 0.0 <= entry["ways"][way]["plan_score"] <= 1.0
    assert entry["ways"]["sequential"]["stage1_format_ok"] is None
    assert entry["ways"]["sequential"]["plan_score"] is None
    run = entry["runs"][0]
    if run["parallel"]["mode_used"] == "parallel":  # the same greedy plan both ways
        assert run["stepped"]["titles"] == run["parallel"]["titles"]


def test_bench_tasks_table_and_progress(tiny_model_dir, capsys):
    assert (
        cli.main(_args(tiny_model_dir, "--task", "multidoc", "--items", "2", "--samples", "1")) == 0
    )
    captured = capsys.readouterr()
    assert "parallel speedup" in captured.out
    assert "stepped" in captured.out
    assert "stage 3, steps re-prefilled -> KV reused" in captured.out
    assert "N=2 sample 1/1" in captured.err  # the progress bar


def test_bench_tasks_missing_model_is_one_line(tmp_path, capsys):
    assert cli.main(_args(tmp_path / "missing", "--no-progress")) == 1
    err = capsys.readouterr().err
    assert err.startswith("parallel-reason: error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--items", "1"], 1),  # checked before loading the model
        (["--plot", "figure.svg"], 1),
        (["--task", "poetry"], 2),
        (["--samples", "0"], 2),
    ],
)
def test_bench_tasks_bad_arguments(tmp_path, capsys, extra, code):
    assert cli.main(_args(tmp_path / "never-loaded", *extra)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 1:
        assert "does not exist" not in err  # refused before the model load
