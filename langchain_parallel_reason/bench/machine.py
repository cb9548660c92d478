"""Where a benchmark ran: the machine, its load, and how busy other processes kept it.

Contract: stdlib only at import time (torch is imported to name a GPU); every function returns
None instead of raising where the platform lacks the figure (no /proc, no load average).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform

from langchain_parallel_reason.runtime import threads
from langchain_parallel_reason.runtime.threads import cpu_snapshot

__all__ = [
    "cpu_snapshot",
    "load_average",
    "machine_description",
    "other_cores",
    "package_version",
]


def machine_description() -> str:
    """Platform, CPU model and core count (plus the GPU name when CUDA is present)."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    parts = [f"{platform.system()} {platform.machine()}", cpu, f"{os.cpu_count()} cores"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    return ", ".join(parts)


def load_average() -> float | None:
    """The 1-minute load average, rounded to 0.01 (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def other_cores(start: tuple[float, float, float] | None) -> float | None:
    """Mean cores other processes kept busy since `start` (a `cpu_snapshot`), to 0.01: the
    contention behind the timings."""
    load = threads.other_cores(start, cpu_snapshot())
    return None if load is None else round(load, 2)


def package_version(package: str) -> str | None:
    """The installed version of `package`, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
