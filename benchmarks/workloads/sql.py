"""Workloads 15 and 16 (issue 14): the relational storages, next to RelStorage 4.

``postgresql``: AmberDB's PostgreSQLStorage (psycopg 3) against RelStorage's PostgreSQL
adapter (psycopg2), on the same throwaway PostgreSQL server (``amberdb.testing.pgcluster``,
fsync and synchronous_commit on), each sample of each engine in a database of its own, made
fresh for it by the runner.  ``sqlite``: AmberDB's SQLiteStorage against RelStorage's sqlite3
adapter, each sample in a new folder.  Both sides run with their default options
(history-preserving; records caches in memory only), except that RelStorage's SQLite
connections are set to ``synchronous=FULL`` -- AmberDB's only mode -- so that both make every
commit durable; RelStorage's own default (NORMAL) is measured too, for the commit latency only.

Per sample, each step in a process of its own:

* :func:`objects` -- commit latency: ``commits`` transactions each changing one attribute of
  one Item, each timed from the change to the return of ``commit()`` (which includes the
  poll the next transaction starts with); p50 and mean.  Then add and update as in
  workloads 1-2: ``n`` Items in chunks (PersistentLists) of ``batch``, one chunk per commit;
* :func:`cold_read`, twice, each in a fresh process with a new storage (empty caches): read
  attribute ``a`` of every Item, timed from opening the connection -- with plain loads (one
  query per object: the target row), then with ``conn.prefetch`` of each chunk first (both
  engines batch it).  Neither the OS page cache nor PostgreSQL's shared buffers are dropped;
* :func:`counter` -- 2 client processes incrementing one Counter that resolves conflicts
  (both engines resolve in the committing process): commits/s over both, and ConflictErrors
  that reached the application per commit (each one retried);
* :func:`pack_build` then :func:`pack` (another fresh database): the pack workload's
  database (``pack_n`` Items, half garbage, three old revisions each), packed at the newest
  transaction in a fresh process; the rows left are counted in the tables and every live
  Item read back through a new storage.

Every figure is checked (sums, counts) before it is reported.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from benchmarks.engines import Engine
from benchmarks.measure import clock, commit_times
from benchmarks.workloads import pack as pack_workload
from benchmarks.workloads.objects import add_and_update
from benchmarks.workloads.server import COUNTER_CLIENTS, increment, run_clients

PREFIXES = {"postgresql": "pg", "sqlite": "sqlite"}
"""The metric keys of each database's workload start with these."""

WARM_UP = 5


def _prefix(database: str) -> str:
    try:
        return PREFIXES[database]
    except KeyError:
        raise ValueError(f"unknown SQL database {database!r}; expected one of {list(PREFIXES)}") from None


def _sum_items(chunks: Any, conn: Any = None) -> tuple[int, int]:
    """(Items read, sum of their ``a``) over every chunk; with ``conn``, each chunk's Items
    are prefetched first (and the chunks themselves before that)."""
    count = total = 0
    if conn is not None:
        conn.prefetch(list(chunks))
    for chunk in chunks:
        if conn is not None:
            conn.prefetch(list(chunk))
        for item in chunk:
            total += item.a
            count += 1
    return count, total


def _latency(engine: Engine, db: Any, commits: int) -> tuple[float, float]:
    """(p50, mean) in ms of ``commits`` one-object commits on ``db``."""
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    conn.root()["latency"] = item = engine.Item(0)
    manager.commit()
    times = commit_times(manager, item, commits, WARM_UP)
    conn.close()
    check = db.open(transaction_manager=manager)
    if check.root()["latency"].a != commits - 1:
        raise AssertionError(f"commit latency: item.a is {check.root()['latency'].a}, expected {commits - 1}")
    manager.abort()
    check.close()
    return statistics.median(times) * 1e3, statistics.fmean(times) * 1e3


def objects(
    engine: Engine, directory: str, database: str, location: str, n: int, batch: int, commits: int
) -> dict[str, float]:
    """Commit latency, then add and update ``n`` Items (see the module docstring)."""
    p = _prefix(database)
    db = engine.open_sql_db(database, location, cache_size=n + 1000)
    try:
        p50, mean = _latency(engine, db, commits)
        manager = engine.transaction_manager()
        conn = db.open(transaction_manager=manager)
        add, update = add_and_update(engine, manager, conn.root(), n, batch)
        conn.close()
    finally:
        db.close()
    objects_held, _ = engine.sql_counts(database, location)
    # The Items, their chunks, the chunk list, the root and the latency Item.
    expected = n + (n + batch - 1) // batch + 3
    if objects_held != expected:
        raise AssertionError(f"add: the tables hold {objects_held} objects, expected {expected}")
    results = {
        f"{p}_commit_p50_ms": p50,
        f"{p}_commit_mean_ms": mean,
        f"{p}_add": n / add,
        f"{p}_update": n / update,
    }
    if database == "sqlite":
        # AmberDB has one mode (FULL); RelStorage's default is NORMAL: its latency there, on a
        # database of its own.
        results["sqlite_commit_p50_default_ms"] = p50
        if engine.name != "amberdb":
            folder = os.path.join(directory, "normal")
            os.mkdir(folder)
            normal = engine.open_sql_db(database, folder, cache_size=1000, full_sync=False)
            try:
                results["sqlite_commit_p50_default_ms"], _ = _latency(engine, normal, commits)
            finally:
                normal.close()
    return results


def cold_read(
    engine: Engine, directory: str, database: str, location: str, n: int, prefetch: bool
) -> dict[str, float]:
    """In a fresh process, a new storage (empty caches) reads every Item; objects/s."""
    db = engine.open_sql_db(database, location, cache_size=n + 1000)
    try:
        manager = engine.transaction_manager()
        began = clock()
        conn = db.open(transaction_manager=manager)
        got = _sum_items(conn.root()["chunks"], conn if prefetch else None)
        elapsed = clock() - began
        expected = (n, n * (n - 1) // 2 + n)
        if got != expected:
            raise AssertionError(f"cold read: read (objects, sum of a) = {got}, expected {expected}")
        manager.abort()
        conn.close()
    finally:
        db.close()
    key = f"{_prefix(database)}_cold_read" + ("_prefetch" if prefetch else "")
    return {key: n / elapsed}


def counter(engine: Engine, directory: str, database: str, location: str, commits: int) -> dict[str, float]:
    """Two client processes increment one resolvable Counter ``commits`` times each."""
    p = _prefix(database)
    db = engine.open_sql_db(database, location, cache_size=1000)
    try:
        manager = engine.transaction_manager()
        conn = db.open(transaction_manager=manager)
        conn.root()["counter"] = engine.Counter()
        manager.commit()
        conn.close()
        rate, conflicts = run_clients(
            engine,
            directory,
            "counter",
            COUNTER_CLIENTS,
            commits,
            task="sql_client",
            params={"database": database, "location": location},
        )
        conn = db.open(transaction_manager=manager)
        count = conn.root()["counter"].count
        manager.abort()
        conn.close()
    finally:
        db.close()
    if count != COUNTER_CLIENTS * commits:
        raise AssertionError(f"counter: {count} increments landed, expected {COUNTER_CLIENTS * commits}")
    return {f"{p}_counter": rate, f"{p}_counter_conflicts": conflicts / (COUNTER_CLIENTS * commits)}


def client(
    engine: Engine, directory: str, database: str, location: str, mode: str, index: int, commits: int
) -> dict[str, float]:
    """A client process of :func:`counter` (see :func:`benchmarks.workloads.server.increment`)."""
    db = engine.open_sql_db(database, location, cache_size=1000)
    return increment(engine, db, mode, index, commits)


def _kept(n: int, batch: int) -> list[int]:
    """The numbers of the Items :func:`benchmarks.workloads.pack.fill` keeps."""
    return [i for start in range(0, n, batch) for i in range(start, min(n, start + batch), 2)]


def pack_build(
    engine: Engine, directory: str, database: str, location: str, n: int, batch: int
) -> dict[str, float]:
    """Fill a fresh database as the pack workload does (setup, not a measurement)."""
    db = engine.open_sql_db(database, location, cache_size=batch + 1000)
    try:
        pack_workload.fill(engine, db, n, batch)
    finally:
        db.close()
    return {}


def pack(
    engine: Engine, directory: str, database: str, location: str, n: int, batch: int
) -> dict[str, float]:
    """Seconds to pack the database :func:`pack_build` made, in a fresh process; checked."""
    p = _prefix(database)
    objects_before, revisions_before = engine.sql_counts(database, location)
    db = engine.open_sql_db(database, location, cache_size=1000)
    try:
        began = clock()
        engine.pack(db)
        elapsed = clock() - began
    finally:
        db.close()
    objects_after, revisions_after = engine.sql_counts(database, location)
    kept = _kept(n, batch)
    # The kept Items, the chunks, the chunk list, the writer Item and the root; one revision each.
    expected = len(kept) + (n + batch - 1) // batch + 3
    if objects_after != expected or revisions_after != expected:
        raise AssertionError(
            f"pack left {objects_after} objects in {revisions_after} revisions (before:"
            f" {objects_before} in {revisions_before}); expected {expected} in {expected}"
        )
    db = engine.open_sql_db(database, location, cache_size=len(kept) + 1000)
    try:
        manager = engine.transaction_manager()
        conn = db.open(transaction_manager=manager)
        got = _sum_items(conn.root()["chunks"], conn)
        manager.abort()
        conn.close()
    finally:
        db.close()
    wanted = (len(kept), sum(kept) + 3 * len(kept))
    if got != wanted:
        raise AssertionError(f"after the pack: read (objects, sum of a) = {got}, expected {wanted}")
    return {
        f"{p}_pack_s": elapsed,
        f"{p}_pack_revisions_before": revisions_before,
        f"{p}_pack_revisions_after": revisions_after,
    }
