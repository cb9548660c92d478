"""CPU threading policy of the package (no LangChain here).

Contract: importing the package calls ``calm_openmp()``: unless the user chose otherwise, idle
OpenMP threads spin briefly and then sleep (``OMP_WAIT_POLICY=PASSIVE`` with
``GOMP_SPINCOUNT=30000``) instead of spinning for long. ``default_threads()`` is the number of
cores this process may run on (``os.sched_getaffinity``), and ``apply_threads(n)`` sets torch's
intra-op threads *for the calling thread* (with OpenMP the count is per thread), so each thread
that runs model forwards calls it once. ``off_main(fn)`` runs ``fn`` on a short-lived thread:
the door loads models there (see below). ``CoreWatch`` tells the engine how many of its cores
other processes leave free, so its forwards use only those (see below).

Why a bounded spin: a long-spinning OpenMP team fights any other load on the machine; on a
2-core box with one core busy, a 64-token answer took 108-124 s with the defaults and 3.2-3.6 s
with passive waiting or one thread (../shared/FACTS.md). Passive waiting alone makes every
parallel region wake its workers through the kernel: a 12-row bfloat16 linear took 160 us
instead of 100. A spin of 30000 (about half a millisecond) keeps the workers awake across the
back-to-back regions of one forward. But two threads spinning for one core that a neighbour
holds lose most of it (``bench busy``: 1.2 s idle, 10.2 s with a core busy): so the engine
samples ``/proc/stat`` every quarter second and runs its forwards on the cores others leave
free (one thread while a neighbour holds a core: 1.5 s, busy or not).

Why off the main thread: libgomp keeps one team per thread that ever ran a parallel region and
throttles spinning to almost nothing once its threads outnumber the cores. A model loaded on
the caller's thread leaves that thread a team; the engine's scheduler thread then runs every
forward with sleeping workers (measured: bench serve's 16 calls at once 7.6-8.4 s with the
caller's team alive, 6.0 s without, same tokens). A thread that ends frees its team.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = [
    "SPIN_COUNT",
    "CoreWatch",
    "apply_threads",
    "calm_openmp",
    "cpu_snapshot",
    "default_threads",
    "off_main",
    "openmp_calmed",
    "other_cores",
]

SPIN_COUNT = 30000
"""``GOMP_SPINCOUNT`` set at import (busy-wait iterations before an idle OpenMP thread sleeps)."""

_T = TypeVar("_T")

_CALMED_BEFORE_TORCH: bool | None = None


def calm_openmp() -> None:
    """Ask OpenMP to let idle threads sleep after a short spin, unless the user set
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` already.

    libgomp reads the policy when torch's thread pool starts, so this only takes effect when
    it runs before the process's first parallel torch op; ``openmp_calmed()`` tells whether it
    did. Idempotent.
    """
    global _CALMED_BEFORE_TORCH
    if _CALMED_BEFORE_TORCH is not None:
        return
    user_set = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    if not user_set:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    _CALMED_BEFORE_TORCH = user_set or "torch" not in sys.modules


def openmp_calmed() -> bool:
    """True when OpenMP's wait policy was chosen (by us or the user) before torch loaded."""
    return bool(_CALMED_BEFORE_TORCH) or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def default_threads() -> int:
    """Cores this process may use: its CPU affinity (cgroup/taskset aware), else ``os.cpu_count``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def apply_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads for the calling thread; return the count in force.

    ``None`` means ``default_threads()``. Values above the usable cores are capped there:
    more threads than cores only wait on each other (and libgomp fails to create thousands).
    """
    import torch

    limit = default_threads()
    n = limit if num_threads is None else max(1, min(int(num_threads), limit))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def off_main(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` run on a new thread that ends when it returns (its result, or
    its exception raised here). The thread's OpenMP team ends with it, so the calling thread
    gains none (see the module docstring)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller, re-raised there
            box["error"] = e

    thread = threading.Thread(target=target, name="parallel-reason-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def cpu_snapshot(cpus: Iterable[int] | None = None) -> tuple[float, float, float] | None:
    """(monotonic s, CPU s busy on ``cpus`` (None: the whole machine), CPU s of this process),
    from ``/proc/stat`` (busy: every state but idle and iowait); None where it cannot be read."""
    names = {"cpu"} if cpus is None else {f"cpu{c}" for c in cpus}
    try:
        with open("/proc/stat", encoding="ascii") as f:
            rows = [line.split() for line in f if line.startswith("cpu")]
        ticks = [sum(int(v) for v in r[1:9]) - int(r[4]) - int(r[5]) for r in rows if r[0] in names]
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    return time.monotonic(), sum(ticks) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def other_cores(
    start: tuple[float, float, float] | None, end: tuple[float, float, float] | None
) -> float | None:
    """Mean cores other processes kept busy between two ``cpu_snapshot``s (None: unknown)."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(others, 0.0) / (end[0] - start[0])


class CoreWatch:
    """How many of this process's cores other processes leave free, from ``/proc/stat``.

    ``free_cores()`` re-samples at most every ``interval_s``: ``other_cores`` over the last
    interval, on the usable cores, is the others' load; a core counts as taken from half a core
    of load. Where ``/proc`` cannot be read (not Linux) every usable core counts as free.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        try:
            self.cpus: list[int] | None = list(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = None
        self.usable = default_threads()
        self.free = self.usable
        self._last: tuple[float, float, float] | None = None  # the last cpu_snapshot

    def free_cores(self) -> int:
        """Usable cores not held by other processes (at least 1)."""
        if self._last is not None and time.monotonic() - self._last[0] < self.interval_s:
            return self.free
        sample = self._sample()
        if sample is None:
            return self.free
        load = other_cores(self._last, sample)
        if load is not None:
            self.free = max(1, self.usable - int(load + 0.5))
        self._last = sample
        return self.free

    def _sample(self) -> tuple[float, float, float] | None:
        return cpu_snapshot(self.cpus)
