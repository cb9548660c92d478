"""`parallel-reason bench tasks`: generators, scorers, the stepped baseline, the command end to end.

Runs on the tiny random model (its answers are noise, so accuracy is never asserted on it);
never asserts on speed.
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
)
from langchain_parallel_reason.bench.tasks import (
    WAYS,
    TaskBenchConfig,
    decode_steps_sequentially,
)
from langchain_parallel_reason.pipeline import PipelineConfig, answer

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


# ----------------------------------------------------------------------------- baseline


def test_stepped_baseline_first_step_equals_parallel_branch(tiny_llama, tiny_tokenizer):
    # Greedy and fp32: step 1 sees the prompt, the plan and its header in both ways, so its
    # text must be the same; later steps differ (they see the earlier ones in the baseline).
    task = generate_task("retrieval", 3, seed=1)
    config = PipelineConfig(
        mode="parallel", steps=task.steps, max_branches=3, max_tokens=40, step_max_tokens=8
    )
    messages = [{"role": "user", "content": task.prompt}]
    parallel = answer(tiny_llama, tiny_tokenizer, messages, config)
    assert parallel.report.mode_used == "parallel"
    steps = decode_steps_sequentially(
        tiny_llama, tiny_tokenizer, messages, list(task.steps), config
    )
    first_body = parallel.content.split("\n\n")[0].removeprefix(f"**{task.steps[0]}**: ")
    assert steps.step_texts[0] == first_body
    assert len(steps.step_texts) == 3
    assert all(f"**{t}**: " in steps.content for t in task.steps)
    assert steps.content.endswith(steps.conclusion)
    assert 0 < steps.output_tokens <= config.max_tokens
    assert steps.seconds > 0


def test_config_budgets_and_validation():
    cfg = TaskBenchConfig(task="retrieval", items=(4,), step_max_tokens=10)
    assert cfg.answer_max_tokens(4) == 50
    assert TaskBenchConfig(task="planning", step_max_tokens=10).answer_max_tokens(3) == 62 + 40
    assert TaskBenchConfig(max_tokens=77).answer_max_tokens(30) == 77
    task = generate_task("retrieval", 4)
    assert cfg.pipeline_config(task, "parallel").steps == task.steps
    assert cfg.pipeline_config(task, "sequential").mode == "sequential"
    planning = generate_task("planning", 4)
    assert TaskBenchConfig(task="planning").pipeline_config(planning, "parallel").mode == "auto"
    with pytest.raises(ValueError, match="items"):
        TaskBenchConfig(items=(1,))
    with pytest.raises(ValueError, match="samples"):
        TaskBenchConfig(samples=0)


# ----------------------------------------------------------------------------- command

_WAY_KEYS = {
    "mean_wall_s",
    "mean_output_tokens",
    "tokens_per_s",
    "accuracy",
    "stage1_format_ok",
    "fallbacks",
    "mean_tokens_per_forward",
}
_SPEEDUP_KEYS = {
    "wall_vs_sequential",
    "tokens_per_s_vs_sequential",
    "wall_vs_sequential_steps",
    "tokens_per_s_vs_sequential_steps",
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
        assert entry["runs"][0]["parallel"]["mode_used"] == "parallel"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_tasks_planning_reports_stage1_rate(tiny_model_dir, capsys):
    argv = _args(tiny_model_dir, "--task", "planning", "--items", "2", "--samples", "1")
    assert cli.main([*argv, "--json", "--no-progress"]) == 0
    entry = json.loads(capsys.readouterr().out)["by_items"][0]
    assert entry["ways"]["parallel"]["stage1_format_ok"] in (0.0, 1.0)
    assert entry["ways"]["sequential"]["stage1_format_ok"] is None


def test_bench_tasks_table_and_progress(tiny_model_dir, capsys):
    assert (
        cli.main(_args(tiny_model_dir, "--task", "multidoc", "--items", "2", "--samples", "1")) == 0
    )
    captured = capsys.readouterr()
    assert "parallel speedup" in captured.out
    assert "sequential steps" in captured.out
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
