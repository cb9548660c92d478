"""Serving benchmark: the same mixed requests one at a time, then all at once, on one engine.

Contract: `run_serve_bench(llm, config)` builds `requests` calls that cycle through four kinds
(given steps, a model-written plan, a plain sequential answer, a forced tool call), streams them
one after another, then all at once (arrivals at `request_rate` per second, Poisson, or all at
the start when infinite; at most `max_concurrency` in flight), and returns a JSON-able dict.
Its top-level serving metrics are those of the all-at-once run, named as vLLM's
``benchmark_serving`` names them: ``duration``, ``completed``, ``total_input_tokens``,
``total_output_tokens``, ``request_throughput``, ``output_throughput``,
``total_token_throughput``, and ``mean_/median_/std_/p99_`` of ``ttft_ms`` (time to the first
streamed text), ``tpot_ms`` (per output token after the first), ``itl_ms`` (between streamed
chunks) and ``e2el_ms`` (end to end); ``one_at_a_time`` holds the same for the serial run. Also:
`serial_s`, `concurrent_s`, `throughput_ratio` (serial / concurrent wall time for the same work),
`identical` (every concurrent output equals its serial run: text and tool calls), `dtype`,
`repeats` with every run's wall time (`serial_runs_s`, `concurrent_runs_s`; the metrics are
those of each phase's median run),
`batch_invariant`, `threads`, and on a local engine its rows per forward and a cost model.
Everything goes through `ChatParallelReason` (local or `base_url`): the engine under test is
the product's. `sweep_concurrency` reruns the concurrent phase at several levels for a plot.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ServeBenchConfig",
    "render_serve",
    "render_side_by_side",
    "run_serve_bench",
    "serving_metrics",
    "sweep_concurrency",
]

KINDS = ("steps", "planned", "sequential", "tool")

_QUESTIONS = (
    "Compare tea and coffee.",
    "Plan a weekend in Lisbon.",
    "Compare trains and planes for a 500 km trip.",
    "How should a small team choose a database?",
    "Compare cats and dogs as pets.",
    "What matters when buying a laptop?",
    "Compare renting and buying a home.",
    "How do I prepare for a job interview?",
)
_STEPS = ["Cost", "Comfort", "Time"]


def _multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@dataclass(frozen=True)
class ServeBenchConfig:
    """What to serve.

    Attributes:
        requests: calls in the set (cycling through KINDS and the questions).
        max_concurrency: most calls in flight in the all-at-once run.
        max_tokens, step_max_tokens: budgets of each call.
        request_rate: arrivals per second of the all-at-once run (a Poisson process seeded
            with `seed`); ``math.inf`` (default) sends every request at the start.
        seed: seed of the arrival times.
        repeats: runs of each phase; the reported run of a phase is its median by wall time
            (runs on a shared machine vary by 10-30%).
        kinds: the kinds of call the set cycles through (a subset of KINDS, in that order;
            ``("steps",)`` is the given-steps set).
    """

    requests: int = 16
    max_concurrency: int = 16
    max_tokens: int = 96
    step_max_tokens: int = 24
    request_rate: float = math.inf
    seed: int = 0
    repeats: int = 1
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.kinds if kind not in KINDS]
        if unknown or not self.kinds:
            msg = f"kinds must be some of {', '.join(KINDS)}; got {list(self.kinds)}"
            raise ValueError(msg)
        for name in ("requests", "max_concurrency", "max_tokens", "step_max_tokens", "repeats"):
            if getattr(self, name) < 1:
                msg = f"{name} must be at least 1, got {getattr(self, name)}"
                raise ValueError(msg)
        if not self.request_rate > 0:
            msg = f"request_rate must be positive (inf: all at once), got {self.request_rate}"
            raise ValueError(msg)


def _calls(llm: Any, config: ServeBenchConfig, count: int) -> list[tuple[str, Any, str]]:
    """(kind, runnable, question) per call."""
    base = llm.bind(max_tokens=config.max_tokens, step_max_tokens=config.step_max_tokens)
    runnables = {
        "steps": base.bind(steps=_STEPS),
        "planned": base.bind(mode="parallel"),
        "sequential": base.bind(mode="sequential"),
        "tool": llm.bind_tools([_multiply], tool_choice="any").bind(max_tokens=48),
    }
    kinds = [config.kinds[i % len(config.kinds)] for i in range(count)]
    return [
        (kind, runnables[kind], _QUESTIONS[i % len(_QUESTIONS)]) for i, kind in enumerate(kinds)
    ]


@dataclass
class _Record:
    """One streamed request: what it answered and when its chunks came (seconds)."""

    summary: tuple[str, str]  # (text, tool calls): what `identical` compares
    input_tokens: int
    output_tokens: int
    ttft: float
    itl: list[float]
    e2el: float
    mode: str | None


async def _stream_one(runnable: Any, question: str) -> _Record:
    """Stream one call; time its first text (or tool-call) chunk and the gaps between chunks."""
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    total = None
    mode = None
    async for chunk in runnable.astream(question):
        now = time.perf_counter()
        if chunk.content or chunk.tool_call_chunks:
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
        total = chunk if total is None else total + chunk
        mode = (chunk.response_metadata.get("parallel") or {}).get("mode_used", mode)
    end = time.perf_counter()
    usage = (total.usage_metadata if total is not None else None) or {}
    calls = [(c["name"], sorted(c["args"].items())) for c in (total.tool_calls if total else [])]
    return _Record(
        summary=(str(total.content) if total is not None else "", repr(calls)),
        input_tokens=int(usage.get("input_tokens", 0)),
        output_tokens=int(usage.get("output_tokens", 0)),
        ttft=(first if first is not None else end) - start,
        itl=gaps,
        e2el=end - start,
        mode=mode,
    )


def _arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds after the start): all 0 at an infinite rate, else Poisson."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(count):
        times.append(t)
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return times


async def _serve(
    calls: list[tuple[str, Any, str]], rate: float, max_concurrency: int, seed: int = 0
) -> tuple[float, list[_Record]]:
    """Stream every call, sent at its arrival time, at most `max_concurrency` in flight."""
    gate = asyncio.Semaphore(max_concurrency)

    async def one(runnable: Any, question: str, at: float) -> _Record:
        await asyncio.sleep(at)
        async with gate:
            return await _stream_one(runnable, question)

    t0 = time.perf_counter()
    arrivals = _arrivals(len(calls), rate, seed)
    done = await asyncio.gather(
        *(one(r, q, at) for (_, r, q), at in zip(calls, arrivals, strict=True))
    )
    return time.perf_counter() - t0, list(done)


def _stats_ms(name: str, seconds: list[float]) -> dict[str, float]:
    """``mean_/median_/std_/p99_<name>_ms`` of `seconds` (zeros when there are none)."""
    ms = [s * 1e3 for s in seconds] or [0.0]
    return {
        f"mean_{name}_ms": round(statistics.fmean(ms), 2),
        f"median_{name}_ms": round(statistics.median(ms), 2),
        f"std_{name}_ms": round(statistics.pstdev(ms), 2),
        f"p99_{name}_ms": round(_percentile(ms, 0.99), 2),
    }


def serving_metrics(
    records: list[Any], duration: float, rate: float, max_concurrency: int
) -> dict[str, Any]:
    """vLLM ``benchmark_serving``'s summary of one run: throughputs and latency statistics.

    TPOT of a request is ``(e2el - ttft) / (output_tokens - 1)`` (requests of one token are
    left out, as vLLM does); ITL is the gap between streamed chunks, which here can carry
    several tokens (a parallel step's chunk, a prefilled block), so ITL counts chunks, not
    tokens.
    """
    inputs = sum(r.input_tokens for r in records)
    outputs = sum(r.output_tokens for r in records)
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in records if r.output_tokens > 1]
    return {
        "duration": round(duration, 3),
        "completed": len(records),
        "request_rate": rate if math.isfinite(rate) else "inf",
        "max_concurrency": max_concurrency,
        "total_input_tokens": inputs,
        "total_output_tokens": outputs,
        "request_throughput": round(len(records) / duration, 3),
        "output_throughput": round(outputs / duration, 2),
        "total_token_throughput": round((inputs + outputs) / duration, 2),
        **_stats_ms("ttft", [r.ttft for r in records]),
        **_stats_ms("tpot", tpot),
        **_stats_ms("itl", [gap for r in records for gap in r.itl]),
        **_stats_ms("e2el", [r.e2el for r in records]),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def forward_cost(model: Any, rows: tuple[int, ...] = (1, 4, 16, 64), context: int = 256) -> dict:
    """A cost model of one plain forward on this machine: ``t(r) = fixed_s + per_row_s * r``
    fitted (least squares) to medians of 5 forwards of ``r`` new tokens after ``context``
    cached ones. Run it while the model is idle (the engine has nothing to do)."""
    import torch
    from transformers.cache_utils import DynamicCache

    from langchain_parallel_reason.decoding.cache import crop_to
    from langchain_parallel_reason.decoding.sequential import forward_tokens

    device = model.get_input_embeddings().weight.device
    cache = DynamicCache()
    ids = torch.arange(100, 100 + context + max(rows), device=device) % 1000
    times = []
    with torch.inference_mode():
        forward_tokens(model, ids[:context], cache, 0)
        for r in rows:
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                forward_tokens(model, ids[context : context + r], cache, context)
                runs.append(time.perf_counter() - t)
                crop_to(cache, context)
            times.append(statistics.median(runs))
    fit = statistics.linear_regression(rows, times)  # least squares
    return {
        "rows": list(rows),
        "seconds": [round(t, 4) for t in times],
        "fixed_s": round(max(0.0, fit.intercept), 4),
        "per_row_s": round(fit.slope, 5),
    }


def run_serve_bench(llm: Any, config: ServeBenchConfig) -> dict[str, Any]:
    """Serve the set one at a time, then all at once; see the module docstring."""
    from langchain_parallel_reason.runtime.threads import default_threads

    calls = _calls(llm, config, config.requests)
    llm.invoke("Warm up.", mode="sequential", max_tokens=2)  # load the model, untimed
    engine = llm.get_engine()
    local = llm.base_url is None
    # Every run of both phases starts from an empty prefix cache (`_runs`): each reuses only
    # what it prefilled itself (the shared planning instructions), not another run's prompts.
    first = engine.stats()
    serial_runs = _runs(engine, local, config.repeats, lambda: _serve(calls, math.inf, 1))
    before = engine.stats()
    concurrent_runs = _runs(
        engine,
        local,
        config.repeats,
        lambda: _serve(calls, config.request_rate, config.max_concurrency, config.seed),
    )
    after = engine.stats()
    (serial_s, serial), (concurrent_s, done) = _median(serial_runs), _median(concurrent_runs)
    latency = [r.e2el for r in done]
    tokens = sum(r.output_tokens for r in serial)
    identical = [a.summary == b.summary for a, b in zip(serial, done, strict=True)]
    result: dict[str, Any] = {
        "requests": config.requests,
        "kinds": {kind: sum(k == kind for k, _, _ in calls) for kind in KINDS},
        **serving_metrics(done, concurrent_s, config.request_rate, config.max_concurrency),
        "one_at_a_time": serving_metrics(serial, serial_s, math.inf, 1),
        "serial_s": round(serial_s, 3),
        "concurrent_s": round(concurrent_s, 3),
        "throughput_ratio": round(serial_s / concurrent_s, 2),
        "serial_tokens_per_s": round(tokens / serial_s, 1),
        "concurrent_tokens_per_s": round(sum(r.output_tokens for r in done) / concurrent_s, 1),
        "p50_latency_s": round(statistics.median(latency), 3),
        "p95_latency_s": round(_percentile(latency, 0.95), 3),
        "serial_p50_latency_s": round(statistics.median(r.e2el for r in serial), 3),
        "identical": all(identical),
        "identical_count": sum(identical),
        "output_tokens": tokens,
        "modes": [r.mode for r in serial],
        "repeats": config.repeats,
        "serial_runs_s": [round(t, 3) for t, _ in serial_runs],
        "concurrent_runs_s": [round(t, 3) for t, _ in concurrent_runs],
    }
    if not local:
        return result | {"engine": "remote", "base_url": llm.base_url}
    steps = (after["steps"] - before["steps"]) // config.repeats  # per run
    model = engine.model
    # What batching could give at best on this machine: each phase's forwards priced as plain
    # forwards of as many tokens (no attention or engine overhead), serial over concurrent.
    cost = forward_cost(model)
    fixed, per_row = cost["fixed_s"], cost["per_row_s"]
    serial_steps = (before["steps"] - first["steps"]) // config.repeats
    serial_rows = (before["rows"] - first["rows"]) / config.repeats
    rows = (after["rows"] - before["rows"]) / config.repeats
    ideal_serial = fixed * serial_steps + per_row * serial_rows
    ideal_concurrent = fixed * steps + per_row * rows
    ideal = ideal_serial / ideal_concurrent if ideal_concurrent > 0 else None
    from langchain_parallel_reason.loading import batch_invariant

    dtype = next(model.parameters()).dtype
    return result | {
        "engine": "in-process",
        "ideal_ratio": None if ideal is None else round(ideal, 2),
        "of_ideal": None if not ideal else round(serial_s / concurrent_s / ideal, 2),
        "forward_cost": cost,
        "serial_forwards": serial_steps,
        "forwards": steps,
        "mean_rows_per_forward": round(rows / steps, 1) if steps else 0,
        "prefix_hit_tokens": {  # per run
            "serial": (before["prefix_cache_hit_tokens"] - first["prefix_cache_hit_tokens"])
            // config.repeats,
            "concurrent": (after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"])
            // config.repeats,
        },
        "dtype": str(dtype).removeprefix("torch."),
        "batch_invariant": batch_invariant(dtype),
        "threads": llm.num_threads or default_threads(),
    }


def _runs(engine: Any, local: bool, repeats: int, serve: Any) -> list[tuple[float, list]]:
    """``repeats`` runs of one phase, each from an empty prefix cache on a local engine (a run
    reuses only what it prefilled itself, not an earlier run's prompts)."""
    runs = []
    for _ in range(repeats):
        if local:
            engine.clear_prefix_cache()
        runs.append(asyncio.run(serve()))
    return runs


def _median(runs: list[tuple[float, list]]) -> tuple[float, list]:
    """The run of median wall time (the lower one of the middle two for an even count)."""
    return sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]


def sweep_concurrency(
    llm: Any, config: ServeBenchConfig, levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
) -> list[dict[str, float]]:
    """Tokens per second at each concurrency level (``max(requests, level)`` calls each)."""
    points = []
    for level in levels:
        calls = _calls(llm, config, max(config.requests, level))
        seconds, done = asyncio.run(_serve(calls, math.inf, level))
        tokens = sum(r.output_tokens for r in done)
        points.append(
            {
                "concurrency": level,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1),
            }
        )
    return points


def plot_sweep(points: list[dict[str, float]], path: str, title: str) -> None:
    """Draw tokens/s against concurrency to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["concurrency"] for p in points]
    ax.plot(xs, [p["tokens_per_s"] for p in points], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s (all requests)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_ROWS = (
    ("completed", "Successful requests", "{}"),
    ("duration", "Benchmark duration (s)", "{:.2f}"),
    ("total_output_tokens", "Total generated tokens", "{}"),
    ("request_throughput", "Request throughput (req/s)", "{:.3f}"),
    ("output_throughput", "Output token throughput (tok/s)", "{:.1f}"),
    ("mean_ttft_ms", "Mean TTFT (ms)", "{:.0f}"),
    ("median_ttft_ms", "Median TTFT (ms)", "{:.0f}"),
    ("p99_ttft_ms", "P99 TTFT (ms)", "{:.0f}"),
    ("mean_tpot_ms", "Mean TPOT (ms)", "{:.1f}"),
    ("median_tpot_ms", "Median TPOT (ms)", "{:.1f}"),
    ("p99_tpot_ms", "P99 TPOT (ms)", "{:.1f}"),
    ("mean_itl_ms", "Mean ITL (ms, per chunk)", "{:.1f}"),
    ("median_itl_ms", "Median ITL (ms, per chunk)", "{:.1f}"),
    ("p99_itl_ms", "P99 ITL (ms, per chunk)", "{:.1f}"),
    ("mean_e2el_ms", "Mean E2E latency (ms)", "{:.0f}"),
    ("median_e2el_ms", "Median E2E latency (ms)", "{:.0f}"),
    ("p99_e2el_ms", "P99 E2E latency (ms)", "{:.0f}"),
)


def _table(columns: dict[str, dict[str, Any]]) -> list[str]:
    """vLLM's result lines, one column per named run."""
    lines = [f"{'':<34}" + "".join(f"{name:>22}" for name in columns)]
    for key, label, form in _ROWS:
        cells = "".join(f"{form.format(run[key]):>22}" for run in columns.values())
        lines.append(f"{label:<34}{cells}")
    return lines


def _columns(result: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    rate = result["request_rate"]
    return {
        f"{prefix}one at a time": result["one_at_a_time"],
        f"{prefix}{result['max_concurrency']} at once"
        + ("" if rate == "inf" else f", {rate}/s"): result,
    }


def render_serve(result: dict[str, Any]) -> None:
    """Print the run as vLLM's benchmark prints it: one column one at a time, one at once."""
    where = result.get("dtype", result.get("base_url", ""))
    print(f"{result['requests']} requests ({result['kinds']}), {result['engine']}, {where}")
    print("\n".join(_table(_columns(result))))
    extra = f" ({result['mean_rows_per_forward']} rows per forward)" if "forwards" in result else ""
    print(
        f"throughput x{result['throughput_ratio']} at once over one at a time{extra}; "
        f"identical: {result['identical']} ({result['identical_count']}/{result['requests']})"
    )


def compare(local: dict[str, Any], remote: dict[str, Any]) -> dict[str, Any]:
    """In-process against remote on the same set: wall-time ratios (in-process / remote; below
    1 the in-process engine is faster) and whether both did the same work. Plans differ with
    the numerics (bfloat16 here, float32 on a server), so a request may take the parallel path
    on one side and fall back to plain decoding on the other: ``modes_differ`` counts those,
    and the output tokens say how much each side wrote."""
    modes = list(zip(local["modes"], remote["modes"], strict=True))
    return {
        "wall_ratio_one_at_a_time": round(local["serial_s"] / remote["serial_s"], 2),
        "wall_ratio_at_once": round(local["concurrent_s"] / remote["concurrent_s"], 2),
        "modes_differ": sum(a != b for a, b in modes),
        "parallel_requests": {
            "in_process": sum(a == "parallel" for a, _ in modes),
            "remote": sum(b == "parallel" for _, b in modes),
        },
        "output_tokens": {"in_process": local["output_tokens"], "remote": remote["output_tokens"]},
    }


def render_side_by_side(local: dict[str, Any], remote: dict[str, Any]) -> None:
    """The same request set in-process and through the remote path, column by column."""
    print(
        f"{local['requests']} requests ({local['kinds']}); in-process {local['dtype']}, "
        f"remote {remote['base_url']}"
    )
    columns = _columns(local, "local, ") | _columns(remote, "remote, ")
    print("\n".join(_table(columns)))
    for name, run in (("in-process", local), ("remote", remote)):
        print(
            f"{name}: x{run['throughput_ratio']} at once over one at a time; identical: "
            f"{run['identical']} ({run['identical_count']}/{run['requests']})"
        )
    both = compare(local, remote)
    print(
        f"in-process / remote wall time: {both['wall_ratio_one_at_a_time']} one at a time, "
        f"{both['wall_ratio_at_once']} at once; parallel path taken by "
        f"{both['parallel_requests']['in_process']} / {both['parallel_requests']['remote']} "
        f"requests, output tokens {both['output_tokens']['in_process']} / "
        f"{both['output_tokens']['remote']}"
        + (
            f" ({both['modes_differ']} requests took another path: not the same work)"
            if both["modes_differ"]
            else ""
        )
    )
