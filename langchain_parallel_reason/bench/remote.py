"""Benchmarks on an OpenAI-compatible server (vLLM, SGLang): `bench decode|tasks --base-url`.

Contract: ``run_remote_decode_bench`` times N completions of T tokens after one P-token prefix,
sent one after another vs all at once; ``run_remote_task_bench`` answers generated tasks three
ways on the server through ``RemoteEngine``: plain (one completion), mode "stepped" (the
paper's baseline: each step continues the prefix and the earlier steps, then the conclusion)
and mode "parallel" (all steps at once). Both read the server's prefix-cache counters
(``/metrics``, vLLM) and return JSON-able dicts. Nothing here loads a model.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import sys
import time
from typing import Any

import httpx

from langchain_parallel_reason.bench.task_gen import generate_tasks, score_answer
from langchain_parallel_reason.call_settings import pipeline_config
from langchain_parallel_reason.runtime import open_engine
from langchain_parallel_reason.runtime.base import Request
from langchain_parallel_reason.runtime.events import StepsDoneEvent

__all__ = ["prefix_cache_counters", "run_remote_decode_bench", "run_remote_task_bench"]

_FILLER = (
    "The river runs past the old mill, under the stone bridge and into the valley, where "
    "farmers grow wheat and barley and keep bees at the edge of the forest. "
)


def prefix_cache_counters(base_url: str) -> dict[str, float]:
    """vLLM's prefix-cache hit and query token counters (zeros when the server has none)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        text = httpx.get(f"{root}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {"hits": 0.0, "queries": 0.0}
    out = {"hits": 0.0, "queries": 0.0}
    for line in text.splitlines():
        for key, name in (
            ("hits", "vllm:prefix_cache_hits_total"),
            ("queries", "vllm:prefix_cache_queries_total"),
        ):
            if line.startswith(name):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def _served_model(base_url: str, model: str | None) -> str:
    if model:
        return model
    cards = httpx.get(f"{base_url.rstrip('/')}/models", timeout=10).json()["data"]
    return str(cards[0]["id"])


def _chat(client: httpx.Client, base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"{base_url.rstrip('/')}/chat/completions", json=body)
    response.raise_for_status()
    return response.json()


def run_remote_decode_bench(
    base_url: str,
    model: str | None = None,
    *,
    branches: int = 8,
    new_tokens: int = 64,
    prefix_tokens: int = 800,
    repeats: int = 3,
) -> dict[str, Any]:
    """N completions of exactly T tokens after one ~P-token prefix: one after another vs at once.

    Greedy, EOS ignored, so both ways decode the same number of tokens. Each repeat uses a fresh
    prefix (a new first line), so the first completion of a way always prefills it.
    """
    model = _served_model(base_url, model)
    filler = _FILLER * max(1, prefix_tokens // 38)  # about 38 tokens per filler sentence

    def body(run: int, b: int) -> dict[str, Any]:
        messages = [{"role": "user", "content": f"[run {run}] {filler}\nDescribe it."}]
        return {
            "model": model,
            "messages": [*messages, {"role": "assistant", "content": f"####Part {b + 1}:"}],
            "continue_final_message": True,
            "add_generation_prompt": False,
            "max_tokens": new_tokens,
            "min_tokens": new_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
        }

    times: dict[str, list[float]] = {"sequential": [], "parallel": []}
    hits: dict[str, float] = {"sequential": 0.0, "parallel": 0.0}
    tokens = branches * new_tokens
    with (
        httpx.Client(timeout=600) as client,
        concurrent.futures.ThreadPoolExecutor(branches) as pool,
    ):
        _chat(client, base_url, {**body(-1, 0), "max_tokens": 4, "min_tokens": 0})  # warm-up
        for r in range(repeats):
            for way in ("sequential", "parallel"):
                run = 2 * r + (way == "parallel")
                before = prefix_cache_counters(base_url)["hits"]
                t = time.perf_counter()
                if way == "sequential":
                    outs = [_chat(client, base_url, body(run, b)) for b in range(branches)]
                else:
                    outs = list(
                        pool.map(
                            lambda b, run=run: _chat(client, base_url, body(run, b)),
                            range(branches),
                        )
                    )
                times[way].append(time.perf_counter() - t)
                hits[way] += prefix_cache_counters(base_url)["hits"] - before
                done = sum(o["usage"]["completion_tokens"] for o in outs)
                if done != tokens:
                    msg = f"the server decoded {done} tokens, expected {tokens} (ignore_eos unsupported?)"
                    raise RuntimeError(msg)
    med = {way: statistics.median(v) for way, v in times.items()}
    return {
        "base_url": base_url,
        "model": model,
        "branches": branches,
        "new_tokens": new_tokens,
        "prefix_tokens_approx": prefix_tokens,
        "repeats": repeats,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in med.items()},
        "speedup": round(med["sequential"] / med["parallel"], 2),
        "prefix_cache_hit_tokens": hits,
        "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }


def run_remote_task_bench(
    base_url: str,
    model: str | None,
    task_config: Any,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Generated tasks (``bench.tasks.TaskBenchConfig``) three ways on the server.

    Only tasks with given steps (retrieval, multidoc: one step per item) are run: the
    comparison is about decoding the same steps, not about planning.
    """
    model = _served_model(base_url, model)
    engine = open_engine(model, base_url=base_url)
    ways = ("sequential", "stepped", "parallel")
    rows = []
    for n in task_config.items:
        tasks = generate_tasks(task_config.task, n, task_config.samples, seed=task_config.seed)
        walls: dict[str, list[float]] = {w: [] for w in ways}
        tokens: dict[str, list[int]] = {w: [] for w in ways}
        correct: dict[str, int] = dict.fromkeys(ways, 0)
        hits_stage2: list[float] = []
        for i, task in enumerate(tasks):
            if task.steps is None or task_config.plans:
                msg = (
                    "the server benchmark runs given steps only: use --task retrieval or "
                    "multidoc with --titles given"
                )
                raise ValueError(msg)
            messages = [{"role": "user", "content": task.prompt}]
            for way in ways:
                if progress:
                    print(f"N={n} sample {i + 1}/{len(tasks)} {way}", file=sys.stderr)
                settings = task_config.settings(task, way)
                before = prefix_cache_counters(base_url)["hits"]
                t = time.perf_counter()
                result, seen = None, None
                for kind, value in engine.stream(Request(messages, pipeline_config(settings))):
                    if kind == "done":
                        result = value
                    elif isinstance(value, StepsDoneEvent):
                        seen = prefix_cache_counters(base_url)["hits"]
                if seen is not None and way == "parallel":
                    hits_stage2.append(seen - before)
                content = result.content
                final = content.rsplit("\n\n", 1)[-1]
                walls[way].append(time.perf_counter() - t)
                tokens[way].append(result.output_tokens)
                correct[way] += bool(score_answer(task, final, content))
        med = {w: statistics.median(walls[w]) for w in ways}
        rows.append({
            "items": n,
            "median_wall_s": {w: round(v, 3) for w, v in med.items()},
            "tokens_per_s": {w: round(sum(tokens[w]) / sum(walls[w]), 1) for w in ways},
            "accuracy": {w: round(correct[w] / len(tasks), 3) for w in ways},
            "speedup_vs_stepped": round(med["stepped"] / med["parallel"], 2),
            "speedup_vs_plain": round(med["sequential"] / med["parallel"], 2),
            "stage2_prefix_cache_hit_tokens": hits_stage2,
            "all_wall_s": {w: [round(x, 3) for x in walls[w]] for w in ways},
        })  # fmt: skip
    return {
        "base_url": base_url,
        "model": model,
        "task": task_config.task,
        "samples": task_config.samples,
        "step_max_tokens": task_config.step_max_tokens,
        "by_items": rows,
    }
