"""`bench serve` on a tiny model: the keys, identical outputs, and the CLI wiring."""

from __future__ import annotations

import json
from typing import Any

import pytest

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.bench.serve import (
    KINDS,
    ServeBenchConfig,
    run_serve_bench,
    sweep_concurrency,
)
from langchain_parallel_reason.cli import main


def test_repeats_report_the_median_run_of_each_phase(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    llm = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, plan_max_tokens=24)
    config = ServeBenchConfig(requests=4, max_concurrency=4, max_tokens=24, repeats=3)
    result = run_serve_bench(llm, config)
    assert result["repeats"] == 3
    for runs, chosen in (("serial_runs_s", "serial_s"), ("concurrent_runs_s", "concurrent_s")):
        assert len(result[runs]) == 3
        assert result[chosen] == sorted(result[runs])[1]
    assert result["identical"] is True  # float32: every run writes the same answers
    # Per-run figures, not the sum of three runs.
    once = run_serve_bench(llm, ServeBenchConfig(requests=4, max_concurrency=4, max_tokens=24))
    assert result["serial_forwards"] == once["serial_forwards"]
    assert result["forwards"] == once["forwards"]
    with pytest.raises(ValueError, match="repeats"):
        ServeBenchConfig(repeats=0)


def test_serve_bench_reports_throughput_latency_and_identity(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    llm = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, plan_max_tokens=24)
    result = run_serve_bench(llm, ServeBenchConfig(requests=8, max_concurrency=8, max_tokens=40))
    for key in (
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "median_tpot_ms",
        "p99_itl_ms",
        "p99_e2el_ms",
        "serial_s",
        "concurrent_s",
        "throughput_ratio",
        "p50_latency_s",
        "p95_latency_s",
        "identical",
        "dtype",
        "threads",
    ):
        assert key in result
    assert result["identical"] is True
    assert result["kinds"] == dict.fromkeys(KINDS, 2)
    assert result["p95_latency_s"] >= result["p50_latency_s"] > 0
    assert result["mean_rows_per_forward"] > 1  # the concurrent run shared forwards
    assert result["dtype"] == "float32"
    assert result["batch_invariant"] is True
    assert result["completed"] == result["one_at_a_time"]["completed"] == 8
    assert result["total_output_tokens"] == result["output_tokens"]
    for run in (result, result["one_at_a_time"]):
        assert 0 < run["mean_ttft_ms"] <= run["mean_e2el_ms"]
        assert run["median_e2el_ms"] <= run["p99_e2el_ms"]
        assert run["output_throughput"] == pytest.approx(
            run["total_output_tokens"] / run["duration"], rel=0.01
        )
    assert result["one_at_a_time"]["max_concurrency"] == 1
    # The cost model is fitted to timed forwards: its terms are never negative (on a busy
    # machine the per-row term can fit to 0), and the ideal counts the same work both ways.
    cost = result["forward_cost"]
    assert cost["per_row_s"] >= 0
    assert cost["fixed_s"] >= 0
    assert result["ideal_ratio"] >= 1
    assert result["of_ideal"] == pytest.approx(
        result["throughput_ratio"] / result["ideal_ratio"], abs=0.02
    )
    assert result["serial_forwards"] > result["forwards"]
    assert result["prefix_hit_tokens"]["concurrent"] > 0  # the planning prompt, prefilled once
    points = sweep_concurrency(llm, ServeBenchConfig(requests=2, max_tokens=8), levels=(1, 2))
    assert [p["concurrency"] for p in points] == [1, 2]


def test_serve_bench_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        ServeBenchConfig(max_concurrency=0)
    with pytest.raises(ValueError, match="request_rate"):
        ServeBenchConfig(request_rate=0)


def test_poisson_arrivals_at_a_finite_rate(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    from langchain_parallel_reason.bench.serve import _arrivals

    assert _arrivals(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    times = _arrivals(200, 50.0, 1)
    assert times == sorted(times)
    assert times[0] == 0.0
    assert 2.0 < times[-1] < 6.0  # about 199 / 50 s
    assert _arrivals(5, 50.0, 1) == _arrivals(5, 50.0, 1)  # seeded
    llm = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, plan_max_tokens=24)
    config = ServeBenchConfig(requests=4, max_concurrency=2, max_tokens=20, request_rate=40.0)
    result = run_serve_bench(llm, config)
    assert (result["request_rate"], result["max_concurrency"]) == (40.0, 2)
    assert result["identical"] is True


def test_kinds_pick_the_set(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    # --kinds steps: the given-steps set (every call has the same 3 given steps).
    llm = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, plan_max_tokens=24)
    config = ServeBenchConfig(requests=3, max_concurrency=3, max_tokens=20, kinds=("steps",))
    result = run_serve_bench(llm, config)
    assert result["kinds"] == {"steps": 3, "planned": 0, "sequential": 0, "tool": 0}
    with pytest.raises(ValueError, match="kinds must be some of"):
        ServeBenchConfig(kinds=("stepz",))
    with pytest.raises(ValueError, match="kinds must be some of"):
        ServeBenchConfig(kinds=())
    # The command line offers exactly the bench's kinds.
    from langchain_parallel_reason.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--kinds", "steps", "tool"])
    assert args.kinds == ["steps", "tool"]
    assert tuple(build_parser().parse_args(["bench", "serve"]).kinds) == KINDS


def test_cli_serve_needs_positive_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--requests", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_cli_serve_json_on_a_model_folder(
    tiny_model_dir: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "serve", "--model", str(tiny_model_dir), "--requests", "4", "--json"]
    # float32: the exact dtype, whose batched outputs equal their solo runs.
    assert main([*argv, "--max-tokens", "20", "--step-max-tokens", "6", "--dtype", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is True
    assert result["requests"] == 4


def test_side_by_side_prints_both_runs_in_columns(
    tiny_llama: Any, tiny_tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from langchain_parallel_reason.bench.serve import render_side_by_side

    llm = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, plan_max_tokens=24)
    local = run_serve_bench(llm, ServeBenchConfig(requests=2, max_concurrency=2, max_tokens=12))
    remote = local | {"engine": "remote", "base_url": "http://127.0.0.1:9/v1"}  # same shape
    render_side_by_side(local, remote)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "local, one at a time" in line)
    assert "remote, 2 at once" in header
    assert sum(line.startswith("Median TPOT (ms)") for line in out.splitlines()) == 1
    assert "remote: x" in out


def test_compare_says_when_the_two_sides_did_different_work(
    tiny_llama: Any, tiny_tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from langchain_parallel_reason.bench.serve import compare, render_side_by_side

    llm = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, plan_max_tokens=24)
    local = run_serve_bench(llm, ServeBenchConfig(requests=4, max_concurrency=4, max_tokens=12))
    # The remote side: twice as slow, and every request on the other path than locally.
    other = {"parallel": "sequential", "sequential": "parallel"}
    remote = local | {
        "serial_s": 2 * local["serial_s"],
        "concurrent_s": 2 * local["concurrent_s"],
        "modes": [other.get(m, m) for m in local["modes"]],
        "base_url": "http://127.0.0.1:9/v1",
    }
    both = compare(local, remote)
    assert both["wall_ratio_one_at_a_time"] == both["wall_ratio_at_once"] == 0.5
    differ = sum(m in other for m in local["modes"])
    assert both["modes_differ"] == differ
    assert both["parallel_requests"]["in_process"] + both["parallel_requests"]["remote"] == differ
    assert compare(local, local)["modes_differ"] == 0
    render_side_by_side(local, remote)
    out = capsys.readouterr().out
    assert "in-process / remote wall time: 0.5 one at a time, 0.5 at once" in out
    assert ("not the same work" in out) == bool(differ)
