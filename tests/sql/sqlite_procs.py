"""Child processes of test_sqlite_processes.py: each opens the SQLite database itself.

Run as ``python -c "from tests.sql.sqlite_procs import main; main()" ROLE PATH ARGS...``
(see :data:`CHILD`).  A child that must start with the others prints ``READY`` once its
database is open and waits for a line on stdin (``go``); one that runs until told prints
its results when its stdin has a line or reaches EOF.  Every result is a line on stdout,
flushed only after what it reports has happened (``ACK`` after the commit returned).
"""

from __future__ import annotations

import json
import os
import random
import select
import sys
import time
from collections.abc import Callable
from typing import Any

CHILD = "from tests.sql.sqlite_procs import main; main()"
"""The ``python -c`` code that runs a role: ``[sys.executable, "-c", CHILD, ROLE, PATH, ...]``."""

SLOTS = 4
"""The killed writer's transaction ``i`` rewrites oids ``SLOT_BASE .. SLOT_BASE + SLOTS - 1``."""
SLOT_BASE = 1 << 40
ABORTED_BASE = 1 << 41
"""The killed writer's voted-then-aborted transaction ``i`` writes oid ``ABORTED_BASE + i``."""


def say(*words: object) -> None:
    """One line on stdout, flushed."""
    print(*words, flush=True)


def ready() -> None:
    """Tell the parent the database is open; wait for its ``go``."""
    say("READY")
    sys.stdin.readline()


def told_to_stop() -> bool:
    """Whether the parent wrote a line to stdin or closed it."""
    return bool(select.select([sys.stdin], [], [], 0)[0])


def open_db(path: str, **options: Any) -> Any:
    """A DB on a SQLiteStorage of ``path``."""
    import amberdb
    from amberdb.storage.sql.sqlite import SQLiteStorage

    return amberdb.DB(SQLiteStorage(path, **options))


def sum_balances(conn: Any) -> int:
    """The total of every account's balance, in the connection's current snapshot."""
    accounts = conn.root()["accounts"]
    return sum(account["balance"] for account in accounts.values())


# -- 1. transfers and readers -----------------------------------------------------------------


def transfer(path: str, worker: str, count: str, total: str) -> None:
    """``count`` random transfers (seeded by ``worker``), each acknowledged after its commit,
    each followed by a reader transaction that checks the total."""
    import amberdb.transaction as transaction

    db = open_db(path, lock_timeout=20)
    conn = db.open()
    number, expected = int(worker), int(total)
    rng = random.Random(number)
    accounts = len(conn.root()["accounts"])
    ready()
    retries = mixed = 0
    for n in range(int(count)):
        a, b = rng.sample(range(accounts), 2)
        amount = rng.randint(1, 30)
        tag = f"{number}:{n}"
        for attempt in transaction.attempts(50):
            with attempt:
                retries += attempt.number > 1
                root = conn.root()
                root["accounts"][a]["balance"] -= amount
                root["accounts"][b]["balance"] += amount
                root["log"][number].append([tag, a, b, amount])
        say("ACK", json.dumps([tag, a, b, amount]))
        transaction.begin()
        if n % 3 == 0:
            conn.cache_minimize()  # the next sum loads from the database, not the cache
        seen = sum_balances(conn)
        transaction.abort()
        if seen != expected:
            mixed += 1
            say("MIXED", seen)
    say("RETRIES", retries)
    say("DONE", mixed)
    db.close()


def reader(path: str, total: str) -> None:
    """Read transactions (cache emptied before each) until told to stop; report how many
    saw a total other than ``total``.  The database is opened by URI, read-only."""
    import amberdb
    import amberdb.transaction as transaction

    db = amberdb.DB(f"sqlite://{os.path.abspath(path)}", read_only=True)
    conn = db.open()
    expected = int(total)
    ready()
    reads = mixed = 0
    while not told_to_stop():
        transaction.begin()
        conn.cache_minimize()
        seen = sum_balances(conn)
        transaction.abort()
        reads += 1
        if seen != expected:
            mixed += 1
            say("MIXED", seen)
    say("READS", reads, "MIXED", mixed)
    db.close()


# -- 2. killed while committing -----------------------------------------------------------------


def slot_record(i: int, j: int) -> bytes:
    """What transaction ``i`` writes to slot ``j``: sometimes big, so the kill may land
    while the rows are being written."""
    size = (1 << 20) + i if i % 9 == 8 else 100 + (i * 37 + j) % 2000
    unit = b"t%d-s%d-" % (i, j)
    return (unit * (size // len(unit) + 1))[:size]


def new_record(i: int) -> bytes:
    """What transaction ``i`` writes to the object it creates."""
    return b"created by %d" % i


def kill_writer(path: str, start: str) -> None:
    """Commit in a loop until killed (see test_sigkill_mid_commit_loses_nothing_acknowledged).

    Transaction ``i`` rewrites every slot with :func:`slot_record` and creates one object
    with a fresh oid; every seventh is voted and aborted instead (it writes oid
    ``ABORTED_BASE + i``); every fifth lingers 20 ms between vote and finish, holding both
    locks, so kills can be aimed there.  Lines: ``voted I`` (before finish), ``ok I TIDHEX
    OIDHEX`` (after), ``aborted I``.
    """
    from amberdb.storage.base import TransactionMeta
    from amberdb.storage.sql.sqlite import SQLiteStorage
    from amberdb.utils import p64, z64

    storage = SQLiteStorage(path, lock_timeout=20)
    i = int(start)
    while True:
        bases = []
        for j in range(SLOTS):
            try:
                bases.append(storage.load(p64(SLOT_BASE + j))[1])
            except KeyError:
                bases.append(z64)
        storage.begin(TransactionMeta(description=f"txn {i}"))
        if i % 7 == 6:
            storage.store(p64(ABORTED_BASE + i), z64, b"aborted %d" % i)
            storage.vote()
            storage.abort()
            say(f"aborted {i}")
        else:
            oid = storage.new_oid()
            for j, base in enumerate(bases):
                storage.store(p64(SLOT_BASE + j), base, slot_record(i, j))
            storage.store(oid, z64, new_record(i))
            storage.vote()
            say(f"voted {i}")
            if i % 5 == 4:
                time.sleep(0.02)
            tid = storage.finish()
            say(f"ok {i} {tid.hex()} {oid.hex()}")
        i += 1


# -- 3. fairness --------------------------------------------------------------------------------


def hammer(path: str, seconds: str, change: Callable[[Any], None]) -> None:
    """After ``go``, commit ``change(root)`` in a loop for ``seconds``; report the counts."""
    import amberdb.transaction as transaction

    db = open_db(path, lock_timeout=20)
    conn = db.open()
    conn.root()  # loaded before the start
    ready()
    deadline = time.monotonic() + float(seconds)
    commits = retries = 0
    slowest = 0.0
    while time.monotonic() < deadline:
        started = time.monotonic()
        for attempt in transaction.attempts(50):
            with attempt:
                retries += attempt.number > 1
                change(conn.root())
        slowest = max(slowest, time.monotonic() - started)
        commits += 1
    say("COMMITS", commits, "RETRIES", retries, "SLOWEST", f"{slowest:.3f}")
    db.close()


def own_slot(path: str, worker: str, seconds: str) -> None:
    """Increment slot ``worker`` (no other process writes it)."""
    number = int(worker)

    def change(root: Any) -> None:
        root["slots"][number]["count"] += 1

    hammer(path, seconds, change)


def shared_counter(path: str, seconds: str) -> None:
    """Add one to the shared ``Length`` (conflicts resolved by ``_p_resolveConflict``)."""

    def change(root: Any) -> None:
        root["counter"].change(1)

    hammer(path, seconds, change)


# -- 4. a lock held by another process -----------------------------------------------------------


def hold(path: str, how: str) -> None:
    """Hold the database's write lock until a line arrives on stdin, then let go; again
    after each further ``again`` line, until EOF.

    ``raw``: a plain sqlite3 connection in ``BEGIN IMMEDIATE``.  ``voted``: an AmberDB
    storage that voted a transaction (commit lock and write transaction) and has not
    finished it.  Lines: ``HELD``, then ``RELEASED``.
    """
    if how == "raw":
        import sqlite3

        conn = sqlite3.connect(path, isolation_level=None)
        while True:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO amberdb_schema (name, value) VALUES ('held-by', ?)", (str(os.getpid()),)
            )
            say("HELD")
            sys.stdin.readline()
            conn.execute("ROLLBACK")
            say("RELEASED")
            if sys.stdin.readline().strip() != "again":
                break
        conn.close()
    else:
        from amberdb.storage.base import TransactionMeta
        from amberdb.storage.sql.sqlite import SQLiteStorage
        from amberdb.utils import p64, z64

        storage = SQLiteStorage(path)
        while True:
            storage.begin(TransactionMeta("holder", "voted, never finished"))
            storage.store(p64(ABORTED_BASE), z64, b"never committed")
            storage.vote()
            say("HELD")
            sys.stdin.readline()
            storage.abort()
            say("RELEASED")
            if sys.stdin.readline().strip() != "again":
                break
        storage.close()


# -- 5. the WAL ---------------------------------------------------------------------------------


def wal_writer(path: str, count: str, size: str, limit: str) -> None:
    """After ``go``, commit ``count`` transactions of one ``size``-byte record each (a few
    objects taking turns); report the biggest WAL seen after a commit and the slowest commit.
    ``limit`` (bytes, 0: the module's) replaces the storage's WAL limit."""
    from amberdb.storage.base import TransactionMeta
    from amberdb.storage.sql import sqlite
    from amberdb.utils import p64, z64

    if int(limit):
        sqlite._WAL_LIMIT = int(limit)
    storage = sqlite.SQLiteStorage(path, lock_timeout=20)
    tids = {}
    wal = path + "-wal"
    ready()
    biggest = 0
    slowest = 0.0
    payload = os.urandom(int(size))  # incompressible, not that SQLite compresses
    for i in range(int(count)):
        oid = p64(1 + i % 8)
        started = time.monotonic()
        storage.begin(TransactionMeta(description=f"big {i}"))
        storage.store(oid, tids.get(oid, z64), payload[i % 64 :] + payload[: i % 64])
        storage.vote()
        tids[oid] = storage.finish()
        slowest = max(slowest, time.monotonic() - started)
        biggest = max(biggest, os.path.getsize(wal))
    say("WAL", biggest, os.path.getsize(wal), "SLOWEST", f"{slowest:.3f}")
    storage.close()


def wal_reader(path: str) -> None:
    """Load the big objects (from the database: a cache of one record) until told to stop;
    report the reads and the biggest WAL seen."""
    from amberdb.storage.sql.sqlite import SQLiteStorage
    from amberdb.utils import p64

    storage = SQLiteStorage(path, read_only=True, cache_size=1)
    wal = path + "-wal"
    ready()
    reads = biggest = 0
    while not told_to_stop():
        storage.poll_invalidations(storage.last_tid())
        try:
            storage.load(p64(1 + reads % 8))
        except KeyError:
            pass
        reads += 1
        try:
            biggest = max(biggest, os.path.getsize(wal))
        except FileNotFoundError:
            pass  # not made yet
    say("READS", reads, "WAL", biggest)
    storage.close()


ROLES: dict[str, Callable[..., None]] = {
    "transfer": transfer,
    "reader": reader,
    "kill-writer": kill_writer,
    "own-slot": own_slot,
    "shared-counter": shared_counter,
    "hold": hold,
    "wal-writer": wal_writer,
    "wal-reader": wal_reader,
}


def main() -> None:
    """Run the role ``sys.argv[1]`` with the remaining arguments."""
    ROLES[sys.argv[1]](*sys.argv[2:])
