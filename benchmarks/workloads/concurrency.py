"""Workload 12: 1, 2 and 4 writer threads, each with its own connection, on a FileStorage.

* disjoint -- every thread increments an Item of its own in each transaction;
* counter -- every transaction increments one shared Counter that resolves conflicts.

A ConflictError that reaches the application is retried (abort, then again); reported are
commits/s over all threads and such conflicts per commit.  A fresh database per run.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from benchmarks.engines import Engine
from benchmarks.measure import clock

MODES = ("disjoint", "counter")
THREADS = (1, 2, 4)


def _run(engine: Engine, path: str, mode: str, threads: int, commits: int) -> tuple[float, float]:
    db = engine.open_db(path, cache_size=1000)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    root = conn.root()
    for n in range(threads):
        root[f"item{n}"] = engine.Item(0)
    root["counter"] = engine.Counter()
    manager.commit()
    conn.close()
    conflicts = [0] * threads
    errors: list[BaseException] = []
    start_line = threading.Barrier(threads + 1, timeout=120)

    def worker(n: int) -> None:
        try:
            tm = engine.transaction_manager()
            connection = db.open(transaction_manager=tm)
            start_line.wait()
            for _ in range(commits):
                while True:
                    try:
                        tm.begin()
                        root: Any = connection.root()
                        if mode == "disjoint":
                            root[f"item{n}"].a += 1
                        else:
                            root["counter"].count += 1
                        tm.commit()
                        break
                    except engine.ConflictError:
                        tm.abort()
                        conflicts[n] += 1
            connection.close()
        except BaseException as exc:
            errors.append(exc)
            raise

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    start_line.wait()
    began = clock()
    for thread in workers:
        thread.join()
    elapsed = clock() - began
    if errors:
        raise errors[0]
    conn = db.open(transaction_manager=manager)
    root = conn.root()
    got = root["counter"].count if mode == "counter" else sum(root[f"item{n}"].a for n in range(threads))
    manager.abort()
    conn.close()
    db.close()
    total = threads * commits
    if got != total:
        raise AssertionError(f"{mode} with {threads} threads: {got} increments landed, expected {total}")
    return total / elapsed, sum(conflicts) / total


def writers(engine: Engine, directory: str, commits: int) -> dict[str, float]:
    """Every mode at every thread count, ``commits`` commits per thread."""
    results: dict[str, float] = {}
    for mode in MODES:
        for threads in THREADS:
            path = os.path.join(directory, f"{mode}{threads}.fs")
            rate, conflict_rate = _run(engine, path, mode, threads, commits)
            results[f"conc_{mode}_{threads}"] = rate
            results[f"conc_{mode}_{threads}_conflicts"] = conflict_rate
    return results
