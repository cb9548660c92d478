"""CPU threading policy of the package (no LangChain here).

Contract: importing the package calls ``calm_openmp()``: unless the user chose otherwise, idle
OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning. ``default_threads()`` is
the number of cores this process may run on (``os.sched_getaffinity``), and ``apply_threads(n)``
sets torch's intra-op threads *for the calling thread* (with OpenMP the count is per thread), so
each thread that runs model forwards calls it once. Why: a spinning OpenMP team fights any other
load on the machine; on a 2-core box with one core busy, a 64-token answer took 108-124 s with
the defaults and 3.2-3.6 s with passive waiting or one thread (../shared/FACTS.md).
"""

from __future__ import annotations

import os
import sys

__all__ = ["apply_threads", "calm_openmp", "default_threads", "openmp_calmed"]

_CALMED_BEFORE_TORCH: bool | None = None


def calm_openmp() -> None:
    """Ask OpenMP to let idle threads sleep, unless ``OMP_WAIT_POLICY`` is set already.

    libgomp reads the policy when torch's thread pool starts, so this only takes effect when
    it runs before the process's first parallel torch op; ``openmp_calmed()`` tells whether it
    did. Idempotent.
    """
    global _CALMED_BEFORE_TORCH
    if _CALMED_BEFORE_TORCH is not None:
        return
    user_set = "OMP_WAIT_POLICY" in os.environ
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
