"""Workload 14: pack a database of ``n`` objects, half of them garbage, each live one with
three old revisions; time it, its peak memory, and what it does to a committing writer.

:func:`build` (not timed) commits ``n`` Items in chunks of ``batch``, then drops every
second Item from its chunk (garbage) and rewrites each remaining Item three times.
:func:`pack_database` runs in a fresh process per sample on a copy of that database: it
measures a writer thread's commit latency (one small change per commit) for a while
without a pack, then while the pack runs, and times the pack.  The process's peak RSS is
the packing process's.
"""

from __future__ import annotations

import os
import resource
import shutil
import threading
import time
from typing import Any

from benchmarks.engines import Engine
from benchmarks.measure import clock

_SUFFIXES = ("", ".index")


def _path(directory: str, name: str = "pack.fs") -> str:
    return os.path.join(directory, name)


def build(engine: Engine, directory: str, n: int, batch: int) -> dict[str, float]:
    """Fill the database (setup, not a measurement)."""
    db = engine.open_db(_path(directory), cache_size=batch + 1000)
    fill(engine, db, n, batch)
    db.close()
    return {"objects": n}


def fill(engine: Engine, db: Any, n: int, batch: int) -> None:
    """Commit ``n`` Items in chunks of ``batch``, drop every second one, rewrite the rest
    three times (the database :func:`build` makes, on ``db``)."""
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    root = conn.root()
    root["chunks"] = chunks = engine.PersistentList()
    root["writer"] = engine.Item(-1)
    item_class, list_class = engine.Item, engine.PersistentList
    for start in range(0, n, batch):
        chunks.append(list_class([item_class(i) for i in range(start, min(n, start + batch))]))
        manager.commit()
        engine.minimize_cache(conn)
    for chunk in chunks:
        chunk[:] = chunk[::2]  # every second Item becomes garbage
        manager.commit()
        engine.minimize_cache(conn)
    for _ in range(3):  # three rewrites: each live Item then has three old revisions
        for chunk in chunks:
            for item in chunk:
                item.a += 1
            manager.commit()
            engine.minimize_cache(conn)
    conn.close()


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB (0 where there is none)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak_rss() -> float:
    """Start the peak-RSS mark (VmHWM) afresh from now, and return the RSS now (MB).

    What the pack itself adds is then its peak minus this: the database's own index, the
    interpreter and the libraries are there before and after, in either engine.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # Linux: reset the peak resident set size to the current one
    except OSError:
        pass
    return _status_mb("VmRSS")


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3


class _Writer(threading.Thread):
    """Commits one small change after another, keeping each commit's latency."""

    def __init__(self, engine: Engine, db: Any) -> None:
        super().__init__(daemon=True)
        self.engine, self.db = engine, db
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        manager = self.engine.transaction_manager()
        conn = self.db.open(transaction_manager=manager)
        item = conn.root()["writer"]
        while not self.stop.is_set():
            began = clock()
            item.a += 1
            manager.commit()
            self.latencies.append(clock() - began)
        conn.close()

    def finish(self, at_least: int) -> list[float]:
        deadline = time.monotonic() + 30
        while len(self.latencies) < at_least and time.monotonic() < deadline:
            time.sleep(0.001)
        self.stop.set()
        self.join()
        return self.latencies


def pack_database(engine: Engine, directory: str, n: int) -> dict[str, float]:
    """Seconds to pack, and the writer's p99 commit latency with and without a pack."""
    source, path = _path(directory), _path(directory, "work.fs")
    for suffix in _SUFFIXES:
        if os.path.exists(source + suffix):
            shutil.copyfile(source + suffix, path + suffix)
    before = os.path.getsize(path)
    db = engine.open_db(path, cache_size=1000)
    try:
        alone = _Writer(engine, db)
        alone.start()
        time.sleep(0.5)
        base = alone.finish(at_least=20)
        writer = _Writer(engine, db)
        writer.start()
        while not writer.latencies:
            time.sleep(0.001)
        resident = _reset_peak_rss()
        began = clock()
        engine.pack(db)
        elapsed = clock() - began
        growth = _status_mb("VmHWM") - resident
        during = writer.finish(at_least=len(writer.latencies) + 5)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        count = engine.object_count(db)
    finally:
        db.close()
    after = os.path.getsize(path)
    # n Items, half garbage; plus the root, the chunk list, the chunks and the writer's Item.
    if not n // 2 <= count <= n // 2 + n // 100 + 10 or after >= before:
        raise AssertionError(f"the pack kept {count} objects of {n} ({before} -> {after} bytes)")
    p99, p99_base = _p99(during), _p99(base)
    return {
        "pack_s": elapsed,
        "pack_peak_rss_mb": peak,
        "pack_rss_growth_mb": growth,
        "pack_p99_ms": p99,
        "pack_p99_base_ms": p99_base,
        "pack_p99_vs_base": p99 / p99_base,
        "pack_shrink": before / after,
    }
