"""Serving benchmark: the same mixed requests one at a time, then all at once, on one engine.

Contract: `run_serve_bench(llm, config)` builds `requests` calls that cycle through four kinds
(given steps, a model-written plan, a plain sequential answer, a forced tool call), runs them one
after another (`invoke`), then concurrently (`ainvoke`, at most `concurrency` in flight), and
returns a JSON-able dict: `serial_s`, `concurrent_s`, `throughput_ratio` (serial / concurrent
wall time for the same work), per-request `p50_latency_s` / `p95_latency_s` of the concurrent
run, `identical` (every concurrent output equals its serial run: text and tool calls), `dtype`,
`threads`, and the engine's rows per forward. `sweep_concurrency` reruns the concurrent phase at
several concurrency levels for a throughput plot. Everything goes through `ChatParallelReason`:
the engine under test is the product's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["ServeBenchConfig", "render_serve", "run_serve_bench", "sweep_concurrency"]

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
        concurrency: most calls in flight in the concurrent run.
        max_tokens, step_max_tokens: budgets of each call.
    """

    requests: int = 16
    concurrency: int = 16
    max_tokens: int = 96
    step_max_tokens: int = 24

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "max_tokens", "step_max_tokens"):
            if getattr(self, name) < 1:
                msg = f"{name} must be at least 1, got {getattr(self, name)}"
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
    return [
        (KINDS[i % len(KINDS)], runnables[KINDS[i % len(KINDS)]], _QUESTIONS[i % len(_QUESTIONS)])
        for i in range(count)
    ]


def _summary(message: Any) -> tuple[str, str, int]:
    calls = [(c["name"], sorted(c["args"].items())) for c in message.tool_calls]
    return message.content, repr(calls), message.usage_metadata["output_tokens"]


async def _concurrent(calls: list[tuple[str, Any, str]], concurrency: int) -> tuple[float, list]:
    gate = asyncio.Semaphore(concurrency)

    async def one(runnable: Any, question: str) -> tuple[Any, float]:
        async with gate:
            t = time.perf_counter()
            message = await runnable.ainvoke(question)
            return message, time.perf_counter() - t

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(r, q) for _, r, q in calls))
    return time.perf_counter() - t0, done


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
    """Serve the set one at a time, then concurrently; see the module docstring."""
    from langchain_parallel_reason.runtime.threads import default_threads

    calls = _calls(llm, config, config.requests)
    llm.invoke("Warm up.", mode="sequential", max_tokens=2)  # load the model, untimed
    engine = llm.get_engine()
    # Both phases start from an empty prefix cache: each reuses only what it prefilled itself
    # (the shared planning instructions), not the other phase's prompts.
    engine.clear_prefix_cache()
    first = engine.stats()
    serial, serial_latency = [], []
    t0 = time.perf_counter()
    for _, runnable, question in calls:
        t = time.perf_counter()
        serial.append(runnable.invoke(question))
        serial_latency.append(time.perf_counter() - t)
    serial_s = time.perf_counter() - t0
    engine.clear_prefix_cache()
    before = engine.stats()
    concurrent_s, done = asyncio.run(_concurrent(calls, config.concurrency))
    after = engine.stats()
    latency = [seconds for _, seconds in done]
    tokens = sum(m.usage_metadata["output_tokens"] for m in serial)
    steps = after["steps"] - before["steps"]
    model = engine.model
    identical = [_summary(a) == _summary(b) for a, (b, _) in zip(serial, done, strict=True)]
    # What batching could give at best on this machine: each phase's forwards priced as plain
    # forwards of as many tokens (no attention or engine overhead), serial over concurrent.
    cost = forward_cost(model)
    fixed, per_row = cost["fixed_s"], cost["per_row_s"]
    serial_steps, serial_rows = before["steps"] - first["steps"], before["rows"] - first["rows"]
    ideal_serial = fixed * serial_steps + per_row * serial_rows
    ideal_concurrent = fixed * steps + per_row * (after["rows"] - before["rows"])
    ideal = ideal_serial / ideal_concurrent if ideal_concurrent > 0 else None
    return {
        "requests": config.requests,
        "concurrency": config.concurrency,
        "kinds": {kind: sum(k == kind for k, _, _ in calls) for kind in KINDS},
        "serial_s": round(serial_s, 3),
        "concurrent_s": round(concurrent_s, 3),
        "throughput_ratio": round(serial_s / concurrent_s, 2),
        "ideal_ratio": None if ideal is None else round(ideal, 2),
        "of_ideal": None if not ideal else round(serial_s / concurrent_s / ideal, 2),
        "forward_cost": cost,
        "serial_forwards": serial_steps,
        "serial_tokens_per_s": round(tokens / serial_s, 1),
        "concurrent_tokens_per_s": round(tokens / concurrent_s, 1),
        "p50_latency_s": round(statistics.median(latency), 3),
        "p95_latency_s": round(_percentile(latency, 0.95), 3),
        "serial_p50_latency_s": round(statistics.median(serial_latency), 3),
        "identical": all(identical),
        "identical_count": sum(identical),
        "output_tokens": tokens,
        "forwards": steps,
        "mean_rows_per_forward": round((after["rows"] - before["rows"]) / steps, 1) if steps else 0,
        "prefix_hit_tokens": {
            "serial": before["prefix_cache_hit_tokens"] - first["prefix_cache_hit_tokens"],
            "concurrent": after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"],
        },
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": llm.num_threads or default_threads(),
        "modes": [m.response_metadata["parallel"]["mode_used"] for m in serial],
    }


def sweep_concurrency(
    llm: Any, config: ServeBenchConfig, levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
) -> list[dict[str, float]]:
    """Tokens per second at each concurrency level (``max(requests, level)`` calls each)."""
    points = []
    for level in levels:
        calls = _calls(llm, config, max(config.requests, level))
        seconds, done = asyncio.run(_concurrent(calls, level))
        tokens = sum(m.usage_metadata["output_tokens"] for m, _ in done)
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


def render_serve(result: dict[str, Any]) -> None:
    """Print the result as a few lines of text."""
    print(
        f"{result['requests']} requests ({result['kinds']}), {result['dtype']}, "
        f"{result['threads']} threads\n"
        f"one at a time {result['serial_s']} s, {result['concurrency']} at once "
        f"{result['concurrent_s']} s: throughput x{result['throughput_ratio']} "
        f"({result['mean_rows_per_forward']} rows per forward)\n"
        f"latency p50 {result['p50_latency_s']} s, p95 {result['p95_latency_s']} s "
        f"(alone p50 {result['serial_p50_latency_s']} s); identical: {result['identical']}"
    )
