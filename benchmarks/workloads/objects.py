"""Workloads 1-5: add, update, warm read, hot read (one process) and cold read (a new one).

The database: ``root["chunks"]``, a PersistentList of PersistentLists of ``batch`` Items
each.  Adding commits one chunk (``batch`` new Items plus the two lists) per transaction;
updating changes attribute ``a`` of every Item, one chunk per transaction.  Reading an
object means reading its attribute ``a`` (which loads a ghost); the sum is checked.
Cache size for both engines: ``n + 1000`` objects, so everything read stays in the cache.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.engines import Engine
from benchmarks.measure import clock

HOT_PASSES = 5


def _path(directory: str) -> str:
    return os.path.join(directory, "objects.fs")


def _read_all(root: Any) -> tuple[int, int]:
    """Read attribute ``a`` of every Item under ``root``: (objects read, sum of ``a``)."""
    count = total = 0
    for chunk in root["chunks"]:
        for item in chunk:
            total += item.a
            count += 1
    return count, total


def _check(what: str, got: tuple[int, int], n: int, offset: int) -> None:
    expected = (n, n * (n - 1) // 2 + n * offset)
    if got != expected:
        raise AssertionError(f"{what}: read (objects, sum of a) = {got}, expected {expected}")


def add_and_update(engine: Engine, manager: Any, root: Any, n: int, batch: int) -> tuple[float, float]:
    """Add ``n`` Items under ``root["chunks"]`` in chunks (PersistentLists) of ``batch``, one
    chunk per commit, then add 1 to each Item's ``a``, a chunk per commit; the seconds of each."""
    root["chunks"] = chunks = engine.PersistentList()
    manager.commit()
    item_class, list_class = engine.Item, engine.PersistentList
    began = clock()
    for start in range(0, n, batch):
        chunks.append(list_class([item_class(i) for i in range(start, min(n, start + batch))]))
        manager.commit()
    add = clock() - began
    began = clock()
    for chunk in chunks:
        for item in chunk:
            item.a += 1
        manager.commit()
    return add, clock() - began


def add_update_read(engine: Engine, directory: str, n: int, batch: int) -> dict[str, float]:
    """Add ``n`` Items in transactions of ``batch``, update each, then warm and hot reads."""
    db = engine.open_db(_path(directory), cache_size=n + 1000)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    add, update = add_and_update(engine, manager, conn.root(), n, batch)

    # Warm: a second connection (the first stays open, so the pool cannot hand back its
    # warm cache) on the open database reads everything; hot: the same reads again.
    reader_manager = engine.transaction_manager()
    reader = db.open(transaction_manager=reader_manager)
    began = clock()
    got = _read_all(reader.root())
    warm = clock() - began
    _check("warm read", got, n, 1)
    began = clock()
    for _ in range(HOT_PASSES):
        got = _read_all(reader.root())
    hot = clock() - began
    _check("hot read", got, n, 1)
    reader_manager.abort()
    reader.close()
    manager.abort()
    conn.close()
    db.close()
    return {
        "add": n / add,
        "update": n / update,
        "warm_read": n / warm,
        "hot_read": n * HOT_PASSES / hot,
        "objects_read": n,
    }


def cold_read(engine: Engine, directory: str, n: int) -> dict[str, float]:
    """In a fresh process: open the database left by :func:`add_update_read`, read everything.

    Timed from before the open to after the last read.  The OS page cache is not dropped.
    """
    began = clock()
    db = engine.open_db(_path(directory), cache_size=n + 1000)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    got = _read_all(conn.root())
    elapsed = clock() - began
    _check("cold read", got, n, 1)
    manager.abort()
    conn.close()
    db.close()
    return {"cold_read": n / elapsed, "objects_read": got[0]}
