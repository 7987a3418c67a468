"""Commit latency of FileStorage next to the floor: a raw write + fdatasync of the same size.

Run as ``python benchmarks/bench_commit.py [N] [DIRECTORY]``.  Both loops run in the same
process on the same disk, alternating one by one so drift in the disk's speed hits both alike.
Each FileStorage commit is begin + store (one small record, an existing object, so the
conflict check reads its header) + vote + finish; the floor appends the same number of bytes
with ``os.write`` and syncs with ``os.fdatasync``.  Also prints open times for a file of
200,000 objects with and without its index (``--open``).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.utils import p64, z64

RECORD = b"x" * 100
META = TransactionMeta(user="bench", description="one small record")


def bench_commit(directory: str, n: int) -> None:
    """Print median commit latency, the floor's and their ratio.

    Commits and floor writes alternate one by one, so the disk's moods hit both alike.
    """
    path = os.path.join(directory, "bench.fs")
    fs = FileStorage(path)
    fs.begin(META)
    fs.store(z64, z64, RECORD)
    fs.vote()
    tid = fs.finish()
    before = os.path.getsize(path)
    fs.begin(META)
    fs.store(z64, tid, RECORD)
    fs.vote()
    tid = fs.finish()
    txn_size = os.path.getsize(path) - before
    data = b"y" * txn_size
    fd = os.open(os.path.join(directory, "floor.bin"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    ours: list[float] = []
    floor: list[float] = []
    clock = time.perf_counter
    try:
        for _ in range(n):
            t0 = clock()
            fs.begin(META)
            fs.store(z64, tid, RECORD)
            fs.vote()
            tid = fs.finish()
            t1 = clock()
            os.write(fd, data)
            os.fdatasync(fd)
            t2 = clock()
            ours.append(t1 - t0)
            floor.append(t2 - t1)
    finally:
        os.close(fd)
        fs.close()
    m_ours, m_floor = statistics.median(ours), statistics.median(floor)
    print(f"transaction size      {txn_size} bytes, {n} commits")
    print(f"FileStorage commit    median {m_ours * 1e6:8.1f} us")
    print(f"write+fdatasync floor median {m_floor * 1e6:8.1f} us")
    print(f"ratio                 {m_ours / m_floor:.3f} (target <= 1.2)")


def bench_open(directory: str, objects: int = 200_000, per_txn: int = 1000) -> None:
    """Print the time to open a file of ``objects`` objects with and without its index."""
    path = os.path.join(directory, "open.fs")
    fs = FileStorage(path, fsync=False)
    for start in range(0, objects, per_txn):
        fs.begin(META)
        for oid in range(start, start + per_txn):
            fs.store(p64(oid), z64, b"r%d" % oid * 10)
        fs.vote()
        fs.finish()
    fs.close()
    size = os.path.getsize(path)
    t0 = time.perf_counter()
    FileStorage(path).close()
    with_index = time.perf_counter() - t0
    os.unlink(path + ".index")
    t0 = time.perf_counter()
    fs = FileStorage(path)
    without = time.perf_counter() - t0
    assert len(fs) == objects
    fs.close()
    print(f"open {objects} objects ({size / 1e6:.1f} MB, {objects // per_txn} txns)")
    print(f"  with index    {with_index * 1e3:8.1f} ms")
    print(f"  without index {without * 1e3:8.1f} ms")


def main() -> None:
    """Entry point."""
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 500
    base = args[1] if len(args) > 1 else None
    with tempfile.TemporaryDirectory(dir=base) as directory:
        bench_commit(directory, n)
        if "--open" in sys.argv:
            bench_open(directory)


if __name__ == "__main__":
    main()
