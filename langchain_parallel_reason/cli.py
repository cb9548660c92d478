"""Command line: `parallel-reason COMMAND ...` (also `python -m langchain_parallel_reason`).

Contract: `main(argv)` parses, runs one command and returns the exit status; it never lets an
exception escape. A failure prints one line `parallel-reason: error: ...` to stderr and returns
1 (usage errors: argparse's message and 2); `--debug` adds the traceback. Results go to stdout,
progress to stderr. Heavy imports (torch, transformers) happen inside the command handlers so
`--help` stays instant.

Adding a command: write `_add_<name>(subparsers)` that builds its parser and sets
`handler=<function(args) -> int>` with `set_defaults`, then list it in `_COMMANDS` (top level)
or `_BENCH_COMMANDS` (under `bench`).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from langchain_parallel_reason.cli_options import (
    add_server_options,
    add_threads_option,
    positive_int,
    print_remote_result,
)

__all__ = ["build_parser", "main"]

PROG = "parallel-reason"

_SubParsers = Any  # argparse's _SubParsersAction is private


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts, wherever they are written on the line."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without the flag must not reset one given before the subcommand.
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    return common


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model / --device: which model to load (shared by commands that run one)."""
    parser.add_argument(
        "--model",
        default=None,
        help="model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda (default: automatic)"
    )


# ----------------------------------------------------------------------------- bench decode


# Copies of bench.decode.ATTENTIONS / DTYPE_CHOICES (a test keeps them equal), so building the
# parser does not import torch.
_ATTENTIONS = ("auto", "split", "mask")
_DTYPE_CHOICES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def _attention_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in _ATTENTIONS]
    if not values or unknown or len(set(values)) != len(values):
        msg = f"expected one or more of {','.join(_ATTENTIONS)} separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values


def _add_bench_decode(subparsers: _SubParsers) -> None:
    parser = subparsers.add_parser(
        "decode",
        parents=[_common_options()],
        help="time N branches: sequential vs one-sequence parallel vs batch fork",
        description=(
            "Decode N branches of T greedy tokens after a P-token prefix three ways on one model "
            "(sequential, belt-mask parallel, batch of N prefix copies) and report median wall "
            "times, speedups and KV-cache bytes. Prefill is not timed."
        ),
    )
    parser.add_argument(
        "--branches", type=positive_int, default=8, metavar="N", help="branches (default 8)"
    )
    parser.add_argument(
        "--new-tokens",
        type=positive_int,
        default=64,
        metavar="T",
        help="T, tokens per branch (default 64)",
    )
    parser.add_argument(
        "--prefix-tokens",
        type=positive_int,
        default=800,
        metavar="P",
        help="P, prefix tokens (default 800)",
    )
    _add_model_options(parser)
    parser.add_argument(
        "--dtype",
        choices=_DTYPE_CHOICES,
        default="auto",
        help="auto (default): time a step in float32 and bfloat16, run each mode in the faster",
    )
    parser.add_argument(
        "--attention",
        type=_attention_list,
        default=("auto",),
        metavar="{auto,split,mask}[,...]",
        help="parallel attention layout; a comma list times each (the first is the headline)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        metavar="R",
        help="timed runs per mode (default 3)",
    )
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_server_options(parser)
    parser.set_defaults(handler=_run_bench_decode)


def _run_bench_decode(args: argparse.Namespace) -> int:
    if args.base_url is not None:  # N completions one after another vs at once, on the server
        from langchain_parallel_reason.bench.remote import run_remote_decode_bench

        result = run_remote_decode_bench(
            args.base_url,
            args.served_model,
            branches=args.branches,
            new_tokens=args.new_tokens,
            prefix_tokens=args.prefix_tokens,
            repeats=args.repeats,
        )
        print_remote_result(result, args.json)
        return 0
    from langchain_parallel_reason.bench.decode import (
        DecodeBenchConfig,
        render_table,
        run_decode_bench,
    )

    # Validate before the (slow) model load.
    config = DecodeBenchConfig(
        branches=args.branches,
        new_tokens=args.new_tokens,
        prefix_tokens=args.prefix_tokens,
        dtype=args.dtype,
        attention=args.attention,
        repeats=args.repeats,
        threads=args.threads,
    )
    from langchain_parallel_reason.runtime.threads import apply_threads

    apply_threads(args.threads)  # None: the cores this process may use
    from langchain_parallel_reason.loading import load_model_and_tokenizer

    progress = not args.no_progress
    # A fixed dtype is loaded directly; "auto" loads the default and casts per mode (so its
    # Linear weights stay plain: packed ones are bfloat16 for good).
    dtype = None if args.dtype == "auto" else args.dtype
    model, tokenizer = load_model_and_tokenizer(
        args.model, device=args.device, dtype=dtype, progress=progress, pack=dtype is not None
    )
    model_name = args.model or "embedded SmolLM2-135M-Instruct"
    result = run_decode_bench(model, tokenizer, config, model_name=model_name, progress=progress)
    if args.json:
        print(json.dumps(result))
    else:
        render_table(result)
    return 0


# ----------------------------------------------------------------------------- parser


def _add_bench(subparsers: _SubParsers) -> None:
    parser = subparsers.add_parser(
        "bench", parents=[_common_options()], help="benchmarks (decode speed, task quality)"
    )
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for add in _BENCH_COMMANDS:
        add(bench_sub)


# ----------------------------------------------------------------------------- ask, bench tasks


def _add_ask(subparsers: _SubParsers) -> None:
    from langchain_parallel_reason import cli_ask  # stdlib-only at import time

    parser = subparsers.add_parser(
        "ask",
        parents=[_common_options()],
        help="answer a question: plan, parallel steps (shown live), conclusion",
        description=(
            "Answer QUESTION on a local model: Stage 1 plans independent steps, Stage 2 decodes "
            "them in parallel in one sequence (shown side by side as they are written), Stage 3 "
            "writes the conclusion; then a short report. Falls back to plain decoding when the "
            "plan does not validate."
        ),
    )
    _add_model_options(parser)
    cli_ask.add_arguments(parser)
    parser.set_defaults(handler=cli_ask.run)


def _add_bench_module(
    subparsers: _SubParsers, name: str, module: str, help: str, description: str
) -> None:
    """A `bench NAME` command whose options and handler live in `bench/<module>.py`
    (`add_arguments(parser)` and `run(args)`; torch is imported by the handler only)."""
    import importlib

    bench = importlib.import_module(f"langchain_parallel_reason.bench.{module}")
    parser = subparsers.add_parser(
        name, parents=[_common_options()], help=help, description=description
    )
    _add_model_options(parser)
    bench.add_arguments(parser)
    parser.set_defaults(handler=bench.run)


def _add_bench_tasks(subparsers: _SubParsers) -> None:
    _add_bench_module(
        subparsers,
        "tasks",
        "tasks",
        "accuracy and speed on generated tasks: sequential vs stepped vs parallel",
        "Generate seeded retrieval, planning or multi-document tasks and answer each four "
        "ways on one model in one run, through the chat model: plain sequential, "
        "mode=\"stepped\" (the plan's steps written one after another, the paper's "
        "baseline), and parallel steps in one sequence with Stage 3 re-prefilling the steps "
        "or reusing their KV. Reports mean wall time, tokens, tokens/s, accuracy, plan "
        "success and score, Stage-3 times and speedups.",
    )


def _add_bench_questions(subparsers: _SubParsers) -> None:
    _add_bench_module(
        subparsers,
        "questions",
        "questions",
        "the model's own plans on a question set: validated, sensible, loops, conclusions",
        "Answer every question of a set (default: the built-in parallelizable questions) "
        "with the model's own plan, and count plans that validate and look sensible, steps "
        "still stuck in a loop, and answers left without a conclusion.",
    )


def _add_bench_profile(subparsers: _SubParsers) -> None:
    _add_bench_module(
        subparsers,
        "profile",
        "profile",
        "where a decode step's time goes at 1, 16 and 48 rows (torch.profiler)",
        "Profile greedy decode steps after a cached prefix (1 row: sequential decoding; N "
        "rows: N parallel branches in one sequence) and split each step into the model's "
        "Linear layers, lm_head, attention, cache writes, other ops, Python inside the "
        "forward, sampling and the decoder's own Python.",
    )


def _add_bench_busy(subparsers: _SubParsers) -> None:
    parser = subparsers.add_parser(
        "busy",
        parents=[_common_options()],
        help="one call idle vs with a core kept busy by another process (threading policy)",
        description=(
            "Time the same greedy sequential call through ChatParallelReason on an idle machine "
            "and while child processes keep cores busy; report medians and the slowdown."
        ),
    )
    _add_model_options(parser)
    parser.add_argument("--max-tokens", type=positive_int, default=64, metavar="T")
    parser.add_argument("--repeats", type=positive_int, default=3, metavar="R")
    parser.add_argument("--busy-cores", type=positive_int, default=1, metavar="C")
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.set_defaults(handler=_run_bench_busy)


def _run_bench_busy(args: argparse.Namespace) -> int:
    from langchain_parallel_reason.bench.busy import BusyBenchConfig, render_busy, run_busy_bench
    from langchain_parallel_reason.chat_models import ChatParallelReason

    config = BusyBenchConfig(args.max_tokens, args.repeats, args.busy_cores)
    llm = ChatParallelReason(
        model=args.model, device=args.device, num_threads=args.threads, progress=False
    )
    result = run_busy_bench(llm, config)
    if args.json:
        print(json.dumps(result))
    else:
        render_busy(result)
    return 0


def _rate(text: str) -> float:
    """argparse type: requests per second, a positive number or "inf"."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        msg = f"expected a positive number of requests per second or inf, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _add_bench_serve(subparsers: _SubParsers) -> None:
    from langchain_parallel_reason.bench.serve import KINDS  # no torch there

    parser = subparsers.add_parser(
        "serve",
        parents=[_common_options()],
        help="many requests on one engine: one at a time vs all at once (continuous batching)",
        description=(
            "Stream a mixed set (given steps, model plans, sequential answers, forced tool "
            "calls) through ChatParallelReason one at a time, then all at once; report vLLM's "
            "serving metrics (TTFT, TPOT, ITL, end-to-end latency: mean, median, p99; request "
            "and output throughput) and whether every output equals its one-at-a-time run. "
            "With --base-url the same set also runs through the remote path on that server, "
            "printed side by side."
        ),
    )
    _add_model_options(parser)
    parser.add_argument("--requests", type=positive_int, default=16, metavar="N")
    parser.add_argument(
        "--max-concurrency",
        "--concurrency",
        dest="max_concurrency",
        type=positive_int,
        default=16,
        metavar="C",
        help="most requests in flight in the all-at-once run (default 16)",
    )
    parser.add_argument(
        "--request-rate",
        type=_rate,
        default=float("inf"),
        metavar="R",
        help="requests per second of the all-at-once run, Poisson arrivals (default inf: "
        "all at the start)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--max-tokens", type=positive_int, default=96, metavar="T")
    parser.add_argument("--step-max-tokens", type=positive_int, default=24, metavar="T")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        metavar="KIND",
        help="the kinds of call the set cycles through: steps (3 given steps), planned, "
        "sequential, tool (default: all four; --kinds steps is the given-steps set)",
    )
    parser.add_argument(
        "--dtype",
        choices=_DTYPE_CHOICES,
        default="auto",
        help="weights dtype (default auto, as ChatParallelReason; float32 is batch-invariant)",
    )
    parser.add_argument(
        "--prefix-cache-mib",
        type=int,
        default=256,
        metavar="MIB",
        help="prompt-prefix KV kept across requests, in MiB (0 = off; default 256)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="K",
        help="runs of each phase, on each side; the median run is reported (default 1)",
    )
    add_threads_option(parser)
    add_server_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--plot", default=None, metavar="FILE.png", help="also sweep concurrency 1..32, draw it"
    )
    parser.set_defaults(handler=_run_bench_serve)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from langchain_parallel_reason.bench import serve
    from langchain_parallel_reason.chat_models import ChatParallelReason

    config = serve.ServeBenchConfig(
        args.requests,
        args.max_concurrency,
        args.max_tokens,
        args.step_max_tokens,
        args.request_rate,
        args.seed,
        args.repeats,
        tuple(args.kinds),
    )
    llm = ChatParallelReason(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        num_threads=args.threads,
        progress=False,
        max_concurrent_requests=max(32, args.max_concurrency),
        prefix_cache_bytes=max(0, args.prefix_cache_mib) * 2**20,
    )
    result = serve.run_serve_bench(llm, config)
    if args.plot:
        result["sweep"] = serve.sweep_concurrency(llm, config)
        serve.plot_sweep(result["sweep"], args.plot, f"bench serve, {result['dtype']}")
        print(f"plot written to {args.plot}", file=sys.stderr)
    remote = None
    if args.base_url is not None:  # the same set through the remote path, side by side
        server = ChatParallelReason(base_url=args.base_url, model=args.served_model)
        remote = serve.run_serve_bench(server, config)
    if args.json:
        if remote is not None:
            result = {
                "in_process": result,
                "remote": remote,
                "compare": serve.compare(result, remote),
            }
        print(json.dumps(result))
    elif remote is None:
        serve.render_serve(result)
    else:
        serve.render_side_by_side(result, remote)
    return 0


# Top-level commands and benchmarks under `bench`.
_COMMANDS: list[Callable[[_SubParsers], None]] = [_add_ask, _add_bench]
_BENCH_COMMANDS: list[Callable[[_SubParsers], None]] = [
    _add_bench_decode,
    _add_bench_tasks,
    _add_bench_busy,
    _add_bench_serve,
    _add_bench_questions,
    _add_bench_profile,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser: one subparser per entry of `_COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Parallel reasoning branches in one sequence, on local transformers models.",
    )
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    """The exception as one line: its first non-empty message line, or its type name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = type(exc).__name__
    return f"{lines[0]} ({name})" if lines else name


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
