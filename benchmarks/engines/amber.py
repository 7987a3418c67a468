"""AmberDB side of the benchmarks: model classes and the :class:`~benchmarks.engines.Engine`."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import amberdb
import amberdb.transaction
import amberdb.utils

SQLITE_FILE = "amberdb.sqlite"
"""The SQLite database of the sqlite workload, in the folder it is given."""


class Item(amberdb.Persistent):
    """A small object with five attributes (the same shape as the ZODB one)."""

    def __init__(self, n: int) -> None:
        self.a = n
        self.b = f"item {n}"
        self.c = n * 0.5
        self.d = n % 7
        self.e = "x"


class Book(amberdb.Persistent):
    """A small object of the evolve workload: a title, a year, a list of tags (the same shape
    as the ZODB one)."""

    def __init__(self, n: int) -> None:
        self.title = f"Book {n}"
        self.year = 1900 + n % 120
        self.tags = ["fiction" if n % 2 else "poetry", f"shelf {n % 50}"]


class Counter(amberdb.Persistent):
    """A shared counter whose concurrent increments merge instead of conflicting."""

    def __init__(self) -> None:
        self.count = 0

    def _p_resolveConflict(self, old: Any, saved: Any, new: Any) -> Any:
        return {**new, "count": saved["count"] + new["count"] - old["count"]}


class AmberEngine:
    """AmberDB: its FileStorage (fsync on every commit) and its transaction package."""

    name = "amberdb"
    Item = Item
    Counter = Counter
    Book = Book
    PersistentList = amberdb.PersistentList
    ConflictError = amberdb.ConflictError

    def open_db(self, path: str | None, cache_size: int) -> Any:
        return amberdb.DB(path, cache_size=cache_size)

    def transaction_manager(self) -> Any:
        return amberdb.transaction.TransactionManager()

    def subtransaction(self, manager: Any) -> None:
        manager.commit(True)

    def btree_class(self) -> type[Any]:
        from amberdb.btrees import IIBTree

        return IIBTree  # type: ignore[no-any-return]

    def object_btree_class(self) -> type[Any]:
        from amberdb.btrees import IOBTree

        return IOBTree  # type: ignore[no-any-return]

    def minimize_cache(self, conn: Any) -> None:
        conn.cache_minimize()

    def incremental_gc(self, conn: Any) -> None:
        conn.cache_gc()

    def object_count(self, db: Any) -> int:
        return len(db.storage)

    def pack(self, db: Any) -> None:
        db.pack()

    def server(self, path: str, log_path: str, python_options: list[str] | None = None) -> Any:
        from benchmarks.servers import amberdb_server

        return amberdb_server(path, log_path, python_options)

    def open_client_db(self, address: tuple[str, int], cache_size: int) -> Any:
        return amberdb.DB(amberdb.ClientStorage(address), cache_size=cache_size)

    def open_sql_db(self, database: str, location: str, cache_size: int, full_sync: bool = True) -> Any:
        # Default options: history-preserving, a 64 MB records cache kept in memory only.  SQLite
        # always syncs FULL here (the storage has no other mode), whatever full_sync says.
        if database == "postgresql":
            storage: Any = amberdb.PostgreSQLStorage(location)
        elif database == "sqlite":
            storage = amberdb.SQLiteStorage(os.path.join(location, SQLITE_FILE))
        else:
            raise ValueError(f"unknown SQL database {database!r}")
        return amberdb.DB(storage, cache_size=cache_size)

    def sql_counts(self, database: str, location: str) -> tuple[int, int]:
        query = "SELECT count(DISTINCT zoid), count(*) FROM amberdb_object"
        if database == "postgresql":
            import psycopg

            with psycopg.connect(location, autocommit=True) as pg:
                row = pg.execute(query).fetchone()
        else:
            lite = sqlite3.connect(os.path.join(location, SQLITE_FILE))
            try:
                row = lite.execute(query).fetchone()
            finally:
                lite.close()
        assert row is not None
        return int(row[0]), int(row[1])


ENGINE = AmberEngine()
