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


def test_serve_bench_reports_throughput_latency_and_identity(
    tiny_llama: Any, tiny_tokenizer: Any
) -> None:
    llm = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, plan_max_tokens=24)
    result = run_serve_bench(llm, ServeBenchConfig(requests=8, concurrency=8, max_tokens=40))
    for key in (
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
    # The cost model prices more rows higher, and the ideal counts the same work both ways.
    cost = result["forward_cost"]
    assert cost["per_row_s"] > 0
    assert cost["fixed_s"] >= 0
    assert result["ideal_ratio"] > 1
    assert result["of_ideal"] == pytest.approx(
        result["throughput_ratio"] / result["ideal_ratio"], abs=0.02
    )
    assert result["serial_forwards"] > result["forwards"]
    assert result["prefix_hit_tokens"]["concurrent"] > 0  # the planning prompt, prefilled once
    points = sweep_concurrency(llm, ServeBenchConfig(requests=2, max_tokens=8), levels=(1, 2))
    assert [p["concurrency"] for p in points] == [1, 2]


def test_serve_bench_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        ServeBenchConfig(concurrency=0)


def test_cli_serve_needs_positive_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--requests", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_cli_serve_json_on_a_model_folder(
    tiny_model_dir: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "serve", "--model", str(tiny_model_dir), "--requests", "4", "--json"]
    assert main([*argv, "--max-tokens", "20", "--step-max-tokens", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is True
    assert result["requests"] == 4
