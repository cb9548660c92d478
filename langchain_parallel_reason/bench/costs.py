"""What one forward of the loaded model costs on this machine, and what that says about a call.

Contract: `forward_seconds(model, rows, context)` times plain forwards of ``r`` new tokens after
``context`` cached ones (best of a few, the model idle meanwhile); `stepped_estimate(report,
seconds)` prices a parallel answer's steps written one after another from such timings. Plain
forwards leave out masks, sampling and scheduling, which both ways pay per pass, so the ratio
of the two prices is the speed-up the parallel steps got, and the wall-time figure scales it.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["forward_seconds", "rows_per_pass", "stepped_estimate"]


def forward_seconds(
    model: Any, rows: tuple[int, ...], context: int = 256, repeats: int = 3
) -> dict[int, float]:
    """Seconds of one forward of ``r`` new tokens after ``context`` cached ones, per ``r`` in
    ``rows``: the best of ``repeats`` (after one untimed warm-up each), the cache cropped back
    between runs. Tokens are arbitrary ids; the cost of a forward does not depend on them."""
    import torch
    from transformers.cache_utils import DynamicCache

    from langchain_parallel_reason.decoding.cache import crop_to
    from langchain_parallel_reason.decoding.sequential import forward_tokens

    embeddings = model.get_input_embeddings()
    device, vocab = embeddings.weight.device, embeddings.weight.shape[0]
    context = max(1, context)
    ids = torch.arange(context + max(rows), device=device) % vocab  # [context + R]
    cache = DynamicCache()
    out: dict[int, float] = {}
    with torch.inference_mode():
        forward_tokens(model, ids[:context], cache, 0)
        for r in rows:
            best = float("inf")
            for attempt in range(repeats + 1):
                start = time.perf_counter()
                forward_tokens(model, ids[context : context + r], cache, context)
                if attempt:  # the first run is the warm-up
                    best = min(best, time.perf_counter() - start)
                crop_to(cache, context)
            out[r] = best
    return out


def stepped_estimate(report: Any, seconds: dict[int, float]) -> dict[str, float] | None:
    """The same steps one after another, priced from measured forwards.

    ``report`` is a `ParallelReport` of a parallel answer; ``seconds`` maps 1 and the answer's
    mean rows per pass (`rows_per_pass(report)`) to forward times. Returns ``steps_s`` (the
    steps' wall time), ``stepped_s`` (estimated: the same wall time scaled by the price of
    ``sum(branch_tokens)`` one-row forwards over ``decode_steps`` forwards of that many rows)
    and ``speedup``; None when the answer had no parallel steps.
    """
    tokens = sum(report.branch_tokens)
    wall = report.timings.get("steps")
    rows = rows_per_pass(report)
    if report.mode_used != "parallel" or not report.decode_steps or not tokens or not wall:
        return None
    parallel_price = report.decode_steps * seconds[rows]
    stepped_price = tokens * seconds[1]
    speedup = stepped_price / parallel_price
    return {"steps_s": round(wall, 3), "stepped_s": round(wall * speedup, 3), "speedup": speedup}


def rows_per_pass(report: Any) -> int:
    """A parallel answer's Stage-2 tokens per forward pass, rounded (at least 1)."""
    tokens = sum(report.branch_tokens)
    return max(1, round(tokens / report.decode_steps)) if report.decode_steps else 1
