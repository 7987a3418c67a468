"""Workload 14: group commit -- many writer threads of one process, each committing an object
of its own, on this machine's disk and on a simulated device whose fsync takes 1 ms.

Reported per thread count (1, 2, 4, 8, 16, 32): commits/s over all threads, commits per
sync call (fsync + fdatasync), and the p50 and p99 latency of one ``commit()``.  The slow
device is simulated by sleeping 1 ms after every ``os.fsync``/``os.fdatasync`` of the worker
process; :func:`simulate_slow_sync` must run before the engine is imported, since ZODB binds
``os.fsync`` at import.  A fresh database per run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.engines import Engine
from benchmarks.measure import clock

THREADS = (1, 2, 4, 8, 16, 32)
DEVICES = ("disk", "slow")
SLOW_SYNC_SECONDS = 0.001


class SyncCounter:
    """Counts the sync calls of the process (and makes each slower on the simulated device)."""

    def __init__(self) -> None:
        self.calls = 0
        self.delay = 0.0
        self._lock = threading.Lock()

    def install(self) -> None:
        """Wrap ``os.fsync`` and ``os.fdatasync`` (idempotent)."""
        if getattr(os.fsync, "_counted", False):
            return
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name, None)
            if real is not None:
                setattr(os, name, self._wrap(real))

    def _wrap(self, real: Callable[[int], None]) -> Callable[[int], None]:
        def synced(fd: int) -> None:
            real(fd)
            if self.delay:
                time.sleep(self.delay)
            with self._lock:
                self.calls += 1

        synced._counted = True  # type: ignore[attr-defined]
        return synced


SYNCS = SyncCounter()


def simulate_slow_sync(slow: bool) -> None:
    """Count syncs from now on; with ``slow``, each takes 1 ms longer (call before importing the engine)."""
    SYNCS.install()
    SYNCS.delay = SLOW_SYNC_SECONDS if slow else 0.0


def _run(engine: Engine, path: str, threads: int, commits: int) -> dict[str, float]:
    db = engine.open_db(path, cache_size=1000)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    root = conn.root()
    for n in range(threads):
        root[f"item{n}"] = engine.Item(0)
    manager.commit()
    conn.close()
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start_line = threading.Barrier(threads + 1, timeout=120)

    def worker(n: int) -> None:
        try:
            tm = engine.transaction_manager()
            connection = db.open(transaction_manager=tm)
            mine: Any = connection.root()[f"item{n}"]
            start_line.wait()
            own = latencies[n]
            for _ in range(commits):
                tm.begin()
                mine.a += 1
                began = clock()
                tm.commit()
                own.append(clock() - began)
            connection.close()
        except BaseException as exc:
            errors.append(exc)
            raise

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    start_line.wait()
    syncs_before = SYNCS.calls
    began = clock()
    for thread in workers:
        thread.join()
    elapsed = clock() - began
    syncs = SYNCS.calls - syncs_before
    if errors:
        raise errors[0]
    conn = db.open(transaction_manager=manager)
    root = conn.root()
    got = sum(root[f"item{n}"].a for n in range(threads))
    manager.abort()
    conn.close()
    db.close()
    total = threads * commits
    if got != total:
        raise AssertionError(f"group commit, {threads} threads: {got} increments landed, expected {total}")
    ordered = sorted(x for own in latencies for x in own)
    return {
        "rate": total / elapsed,
        "per_sync": total / max(syncs, 1),
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, (len(ordered) * 99) // 100)],
        "min_thread_share": min(len(own) for own in latencies) / commits,
    }


def group_commit(
    engine: Engine, directory: str, commits: int, device: str, threads: tuple[int, ...] = THREADS
) -> dict[str, float]:
    """Every thread count on ``device`` (``disk`` or ``slow``; see :func:`simulate_slow_sync`),
    ``commits`` commits per thread."""
    results: dict[str, float] = {}
    for count in threads:
        path = os.path.join(directory, f"group{device}{count}.fs")
        figures = _run(engine, path, count, commits)
        for name, value in figures.items():
            results[f"group_{device}_{count}_{name}"] = value
    return results


BENCH_THREADS = (1, 16, 32)
"""The thread counts the suite (``./scripts/bench --only group_commit``) measures."""


def prepare() -> None:
    """Before the engine is imported in the worker: count syncs (ZODB binds ``os.fsync`` at
    import, so wrapping it later would miss its calls)."""
    SYNCS.install()


def suite_workload(engine: Engine, directory: str, commits: int) -> dict[str, float]:
    """The suite's task: :data:`BENCH_THREADS` writers on the real disk and on the simulated
    1 ms device, plus the ratios the issue's targets are about (16 threads vs 1 on each
    device, p99 / p50 at 32 threads)."""
    results: dict[str, float] = {}
    for device in DEVICES:
        SYNCS.install()
        SYNCS.delay = SLOW_SYNC_SECONDS if device == "slow" else 0.0
        results.update(group_commit(engine, directory, commits, device, BENCH_THREADS))
        results[f"group_{device}_16_vs_1"] = (
            results[f"group_{device}_16_rate"] / results[f"group_{device}_1_rate"]
        )
        results[f"group_{device}_32_p99_vs_p50"] = (
            results[f"group_{device}_32_p99_ms"] / results[f"group_{device}_32_p50_ms"]
        )
    SYNCS.delay = 0.0
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.workloads.groupcommit ENGINE DEVICE COMMITS [THREADS...]``: one
    engine on one device in this process, the figures printed one per line."""
    import sys
    import tempfile

    args = sys.argv[1:] if argv is None else argv
    name, device, commits = args[0], args[1], int(args[2])
    counts = tuple(int(a) for a in args[3:]) or THREADS
    simulate_slow_sync(device == "slow")
    from benchmarks.engines import load

    engine = load(name)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as directory:
        for key, value in group_commit(engine, directory, commits, device, counts).items():
            print(f"{key} {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
