"""Helper for test_process_faults.py: FileStorage work in a child process, killed or watched.

Usage: ``python fault_child.py MODE PATH [ARGS...]``

``commit PATH KILL_AT HOW``
    Commit transactions 0..11 (transaction ``i`` stores oid ``i + 1`` with :func:`record_for`
    and the root as ``str(i)``; every fourth is voted, then aborted, with oid
    ``ABORTED_BASE + i``; every fifth record is big enough to be streamed out before the
    vote).  Prints ``ok I TIDHEX`` / ``aborted I`` once each call returned, then ``calls N``.
``open PATH KILL_AT HOW``
    Open PATH writable (recovering its end) and close it; then print ``calls N``.
``flap PATH SECONDS``
    For SECONDS: commit transaction ``i``, then vote a big transaction and abort it after a
    short pause; readers opening meanwhile must never see it.
``read PATH SECONDS``
    For SECONDS: open PATH read-only, check what it sees (below), close; and keep one
    storage open throughout, loading from it again and again.  Prints ``reads N``.

KILL_AT numbers the calls of ``os.pwrite``, ``os.ftruncate``, ``os.fsync``,
``os.fdatasync`` and ``os.replace`` (0: never, and list them).  At that call the process SIGKILLs itself,
as HOW says: ``before`` the call, ``after`` it returned, or ``torn``: a write spanning pages
is done up to a page boundary first (what a SIGKILL between the kernel's page copies
leaves; a write within one page cannot tear, and dies before instead).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from amberdb.exceptions import POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.file import storage as storage_module
from amberdb.utils import p64, z64

ABORTED_BASE = 1 << 32
TRANSACTIONS = 12
PAGE = 4096


def record_for(i: int) -> bytes:
    """The record transaction ``i`` writes: every fifth is streamed (FLUSH_SIZE is 3000 here)."""
    size = 9000 + i if i % 5 == 4 else 40 + (i * 37) % 2000
    unit = b"r%d-" % i
    return (unit * (size // len(unit) + 1))[:size]


def install_kill(kill_at: int, how: str) -> Callable[[], int]:
    """Wrap the writing system calls; returns a function giving how many were made.

    Without a kill point, prints ``call N NAME`` for each (``pwrite-pages`` for a write
    that spans pages, the only kind a kill can tear).
    """
    count = [0]

    def die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(name: str) -> None:
        real = getattr(os, name)

        def wrapper(*args: Any) -> Any:
            count[0] += 1
            if not kill_at:
                spans = name == "pwrite" and args[2] % PAGE + len(args[1]) > PAGE
                print(f"call {count[0]} {'pwrite-pages' if spans else name}", flush=True)
            if count[0] != kill_at:
                return real(*args)
            if how == "torn" and name == "pwrite":
                fd, data, offset = args
                view = memoryview(data)
                cut = PAGE - offset % PAGE
                if cut < len(view):
                    pages = (len(view) - cut - 1) // PAGE
                    cut += PAGE * (kill_at % (pages + 1))
                    real(fd, view[:cut], offset)
            if how == "after":
                real(*args)
            die()

        setattr(os, name, wrapper)

    for name in ("pwrite", "ftruncate", "fsync", "fdatasync", "replace"):
        wrap(name)
    return lambda: count[0]


def commit_all(path: str) -> None:
    fs = FileStorage(path)
    for i in range(TRANSACTIONS):
        root_tid = fs.load(z64)[1] if len(fs) else z64
        fs.begin(TransactionMeta(description=f"txn {i}"))
        if i % 4 == 3:
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
    fs.close()


def flap(path: str, seconds: float) -> None:
    fs = FileStorage(path)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        root_tid = fs.load(z64)[1] if len(fs) else z64
        fs.begin(TransactionMeta())
        fs.store(p64(i + 1), z64, record_for(i))
        fs.store(z64, root_tid, str(i).encode())
        fs.vote()
        fs.finish()
        fs.begin(TransactionMeta())
        fs.store(p64(ABORTED_BASE + i), z64, b"never committed" * 2000)  # several pages
        fs.store(z64, fs.load(z64)[1], b"aborted root")
        fs.vote()
        time.sleep(0.002)
        fs.abort()
        i += 1
    fs.close()


def check_snapshot(fs: FileStorage) -> int:
    """What a reader sees must be a finished state: root i, oids 1..i+1 present, no aborted oid."""
    record, _ = fs.load(z64)
    assert record != b"aborted root", "read the root of an aborted transaction"
    i = int(record)
    for j in range(max(0, i - 3), i + 1):
        assert fs.load(p64(j + 1))[0] == record_for(j), j
    for j in range(max(0, i - 3), i + 3):
        try:
            fs.load(p64(ABORTED_BASE + j))
        except POSKeyError:
            continue
        raise AssertionError(f"read oid {ABORTED_BASE + j} of an aborted transaction")
    return i


def read(path: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            steady = FileStorage(path, read_only=True)
            if len(steady):
                break
            steady.close()
        except Exception:  # the writer is still creating the file
            pass
        time.sleep(0.01)
    reads = 0
    while time.monotonic() < deadline:
        with FileStorage(path, read_only=True) as fs:
            if len(fs):
                check_snapshot(fs)
        check_snapshot(steady)  # its map outlives many truncations by the writer
        reads += 1
    steady.close()
    print(f"reads {reads}", flush=True)


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    storage_module.FLUSH_SIZE = 3000
    if mode in ("commit", "open"):
        calls = install_kill(int(sys.argv[3]), sys.argv[4])
        if mode == "commit":
            commit_all(path)
        else:
            FileStorage(path).close()
        print(f"calls {calls()}", flush=True)
    elif mode == "flap":
        flap(path, float(sys.argv[3]))
    elif mode == "read":
        read(path, float(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
