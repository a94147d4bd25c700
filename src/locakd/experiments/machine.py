"""The machine a measurement ran on, and the CPU time it took.

Timings of the demo and the benchmark suite depend on the CPU model, the cores this process
may use and how busy the machine was, so every ``results.json`` carries :func:`machine_info`
and the load average at the end (:func:`load_average`). CPU time (:func:`cpu_seconds`) counts
this process and its finished child processes (the runner's workers), which makes it the
steadier number on a shared machine.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["available_cores", "cpu_seconds", "load_average", "machine_info"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1 / 5 / 15-minute load averages, or ``None`` where the OS has none."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have finished."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch and Python versions, platform and load average (timings depend on all)."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores_available": available_cores(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    load = load_average()
    if load is not None:
        info["load_average"] = [round(x, 2) for x in load]
    return info
