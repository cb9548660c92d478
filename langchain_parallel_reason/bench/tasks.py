"""Task benchmark: quality and speed of four ways to answer the same generated tasks.

Contract: `run_task_bench(model, tokenizer, config)` answers `samples` generated tasks per item
count (see `task_gen`) four ways through the public chat model (`ChatParallelReason.from_model`,
one per-call `mode` each) on one model in one run, interleaved per sample, and returns a
JSON-able dict read from each answer's report (`response_metadata["parallel"]`) and usage;
`render_table` prints it and `plot_result` draws it. `add_arguments` / `run` are the
`parallel-reason bench tasks` command. torch and the model are imported on first use, so
building the command line stays instant.

  sequential      plain decoding of the answer (`mode="sequential"`).
  stepped         the paper's baseline (`mode="stepped"`): the same plan, its steps written one
                  after another in one sequence by ordinary decoding, then the conclusion.
  parallel        the steps decoded at once in one sequence (`mode="parallel"`); Stage 3
                  prefills the merged steps (`conclusion_kv="reprefill"`).
  parallel_reuse  the same, but Stage 3 reuses the steps' own KV (`conclusion_kv="reuse"`).

Titles: with `titles="given"` retrieval and multidoc pass one step per record/document
(`steps=`, the paper's map-style use); with `titles="model"` (and always for planning) the model
writes its own step titles in Stage 1, as in the paper, and the plan is scored by
`task_gen.score_plan` (the fraction of the task's items that some title names).

Figures: wall time of the whole call (prompt prefill included, model load excluded); tokens/s
is output tokens / wall time; Stage-3 times are the report's `timings` ("merge": until the
first conclusion token, "conclusion": all of Stage 3). Speedups are ratios of means within this
run. The conclusion that is scored is the content after the steps: the chat model streams the
steps (with the plan's preamble) as one chunk, before any conclusion text.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_parallel_reason.bench.task_gen import (
    TASK_KINDS,
    Task,
    generate_tasks,
    max_items,
    score_answer,
    score_plan,
)

__all__ = [
    "WAYS",
    "TaskBenchConfig",
    "add_arguments",
    "plot_result",
    "render_table",
    "run",
    "run_task_bench",
]

WAYS: tuple[str, ...] = ("sequential", "stepped", "parallel", "parallel_reuse")
"""The four ways every sample is answered, in the order they are reported."""

# Short: the table must fit 80 columns when stdout is not a terminal.
_WAY_LABELS = {
    "sequential": "plain",
    "stepped": "stepped",
    "parallel": "parallel",
    "parallel_reuse": "par+reuse",
}
_EXCERPT_CHARS = 160
_NO_MATPLOTLIB = "--plot needs matplotlib: pip install 'langchain-parallel-reason[plot]'"


@dataclass(frozen=True)
class TaskBenchConfig:
    """What one task benchmark run measures.

    Attributes:
        task: "retrieval", "planning" or "multidoc".
        items: item counts N to run (records, documents or aspects per task).
        samples: tasks per item count.
        seed: generator seed (tasks) and sampling seed.
        max_tokens: new tokens per answer, the same for every way; None sizes it per N as
            plan budget + (N + 1) * step_max_tokens (so every step gets its budget).
        step_max_tokens: new tokens per step (every way but sequential).
        temperature: 0 (default) is greedy.
        titles: "given" (one step per record/document) or "model" (the model plans its own
            titles); planning tasks have no given titles and always plan.
        threads: CPU threads for the forwards (None: the cores this process may use).
    """

    task: str = "retrieval"
    items: tuple[int, ...] = (4,)
    samples: int = 3
    seed: int = 0
    max_tokens: int | None = None
    step_max_tokens: int = 32
    temperature: float = 0.0
    titles: Literal["given", "model"] = "given"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASK_KINDS:
            msg = f"unknown task {self.task!r}; choose one of {', '.join(TASK_KINDS)}"
            raise ValueError(msg)
        if self.titles not in ("given", "model"):
            msg = f"titles must be 'given' or 'model', got {self.titles!r}"
            raise ValueError(msg)
        top = max_items(self.task)
        bad = [n for n in self.items if not 2 <= n <= top]
        if not self.items or bad:
            msg = f"{self.task} tasks take 2 to {top} items, got {list(self.items)}"
            raise ValueError(msg)
        for name in ("samples", "step_max_tokens"):
            if getattr(self, name) < 1:
                msg = f"{name} must be >= 1, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.max_tokens is not None and self.max_tokens < 1:
            msg = f"max_tokens must be >= 1, got {self.max_tokens}"
            raise ValueError(msg)

    @property
    def plans(self) -> bool:
        """Whether the model writes its own step titles (Stage 1 runs)."""
        return self.task == "planning" or self.titles == "model"

    def plan_max_tokens(self, n: int) -> int:
        """Stage-1 budget for n titles (about 10 tokens a title line); 0 without Stage 1."""
        return 32 + 10 * n if self.plans else 0

    def answer_max_tokens(self, n: int) -> int:
        """New tokens per answer for n items."""
        if self.max_tokens is not None:
            return self.max_tokens
        return self.plan_max_tokens(n) + (n + 1) * self.step_max_tokens

    def settings(self, task: Task, way: str) -> dict[str, Any]:
        """The `ChatParallelReason` per-call settings of `way` (one of `WAYS`) for `task`."""
        n = task.items
        out: dict[str, Any] = {
            "mode": "sequential",
            "max_branches": max(n, 2),
            "max_tokens": self.answer_max_tokens(n),
            "step_max_tokens": self.step_max_tokens,
            "plan_max_tokens": max(1, self.plan_max_tokens(n)),
            "temperature": self.temperature,
            "seed": self.seed,
        }
        if way == "sequential":
            return out
        if way not in WAYS:
            msg = f"unknown way {way!r}; choose one of {', '.join(WAYS)}"
            raise ValueError(msg)
        out["mode"] = "stepped" if way == "stepped" else "parallel"
        out["steps"] = None if self.plans or task.steps is None else list(task.steps)
        out["conclusion_kv"] = "reuse" if way == "parallel_reuse" else "reprefill"
        return out


# ----------------------------------------------------------------------------- one answer


@dataclass
class _Outcome:
    wall_s: float
    output_tokens: int
    correct: bool
    mode_used: str
    stage1_ok: bool | None = None
    plan_score: float | None = None
    plan_attempts: int = 0
    fallback: str | None = None
    tokens_per_forward: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    titles: list[str] = field(default_factory=list)
    final: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 4),
            "output_tokens": self.output_tokens,
            "tokens_per_s": round(self.output_tokens / self.wall_s, 3) if self.wall_s else None,
            "correct": self.correct,
            "mode_used": self.mode_used,
            "stage1_ok": self.stage1_ok,
            "plan_score": self.plan_score,
            "plan_attempts": self.plan_attempts,
            "fallback": self.fallback,
            "tokens_per_forward": self.tokens_per_forward,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "titles": self.titles,
            "final": self.final[:_EXCERPT_CHARS],
        }


def _answer(chat: Any, task: Task, settings: dict[str, Any], plans: bool) -> _Outcome:
    """One answer through the chat model's public stream; figures from its report."""
    pieces: list[str] = []
    last = None
    t = time.perf_counter()
    for chunk in chat.stream(task.prompt, **settings):
        if chunk.content:
            pieces.append(str(chunk.content))
        if chunk.response_metadata.get("parallel") is not None:
            last = chunk
    wall = time.perf_counter() - t
    report = last.response_metadata["parallel"]
    content = "".join(pieces)
    stepped = report["mode_used"] in ("parallel", "stepped")
    # The steps arrive as the first content chunk; the conclusion is what follows.
    final = "".join(pieces[1:]) if stepped else content
    titles = list(report["steps"])
    stage1 = plans and settings["mode"] != "sequential"
    return _Outcome(
        wall_s=wall,
        output_tokens=int(last.usage_metadata["output_tokens"]),
        correct=score_answer(task, final, content),
        mode_used=report["mode_used"],
        stage1_ok=(stepped if stage1 else None),
        plan_score=(score_plan(task, titles) if stage1 else None),
        plan_attempts=report["plan_attempts"],
        fallback=report["fallback_reason"],
        tokens_per_forward=report["tokens_per_forward"],
        timings=dict(report["timings"]),
        titles=titles,
        final=final.strip(),
    )


def _run_sample(chat: Any, task: Task, cfg: TaskBenchConfig, tick: Any) -> dict[str, _Outcome]:
    """Answer `task` every way; `tick(way, done)` is called before and after each way."""
    out: dict[str, _Outcome] = {}
    for way in WAYS:
        tick(way, False)
        out[way] = _answer(chat, task, cfg.settings(task, way), cfg.plans)
        tick(way, True)
    return out


# ----------------------------------------------------------------------------- the run


def _warm_up(chat: Any) -> None:
    """One short sequential and one short parallel answer, untimed (first-call costs)."""
    chat.invoke("Say hello.", mode="sequential", max_tokens=4)
    chat.invoke("Say hello.", mode="parallel", steps=["One", "Two"], max_tokens=32)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _summarize_way(outcomes: list[_Outcome]) -> dict[str, Any]:
    wall = sum(o.wall_s for o in outcomes)
    tokens = sum(o.output_tokens for o in outcomes)
    stage1 = [o.stage1_ok for o in outcomes if o.stage1_ok is not None]
    plan = [o.plan_score for o in outcomes if o.plan_score is not None]
    tpf = [o.tokens_per_forward for o in outcomes if o.tokens_per_forward is not None]

    def stage(key: str) -> float | None:
        return _rounded(_mean([o.timings[key] for o in outcomes if key in o.timings]), 4)

    return {
        "mean_wall_s": round(wall / len(outcomes), 4),
        "mean_output_tokens": round(tokens / len(outcomes), 2),
        "tokens_per_s": round(tokens / wall, 3) if wall else None,
        "accuracy": round(sum(o.correct for o in outcomes) / len(outcomes), 4),
        "stage1_format_ok": _rounded(_mean(stage1), 4),
        "plan_score": _rounded(_mean(plan), 4),
        "fallbacks": sum(o.fallback is not None for o in outcomes),
        "mean_tokens_per_forward": _rounded(_mean(tpf), 3),
        "mean_steps_s": stage("steps"),
        "mean_merge_s": stage("merge"),
        "mean_stage3_s": stage("conclusion"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _speedups(ways: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    par = ways["parallel"]
    return {
        f"{kind}_vs_{base}": (
            _ratio(ways[base]["mean_wall_s"], par["mean_wall_s"])
            if kind == "wall"
            else _ratio(par["tokens_per_s"], ways[base]["tokens_per_s"])
        )
        for base in ("sequential", "stepped")
        for kind in ("wall", "tokens_per_s")
    }


def _stage3(ways: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage 3 with the steps re-prefilled vs their KV reused: times, quality, agreement."""
    pre, reuse = ways["parallel"], ways["parallel_reuse"]
    both = [r for r in runs if r["parallel"]["mode_used"] == r["parallel_reuse"]["mode_used"]]
    same = [r["parallel"]["final"] == r["parallel_reuse"]["final"] for r in both]
    return {
        "merge_s": {"reprefill": pre["mean_merge_s"], "reuse": reuse["mean_merge_s"]},
        "stage3_s": {"reprefill": pre["mean_stage3_s"], "reuse": reuse["mean_stage3_s"]},
        "merge_speedup": _ratio(pre["mean_merge_s"], reuse["mean_merge_s"]),
        "accuracy": {"reprefill": pre["accuracy"], "reuse": reuse["accuracy"]},
        "same_conclusion": round(sum(same) / len(same), 4) if same else None,
    }


def run_task_bench(
    model: Any,
    tokenizer: Any,
    config: TaskBenchConfig,
    *,
    model_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) and return its figures.

    Keys: run metadata (`task`, `titles`, `samples`, `seed`, `model`, `device`, `dtype`,
    `torch_threads`, `machine`, `load_avg_start`, `load_avg_end`, `step_max_tokens`,
    `temperature`, `elapsed_s`) and `by_items`, one entry per N with `items`, `max_tokens`,
    `ways` (per way: `mean_wall_s`, `mean_output_tokens`, `tokens_per_s`, `accuracy`,
    `stage1_format_ok`, `plan_score`, `fallbacks`, `mean_tokens_per_forward`, `mean_steps_s`,
    `mean_merge_s`, `mean_stage3_s`), `speedup` (`wall_vs_sequential`,
    `tokens_per_s_vs_sequential`, `wall_vs_stepped`, `tokens_per_s_vs_stepped`: parallel
    against each), `stage3` (`merge_s`, `stage3_s`, `accuracy` for "reprefill" and "reuse",
    `merge_speedup`, `same_conclusion`) and `runs` (per sample, per way).
    """
    import torch
    from tqdm.auto import tqdm

    from langchain_parallel_reason import ChatParallelReason
    from langchain_parallel_reason.bench.machine import load_average, machine_description

    chat = ChatParallelReason.from_model(model, tokenizer, num_threads=config.threads)
    param = next(model.parameters())
    load_start = load_average()
    started = time.perf_counter()
    bar = tqdm(
        total=len(config.items) * config.samples * len(WAYS),
        unit="answer",
        desc="warm-up",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    by_items = []
    with bar:
        _warm_up(chat)
        for n in config.items:
            tasks = generate_tasks(config.task, n, config.samples, seed=config.seed)
            runs, outcomes = [], []
            for i, task in enumerate(tasks):

                def tick(way: str, done: bool, n: int = n, i: int = i) -> None:
                    if done:
                        bar.update(1)
                    else:
                        bar.set_description(f"N={n} sample {i + 1}/{config.samples} {way}")

                sample = _run_sample(chat, task, config, tick)
                outcomes.append(sample)
                runs.append(
                    {
                        "index": i,
                        "expected": task.expected or list(task.aspects),
                        **{way: sample[way].as_dict() for way in WAYS},
                    }
                )
            ways = {way: _summarize_way([s[way] for s in outcomes]) for way in WAYS}
            by_items.append(
                {
                    "items": n,
                    "max_tokens": config.answer_max_tokens(n),
                    "ways": ways,
                    "speedup": _speedups(ways),
                    "stage3": _stage3(ways, runs),
                    "runs": runs,
                }
            )
    return {
        "task": config.task,
        "titles": "model" if config.plans else "given",
        "samples": config.samples,
        "seed": config.seed,
        "step_max_tokens": config.step_max_tokens,
        "temperature": config.temperature,
        "model": model_name,
        "device": str(param.device),
        "dtype": str(param.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "machine": machine_description(),
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
        "elapsed_s": round(time.perf_counter() - started, 2),
        "by_items": by_items,
    }


# ----------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(result: dict[str, Any], console: Any = None) -> None:
    """Print one table per item count, plus the speedups and the Stage-3 comparison, with rich."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(file=sys.stdout, highlight=False)
    console.print(
        f"task {result['task']} ({result['titles']} titles), {result['samples']} samples, model "
        f"{result['model']}, {result['device']} {result['dtype']}, {result['torch_threads']} "
        f"threads, load {result['load_avg_start']} -> {result['load_avg_end']}",
        markup=False,
    )
    # Times in seconds; "merge": Stage 3 until its first token, "stage3": all of Stage 3.
    columns = ("way", "wall", "tokens", "tok/s", "acc", "plan", "tok/fwd", "merge", "stage3")
    for entry in result["by_items"]:
        table = Table(
            title=f"N = {entry['items']} (max_tokens {entry['max_tokens']}; times in s)",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for col in columns:
            table.add_column(col, justify="left" if col == "way" else "right", no_wrap=True)
        for way in WAYS:
            w = entry["ways"][way]
            table.add_row(
                _WAY_LABELS[way],
                _fmt(w["mean_wall_s"], ".2f"),
                _fmt(w["mean_output_tokens"], ".1f"),
                _fmt(w["tokens_per_s"], ".1f"),
                _fmt(w["accuracy"], ".2f"),
                _fmt(w["plan_score"], ".2f"),
                _fmt(w["mean_tokens_per_forward"], ".2f"),
                _fmt(w["mean_merge_s"], ".3f"),
                _fmt(w["mean_stage3_s"], ".2f"),
            )
        console.print(table)
        s = entry["speedup"]
        console.print(
            "parallel speedup: wall "
            f"{_fmt(s['wall_vs_sequential'], '.2f')}x vs plain, "
            f"{_fmt(s['wall_vs_stepped'], '.2f')}x vs stepped; tokens/s "
            f"{_fmt(s['tokens_per_s_vs_sequential'], '.2f')}x vs plain, "
            f"{_fmt(s['tokens_per_s_vs_stepped'], '.2f')}x vs stepped",
            markup=False,
        )
        st = entry["stage3"]
        console.print(
            f"stage 3, steps re-prefilled -> KV reused: merge {_fmt(st['merge_s']['reprefill'], '.3f')}"
            f" -> {_fmt(st['merge_s']['reuse'], '.3f')} s ({_fmt(st['merge_speedup'], '.2f')}x), "
            f"accuracy {_fmt(st['accuracy']['reprefill'], '.2f')} -> "
            f"{_fmt(st['accuracy']['reuse'], '.2f')}, same conclusion "
            f"{_fmt(st['same_conclusion'], '.2f')}",
            markup=False,
        )


def plot_result(result: dict[str, Any], path: str) -> None:
    """Draw speedup and accuracy against N as a PNG (needs the `plot` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(_NO_MATPLOTLIB) from e

    entries = result["by_items"]
    xs = [e["items"] for e in entries]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("wall_vs_stepped", "wall time vs stepped"),
        ("tokens_per_s_vs_stepped", "tokens/s vs stepped"),
        ("wall_vs_sequential", "wall time vs plain sequential"),
        ("tokens_per_s_vs_sequential", "tokens/s vs plain sequential"),
    ):
        ax1.plot(xs, [e["speedup"][key] for e in entries], marker="o", label=label)
    ax1.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax1.set(xlabel="items N", ylabel="parallel speedup (x)", title="Speedup of parallel steps")
    ax1.legend(fontsize=8)
    for way in WAYS:
        ax2.plot(
            xs, [e["ways"][way]["accuracy"] for e in entries], marker="o", label=_WAY_LABELS[way]
        )
    ax2.set(xlabel="items N", ylabel="accuracy", title="Accuracy", ylim=(-0.05, 1.05))
    ax2.legend(fontsize=8)
    fig.suptitle(f"{result['task']}, {result['samples']} samples, {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `bench tasks`' own options (the registry adds --model, --device, --debug)."""
    from langchain_parallel_reason.cli_options import (
        add_server_options,
        add_threads_option,
        positive_int,
    )

    parser.add_argument("--task", choices=TASK_KINDS, default="retrieval", help="task kind")
    parser.add_argument(
        "--titles",
        choices=("given", "model"),
        default="given",
        help="step titles: one per record/document (given), or the model plans its own as in "
        "the paper (model; always so for planning)",
    )
    parser.add_argument(
        "--items",
        type=positive_int,
        nargs="+",
        default=[4],
        metavar="N",
        help="records/documents/aspects per task; several values give one row each (default 4)",
    )
    parser.add_argument(
        "--samples", type=positive_int, default=3, metavar="K", help="tasks per N (default 3)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0)")
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="new tokens per answer, every way (default: plan + (N + 1) x step budget)",
    )
    parser.add_argument(
        "--step-max-tokens",
        type=positive_int,
        default=32,
        metavar="N",
        help="new tokens per step (default 32)",
    )
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="draw a PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_server_options(parser)


def run(args: argparse.Namespace) -> int:
    """The `bench tasks` command: validate, load the model, run, print; returns 0."""
    from langchain_parallel_reason.cli_options import EMBEDDED_LABEL, print_remote_result

    config = TaskBenchConfig(
        task=args.task,
        items=tuple(args.items),
        samples=args.samples,
        seed=args.seed,
        max_tokens=args.max_tokens,
        step_max_tokens=args.step_max_tokens,
        titles=args.titles,
        threads=args.threads,
    )
    if args.plot is not None:
        # Checked before the (long) run, not after it.
        if not args.plot.lower().endswith(".png"):
            msg = f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}"
            raise ValueError(msg)
        if importlib.util.find_spec("matplotlib") is None:
            raise RuntimeError(_NO_MATPLOTLIB)

    if args.base_url is not None:  # three ways on a vLLM/SGLang server
        from langchain_parallel_reason.bench.remote import run_remote_task_bench

        result = run_remote_task_bench(
            args.base_url, args.served_model, config, progress=not args.no_progress
        )
        print_remote_result(result, args.json)
        return 0
    from langchain_parallel_reason.loading import load_model_and_tokenizer
    from langchain_parallel_reason.runtime.threads import apply_threads

    apply_threads(args.threads)  # None: the cores this process may use
    progress = not args.no_progress
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, progress=progress)
    result = run_task_bench(
        model, tokenizer, config, model_name=args.model or EMBEDDED_LABEL, progress=progress
    )
    if args.plot is not None:
        plot_result(result, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        render_table(result)
    return 0
