"""Commits per second with 1, 2 and 4 writer threads, AmberDB next to ZODB in one run.

Two workloads on a file database, each thread with its own connection:

* disjoint — every thread changes its own object in each transaction;
* counter — every transaction increments one shared counter that resolves conflicts.

Reported: commits/s (total over threads, median of the repeats), the conflict rate
(ConflictErrors that reached the application per commit: retries), and AmberDB/ZODB ratios.
Run: ``python benchmarks/bench_concurrency.py [--commits N] [--repeat R]``; install the
``bench`` extra to include ZODB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from typing import Any

import amberdb
import amberdb.transaction as amber_transaction

try:
    import persistent
    import ZODB
    import ZODB.FileStorage
    from ZODB.POSException import ConflictError as ZodbConflictError

    import transaction as zodb_transaction
except ImportError:  # the bench extra is not installed: measure AmberDB alone
    ZODB = None


class AmberItem(amberdb.Persistent):
    def __init__(self) -> None:
        self.value = 0


class AmberCounter(amberdb.Persistent):
    def __init__(self) -> None:
        self.count = 0

    def _p_resolveConflict(self, old: Any, saved: Any, new: Any) -> Any:
        return {**new, "count": saved["count"] + new["count"] - old["count"]}


if ZODB is not None:

    class ZodbItem(persistent.Persistent):
        def __init__(self) -> None:
            self.value = 0

    class ZodbCounter(persistent.Persistent):
        def __init__(self) -> None:
            self.count = 0

        def _p_resolveConflict(self, old: Any, saved: Any, new: Any) -> Any:
            return {**new, "count": saved["count"] + new["count"] - old["count"]}


class Engine:
    """The operations a workload needs, for one database implementation."""

    def __init__(self, name: str, directory: str) -> None:
        self.name = name
        self.path = os.path.join(directory, f"{name}.fs")

    def open_db(self) -> Any:
        if self.name == "amberdb":
            return amberdb.DB(self.path)
        return ZODB.DB(ZODB.FileStorage.FileStorage(self.path))

    @property
    def manager(self) -> Any:
        return amber_transaction.manager if self.name == "amberdb" else zodb_transaction.manager

    @property
    def conflict(self) -> type[BaseException]:
        return amberdb.ConflictError if self.name == "amberdb" else ZodbConflictError

    def item(self) -> Any:
        return AmberItem() if self.name == "amberdb" else ZodbItem()

    def counter(self) -> Any:
        return AmberCounter() if self.name == "amberdb" else ZodbCounter()


def run(engine: Engine, workload: str, threads: int, commits: int) -> tuple[float, float]:
    """Commits per second and conflicts per commit for one configuration."""
    db = engine.open_db()
    conn = db.open()
    root = conn.root()
    for n in range(threads):
        root[f"item{n}"] = engine.item()
    root["counter"] = engine.counter()
    engine.manager.commit()
    conn.close()
    conflicts = [0] * threads
    start_line = threading.Barrier(threads + 1)

    def worker(n: int) -> None:
        connection = db.open()
        manager = engine.manager
        start_line.wait()
        for _ in range(commits):
            while True:
                try:
                    manager.begin()
                    root = connection.root()
                    if workload == "disjoint":
                        root[f"item{n}"].value += 1
                    else:
                        root["counter"].count += 1
                    manager.commit()
                    break
                except engine.conflict:
                    manager.abort()
                    conflicts[n] += 1
        connection.close()

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    start_line.wait()
    began = time.perf_counter()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - began
    db.close()
    total = threads * commits
    return total / elapsed, sum(conflicts) / total


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commits", type=int, default=200, help="commits per thread")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    names = ["amberdb"] + (["zodb"] if ZODB is not None else [])
    print(f"{'workload':<10}{'threads':>8}" + "".join(f"{n + ' c/s':>14}{n + ' confl':>14}" for n in names)
          + ("   amber/zodb" if len(names) == 2 else ""))  # fmt: skip
    for workload in ("disjoint", "counter"):
        for threads in (1, 2, 4):
            rates: dict[str, list[float]] = {name: [] for name in names}
            conflict_rates: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(args.repeat):
                for name in names:  # alternate the two so machine noise hits both alike
                    with tempfile.TemporaryDirectory() as directory:
                        rate, conflict_rate = run(Engine(name, directory), workload, threads, args.commits)
                    rates[name].append(rate)
                    conflict_rates[name].append(conflict_rate)
            medians = {name: statistics.median(rates[name]) for name in names}
            row = f"{workload:<10}{threads:>8}"
            for name in names:
                row += f"{medians[name]:>14.0f}{statistics.median(conflict_rates[name]):>14.3f}"
            if len(names) == 2:
                row += f"{medians['amberdb'] / medians['zodb']:>13.2f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
