"""Where a benchmark ran: the machine, its load, and how busy other processes kept it.

Contract: stdlib only at import time (torch is imported to name a GPU); every function returns
None instead of raising where the platform lacks the figure (no /proc, no load average).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import time

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


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, CPU s busy on the whole machine, CPU s of this process), from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    own = os.times()
    return time.monotonic(), busy, own.user + own.system


def other_cores(start: tuple[float, float, float] | None) -> float | None:
    """Mean cores other processes kept busy since `start` (a `cpu_snapshot`): the contention
    behind the timings."""
    end = cpu_snapshot()
    if start is None or end is None or end[0] <= start[0]:
        return None
    others = (end[1] - start[1]) - (end[2] - start[2])
    return round(max(others, 0.0) / (end[0] - start[0]), 2)


def package_version(package: str) -> str | None:
    """The installed version of `package`, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
