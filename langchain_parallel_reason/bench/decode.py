"""Decode benchmark: N branches sequentially, in one sequence (belt mask), and as a batch fork.

Contract: `run_decode_bench(model, tokenizer, config)` decodes `branches` x `new_tokens` greedy
tokens after the same `prefix_tokens`-token prefix in three ways, on one model in one run, and
returns a flat JSON-able dict of medians over `repeats`; `render_table` prints it. Prefill is
never timed; every mode writes exactly `new_tokens` tokens per branch (no stop tokens).

  sequential  one branch after another, each alone after the prefix: a plain greedy loop, one
              token per forward, on a DynamicCache prefilled once and cropped back per branch.
  parallel    `decode_branches`: all branches in one sequence, one token per branch per forward.
  batch       the prefix cache copied N times (Skeleton-of-Thought style), [N, 1] tokens a step.

Single decode steps t(1) and t(N) after the prefix give `ideal_speedup = N * t(1) / t(N)`: what
parallel decoding could reach if nothing but the forward passes cost time.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from langchain_parallel_reason.bench.machine import (
    cpu_snapshot,
    load_average,
    machine_description,
    other_cores,
    package_version,
)
from langchain_parallel_reason.decoding.cache import crop_to, kv_bytes
from langchain_parallel_reason.decoding.decoder import prefill
from langchain_parallel_reason.decoding.masks import ColumnLayout, model_mask_kind
from langchain_parallel_reason.decoding.sequential import forward_tokens
from langchain_parallel_reason.loading import DTYPES

__all__ = [
    "ATTENTIONS",
    "DTYPE_CHOICES",
    "DecodeBenchConfig",
    "build_branch_prefixes",
    "build_prefix_ids",
    "load_average",
    "machine_description",
    "render_table",
    "run_decode_bench",
]

ATTENTIONS: tuple[str, ...] = ("auto", "split", "mask")
"""Stage-2 attention layouts `decode_branches` accepts."""

DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)
"""`auto` times one step in float32 and bfloat16 and runs each mode in its faster dtype."""
_AUTO_DTYPES = (torch.float32, torch.bfloat16)

_MODES = ("sequential", "parallel", "batch")

# Natural text for the shared prefix: repeated and cut to exactly `prefix_tokens` tokens.
_PARAGRAPH = (
    "The old lighthouse stood at the end of a narrow spit of rock, and for more than a century "
    "its keepers had written down the weather twice a day. Their notebooks describe storms that "
    "closed the harbour for a week, summers so calm that the fishing boats drifted for hours, "
    "and winters when ice covered the railings of the gallery. Historians who read them today "
    "compare the notes with modern measurements to learn how the climate of the coast has "
    "changed, how often the fog arrives in spring, and why the shipping lanes were moved twice. "
)


@dataclass(frozen=True)
class DecodeBenchConfig:
    """What one benchmark run measures.

    Attributes:
        branches: N, branches decoded per mode.
        new_tokens: T, tokens each branch writes (after its forced prefix).
        prefix_tokens: P, tokens of the shared prefix.
        dtype: a key of `DTYPE_CHOICES`; "auto" picks the faster dtype per mode.
        attention: `decode_branches` attention layouts to time (the first is the headline).
        repeats: timed runs per mode; medians are reported.
        step_samples: timed single steps per t(1) / t(N) figure (after one warm-up).
        threads: torch intra-op threads; None keeps torch's default.
    """

    branches: int = 8
    new_tokens: int = 64
    prefix_tokens: int = 800
    dtype: str = "auto"
    attention: tuple[str, ...] = ("auto",)
    repeats: int = 3
    step_samples: int = 5
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("branches", "new_tokens", "prefix_tokens", "repeats", "step_samples"):
            if getattr(self, name) < 1:
                msg = f"{name} must be at least 1, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.threads is not None and self.threads < 1:
            msg = f"threads must be at least 1, got {self.threads}"
            raise ValueError(msg)
        if self.dtype not in DTYPE_CHOICES:
            msg = f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}"
            raise ValueError(msg)
        if not self.attention or any(a not in ATTENTIONS for a in self.attention):
            msg = f"attention must be among {', '.join(ATTENTIONS)}, got {self.attention!r}"
            raise ValueError(msg)
        if len(set(self.attention)) != len(self.attention):
            msg = f"attention lists a layout twice: {self.attention!r}"
            raise ValueError(msg)


# ----------------------------------------------------------------------------- inputs


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def build_prefix_ids(tokenizer: Any, n_tokens: int) -> list[int]:
    """`n_tokens` ids of natural text (a paragraph repeated, then cut; BOS if the tokenizer adds one)."""
    per_paragraph = max(1, len(_encode(tokenizer, _PARAGRAPH, special=False)))
    text = _PARAGRAPH * (n_tokens // per_paragraph + 2)
    ids = _encode(tokenizer, text, special=True)
    if len(ids) < n_tokens:  # only a pathological tokenizer packs the text this tightly
        msg = f"could not build a {n_tokens}-token prefix ({len(ids)} tokens of text)"
        raise ValueError(msg)
    return ids[:n_tokens]


def build_branch_prefixes(tokenizer: Any, n_branches: int) -> list[list[int]]:
    """Forced tokens of "####Step k:" for k = 1..N, all of one length.

    Equal lengths let the batch-fork baseline run without padding: a shorter list (fewer digits)
    is left-filled with copies of its first token.
    """
    prefixes = [
        _encode(tokenizer, f"####Step {k}:", special=False) for k in range(1, n_branches + 1)
    ]
    length = max(len(p) for p in prefixes)
    return [[p[0]] * (length - len(p)) + p for p in prefixes]


# ----------------------------------------------------------------------------- torch helpers


def _sync(device: torch.device) -> None:
    """Wait for queued kernels so wall time covers them (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


@contextlib.contextmanager
def _as_dtype(model: Any, dtype: torch.dtype) -> Iterator[None]:
    """Cast the model's parameters and buffers to `dtype` for the block, then put the originals back.

    Restoring the original tensors (not casting back) keeps float32 weights exact after a
    bfloat16 detour, at the price of one extra copy of the model while the block runs.
    """
    if all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        yield
        return
    params = {name: p.data for name, p in model.named_parameters()}
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items()]
    model.to(dtype)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.data = params[name]
        for m, name, b in buffers:
            m._buffers[name] = b


def _belt_step_inputs(
    model: Any, prefix_len: int, n: int, device: torch.device
) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    """The belt mask(s) and positions ``[1, n]`` for n tokens of n branches at one position.

    Each token sees the prefix and itself: the decoder's own masks (``decoding.masks``), a
    ``[1, 1, n, P+n]`` tensor or a dict per layer type, as the model takes them.
    """
    q_branch = torch.arange(n, device=device)
    q_pos = torch.full((n,), prefix_len, device=device)
    cols = ColumnLayout.for_prefix(prefix_len, prefix_len + n, device)
    cols.append(q_branch, q_pos)
    dtype = next(model.parameters()).dtype
    return cols.masks(q_branch, q_pos, dtype, *model_mask_kind(model)), q_pos[None]


def _fork(cache: DynamicCache, n: int) -> DynamicCache:
    """A new DynamicCache holding `n` copies of `cache` along the batch dimension."""
    data = []
    for layer in cache.layers:
        keys, values = layer.keys, layer.values  # [1, kv_heads, P, head_dim]
        data.append((keys.expand(n, -1, -1, -1), values.expand(n, -1, -1, -1)))
    return DynamicCache(ddp_cache_data=data)  # update() concatenates: one real copy


# ----------------------------------------------------------------------------- the three modes


@dataclass
class _Run:
    """One timed run of one mode."""

    seconds: float
    tokens: list[list[int]]
    forward_passes: int
    kv_bytes: int
    attention: str | None = None


def decode_sequential(
    model: Any,
    cache: DynamicCache,
    last_logits: torch.Tensor,
    branch_prefixes: Sequence[Sequence[int]],
    new_tokens: int,
    tick: Callable[[int], None] = lambda n: None,
) -> tuple[list[list[int]], int, int]:
    """Greedy-decode each branch alone after the prefix `cache` holds; return (tokens, passes, peak KV).

    A branch's forced tokens go in one forward, then one token per forward; the cache is cropped
    back to the prefix after each branch, so it ends as it started.
    """
    prefix_len = cache.get_seq_length()
    device = last_logits.device
    results, passes, peak = [], 0, 0
    for forced in branch_prefixes:
        pos, logits = prefix_len, last_logits  # [V]
        if forced:
            logits = forward_tokens(model, torch.tensor(list(forced), device=device), cache, pos)
            pos, passes = pos + len(forced), passes + 1
        tokens = []
        for i in range(new_tokens):
            token = logits.argmax(-1, keepdim=True)  # [1]; stays on device: no sync per step
            tokens.append(token)
            tick(1)
            if i + 1 < new_tokens:  # the last token needs no forward of its own
                logits = forward_tokens(model, token, cache, pos)
                pos, passes = pos + 1, passes + 1
        peak = max(peak, kv_bytes(cache))
        crop_to(cache, prefix_len)
        results.append(torch.cat(tokens).tolist())
    return results, passes, peak


def decode_batch_fork(
    model: Any,
    cache: DynamicCache,
    last_logits: torch.Tensor,
    branch_prefixes: Sequence[Sequence[int]],
    new_tokens: int,
    tick: Callable[[int], None] = lambda n: None,
) -> tuple[list[list[int]], int, int]:
    """Greedy-decode all branches as a batch of N prefix copies; return (tokens, passes, peak KV).

    The copy is made here (it is part of this mode's cost); `cache` itself is left untouched.
    """
    n = len(branch_prefixes)
    prefix_len = cache.get_seq_length()
    device = last_logits.device
    fork = _fork(cache, n)
    pos, passes = prefix_len, 0
    logits = last_logits.expand(n, -1)  # [N, V]
    if branch_prefixes[0]:
        forced = torch.tensor([list(p) for p in branch_prefixes], device=device)  # [N, Lb]
        logits = forward_tokens(model, forced, fork, pos)
        pos, passes = pos + forced.shape[1], 1
    tokens = []
    for i in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)  # [N, 1]
        tokens.append(token)
        tick(n)
        if i + 1 < new_tokens:
            logits = forward_tokens(model, token, fork, pos)
            pos, passes = pos + 1, passes + 1
    peak = kv_bytes(fork)
    return torch.cat(tokens, dim=-1).tolist(), passes, peak


def decode_parallel(
    model: Any,
    cache: DynamicCache,
    prefix_ids: list[int],
    branch_prefixes: Sequence[Sequence[int]],
    new_tokens: int,
    attention: str,
    prefix_logits: torch.Tensor | None = None,
) -> tuple[list[list[int]], int, int, str]:
    """`decode_branches` reusing the prefix `cache`; return (tokens, passes, peak KV, attention).

    The decoder feeds all forced tokens in one forward, then one token per branch per forward,
    as `decode_sequential` does per branch, and hands `cache` back holding exactly the prefix.
    """
    from langchain_parallel_reason.decoding import decode_branches

    out = decode_branches(
        model,
        prefix_ids,
        [list(p) for p in branch_prefixes],
        max_new_tokens=new_tokens,
        prefix_cache=cache,
        prefix_logits=prefix_logits,  # [V]; only used for an empty forced prefix
        attention=attention,
    )
    tokens = [list(b.token_ids) for b in out.branches]
    return tokens, out.forward_passes, out.kv_bytes, out.attention


def _median_step(
    fn: Callable[[], Any], undo: Callable[[], None], device: torch.device, samples: int
) -> float:
    """Median wall time of `fn` over `samples` runs after one warm-up, calling `undo` after each."""
    times = []
    for i in range(samples + 1):
        _, seconds = _timed(fn, device)
        undo()
        if i:
            times.append(seconds)
    return statistics.median(times)


def measure_steps(
    model: Any, cache: DynamicCache, n: int, samples: int, token_id: int
) -> dict[str, float]:
    """Single decode-step times after the prefix in `cache`: t(1), t(N) belt, and a batch of N.

    Returns milliseconds: `t1` (1 token), `tn` (N tokens at one position, belt mask), `batch_n`
    (N prefix copies, one token each) and `ideal` = N * t1 / tn. `cache` ends as it started.
    """
    prefix_len = cache.get_seq_length()
    device = next(model.parameters()).device
    one = torch.tensor([[token_id]], device=device)
    t1 = _median_step(
        lambda: forward_tokens(model, one, cache, prefix_len),
        lambda: crop_to(cache, prefix_len),
        device,
        samples,
    )
    mask, positions = _belt_step_inputs(model, prefix_len, n, device)
    row = torch.full((1, n), token_id, device=device)
    tn = _median_step(  # N logits, as a decode step of N branches needs
        lambda: forward_tokens(
            model,
            row,
            cache,
            prefix_len,
            position_ids=positions,
            attention_mask=mask,
            every_token=True,
        ),
        lambda: crop_to(cache, prefix_len),
        device,
        samples,
    )
    fork = _fork(cache, n)
    column = torch.full((n, 1), token_id, device=device)
    tb = _median_step(
        lambda: forward_tokens(model, column, fork, prefix_len),
        lambda: crop_to(fork, prefix_len),
        device,
        samples,
    )
    return {"t1": t1 * 1e3, "tn": tn * 1e3, "batch_n": tb * 1e3, "ideal": n * t1 / tn}


# ----------------------------------------------------------------------------- the run


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pick_dtypes(config: DecodeBenchConfig, steps: dict[str, dict[str, float]]) -> dict[str, str]:
    """Dtype per mode: the fixed one, or with "auto" the fastest at that mode's step."""
    if config.dtype != "auto":
        name = _dtype_name(DTYPES[config.dtype])
        return dict.fromkeys(_MODES, name)
    step_of_mode = {"sequential": "t1", "parallel": "tn", "batch": "batch_n"}
    return {mode: min(steps, key=lambda d: steps[d][key]) for mode, key in step_of_mode.items()}


def _check_positions(model: Any, needed: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and needed > limit:
        msg = (
            f"prefix + branch prefix + new tokens = {needed} positions, but the model supports "
            f"{limit}; lower --prefix-tokens or --new-tokens"
        )
        raise ValueError(msg)


def run_decode_bench(
    model: Any,
    tokenizer: Any,
    config: DecodeBenchConfig,
    *,
    model_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Time the three modes on `model` and return the figures (see the module docstring).

    Keys: `sequential_s`, `parallel_s`, `batch_s` (medians, seconds), `speedup` (sequential /
    parallel), `speedup_vs_batch` (batch / parallel), `ideal_speedup`, `kv_bytes_*` (peak KV
    bytes held per mode), `kv_tokens` (the same counted in cached tokens, comparable across
    dtypes), `dtype` (per mode), `step_ms` (per dtype tried), `parallel_by_attention`
    (one entry per layout timed), `branches_match_sequential` (fraction of parallel branches equal
    to their sequential decode, when both ran in one dtype), `other_cpu_cores` (mean CPU cores
    other processes used during the run: contention), run metadata, and the raw `runs_s`.
    """
    from tqdm.auto import tqdm

    from langchain_parallel_reason.runtime.threads import apply_threads

    apply_threads(config.threads)  # None: the cores this process may use
    n, t, p = config.branches, config.new_tokens, config.prefix_tokens
    device = next(model.parameters()).device
    prefix_ids = build_prefix_ids(tokenizer, p)
    branch_prefixes = build_branch_prefixes(tokenizer, n)
    _check_positions(model, p + len(branch_prefixes[0]) + t)
    prefix_t = torch.tensor(prefix_ids, device=device)  # [P]
    load_start, cpu_start = load_average(), cpu_snapshot()

    candidates = list(_AUTO_DTYPES) if config.dtype == "auto" else [DTYPES[config.dtype]]
    by_name = {_dtype_name(d): d for d in candidates}
    parallel_modes = [f"parallel:{a}" for a in config.attention]
    modes = ["sequential", *parallel_modes, "batch"]
    bar = tqdm(
        total=config.repeats * n * t * len(modes),
        unit="tok",
        desc="step timings",
        file=sys.stderr,
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    runs: dict[str, list[_Run]] = {m: [] for m in modes}
    steps: dict[str, dict[str, float]] = {}
    token_bytes: dict[str, float] = {}  # KV bytes per cached token, per dtype
    with torch.inference_mode(), bar:
        # 1. one-step timings per candidate dtype (also the warm-up)
        for name, dtype in by_name.items():
            bar.set_description(f"step timings {name}")
            with _as_dtype(model, dtype):
                cache = DynamicCache()  # without config: sliding layers keep every prefix token
                prefill(model, prefix_t, cache)
                token_bytes[name] = kv_bytes(cache) / p
                steps[name] = measure_steps(model, cache, n, config.step_samples, prefix_ids[-1])
        chosen = _pick_dtypes(config, steps)

        # 2. the timed modes, grouped by dtype, interleaved across repeats to spread drift
        for name in dict.fromkeys(chosen.values()):
            group = [m for m in modes if chosen[m.split(":")[0]] == name]
            with _as_dtype(model, by_name[name]):
                cache = DynamicCache()
                last_logits = prefill(model, prefix_t, cache)  # [V]
                for r in range(config.repeats):
                    for mode in group:
                        bar.set_description(f"{mode} {name} {r + 1}/{config.repeats}")
                        runs[mode].append(
                            _run_mode(
                                mode,
                                model,
                                cache,
                                last_logits,
                                prefix_ids,
                                branch_prefixes,
                                t,
                                device,
                                bar.update,
                            )
                        )
                del cache, last_logits
    meta = {
        "model": model_name,
        "device": device,
        "load_start": load_start,
        "other_cores": other_cores(cpu_start),
    }
    return _summarize(config, runs, steps, chosen, token_bytes, len(branch_prefixes[0]), meta)


def _run_mode(
    mode: str,
    model: Any,
    cache: DynamicCache,
    last_logits: torch.Tensor,
    prefix_ids: list[int],
    branch_prefixes: list[list[int]],
    new_tokens: int,
    device: torch.device,
    tick: Callable[[int], Any],
) -> _Run:
    """Time one run of `mode`; `cache` (the prefix) is the same before and after."""
    n = len(branch_prefixes)
    if mode in ("sequential", "batch"):
        decode = decode_sequential if mode == "sequential" else decode_batch_fork
        (tokens, passes, kv), seconds = _timed(
            lambda: decode(model, cache, last_logits, branch_prefixes, new_tokens, tick), device
        )
        return _Run(seconds, tokens, passes, kv)
    attention = mode.split(":", 1)[1]
    # Untimed contiguous copy: the split backend reads the prefix keys in place, and after a crop
    # `cache` may hold strided views of a longer tensor.
    own = _fork(cache, 1)
    (tokens, passes, kv, used), seconds = _timed(
        lambda: decode_parallel(
            model, own, prefix_ids, branch_prefixes, new_tokens, attention, last_logits
        ),
        device,
    )
    tick(n * new_tokens)
    bad = [len(b) for b in tokens if len(b) != new_tokens]
    if len(tokens) != n or bad:
        msg = (
            f"decode_branches returned {len(tokens)} branches with lengths "
            f"{[len(b) for b in tokens]}; expected {n} x {new_tokens} tokens"
        )
        raise RuntimeError(msg)
    return _Run(seconds, tokens, passes, kv, used)


def _summarize(
    config: DecodeBenchConfig,
    runs: dict[str, list[_Run]],
    steps: dict[str, dict[str, float]],
    chosen: dict[str, str],
    token_bytes: dict[str, float],
    branch_prefix_tokens: int,
    meta: dict[str, Any],
) -> dict[str, Any]:
    n, t = config.branches, config.new_tokens

    def tokens_held(kv_bytes: int, mode: str) -> int:
        # dtype-free memory figure: modes may run in different dtypes
        return round(kv_bytes / token_bytes[chosen[mode]])

    def med(mode: str) -> float:
        return statistics.median(r.seconds for r in runs[mode])

    seq_s, batch_s = med("sequential"), med("batch")
    seq_tokens = runs["sequential"][-1].tokens
    by_attention: dict[str, dict[str, Any]] = {}
    for attention in config.attention:
        mode = f"parallel:{attention}"
        par_s, last = med(mode), runs[mode][-1]
        match = None
        if chosen["parallel"] == chosen["sequential"]:
            match = sum(a == b for a, b in zip(last.tokens, seq_tokens, strict=True)) / n
        by_attention[attention] = {
            "attention": last.attention,
            "parallel_s": par_s,
            "parallel_tok_s": n * t / par_s,
            "speedup": seq_s / par_s,
            "speedup_vs_batch": batch_s / par_s,
            "kv_bytes_parallel": last.kv_bytes,
            "kv_tokens_parallel": tokens_held(last.kv_bytes, "parallel"),
            "forward_passes": last.forward_passes,
            "branches_match_sequential": match,
            "runs_s": [r.seconds for r in runs[mode]],
        }
    head = by_attention[config.attention[0]]
    ideal = n * steps[chosen["sequential"]]["t1"] / steps[chosen["parallel"]]["tn"]
    return {
        "model": meta["model"],
        "device": str(meta["device"]),
        "machine": machine_description(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_version": torch.__version__,
        "transformers_version": package_version("transformers"),
        "load_avg": [meta["load_start"], load_average()],
        "other_cpu_cores": meta["other_cores"],
        "branches": n,
        "new_tokens": t,
        "prefix_tokens": config.prefix_tokens,
        "branch_prefix_tokens": branch_prefix_tokens,
        "repeats": config.repeats,
        "dtype": chosen,
        "attention": head["attention"],
        "sequential_s": seq_s,
        "parallel_s": head["parallel_s"],
        "batch_s": batch_s,
        "speedup": head["speedup"],
        "ideal_speedup": ideal,
        "speedup_vs_batch": head["speedup_vs_batch"],
        "sequential_tok_s": n * t / seq_s,
        "parallel_tok_s": head["parallel_tok_s"],
        "batch_tok_s": n * t / batch_s,
        "kv_bytes_sequential": runs["sequential"][-1].kv_bytes,
        "kv_bytes_parallel": head["kv_bytes_parallel"],
        "kv_bytes_batch": runs["batch"][-1].kv_bytes,
        "kv_tokens": {
            "sequential": tokens_held(runs["sequential"][-1].kv_bytes, "sequential"),
            "parallel": head["kv_tokens_parallel"],
            "batch": tokens_held(runs["batch"][-1].kv_bytes, "batch"),
        },
        "forward_passes": {
            "sequential": runs["sequential"][-1].forward_passes,
            "parallel": head["forward_passes"],
            "batch": runs["batch"][-1].forward_passes,
        },
        "branches_match_sequential": head["branches_match_sequential"],
        "step_ms": steps,
        "parallel_by_attention": by_attention,
        "runs_s": {
            "sequential": [r.seconds for r in runs["sequential"]],
            "parallel": head["runs_s"],
            "batch": [r.seconds for r in runs["batch"]],
        },
    }


# ----------------------------------------------------------------------------- output


def render_table(result: dict[str, Any], console: Any = None) -> None:
    """Print `result` (from `run_decode_bench`) as a rich table with a short context footer."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    n, t = result["branches"], result["new_tokens"]
    table = Table(
        title=(
            f"decode: {n} branches x {t} tokens after a {result['prefix_tokens']}-token prefix "
            f"(median of {result['repeats']})"
        )
    )
    table.add_column("mode", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    for column in ("time s", "tok/s", "speedup", "fwd", "KV MiB", "KV tok"):
        table.add_column(column, justify="right")
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # fits 80 columns

    def row(label: str, dtype: str, seconds: float, passes: int, kv: int, kv_tokens: int) -> None:
        speedup = result["sequential_s"] / seconds
        cells = (f"{seconds:.3f}", f"{n * t / seconds:.1f}", f"{speedup:.2f}x", str(passes))
        table.add_row(label, short.get(dtype, dtype), *cells, f"{kv / 2**20:.1f}", str(kv_tokens))

    dtypes, passes, held = result["dtype"], result["forward_passes"], result["kv_tokens"]
    row(
        "sequential",
        dtypes["sequential"],
        result["sequential_s"],
        passes["sequential"],
        result["kv_bytes_sequential"],
        held["sequential"],
    )
    for requested, entry in result["parallel_by_attention"].items():
        row(
            f"parallel/{entry['attention'] or requested}",
            dtypes["parallel"],
            entry["parallel_s"],
            entry["forward_passes"],
            entry["kv_bytes_parallel"],
            entry["kv_tokens_parallel"],
        )
    row(
        "batch fork",
        dtypes["batch"],
        result["batch_s"],
        passes["batch"],
        result["kv_bytes_batch"],
        held["batch"],
    )
    console.print(table)
    steps = "; ".join(
        f"{name}: t(1) {s['t1']:.1f} ms, t({n}) {s['tn']:.1f} ms, batch {s['batch_n']:.1f} ms"
        for name, s in result["step_ms"].items()
    )
    console.print(
        f"ideal speedup N*t(1)/t(N) = {result['ideal_speedup']:.2f}x; "
        f"parallel vs batch fork = {result['speedup_vs_batch']:.2f}x\n"
        f"one step: {steps}\n"
        f"{result['model']} on {result['device']}, {result['torch_threads']} threads, "
        f"{result['machine']}; other processes used {result['other_cpu_cores']} cores meanwhile"
    )
