"""Workload 9: commit latency of one small object per transaction, next to the disk's floor.

Each transaction changes attribute ``a`` of one Item in a FileStorage and commits (both
engines sync the file on every commit).  The floor appends as many bytes as one such commit
adds to the file with ``os.write`` and syncs with ``os.fdatasync`` (``os.fsync`` where that
is missing), on the same disk, in the same process.  Commits and floor writes alternate one
by one so the disk's moods hit both alike; figures are medians in ms.
"""

from __future__ import annotations

import os
import statistics

from benchmarks.engines import Engine
from benchmarks.measure import clock

_sync = getattr(os, "fdatasync", os.fsync)


def commit_latency(engine: Engine, directory: str, n: int) -> dict[str, float]:
    """Median latency of ``n`` one-object commits and of ``n`` same-size write+sync calls."""
    path = os.path.join(directory, "commit.fs")
    db = engine.open_db(path, cache_size=1000)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    conn.root()["item"] = item = engine.Item(0)
    manager.commit()
    item.a = -1
    manager.commit()  # a first change, so the measured ones are all alike
    before = os.path.getsize(path)
    item.a = -2
    manager.commit()
    size = os.path.getsize(path) - before
    data = b"y" * size
    fd = os.open(os.path.join(directory, "floor.bin"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    commits: list[float] = []
    floor: list[float] = []
    try:
        for i in range(n):
            t0 = clock()
            item.a = i
            manager.commit()
            t1 = clock()
            os.write(fd, data)
            _sync(fd)
            t2 = clock()
            commits.append(t1 - t0)
            floor.append(t2 - t1)
    finally:
        os.close(fd)
    conn.close()
    db.close()
    commit_ms = statistics.median(commits) * 1e3
    floor_ms = statistics.median(floor) * 1e3
    return {
        "commit_ms": commit_ms,
        "commit_floor_ms": floor_ms,
        "commit_vs_floor": commit_ms / floor_ms,
        "commit_bytes": size,
    }
