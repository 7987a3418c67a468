"""Clocks and memory readings shared by the workloads."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

__all__ = ["clock", "commit_times", "current_rss_mb", "peak_rss_mb"]

clock = time.perf_counter


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (``getrusage`` ``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB elsewhere


def current_rss_mb() -> float:
    """This process's resident set size now, in MB (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return peak_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def commit_times(manager: Any, item: Any, n: int, warm_up: int = 5) -> list[float]:
    """Seconds each of ``n`` commits took, each setting ``item.a`` to its number (so the last
    leaves ``n - 1``), after ``warm_up`` untimed ones: a connection's first are not typical."""
    for i in range(warm_up):
        item.a = -i - 1
        manager.commit()
    times = []
    for i in range(n):
        began = clock()
        item.a = i
        manager.commit()
        times.append(clock() - began)
    return times
