"""Helper for test_crash.py: commit in a loop until killed, acknowledging each finished commit.

Usage: ``python crash_writer.py PATH START``.  Transaction ``i`` (counting from START) stores
oid ``i + 1`` with :func:`record_for` ``(i)`` and the root with ``str(i)``; every seventh is
voted and then aborted instead, and writes oid ``ABORTED_BASE + i``.  Lines on stdout, each
flushed only after the storage call returned: ``ok I TIDHEX`` and ``aborted I``.
"""

from __future__ import annotations

import sys

from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.utils import p64, z64

ABORTED_BASE = 1 << 32


def record_for(i: int) -> bytes:
    """The record transaction ``i`` writes: mostly small, sometimes big enough to stream."""
    size = (2 << 20) + i if i % 25 == 24 else 50 + (i * 37) % 3000
    unit = b"r%d-" % i
    return (unit * (size // len(unit) + 1))[:size]


def main() -> None:
    """Commit forever (until SIGKILL)."""
    path, start = sys.argv[1], int(sys.argv[2])
    fs = FileStorage(path)
    i = start
    while True:
        root_tid = fs.load(z64)[1] if len(fs) else z64
        fs.begin(TransactionMeta(description=f"txn {i}"))
        if i % 7 == 6:
            fs.store(p64(ABORTED_BASE + i), z64, record_for(i))
            fs.vote()
            fs.abort()
            print(f"aborted {i}", flush=True)
        else:
            fs.store(p64(i + 1), z64, record_for(i))
            fs.store(z64, root_tid, str(i).encode())
            fs.vote()
            tid = fs.finish()
            print(f"ok {i} {tid.hex()}", flush=True)
        i += 1


if __name__ == "__main__":
    main()
