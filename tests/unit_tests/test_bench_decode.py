"""`parallel-reason bench decode` end to end on a tiny random model, plus its error paths.

Never asserts on speed: only that every mode ran, wrote what it should, and reported it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from langchain_parallel_reason import cli
from langchain_parallel_reason.bench import decode as bench_decode

N, T, P = 3, 4, 24
_KEYS = {
    "sequential_s",
    "parallel_s",
    "batch_s",
    "speedup",
    "ideal_speedup",
    "speedup_vs_batch",
    "kv_bytes_parallel",
    "kv_bytes_batch",
    "kv_bytes_sequential",
    "branches",
    "new_tokens",
    "prefix_tokens",
    "dtype",
    "model",
    "device",
    "torch_threads",
    "machine",
    "step_ms",
    "parallel_by_attention",
    "forward_passes",
    "runs_s",
    "other_cpu_cores",
}


def _bench_args(model_dir: Path, *extra: str) -> list[str]:
    return [
        "bench",
        "decode",
        "--model",
        str(model_dir),
        "--branches",
        str(N),
        "--new-tokens",
        str(T),
        "--prefix-tokens",
        str(P),
        "--repeats",
        "2",
        "--no-progress",
        *extra,
    ]


def test_bench_decode_json_float32(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    # Same --threads as now, so the process-wide setting is exercised but left unchanged.
    threads = str(torch.get_num_threads())
    args = _bench_args(
        tiny_model_dir,
        *("--dtype", "float32", "--attention", "split,mask", "--threads", threads, "--json"),
    )
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # stdout is exactly one JSON object

    assert result.keys() >= _KEYS
    assert (result["branches"], result["new_tokens"], result["prefix_tokens"]) == (N, T, P)
    assert result["dtype"] == dict.fromkeys(("sequential", "parallel", "batch"), "float32")
    assert result["torch_threads"] == int(threads)
    for key in ("sequential_s", "parallel_s", "batch_s", "speedup", "ideal_speedup"):
        assert result[key] > 0, key
    assert len(result["runs_s"]["sequential"]) == 2
    # N branches x T tokens: N*T one-token forwards alone (forced prefix counted once per
    # branch, last token needs none), T forwards for the one sequence and for the batch.
    assert result["forward_passes"] == {"sequential": N * T, "parallel": T, "batch": T}
    # The batch holds N prefix copies; the one sequence holds the prefix once.
    assert result["kv_bytes_batch"] > result["kv_bytes_parallel"] > 0
    assert result["kv_bytes_parallel"] > result["kv_bytes_sequential"] > 0
    # Tokens held at the peak: one branch alone, the prefix once plus N branches, N copies.
    held = P + result["branch_prefix_tokens"] + T - 1
    assert result["kv_tokens"]["sequential"] == held
    assert result["kv_tokens"]["batch"] == N * held
    assert P + N * (held - P) <= result["kv_tokens"]["parallel"] < N * held
    assert set(result["parallel_by_attention"]) == {"split", "mask"}
    for layout, entry in result["parallel_by_attention"].items():
        assert entry["attention"] == layout
        assert entry["parallel_s"] > 0
        # Greedy float32: each branch of the one sequence equals that branch decoded alone.
        assert entry["branches_match_sequential"] == 1.0
    assert result["parallel_s"] == result["parallel_by_attention"]["split"]["parallel_s"]


def test_bench_decode_auto_dtype_table(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(_bench_args(tiny_model_dir, "--dtype", "auto")) == 0
    out = capsys.readouterr().out
    for label in ("sequential", "parallel", "batch fork", "ideal speedup"):
        assert label in out


def test_bench_decode_auto_dtype_json(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main([*_bench_args(tiny_model_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["step_ms"]) == {"float32", "bfloat16"}  # both timed
    assert set(result["dtype"].values()) <= {"float32", "bfloat16"}
    for mode, step in (("sequential", "t1"), ("parallel", "tn"), ("batch", "batch_n")):
        chosen = result["dtype"][mode]
        assert all(result["step_ms"][chosen][step] <= s[step] for s in result["step_ms"].values())


def test_missing_model_folder_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "no-such-model"
    assert cli.main(_bench_args(missing)) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("parallel-reason: error:")
    assert str(missing) in lines[0]


def test_debug_adds_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--debug", *_bench_args(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("parallel-reason: error:")


@pytest.mark.parametrize(
    "bad",
    [["--branches", "0"], ["--new-tokens", "x"], ["--attention", "split,nope"], ["--dtype", "f8"]],
)
def test_usage_errors_exit_2(bad: list[str], capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "decode", *bad]) == 2
    assert "usage:" in capsys.readouterr().err


def test_parser_choices_match_the_benchmark() -> None:
    # cli keeps copies so that building the parser does not import torch.
    assert cli._ATTENTIONS == bench_decode.ATTENTIONS
    assert cli._DTYPE_CHOICES == bench_decode.DTYPE_CHOICES


def test_module_entry_point_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "langchain_parallel_reason", "bench", "decode", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--new-tokens" in done.stdout


def test_inputs_have_the_requested_shape(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(bench_decode.build_prefix_ids(tokenizer, 37)) == 37
    prefixes = bench_decode.build_branch_prefixes(tokenizer, 12)  # 1- and 2-digit step numbers
    assert len({tuple(p) for p in prefixes}) == 12
    assert len({len(p) for p in prefixes}) == 1


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="branches"):
        bench_decode.DecodeBenchConfig(branches=0)
    with pytest.raises(ValueError, match="attention"):
        bench_decode.DecodeBenchConfig(attention=("split", "split"))
