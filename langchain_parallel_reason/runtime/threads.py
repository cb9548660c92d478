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
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "SPIN_COUNT",
    "CoreWatch",
    "apply_threads",
    "calm_openmp",
    "default_threads",
    "off_main",
    "openmp_calmed",
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


class CoreWatch:
    """How many of this process's cores other processes leave free, from ``/proc/stat``.

    ``free_cores()`` re-samples at most every ``interval_s``: the busy time of the usable cores
    over the last interval, less this process's own CPU time, is the others' load in cores; a
    core counts as taken from half a core of load. Where ``/proc`` cannot be read (not Linux)
    every usable core counts as free.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        try:
            self.cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = []
        self.usable = default_threads()
        self.free = self.usable
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last: tuple[float, int, int] | None = None  # (time, cores' busy, own) in ticks

    def free_cores(self) -> int:
        """Usable cores not held by other processes (at least 1)."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.interval_s:
            return self.free
        sample = self._sample()
        if sample is None:
            return self.free
        if self._last is not None:
            seconds = now - self._last[0]
            others = (sample[0] - self._last[1]) - (sample[1] - self._last[2])
            load = others / (self._tick * seconds)  # cores' worth of other processes' work
            self.free = max(1, self.usable - int(load + 0.5))
        self._last = (now, *sample)
        return self.free

    def _sample(self) -> tuple[int, int] | None:
        """(busy ticks of the usable cores, this process's ticks), or None."""
        try:
            with open("/proc/stat") as f:
                lines = f.read().splitlines()
            with open("/proc/self/stat") as f:
                own = f.read()
        except OSError:
            return None
        wanted = {f"cpu{c}" for c in self.cpus}
        busy = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if name in wanted:
                # user nice system idle iowait irq softirq: all but idle and iowait
                t = [int(x) for x in rest.split()[:7]]
                busy += t[0] + t[1] + t[2] + t[5] + t[6]
        fields = own[own.rindex(")") + 2 :].split()
        return busy, int(fields[11]) + int(fields[12])  # utime + stime
