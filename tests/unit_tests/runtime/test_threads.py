"""The package's CPU threading policy (runtime/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from langchain_parallel_reason.runtime.threads import apply_threads, default_threads


def _run(code: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")], ids=["unset", "user-set"]
)
def test_import_sets_passive_waiting_unless_user_chose(preset: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os, langchain_parallel_reason; print(os.environ['OMP_WAIT_POLICY'])"
    assert _run(code, env) == expected


def test_policy_is_set_before_torch_loads() -> None:
    # The package must not import torch itself before it has set the policy.
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = (
        "import sys, langchain_parallel_reason as p\n"
        "from langchain_parallel_reason.runtime.threads import openmp_calmed\n"
        "print('torch' in sys.modules, openmp_calmed())"
    )
    assert _run(code, env) == "False True"


def test_default_threads_follow_affinity() -> None:
    assert default_threads() == len(os.sched_getaffinity(0))


def test_apply_threads_caps_at_usable_cores_and_is_per_thread() -> None:
    before = torch.get_num_threads()
    try:
        assert apply_threads(10**6) == default_threads()
        assert apply_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert apply_threads(None) == default_threads()
        seen: list[int] = []
        # A new thread sets its own count (OpenMP's count is per thread).
        t = threading.Thread(target=lambda: seen.append(apply_threads(1)))
        t.start()
        t.join()
        assert seen == [1]
    finally:
        torch.set_num_threads(before)


def test_busy_bench_reports_the_slowdown(chat) -> None:
    from langchain_parallel_reason.bench.busy import BusyBenchConfig, run_busy_bench

    result = run_busy_bench(chat, BusyBenchConfig(max_tokens=4, repeats=1))
    assert result["slowdown"] == pytest.approx(
        result["busy_s"] / result["idle_s"], rel=0.1, abs=0.1
    )
    assert result["omp_wait_policy"] == "PASSIVE"
    assert result["threads"] <= result["usable_cores"]
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        BusyBenchConfig(repeats=0)
