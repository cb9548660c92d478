"""Task benchmark: quality and speed of three ways to answer the same generated tasks.

Contract: `run_task_bench(model, tokenizer, config)` answers `samples` generated tasks per item
count (see `task_gen`) three ways on one model in one run, interleaved per sample, and returns a
JSON-able dict; `render_table` prints it and `plot_result` draws it. `add_arguments` / `run` are
the `parallel-reason bench tasks` command. torch and the pipeline are imported on first use, so
building the command line stays instant.

  sequential        plain decoding of the answer (`PipelineConfig(mode="sequential")`).
  sequential_steps  the paper's baseline: the same prompt and plan as `parallel`, its steps then
                    written one after another in one sequence by normal decoding (each step sees
                    the earlier ones), then the conclusion cue. Its time includes the Stage-1 plan
                    time measured in the `parallel` run of the same sample (same greedy plan).
  parallel          the pipeline: retrieval and multidoc pass one step per record/document
                    (`PipelineConfig(steps=...)`, the paper's map-style use); planning plans
                    itself (Stage 1, mode "auto").

Decode speed is output tokens / wall time of the whole answer (prompt prefill included, model
load excluded). Speedups are ratios of means within this run: wall time baseline / parallel and
tokens/s parallel / baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from langchain_parallel_reason.bench.task_gen import (
    TASK_KINDS,
    Task,
    generate_tasks,
    max_items,
    score_answer,
)

__all__ = [
    "WAYS",
    "TaskBenchConfig",
    "add_arguments",
    "decode_steps_sequentially",
    "plot_result",
    "render_table",
    "run",
    "run_task_bench",
]

WAYS: tuple[str, ...] = ("sequential", "sequential_steps", "parallel")
"""The three ways every sample is answered, in the order they are reported."""

# Short: the table must fit 80 columns when stdout is not a terminal.
_WAY_LABELS = {
    "sequential": "plain sequential",
    "sequential_steps": "sequential steps",
    "parallel": "parallel steps",
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
            plan budget + (N + 1) * step_max_tokens (so every parallel step gets its budget).
        step_max_tokens: new tokens per step (parallel and sequential_steps).
        temperature: 0 (default) is greedy.
    """

    task: str = "retrieval"
    items: tuple[int, ...] = (4,)
    samples: int = 3
    seed: int = 0
    max_tokens: int | None = None
    step_max_tokens: int = 32
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.task not in TASK_KINDS:
            msg = f"unknown task {self.task!r}; choose one of {', '.join(TASK_KINDS)}"
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

    def plan_max_tokens(self, n: int) -> int:
        """Stage-1 budget for n aspects (about 10 tokens a title line); 0 without Stage 1."""
        return 32 + 10 * n if self.task == "planning" else 0

    def answer_max_tokens(self, n: int) -> int:
        """New tokens per answer for n items."""
        if self.max_tokens is not None:
            return self.max_tokens
        return self.plan_max_tokens(n) + (n + 1) * self.step_max_tokens

    def pipeline_config(self, task: Task, mode: str) -> Any:
        """The `PipelineConfig` of way `mode` ("sequential" or "parallel") for `task`."""
        from langchain_parallel_reason.pipeline import PipelineConfig

        n = task.items
        config = PipelineConfig(
            mode="sequential",
            max_branches=max(n, 2),
            max_tokens=self.answer_max_tokens(n),
            step_max_tokens=self.step_max_tokens,
            plan_max_tokens=max(1, self.plan_max_tokens(n)),
            temperature=self.temperature,
            seed=self.seed,
        )
        if mode == "sequential":
            return config
        if task.steps is None:
            return replace(config, mode="auto")
        return replace(config, mode="parallel", steps=task.steps)


# ----------------------------------------------------------------------------- the baseline


def _clean_prefix(tokenizer: Any, tokens: list[int], kept_text: str) -> int:
    """How many leading `tokens` spell a prefix of `kept_text` (the step cut at its marker).

    The last sampled token is never in the cache, and the tokens that spell the stop marker
    must leave it, so at most len(tokens) - 1 are kept.
    """
    for j in range(len(tokens) - 1, 0, -1):
        text = tokenizer.decode(tokens[:j], skip_special_tokens=True)
        if kept_text.startswith(text) and not text.endswith("\ufffd"):
            return j
    return 0


@dataclass(frozen=True)
class StepsResult:
    """What `decode_steps_sequentially` wrote: content as the pipeline lays it out, the final
    conclusion, generated tokens (steps + conclusion) and seconds."""

    content: str
    conclusion: str
    step_texts: list[str]
    output_tokens: int
    seconds: float


def decode_steps_sequentially(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    titles: list[str],
    config: Any,
    *,
    preamble: str = "",
    plan_tokens: int = 0,
) -> StepsResult:
    """The paper's sequential baseline: the plan's steps written one after another.

    The prompt and plan are laid out as the pipeline lays them out before Stage 2; then for each
    title the header ``####Title:`` is forced and the model decodes until ``####``, EOS or the
    step budget, with every earlier step in its context; then the conclusion cue and the
    conclusion. The tokens that spell a stop marker are cropped from the cache, so the context is
    the steps as written plus one newline each, as in the pipeline's Stage 3.

    Args:
        config: the parallel way's `PipelineConfig` (budgets, sampling, max_branches).
        preamble, plan_tokens: the Stage-1 plan's preamble and generated tokens, when there was
            a Stage 1 (they count against `max_tokens` as in the pipeline).
    """
    from transformers.cache_utils import DynamicCache

    from langchain_parallel_reason.decoding.cache import crop_to
    from langchain_parallel_reason.decoding.sampling import SamplingParams
    from langchain_parallel_reason.decoding.sequential import SuppressFirst, iter_decode
    from langchain_parallel_reason.decoding.stops import cut_at_stop
    from langchain_parallel_reason.pipeline import (
        MIN_STEP_TOKENS,
        drive,
        render_prompt,
        step_opening_banned_ids,
        stop_token_ids,
        with_system,
    )
    from langchain_parallel_reason.plan import format_plan
    from langchain_parallel_reason.prompts import (
        STEP_MARKER,
        conclusion_cue,
        stage1_system_prompt,
        step_header,
    )
    from langchain_parallel_reason.schemas import Plan

    t0 = time.perf_counter()

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prompt = render_prompt(
        tokenizer, with_system(messages, stage1_system_prompt(config.max_branches))
    )
    plan = Plan.model_validate(
        {"preamble": preamble, "titles": list(titles)},
        context={"max_branches": max(config.max_branches, len(titles)), "max_title_chars": 200},
    )
    prefix = [*prompt, *encode(format_plan(plan)), *encode("\n")]
    n = len(titles)
    text_config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    ctx = int(getattr(text_config, "max_position_embeddings", None) or 1 << 30)
    # The pipeline's budget rule, so both stepped ways get the same per-step budget.
    left_tokens = config.max_tokens - plan_tokens
    per_step = max(
        1, min(config.step_max_tokens, left_tokens // (n + 1), (ctx - len(prefix)) // (n + 1))
    )
    params = SamplingParams(config.temperature, config.top_p, config.top_k)
    stop_ids = stop_token_ids(model, tokenizer)
    stops = (STEP_MARKER, *config.stop)

    # Steps open under the same rule as the pipeline's parallel branches (no marker, newline,
    # placeholder or EOS in their first tokens), so both ways write comparable steps.
    banned = [*step_opening_banned_ids(tokenizer), *stop_ids]
    opening = min(MIN_STEP_TOKENS, per_step // 2)
    cache = DynamicCache()
    pos = 0  # tokens in the cache
    feed = [*prefix, *encode(step_header(titles[0]))]
    bodies: list[str] = []
    generated = 0
    for k in range(n):
        result = drive(
            iter_decode(
                model,
                feed,
                cache,
                start=pos,
                max_new_tokens=per_step,
                params=params,
                seed=None if config.seed is None else config.seed + k,
                stop_token_ids=stop_ids,
                stop_strings=stops,
                tokenizer=tokenizer,
                suppress=SuppressFirst(banned, opening),
            )
        )
        tokens = result.token_ids
        generated += len(tokens)
        pos += len(feed)
        text, _ = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
        keep = _clean_prefix(tokenizer, tokens, text)
        crop_to(cache, pos + keep)
        pos += keep
        rest = text[len(tokenizer.decode(tokens[:keep], skip_special_tokens=True)) :]
        bodies.append(text.strip())
        glue = rest if text.endswith("\n") else rest + "\n"
        nxt = step_header(titles[k + 1]) if k + 1 < n else conclusion_cue()
        feed = encode(glue + nxt)

    budget = max(1, min(config.max_tokens - plan_tokens - generated, ctx - pos - len(feed)))
    result = drive(
        iter_decode(
            model,
            feed,
            cache,
            start=pos,
            max_new_tokens=budget,
            params=params,
            seed=config.seed,
            stop_token_ids=stop_ids,
            stop_strings=stops,
            tokenizer=tokenizer,
        )
    )
    generated += len(result.token_ids)
    text, _ = cut_at_stop(tokenizer.decode(result.token_ids, skip_special_tokens=True), stops)
    conclusion = text.strip()
    steps_md = "".join(f"**{t}**: {b}\n\n" for t, b in zip(titles, bodies, strict=True))
    head = f"{preamble.strip()}\n\n" if preamble.strip() else ""
    return StepsResult(
        content=head + steps_md + conclusion,
        conclusion=conclusion,
        step_texts=bodies,
        output_tokens=generated,
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------- one sample


@dataclass
class _Outcome:
    wall_s: float
    output_tokens: int
    correct: bool
    mode_used: str
    stage1_ok: bool | None = None
    plan_attempts: int = 0
    fallback: str | None = None
    tokens_per_forward: float | None = None
    final: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 4),
            "output_tokens": self.output_tokens,
            "tokens_per_s": round(self.output_tokens / self.wall_s, 3) if self.wall_s else None,
            "correct": self.correct,
            "mode_used": self.mode_used,
            "stage1_ok": self.stage1_ok,
            "plan_attempts": self.plan_attempts,
            "fallback": self.fallback,
            "tokens_per_forward": self.tokens_per_forward,
            "final": self.final[:_EXCERPT_CHARS],
        }


def _run_pipeline(model: Any, tokenizer: Any, task: Task, config: Any) -> tuple[Any, Any, float]:
    from langchain_parallel_reason.cli_ask import AnswerView
    from langchain_parallel_reason.pipeline import iter_answer

    view = AnswerView()
    messages = [{"role": "user", "content": task.prompt}]
    t = time.perf_counter()
    gen = iter_answer(model, tokenizer, messages, config)
    while True:
        try:
            view.feed(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    return result, view, time.perf_counter() - t


def _run_sample(
    model: Any, tokenizer: Any, task: Task, cfg: TaskBenchConfig, tick: Any
) -> dict[str, _Outcome]:
    """Answer `task` the three ways: sequential, parallel, then sequential_steps (needs the plan).

    `tick(way, done)` is called before (done False) and after (done True) each way.
    """
    out: dict[str, _Outcome] = {}
    stage1 = task.steps is None

    tick("sequential", False)
    result, view, wall = _run_pipeline(
        model, tokenizer, task, cfg.pipeline_config(task, "sequential")
    )
    out["sequential"] = _Outcome(
        wall,
        result.output_tokens,
        score_answer(task, view.final, result.content),
        result.report.mode_used,
        final=view.final.strip(),
    )
    tick("sequential", True)

    tick("parallel", False)
    par_config = cfg.pipeline_config(task, "parallel")
    result, view, wall = _run_pipeline(model, tokenizer, task, par_config)
    report = result.report
    out["parallel"] = _Outcome(
        wall,
        result.output_tokens,
        score_answer(task, view.final, result.content),
        report.mode_used,
        stage1_ok=(bool(view.titles) if stage1 else None),
        plan_attempts=report.plan_attempts,
        fallback=report.fallback_reason,
        tokens_per_forward=report.tokens_per_forward,
        final=view.final.strip(),
    )
    tick("parallel", True)

    tick("sequential_steps", False)
    if view.titles:
        plan_s = report.timings.get("plan", 0.0)
        plan_tokens = 0
        if stage1:
            from langchain_parallel_reason.plan import format_plan
            from langchain_parallel_reason.schemas import Plan

            plan = Plan(preamble=view.preamble, titles=view.titles)
            plan_tokens = len(tokenizer.encode(format_plan(plan), add_special_tokens=False))
        steps = decode_steps_sequentially(
            model,
            tokenizer,
            [{"role": "user", "content": task.prompt}],
            view.titles,
            par_config,
            preamble=view.preamble,
            plan_tokens=plan_tokens,
        )
        out["sequential_steps"] = _Outcome(
            plan_s + steps.seconds,
            plan_tokens + steps.output_tokens,
            score_answer(task, steps.conclusion, steps.content),
            "sequential_steps",
            stage1_ok=out["parallel"].stage1_ok,
            plan_attempts=report.plan_attempts,
            final=steps.conclusion,
        )
    else:
        # No plan validated: the stepped baseline has nothing to step through and would decode
        # plainly, exactly as the sequential way did; its figures are those.
        base = out["sequential"]
        out["sequential_steps"] = replace(
            base, stage1_ok=False, fallback="no valid plan: same as plain sequential"
        )
    tick("sequential_steps", True)
    return out


# ----------------------------------------------------------------------------- the run


def _warm_up(model: Any, tokenizer: Any) -> None:
    """One short sequential and one short parallel answer, untimed (first-call costs)."""
    from langchain_parallel_reason.pipeline import PipelineConfig, answer

    messages = [{"role": "user", "content": "Say hello."}]
    answer(model, tokenizer, messages, PipelineConfig(mode="sequential", max_tokens=4))
    answer(
        model,
        tokenizer,
        messages,
        PipelineConfig(mode="parallel", steps=("One", "Two"), max_tokens=32, step_max_tokens=8),
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summarize_way(outcomes: list[_Outcome]) -> dict[str, Any]:
    wall = sum(o.wall_s for o in outcomes)
    tokens = sum(o.output_tokens for o in outcomes)
    stage1 = [o.stage1_ok for o in outcomes if o.stage1_ok is not None]
    tpf = [o.tokens_per_forward for o in outcomes if o.tokens_per_forward is not None]
    return {
        "mean_wall_s": round(wall / len(outcomes), 4),
        "mean_output_tokens": round(tokens / len(outcomes), 2),
        "tokens_per_s": round(tokens / wall, 3) if wall else None,
        "accuracy": round(sum(o.correct for o in outcomes) / len(outcomes), 4),
        "stage1_format_ok": round(sum(stage1) / len(stage1), 4) if stage1 else None,
        "fallbacks": sum(o.fallback is not None for o in outcomes),
        "mean_tokens_per_forward": round(_mean(tpf), 3) if tpf else None,
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
        for base in ("sequential", "sequential_steps")
        for kind in ("wall", "tokens_per_s")
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

    Keys: run metadata (`task`, `samples`, `seed`, `model`, `device`, `dtype`, `torch_threads`,
    `machine`, `load_avg_start`, `load_avg_end`, `step_max_tokens`, `elapsed_s`) and `by_items`, one
    entry per N with `items`, `max_tokens`, `ways` (per way: `mean_wall_s`,
    `mean_output_tokens`, `tokens_per_s`, `accuracy`, `stage1_format_ok`, `fallbacks`,
    `mean_tokens_per_forward`), `speedup` (`wall_vs_sequential`, `tokens_per_s_vs_sequential`,
    `wall_vs_sequential_steps`, `tokens_per_s_vs_sequential_steps`) and `runs` (per sample).
    """
    import torch
    from tqdm.auto import tqdm

    from langchain_parallel_reason.bench.decode import _load_avg, machine_description

    param = next(model.parameters())
    load_start = _load_avg()
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
        _warm_up(model, tokenizer)
        for n in config.items:
            tasks = generate_tasks(config.task, n, config.samples, seed=config.seed)
            runs = []
            for i, task in enumerate(tasks):

                def tick(way: str, done: bool, n: int = n, i: int = i) -> None:
                    if done:
                        bar.update(1)
                    else:
                        bar.set_description(f"N={n} sample {i + 1}/{config.samples} {way}")

                outcomes = _run_sample(model, tokenizer, task, config, tick)
                runs.append(
                    {
                        "index": i,
                        "expected": task.expected or list(task.aspects),
                        **{way: outcomes[way].as_dict() for way in WAYS},
                        "_outcomes": outcomes,
                    }
                )
            ways = {way: _summarize_way([r["_outcomes"][way] for r in runs]) for way in WAYS}
            for r in runs:
                del r["_outcomes"]
            by_items.append(
                {
                    "items": n,
                    "max_tokens": config.answer_max_tokens(n),
                    "ways": ways,
                    "speedup": _speedups(ways),
                    "runs": runs,
                }
            )
    return {
        "task": config.task,
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
        "load_avg_end": _load_avg(),
        "elapsed_s": round(time.perf_counter() - started, 2),
        "by_items": by_items,
    }


# ----------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(result: dict[str, Any], console: Any = None) -> None:
    """Print one table per item count, plus the speedups, with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(file=sys.stdout, highlight=False)
    console.print(
        f"task {result['task']}, {result['samples']} samples, model {result['model']}, "
        f"{result['device']} {result['dtype']}, {result['torch_threads']} threads, load "
        f"{result['load_avg_start']} -> {result['load_avg_end']}",
        markup=False,
    )
    for entry in result["by_items"]:
        table = Table(title=f"N = {entry['items']} (max_tokens {entry['max_tokens']})")
        for col in ("way", "wall s", "tokens", "tok/s", "accuracy", "plan ok", "tok/fwd"):
            table.add_column(col, justify="left" if col == "way" else "right", no_wrap=True)
        for way in WAYS:
            w = entry["ways"][way]
            table.add_row(
                _WAY_LABELS[way],
                _fmt(w["mean_wall_s"], ".2f"),
                _fmt(w["mean_output_tokens"], ".1f"),
                _fmt(w["tokens_per_s"], ".1f"),
                _fmt(w["accuracy"], ".2f"),
                _fmt(w["stage1_format_ok"], ".2f"),
                _fmt(w["mean_tokens_per_forward"], ".2f"),
            )
        console.print(table)
        s = entry["speedup"]
        console.print(
            "parallel speedup: wall "
            f"{_fmt(s['wall_vs_sequential'], '.2f')}x vs plain, "
            f"{_fmt(s['wall_vs_sequential_steps'], '.2f')}x vs sequential steps; tokens/s "
            f"{_fmt(s['tokens_per_s_vs_sequential'], '.2f')}x vs plain, "
            f"{_fmt(s['tokens_per_s_vs_sequential_steps'], '.2f')}x vs sequential steps",
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
        ("wall_vs_sequential_steps", "wall time vs sequential steps"),
        ("tokens_per_s_vs_sequential_steps", "tokens/s vs sequential steps"),
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
    from langchain_parallel_reason.cli_options import add_threads_option, positive_int

    parser.add_argument("--task", choices=TASK_KINDS, default="retrieval", help="task kind")
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
    from langchain_parallel_reason.cli import add_server_options

    add_server_options(parser)


def run(args: argparse.Namespace) -> int:
    """The `bench tasks` command: validate, load the model, run, print; returns 0."""
    from langchain_parallel_reason.cli_ask import EMBEDDED_LABEL

    config = TaskBenchConfig(
        task=args.task,
        items=tuple(args.items),
        samples=args.samples,
        seed=args.seed,
        max_tokens=args.max_tokens,
        step_max_tokens=args.step_max_tokens,
    )
    if args.plot is not None:
        # Checked before the (long) run, not after it.
        if not args.plot.lower().endswith(".png"):
            msg = f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}"
            raise ValueError(msg)
        if importlib.util.find_spec("matplotlib") is None:
            raise RuntimeError(_NO_MATPLOTLIB)

    if args.base_url is not None:  # the three ways on a vLLM/SGLang server
        from langchain_parallel_reason.bench.remote import run_remote_task_bench
        from langchain_parallel_reason.cli import print_remote_result

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
