"""`parallel-reason ask`: answer one question on a local model and show the stages as they run.

Contract: `add_arguments(parser)` declares the options (the command registry in `cli.py` adds
`--model`/`--device`/`--debug`), `run(args)` answers and returns the exit status. In a terminal a
rich Live view shows the plan, one panel per step filling in side by side, then the conclusion;
when stdout is not a terminal the same content comes as plain, complete lines. `--json` prints one
JSON object instead. Errors propagate to `cli.main`, which prints them as one line.
`AnswerView` folds the pipeline's events into plan / steps / final answer. Heavy imports (torch,
transformers) happen in `run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from langchain_parallel_reason.cli_options import EMBEDDED_LABEL

__all__ = ["AnswerView", "add_arguments", "format_report", "run"]


# ----------------------------------------------------------------------------- events -> parts


@dataclass
class AnswerView:
    """The parts of an answer, folded from `pipeline.iter_answer` events as they arrive.

    Attributes:
        preamble, titles: the plan (empty when no plan was accepted).
        steps: the live text of each step; after Stage 2 the exact bodies of the merged steps.
        final: the conclusion of a stepped answer, or the whole text of a sequential one.
        fallback: why the answer fell back to sequential decoding, if it did.
        notes: other events worth showing (an out-of-memory retry of the steps).
        phase: "answer" (plain text), "steps" (Stage 2 running), "merged" (the next content
            delta is the merged steps), "conclusion".
    """

    preamble: str = ""
    titles: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    final: str = ""
    fallback: str | None = None
    notes: list[str] = field(default_factory=list)
    phase: str = "answer"
    _since_retry: set[int] = field(default_factory=set, init=False, repr=False)

    def feed(self, event: Any) -> None:
        """Fold one `ContentDelta`, `StepDelta` or stage event into the view."""
        from langchain_parallel_reason.runtime import events as ev

        match event:
            case ev.StepDelta():
                self.steps[event.step] += event.text
                self._since_retry.add(event.step)
            case ev.ContentDelta():
                self._content(event.text)
            case ev.PlanEvent():
                self.titles = list(event.titles)
                self.preamble = event.preamble.strip()
                self.steps = [""] * len(self.titles)
                self.phase = "steps"
            case ev.StepsRetryEvent():
                # Branches that were decoding when memory ran out are decoded again from scratch.
                for b in self._since_retry:
                    self.steps[b] = ""
                self._since_retry.clear()
                self.notes.append(f"steps retried {event.width} at a time (out of memory)")
            case ev.StepsDoneEvent():
                # The exact bodies of the merged steps (live text may have been reset by a retry).
                if len(event.bodies) == len(self.steps):
                    self.steps = list(event.bodies)
                self.phase = "merged"
            case ev.FallbackEvent():
                self.fallback = event.reason
                self.final = ""
                self.phase = "answer"

    def _content(self, text: str) -> None:
        if self.phase == "merged":
            # The pipeline yields the merged steps as one delta right after the steps_done event;
            # their bodies came with that event.
            self.phase = "conclusion"
        elif self.phase != "steps":  # in "steps", content is the preamble (already in the plan)
            self.final += text


# ----------------------------------------------------------------------------- rendering


def format_report(
    result: Any, view: AnswerView, speed: dict[str, float] | None = None, dtype: str = ""
) -> list[str]:
    """The short report after an answer: mode, steps, tokens per forward pass, stage times;
    with ``speed`` (`bench.costs.stepped_estimate`) the speed-up of the parallel steps, with
    ``dtype`` (e.g. ``"bfloat16 (auto: ...)"``) the weights dtype and batch invariance."""
    report = result.report
    mode = report.mode_used + (f" (attention {report.attention})" if report.attention else "")
    parts = [f"mode: {mode}"]
    if report.mode_used in ("parallel", "stepped"):
        parts.append(f"steps: {len(report.steps)}")
        if report.tokens_per_forward is not None:
            parts.append(
                f"tokens/forward: {report.tokens_per_forward:.2f} "
                f"({sum(report.branch_tokens)} step tokens in {report.decode_steps} passes)"
            )
        loops = report.branch_finish_reasons.count("repetition")
        if loops:
            parts.append(f"loops cut: {loops}")
    if report.plan_attempts:
        parts.append(f"plan attempts: {report.plan_attempts}")
    lines = [" | ".join(parts)]
    if report.route:
        lines.append(f"route: {report.route} ({report.route_reason})")
    order = ("plan", "steps", "conclusion", "sequential", "total")
    times = [(k, report.timings[k]) for k in order if k in report.timings]
    if times:
        lines.append("times: " + ", ".join(f"{k} {v:.2f} s" for k, v in times))
    conclusion = (
        f" (conclusion {report.conclusion_tokens})"
        if report.mode_used in ("parallel", "stepped")
        else ""
    )
    lines.append(
        f"tokens: prompt {result.input_tokens}, generated {result.output_tokens}{conclusion}"
    )
    if speed is not None:
        lines.append(
            f"speed-up: x{speed['speedup']:.2f} over the same steps one after another "
            f"(steps {speed['steps_s']:.2f} s vs about {speed['stepped_s']:.2f} s, priced from "
            f"forwards timed here: 1 row {speed['t1_ms']:.0f} ms, {speed['rows']} rows "
            f"{speed['tn_ms']:.0f} ms)"
        )
    if dtype:
        invariant = {True: "batch-invariant", False: "not batch-invariant", None: ""}
        tail = invariant[report.batch_invariant]
        lines.append(f"dtype: {dtype}" + (f", {tail}" if tail else ""))
    if report.fallback_reason:
        lines.append(f"fallback: {report.fallback_reason}")
    lines.extend(f"note: {note}" for note in (*view.notes, *report.notes))
    return lines


class _PlainRenderer:
    """Complete lines on a non-terminal stream: the plan, then each step's lines once Stage 2
    ended (its final body: a looping step's repeats are trimmed there, and printed lines cannot
    be taken back), then the answer's lines as they end."""

    def __init__(self, out: TextIO, stepped: bool = False) -> None:
        self.out = out
        self.steps_header = (
            "Steps (written one after another):" if stepped else "Steps (decoded in parallel):"
        )
        self.view = AnswerView()
        self.final_buf = ""
        self.final_header = False

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def feed(self, event: Any) -> None:
        view = self.view
        before = view.phase
        view.feed(event)
        from langchain_parallel_reason.runtime import events as ev

        match event:
            case ev.PlanEvent():
                self._write(f"Plan: {view.preamble}" if view.preamble else "Plan:")
                for i, title in enumerate(view.titles, start=1):
                    self._write(f"  {i}. {title}")
                self._write(self.steps_header)
            case ev.StepsRetryEvent():
                self._write(f"note: {view.notes[-1]}")
            case ev.StepsDoneEvent():
                for b, body in enumerate(view.steps):  # the bodies the event carried
                    for line in body.split("\n"):
                        self._step_line(b, line)
            case ev.FallbackEvent():
                self._write(f"Fallback to sequential decoding: {view.fallback}")
                self.final_buf = ""
                self.final_header = False
            case ev.ContentDelta() if before in ("answer", "conclusion"):
                # Content in the other phases is the preamble (printed with the plan) or the
                # merged steps (already printed line by line).
                self._final_text(event.text)

    def _step_line(self, b: int, line: str) -> None:
        if line.strip():
            self._write(f"[{b + 1} {self.view.titles[b]}] {line.strip()}")

    def _final_text(self, text: str) -> None:
        if not self.final_header:
            self._write("Conclusion:" if self.view.phase == "conclusion" else "Answer:")
            self.final_header = True
        self.final_buf += text
        *done, self.final_buf = self.final_buf.split("\n")
        for line in done:
            self._write(line)

    def close(self) -> None:
        if self.final_buf:
            self._write(self.final_buf)
            self.final_buf = ""


class _LiveView:
    """A rich renderable of the whole answer so far: plan, step panels side by side, answer."""

    def __init__(self, view: AnswerView, console: Any) -> None:
        self.view = view
        self.console = console

    def __rich__(self) -> Any:
        from rich.columns import Columns
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        view = self.view
        parts: list[Any] = []
        if view.titles:
            plan = Text("Plan: ", style="bold")
            plan.append(view.preamble or "")
            parts.append(plan)
            per_row = max(1, min(len(view.titles), 4))
            width = max(24, self.console.width // per_row - 1)
            done = view.phase in ("merged", "conclusion")
            panels = [
                Panel(
                    Text(text.strip() or "…"),
                    title=f"{i}. {title}",
                    title_align="left",
                    width=width,
                    border_style="green" if done else "cyan",
                )
                for i, (title, text) in enumerate(zip(view.titles, view.steps, strict=True), 1)
            ]
            parts.append(Columns(panels))
        if view.fallback:
            parts.append(Text(f"Fallback to sequential decoding: {view.fallback}", style="yellow"))
        if view.final or view.phase == "conclusion":
            label = "Conclusion" if view.phase == "conclusion" else "Answer"
            parts.append(Text(f"{label}:", style="bold"))
            parts.append(Text(view.final.strip()))
        if not parts:
            parts.append(Text("thinking…", style="dim"))
        return Group(*parts)


class _LiveRenderer:
    def __init__(self, console: Any) -> None:
        from rich.live import Live

        self.view = AnswerView()
        self.live = Live(
            _LiveView(self.view, console),
            console=console,
            refresh_per_second=8,
            vertical_overflow="visible",
        )
        self.live.start()

    def feed(self, event: Any) -> None:
        self.view.feed(event)

    def close(self) -> None:
        self.live.refresh()
        self.live.stop()


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `ask`'s own options on `parser` (the registry adds --model, --device, --debug)."""
    from langchain_parallel_reason.cli_options import add_threads_option, positive_int

    parser.add_argument("question", help="the question to answer")
    parser.add_argument(
        "--mode",
        choices=("auto", "parallel", "sequential", "stepped"),
        default="auto",
        help="auto (default): the model first chooses between a plan and a direct answer, "
        "and a plan's steps are decoded in parallel (sequential when it does not validate); "
        "parallel: always a plan, a fallback is reported; sequential: no plan; stepped: the "
        "paper's baseline, the plan's steps written one after another",
    )
    parser.add_argument(
        "--conclusion-kv",
        choices=("reprefill", "reuse"),
        default="reprefill",
        help="Stage 3: prefill the merged steps again (default), or reuse their KV",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        default=None,
        metavar="TITLE",
        help="give the step titles yourself (2 or more); Stage 1 is skipped",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=512,
        metavar="N",
        help="new tokens for the whole answer (default 512)",
    )
    parser.add_argument(
        "--step-max-tokens",
        type=positive_int,
        default=96,
        metavar="N",
        help="new tokens per parallel step (default 96)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 (default) is greedy"
    )
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        metavar="P",
        help="as in transformers' generate, per step (e.g. 1.2; default off)",
    )
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="as in transformers' generate, per step (default off)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
        default="auto",
        help="weights dtype; auto (default): bfloat16 on CUDA and where bf16 matmuls are "
        "measured faster on this CPU (AMX, AVX512-BF16), else float32; float32 is exact "
        "(batch-invariant)",
    )
    parser.add_argument(
        "--route-bias",
        type=float,
        default=None,
        metavar="B",
        help="added to the router's 'yes, plan' log-odds in mode auto (default 0.75)",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="answer on an OpenAI-compatible server (vLLM, SGLang), e.g. "
        "http://127.0.0.1:8000/v1; --model is then the served model name",
    )
    parser.add_argument(
        "--no-speedup",
        action="store_true",
        help="skip timing a few forwards after the answer to show the steps' speed-up",
    )
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _check_steps(steps: tuple[str, ...], max_branches: int) -> None:
    """Refuse unusable --steps before the model load, with the plan rule that they break."""
    from pydantic import ValidationError

    from langchain_parallel_reason.schemas import Plan

    try:
        Plan.model_validate(
            {"titles": list(steps)},
            context={"max_branches": max_branches, "max_title_chars": 200},
        )
    except ValidationError as e:
        reason = str(e.errors()[0]["msg"]).removeprefix("Value error, ")
        msg = f"--steps: {reason} (give 2 or more distinct titles without ':' or '####')"
        raise ValueError(msg) from None


def _config(args: argparse.Namespace) -> Any:
    from langchain_parallel_reason.call_settings import pipeline_config

    steps = tuple(args.steps) if args.steps else None
    if steps is not None:
        _check_steps(steps, max(6, len(steps)))
    return pipeline_config(
        {
            "mode": args.mode,
            "steps": steps,
            "max_branches": max(6, len(steps or ())),
            "max_tokens": args.max_tokens,
            "step_max_tokens": args.step_max_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
            "repetition_penalty": args.repetition_penalty,
            "no_repeat_ngram_size": args.no_repeat_ngram_size,
            "conclusion_kv": args.conclusion_kv,
            **({"route_bias": args.route_bias} if args.route_bias is not None else {}),
        }
    )


def run(args: argparse.Namespace) -> int:
    """Answer `args.question` and print it (see the module docstring); returns 0."""
    config = _config(args)  # validated before the slow model load
    from langchain_parallel_reason.runtime import Request, open_engine
    from langchain_parallel_reason.runtime.threads import apply_threads

    apply_threads(args.threads)  # None: the cores this process may use
    # The product's door: the engine that serves ChatParallelReason (local, or a server).
    if args.base_url is not None:
        engine = open_engine(args.model, base_url=args.base_url)
    else:
        engine = open_engine(
            args.model, device=args.device, dtype=args.dtype, name=args.model or EMBEDDED_LABEL
        )
    model = engine.model if args.base_url is None else None  # a server: no local dtype, timing
    messages = [{"role": "user", "content": args.question}]
    try:
        items = engine.stream(Request(messages, config, num_threads=args.threads))
        return _show(args, items, model)
    finally:
        if model is not None:
            engine.close()


def _dtype_label(args: argparse.Namespace, model: Any) -> str:
    """The model's dtype, and why when "auto" chose it: ``"bfloat16 (auto: CPU with AMX)"``."""
    from langchain_parallel_reason.loading import auto_dtype

    if model is None:
        return ""
    dtype = next(model.parameters()).dtype
    name = str(dtype).removeprefix("torch.")
    if args.dtype != "auto":
        return name
    choice = auto_dtype(next(model.parameters()).device)  # cached: no second measurement
    return f"{name} (auto: {choice.reason})" if choice.dtype == dtype else name


def _with_dtype(result: Any, model: Any) -> Any:
    """The answer with ``report.batch_invariant`` filled from the model's dtype."""
    import dataclasses

    if model is None:
        return result

    from langchain_parallel_reason.loading import batch_invariant

    invariant = batch_invariant(next(model.parameters()).dtype)
    report = result.report.model_copy(update={"batch_invariant": invariant})
    return dataclasses.replace(result, report=report)


def _speedup(args: argparse.Namespace, result: Any, model: Any) -> dict[str, float] | None:
    """The parallel steps' speed-up over the same steps one after another, priced from a few
    forwards timed now at 1 row and at the answer's rows per pass (about 0.5-1 s)."""
    from langchain_parallel_reason.bench.costs import (
        forward_seconds,
        rows_per_pass,
        stepped_estimate,
    )

    report = result.report
    if model is None or args.no_speedup:
        return None
    if report.mode_used != "parallel" or not report.decode_steps:
        return None
    rows = rows_per_pass(report)
    seconds = forward_seconds(model, tuple(sorted({1, rows})), context=result.input_tokens)
    speed = stepped_estimate(report, seconds)
    if speed is None:
        return None
    speed |= {"rows": rows, "t1_ms": seconds[1] * 1e3, "tn_ms": seconds[rows] * 1e3}
    return {k: round(v, 3) for k, v in speed.items()}


def _show(args: argparse.Namespace, gen: Any, model: Any) -> int:
    """Print the answer whose engine items ``gen`` yields (live, plain or JSON)."""

    if args.json:
        view = AnswerView()
        result = _with_dtype(_consume(gen, view.feed), model)
        out = _json_result(args, result, view)
        out["dtype"] = _dtype_label(args, model)
        out["speedup"] = _speedup(args, result, model)
        sys.stdout.write(json.dumps(out) + "\n")
        return 0

    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False)
    renderer: Any = (
        _LiveRenderer(console)
        if console.is_terminal
        else _PlainRenderer(sys.stdout, stepped=args.mode == "stepped")
    )
    try:
        result = _with_dtype(_consume(gen, renderer.feed), model)
    finally:
        renderer.close()
    speed = _speedup(args, result, model)
    lines = ["---", *format_report(result, renderer.view, speed, _dtype_label(args, model))]
    if console.is_terminal:
        for line in lines:
            console.print(line, style="dim", markup=False)
    else:
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _consume(items: Any, sink: Any) -> Any:
    """Feed every event of the engine's `items` to `sink`; return the answer (``"done"``)."""
    for kind, value in items:
        if kind == "done":
            return value
        sink(value)
    msg = "the engine ended without an answer"  # unreachable: the stream ends on "done"
    raise RuntimeError(msg)


def _json_result(args: argparse.Namespace, result: Any, view: AnswerView) -> dict[str, Any]:
    return {
        "model": args.model or EMBEDDED_LABEL,
        "content": result.content,
        "conclusion": view.final.strip(),
        "steps": [
            {"title": title, "text": text.strip()}
            for title, text in zip(view.titles, view.steps, strict=True)
        ]
        if result.report.mode_used in ("parallel", "stepped")
        else [],
        "report": result.report.model_dump(),
        "usage": {
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
            "total_tokens": result.input_tokens + result.output_tokens,
        },
    }
