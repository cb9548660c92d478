"""Busy-core benchmark: one library call on an idle machine vs with one core kept busy.

Contract: `run_busy_bench(llm, config)` times the same greedy call (`ChatParallelReason.invoke`,
the public path with the package's default threading policy) `repeats` times with nothing else
started by us, then again while a child process spins on one core, and returns a JSON-able dict
of medians and `slowdown = busy_s / idle_s`. Why: OpenMP threads that spin while they wait made
a 64-token answer about 30x slower under any other load (../shared/FACTS.md); the package now
lets idle threads sleep and sizes its thread count to the usable cores (runtime/threads.py).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["BusyBenchConfig", "render_busy", "run_busy_bench"]

_QUESTION = "Describe the sea in a few sentences."
# One core's worth of pure-Python spinning: the kind of load a neighbour process puts on a box.
_SPIN = "while True: pass"


@dataclass(frozen=True)
class BusyBenchConfig:
    """What to time.

    Attributes:
        max_tokens: new tokens of the call (sequential mode: one token per forward).
        repeats: timed calls per condition (median reported).
        busy_cores: child processes that each keep one core busy.
    """

    max_tokens: int = 64
    repeats: int = 3
    busy_cores: int = 1

    def __post_init__(self) -> None:
        for name in ("max_tokens", "repeats", "busy_cores"):
            if getattr(self, name) < 1:
                msg = f"{name} must be at least 1, got {getattr(self, name)}"
                raise ValueError(msg)


def _time_calls(llm: Any, config: BusyBenchConfig) -> tuple[list[float], int]:
    times, tokens = [], 0
    for _ in range(config.repeats):
        t = time.perf_counter()
        msg = llm.invoke(_QUESTION, mode="sequential", max_tokens=config.max_tokens)
        times.append(time.perf_counter() - t)
        tokens = msg.usage_metadata["output_tokens"]
    return times, tokens


def run_busy_bench(llm: Any, config: BusyBenchConfig) -> dict[str, Any]:
    """Time `llm`'s call idle, then with `busy_cores` spinning children; see the module doc."""
    import torch

    from langchain_parallel_reason.runtime.threads import default_threads

    llm.invoke(_QUESTION, mode="sequential", max_tokens=4)  # load + warm up, untimed
    idle, tokens = _time_calls(llm, config)
    spinners = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(config.busy_cores)]
    try:
        time.sleep(0.5)  # let the spinners reach full speed
        busy, _ = _time_calls(llm, config)
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    idle_s, busy_s = statistics.median(idle), statistics.median(busy)
    return {
        "idle_s": _seconds(idle_s),
        "busy_s": _seconds(busy_s),
        "slowdown": round(busy_s / idle_s, 2),
        "idle_runs_s": [_seconds(t) for t in idle],
        "busy_runs_s": [_seconds(t) for t in busy],
        "output_tokens": tokens,
        "busy_cores": config.busy_cores,
        "usable_cores": default_threads(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def render_busy(result: dict[str, Any]) -> None:
    """Print the result as two lines of text."""
    print(
        f"idle {result['idle_s']} s, {result['busy_cores']} core(s) busy {result['busy_s']} s: "
        f"slowdown {result['slowdown']}x ({result['output_tokens']} tokens, "
        f"{result['threads']} threads, OMP_WAIT_POLICY={result['omp_wait_policy']})"
    )


def _seconds(t: float) -> float:
    """``t`` to 4 significant digits: a millisecond call on a tiny model keeps its ratio
    (rounded to whole milliseconds, 3.4 and 5.2 ms read 0.003 and 0.005 s: 1.67x for 1.53x)."""
    return float(f"{t:.4g}")
