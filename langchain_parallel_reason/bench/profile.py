"""`parallel-reason bench profile`: where one decode step's time goes, at 1, 16 and 48 rows.

Contract: `profile_steps(model, tokenizer, config)` decodes greedy steps after a
`context`-token prefix (1 row: the sequential decoder; N rows: N parallel branches in one
sequence, the Stage-2 decoder) under `torch.profiler`, and splits each step's time into
disjoint parts: the model's Linear layers, lm_head, the attention function, cache writes
(the cache's ``update``: concatenation or copies), other ops inside the forward (norms, RoPE,
activations, embedding, masks), Python and dispatch inside the forward (transformers'
per-layer code: the forward's time not in any op), sampling, and the decoder's own Python
outside the forward. Parts are labelled by wrapping those functions in `record_function` for
the run (restored after). The profiler slows a step down; `step_ms` is timed without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["PARTS", "ProfileConfig", "add_arguments", "profile_steps", "render_profile", "run"]

PARTS = (
    "linears",
    "lm_head",
    "attention",
    "cache_writes",
    "other_ops",
    "forward_python",
    "sampling",
    "decoder_python",
)
"""The parts a step's time is split into (see the module docstring), in print order."""

_MISSING = object()
_RANGES = ("linears", "lm_head", "attention", "cache_writes", "sampling", "forward")


@dataclass(frozen=True)
class ProfileConfig:
    """What to profile.

    Attributes:
        rows: tokens per forward to profile (1 = a sequential decode step).
        context: prefix tokens cached before the steps.
        steps: decode steps profiled per row count (after as many untimed warm-up steps).
        attention: Stage-2 attention layout for N > 1 rows ("auto", "split" or "mask").
    """

    rows: tuple[int, ...] = (1, 16, 48)
    context: int = 256
    steps: int = 8
    attention: str = "auto"

    def __post_init__(self) -> None:
        if not self.rows or min(self.rows) < 1 or self.context < 1 or self.steps < 1:
            msg = "rows, context and steps must be at least 1"
            raise ValueError(msg)


def _ranged(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def _labelled(model: Any) -> Iterator[None]:
    """Wrap the model's forward, its Linear layers, the attention functions, the caches'
    ``update`` and the decoders' ``sample_next`` in named profiler ranges; undo afterwards."""
    import torch
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from langchain_parallel_reason.decoding import cache, decoder, sequential

    vocab = model.get_output_embeddings().weight.shape[0]
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, name: str) -> None:
        # An attribute of the object itself comes back as it was; an inherited one is deleted.
        saved.append((owner, attr, vars(owner).get(attr, _MISSING)))
        setattr(owner, attr, _ranged(name, getattr(owner, attr)))

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):  # packed ones too (a subclass)
            patch(module, "forward", "lm_head" if module.out_features == vocab else "linears")
    patch(model, "forward", "forward")
    patch(DynamicCache, "update", "cache_writes")
    patch(cache.BranchCache, "update", "cache_writes")
    patch(decoder, "sample_next", "sampling")
    patch(sequential, "sample_next", "sampling")
    # The interface's local mapping shadows the global one: the labels live there only.
    local = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    for key in list(ALL_ATTENTION_FUNCTIONS):
        ALL_ATTENTION_FUNCTIONS[key] = _ranged("attention", ALL_ATTENTION_FUNCTIONS[key])
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS._local_mapping = local
        for owner, attr, original in reversed(saved):
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


@dataclass
class _Prefix:
    """The prefix ids, its cache and the logits after its last token ``[V]``."""

    ids: list[int]
    cache: Any
    logits: Any


@contextlib.contextmanager
def _steps(model: Any, prefix: _Prefix, rows: int, count: int, attention: str) -> Iterator[Any]:
    """A generator of `count` + 1 greedy decode steps of `rows` rows after the cached prefix
    (its first step needs no forward); the cache holds exactly the prefix again afterwards."""
    import torch

    from langchain_parallel_reason.decoding.cache import crop_to
    from langchain_parallel_reason.decoding.decoder import iter_decode_branches
    from langchain_parallel_reason.decoding.sequential import iter_decode

    plen = len(prefix.ids)
    if rows == 1:
        device = model.get_input_embeddings().weight.device
        crop_to(prefix.cache, plen - 1)  # the last token is fed again: one token per forward
        gen = iter_decode(
            model,
            torch.tensor(prefix.ids[-1:], device=device),
            prefix.cache,
            start=plen - 1,
            max_new_tokens=count + 1,
        )
    else:
        gen = iter_decode_branches(
            model,
            prefix.ids,
            [[] for _ in range(rows)],  # no forced tokens: one token per branch per step
            max_new_tokens=count + 1,
            prefix_cache=prefix.cache,
            prefix_logits=prefix.logits,
            attention=attention,
        )
    try:
        yield gen
    finally:
        gen.close()
        crop_to(prefix.cache, plen)


def _timed_steps(gen: Any, count: int) -> list[float]:
    times = []
    next(gen)  # the first token (1 row: the re-fed last token; N rows: the prefix logits)
    for _ in range(count):
        start = time.perf_counter()
        next(gen)
        times.append(time.perf_counter() - start)
    return times


def _breakdown(events: Any, steps: int, wall_s: float) -> dict[str, float]:
    """Milliseconds per step of each part, from the profiler's events of `steps` steps."""
    ranges = dict.fromkeys(_RANGES, 0.0)
    op_self = 0.0  # op self time inside the forward but outside every labelled range
    for event in events:
        name = event.name
        if name in ranges:
            # A range inside another labelled part (e.g. a Linear inside lm_head) is not new time.
            if _range_parent(event) in (None, "forward"):
                ranges[name] += event.cpu_time_total
            continue
        if _range_parent(event) == "forward":
            op_self += event.self_cpu_time_total
    per = {k: v / 1e3 / steps for k, v in ranges.items()}  # us -> ms per step
    forward = per.pop("forward")
    inside = sum(per[k] for k in ("linears", "lm_head", "attention", "cache_writes"))
    per["other_ops"] = op_self / 1e3 / steps
    per["forward_python"] = max(0.0, forward - inside - per["other_ops"])
    per["decoder_python"] = max(0.0, wall_s * 1e3 / steps - forward - per["sampling"])
    return {k: round(per[k], 2) for k in PARTS}


def _range_parent(event: Any) -> str | None:
    """The name of the nearest enclosing labelled range (None at the top)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in _RANGES:
            return parent.name
        parent = parent.cpu_parent
    return None


def profile_steps(model: Any, tokenizer: Any, config: ProfileConfig) -> dict[str, Any]:
    """Profile decode steps at each row count; see the module docstring. Returns a JSON-able
    dict: ``rows`` -> ``{"step_ms", "profiled_step_ms", "parts_ms", "parts_pct",
    "top_ops"}``, plus ``dtype``, ``context``, ``steps``, ``attention``."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers.cache_utils import DynamicCache

    from langchain_parallel_reason.bench.decode import build_prefix_ids
    from langchain_parallel_reason.decoding.decoder import choose_attention, prefill

    device = model.get_input_embeddings().weight.device
    ids = build_prefix_ids(tokenizer, config.context)
    cache = DynamicCache()
    with torch.inference_mode():
        logits = prefill(model, torch.tensor(ids, device=device), cache)
    prefix = _Prefix(ids, cache, logits)
    out: dict[str, Any] = {}
    for rows in config.rows:
        # 1. untimed warm-up, then the same steps timed without the profiler
        with _steps(model, prefix, rows, 2, config.attention) as gen:
            _timed_steps(gen, 2)
        with _steps(model, prefix, rows, config.steps, config.attention) as gen:
            plain = _timed_steps(gen, config.steps)
        # 2. the same steps under the profiler, labelled
        with _labelled(model), _steps(model, prefix, rows, config.steps, config.attention) as gen:
            next(gen)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for _ in range(config.steps):
                    next(gen)
                wall = time.perf_counter() - start
        parts = _breakdown(prof.events(), config.steps, wall)
        total = sum(parts.values())
        table = prof.key_averages()
        ops = sorted(
            (e for e in table if e.key.startswith("aten::")),
            key=lambda e: e.self_cpu_time_total,
            reverse=True,
        )[:8]
        out[str(rows)] = {
            "step_ms": round(statistics.median(plain) * 1e3, 2),
            "profiled_step_ms": round(wall * 1e3 / config.steps, 2),
            "parts_ms": parts,
            "parts_pct": {k: round(100 * v / total, 1) if total else 0.0 for k, v in parts.items()},
            "top_ops": {e.key: round(e.self_cpu_time_total / 1e3 / config.steps, 2) for e in ops},
        }
    attention = choose_attention(model, config.attention) if max(config.rows) > 1 else None
    return {
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "context": config.context,
        "steps": config.steps,
        "attention": attention,
        "rows": out,
    }


def render_profile(result: dict[str, Any]) -> None:
    """Print one column per row count: ms per step of each part, and its share."""
    rows = list(result["rows"])
    head = f"{'part (ms per step, % of profiled)':<34}" + "".join(
        f"{r + ' rows':>18}" for r in rows
    )
    print(
        f"{result['dtype']}, {result['context']} cached tokens, {result['steps']} steps, "
        f"attention {result['attention']}"
    )
    print(head)
    for part in PARTS:
        cells = "".join(
            f"{result['rows'][r]['parts_ms'][part]:>10.1f} ({result['rows'][r]['parts_pct'][part]:>4.1f}%)"
            for r in rows
        )
        print(f"{part:<34}{cells}")
    for key, label in (("profiled_step_ms", "step, profiled"), ("step_ms", "step, no profiler")):
        print(f"{label:<34}" + "".join(f"{result['rows'][r][key]:>18.1f}" for r in rows))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `bench profile`'s options (the registry adds --model, --device, --debug)."""
    from langchain_parallel_reason.cli_options import add_threads_option, positive_int

    parser.add_argument(
        "--rows",
        default="1,16,48",
        metavar="R[,R...]",
        help="tokens per forward to profile (1 = sequential decoding; default 1,16,48)",
    )
    parser.add_argument("--context", type=positive_int, default=256, metavar="P")
    parser.add_argument("--steps", type=positive_int, default=8, metavar="S")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
        default="auto",
        help="weights dtype (default auto, as ChatParallelReason)",
    )
    parser.add_argument("--attention", choices=("auto", "split", "mask"), default="auto")
    parser.add_argument(
        "--no-pack",
        action="store_true",
        help="keep plain nn.Linear layers (default: bf16 weights packed for oneDNN, as loaded)",
    )
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    """Load the model, profile, print (see the module docstring); returns 0."""
    try:
        rows = tuple(int(r) for r in args.rows.split(","))
    except ValueError as e:
        msg = f"--rows: expected integers separated by commas, got {args.rows!r}"
        raise ValueError(msg) from e
    config = ProfileConfig(rows, args.context, args.steps, args.attention)
    from langchain_parallel_reason.bench.machine import load_average
    from langchain_parallel_reason.loading import load_model_and_tokenizer
    from langchain_parallel_reason.runtime.threads import apply_threads

    apply_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(
        args.model,
        device=args.device,
        dtype=args.dtype,
        progress=not args.json,
        pack=not args.no_pack,
    )
    result = profile_steps(model, tokenizer, config)
    result["load_average"] = load_average()
    if args.json:
        print(json.dumps(result))
    else:
        render_profile(result)
        print(f"load average {result['load_average']}")
    return 0
