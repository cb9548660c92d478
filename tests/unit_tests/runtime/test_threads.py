"""The package's CPU threading policy (runtime/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from langchain_parallel_reason.runtime.threads import (
    SPIN_COUNT,
    CoreWatch,
    apply_threads,
    default_threads,
    off_main,
)


def _run(code: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ({}, f"PASSIVE {SPIN_COUNT}"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE -"),
        ({"GOMP_SPINCOUNT": "7"}, "- 7"),
    ],
    ids=["unset", "user-set-policy", "user-set-spin"],
)
def test_import_sets_a_short_spin_unless_user_chose(preset: dict[str, str], expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(preset)
    code = (
        "import os, langchain_parallel_reason\n"
        "print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'))"
    )
    assert _run(code, env) == expected


def test_policy_is_set_before_torch_loads() -> None:
    # The package must not import torch itself before it has set the policy.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
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


def test_off_main_runs_on_a_thread_that_ends_and_hands_back_result_and_error() -> None:
    ran: list[threading.Thread] = []

    def work(x: int, *, y: int) -> int:
        ran.append(threading.current_thread())
        return x + y

    assert off_main(work, 1, y=2) == 3
    assert ran[0] is not threading.current_thread()
    assert not ran[0].is_alive()  # its OpenMP team went with it

    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        off_main(fail)


def test_the_door_loads_a_model_off_the_calling_thread(monkeypatch) -> None:
    import langchain_parallel_reason.loading as loading
    from langchain_parallel_reason.runtime.door import open_engine

    seen: list[threading.Thread] = []

    def load(*args, **kwargs):
        seen.append(threading.current_thread())
        raise RuntimeError("stop after the thread is known")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", load)
    with pytest.raises(RuntimeError, match="stop after the thread is known"):
        open_engine("a-folder-that-is-never-read", progress=False)
    assert seen
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


@pytest.mark.skipif(default_threads() < 2, reason="needs 2 usable cores: one to keep busy")
def test_core_watch_sees_a_neighbour_hold_a_core() -> None:
    watch = CoreWatch(interval_s=0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        watch.free_cores()  # first sample
        time.sleep(0.5)
        assert watch.free_cores() <= default_threads() - 1
    finally:
        spinner.kill()
        spinner.wait()


def test_core_watch_counts_every_core_free_where_proc_cannot_be_read(monkeypatch) -> None:
    watch = CoreWatch(interval_s=0.0)
    monkeypatch.setattr(watch, "_sample", lambda: None)
    assert watch.free_cores() == watch.free_cores() == default_threads()
