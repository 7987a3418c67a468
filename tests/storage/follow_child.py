"""Helper for test_follower.py: a writer in a child process, for a read-only follower to watch.

Usage: ``python follow_child.py MODE PATH [ARGS...]``.  Every mode first commits transaction
0 (the root, ``b"0"``), then prints ``ready``.  Lines on stdout are flushed only after the
storage call they report returned.

``plan PATH SEED SECONDS``
    For SECONDS, commit transactions 1, 2, ... as :func:`plan` says: transaction ``i``
    writes ``b"%d" % i`` into the root and :func:`record` into each of its oids; an aborted
    one also writes oid ``ABORTED_BASE + i`` and the root ``b"aborted"``, votes, waits a
    moment and aborts.  Prints ``ok I TIDHEX`` or ``aborted I``, then ``done I`` (the last
    transaction number).
``voted PATH``
    Commit transactions 1..3 as :func:`plan` (seed 0) says, but never aborting; then vote
    transaction 4 (root ``b"4"`` and a new oid ``NEW_OID``), print ``voted`` and sleep
    until killed.
``stream PATH HOW``
    Commit 1..3 as ``voted`` does, then store the root ``b"big"`` and oid ``BIG_OID`` with
    :func:`big_record`, streamed out behind a zero header.  HOW: ``pause`` prints
    ``streaming`` and sleeps until killed; ``torn`` SIGKILLs itself halfway through the
    write of the big record; ``header`` votes and SIGKILLs itself right after the vote's
    header write, before its fdatasync.
``db PATH SECONDS``
    Through :class:`amberdb.DB`, commit ``root['n'] = i`` for i = 1, 2, ... for SECONDS,
    printing ``ok I`` after each commit.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from typing import Any

from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.file.storage import FLUSH_SIZE
from amberdb.utils import p64, z64

OIDS = 12
"""Transactions of a plan write oids among 1..OIDS (and the root)."""
ABORTED_BASE = 1 << 32
NEW_OID = 1000
BIG_OID = 2000
_SLEEP = 60.0  # far longer than any test waits: the test kills us first


def plan(seed: int, i: int) -> tuple[list[int], int, bool]:
    """Transaction ``i`` (from 1): the oids it writes, its first record's size, aborted or not.

    Some first records are bigger than FLUSH_SIZE: those transactions are streamed out
    before their vote.
    """
    rng = random.Random(seed * 1_000_003 + i)
    oids = sorted(rng.sample(range(1, OIDS + 1), rng.randint(1, OIDS)))
    size = FLUSH_SIZE + rng.randint(1, 1 << 18) if rng.random() < 0.05 else rng.randint(1, 4000)
    return oids, size, rng.random() < 0.2


def record(i: int, oid: int, size: int) -> bytes:
    """The record transaction ``i`` writes into ``oid``: its number first, padded to ``size``."""
    head = b"%d:%d:" % (i, oid)
    return head + b"." * (size - len(head))


def big_record() -> bytes:
    """The record of ``BIG_OID`` in the ``stream`` mode: more than two FLUSH_SIZEs."""
    return bytes(range(256)) * ((2 * FLUSH_SIZE + 300_000) // 256)


def say(line: str) -> None:
    print(line, flush=True)


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Writer:
    """A FileStorage writer that remembers the tid of each oid it committed."""

    def __init__(self, path: str) -> None:
        self.fs = FileStorage(path)
        self.tids: dict[bytes, bytes] = {}
        self.commit({z64: b"0"})
        say("ready")

    def store(self, items: dict[bytes, bytes]) -> None:
        for oid, data in items.items():
            self.fs.store(oid, self.tids.get(oid, z64), data)

    def commit(self, items: dict[bytes, bytes]) -> bytes:
        self.fs.begin(TransactionMeta())
        self.store(items)
        self.fs.vote()
        tid = self.fs.finish()
        self.tids.update(dict.fromkeys(items, tid))
        return tid

    def planned(self, seed: int, i: int, allow_abort: bool = True) -> None:
        oids, size, aborted = plan(seed, i)
        items = {p64(oid): record(i, oid, size if n == 0 else 40) for n, oid in enumerate(oids)}
        if aborted and allow_abort:
            self.fs.begin(TransactionMeta())
            self.store({z64: b"aborted", **items, p64(ABORTED_BASE + i): b"never"})
            self.fs.vote()
            time.sleep(0.002)  # a follower may look at the voted transaction meanwhile
            self.fs.abort()
            say(f"aborted {i}")
        else:
            tid = self.commit({z64: b"%d" % i, **items})
            say(f"ok {i} {tid.hex()}")


def run_plan(path: str, seed: int, seconds: float) -> None:
    writer = Writer(path)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        writer.planned(seed, i)
    writer.fs.close()
    say(f"done {i}")


def first_three(path: str) -> Writer:
    writer = Writer(path)
    for i in (1, 2, 3):
        writer.planned(0, i, allow_abort=False)
    return writer


def voted(path: str) -> None:
    writer = first_three(path)
    writer.fs.begin(TransactionMeta())
    writer.store({z64: b"4", p64(NEW_OID): b"new in 4"})
    writer.fs.vote()
    say("voted")
    time.sleep(_SLEEP)


def stream(path: str, how: str) -> None:
    writer = first_three(path)
    fs = writer.fs
    real_pwrite = os.pwrite
    big = big_record()
    started: list[int] = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if how == "torn" and len(data) == len(big):
            real_pwrite(fd, memoryview(data)[: len(big) // 2], offset)
            die()
        if not started:
            started.append(offset)  # the zero header and what was buffered behind it
        elif how == "header" and offset == started[0]:
            real_pwrite(fd, data, offset)
            die()
        return real_pwrite(fd, data, offset)

    fs.begin(TransactionMeta())
    os.pwrite = pwrite
    writer.store({z64: b"big", p64(BIG_OID): big})
    if how == "pause":
        say("streaming")
        time.sleep(_SLEEP)
    fs.vote()
    raise SystemExit(f"stream {how}: not killed")


def run_db(path: str, seconds: float) -> None:
    import amberdb

    db = amberdb.DB(path)
    say("ready")
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        with db.transaction() as conn:
            conn.root()["n"] = i
        say(f"ok {i}")
    db.close()


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "plan":
        run_plan(path, int(sys.argv[3]), float(sys.argv[4]))
    elif mode == "voted":
        voted(path)
    elif mode == "stream":
        stream(path, sys.argv[3])
    elif mode == "db":
        run_db(path, float(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
