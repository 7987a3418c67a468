"""Workload 11: open a database of ``n`` objects, with its index file and without it.

:func:`build` (not timed) fills a FileStorage with ``n`` Items in transactions of
``batch`` and closes it cleanly, which writes the index.  :func:`open_database` runs in a
fresh process per sample: it times ``DB(path)`` (storage open, index load or file scan, root
check), then closes the database, which writes the index again for the next sample.
"""

from __future__ import annotations

import os

from benchmarks.engines import Engine
from benchmarks.measure import clock


def _path(directory: str) -> str:
    return os.path.join(directory, "open.fs")


def build(engine: Engine, directory: str, n: int, batch: int) -> dict[str, float]:
    """Fill the database (setup, not a measurement)."""
    db = engine.open_db(_path(directory), cache_size=batch + 1000)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    conn.root()["chunks"] = chunks = engine.PersistentList()
    item_class, list_class = engine.Item, engine.PersistentList
    for start in range(0, n, batch):
        chunks.append(list_class([item_class(i) for i in range(start, min(n, start + batch))]))
        manager.commit()
        engine.minimize_cache(conn)
    conn.close()
    db.close()
    return {"objects": n}


def open_database(engine: Engine, directory: str, n: int, index: bool) -> dict[str, float]:
    """Milliseconds to open the database, with or without its index file."""
    path = _path(directory)
    index_path = path + ".index"
    if not index and os.path.exists(index_path):
        os.unlink(index_path)
    if index and not os.path.exists(index_path):
        raise AssertionError(f"{index_path} is missing: the previous close did not write it")
    began = clock()
    db = engine.open_db(path, cache_size=1000)
    elapsed = clock() - began
    count = engine.object_count(db)
    db.close()
    if count < n:
        raise AssertionError(f"the opened database reports {count} objects, expected at least {n}")
    return {"open_index_ms" if index else "open_noindex_ms": elapsed * 1e3}
