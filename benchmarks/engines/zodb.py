"""ZODB side of the benchmarks: ZODB 6 on FileStorage with the C ``persistent`` and ``BTrees``."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
from typing import Any

import persistent
import persistent.list
import ZODB
import ZODB.FileStorage
import ZODB.POSException

import transaction
from benchmarks.engines import UnavailableError, relstorage_missing


class Item(persistent.Persistent):
    """A small object with five attributes (the same shape as the AmberDB one)."""

    def __init__(self, n: int) -> None:
        self.a = n
        self.b = f"item {n}"
        self.c = n * 0.5
        self.d = n % 7
        self.e = "x"


class Book(persistent.Persistent):
    """A small object of the evolve workload: a title, a year, a list of tags (the same shape
    as the AmberDB one)."""

    def __init__(self, n: int) -> None:
        self.title = f"Book {n}"
        self.year = 1900 + n % 120
        self.tags = ["fiction" if n % 2 else "poetry", f"shelf {n % 50}"]


class Counter(persistent.Persistent):
    """A shared counter whose concurrent increments merge instead of conflicting."""

    def __init__(self) -> None:
        self.count = 0

    def _p_resolveConflict(self, old: Any, saved: Any, new: Any) -> Any:
        return {**new, "count": saved["count"] + new["count"] - old["count"]}


class ZodbEngine:
    """ZODB: FileStorage (which fsyncs every commit) and the ``transaction`` package."""

    name = "zodb"
    Item = Item
    Counter = Counter
    Book = Book
    PersistentList = persistent.list.PersistentList
    ConflictError = ZODB.POSException.ConflictError

    def open_db(self, path: str | None, cache_size: int) -> Any:
        storage = None if path is None else ZODB.FileStorage.FileStorage(path)
        return ZODB.DB(storage, cache_size=cache_size)

    def transaction_manager(self) -> Any:
        return transaction.TransactionManager()

    def subtransaction(self, manager: Any) -> None:
        manager.savepoint(True)  # ZODB's replacement for commit(True)

    def btree_class(self) -> type[Any]:
        from BTrees.IIBTree import IIBTree

        return IIBTree  # type: ignore[no-any-return]

    def object_btree_class(self) -> type[Any]:
        from BTrees.IOBTree import IOBTree

        return IOBTree  # type: ignore[no-any-return]

    def minimize_cache(self, conn: Any) -> None:
        conn.cacheMinimize()

    def incremental_gc(self, conn: Any) -> None:
        conn.cacheGC()

    def object_count(self, db: Any) -> int:
        return len(db.storage)

    def pack(self, db: Any) -> None:
        db.pack()

    def server(self, path: str, log_path: str, python_options: list[str] | None = None) -> Any:
        if importlib.util.find_spec("ZEO") is None:
            raise UnavailableError("ZEO is not installed (./scripts/bench installs the bench extra)")
        from benchmarks.servers import zeo_server

        return zeo_server(path, log_path, python_options)

    def open_client_db(self, address: tuple[str, int], cache_size: int) -> Any:
        import ZEO.ClientStorage

        storage = ZEO.ClientStorage.ClientStorage(address, wait=True)  # in-memory cache, 20 MB
        return ZODB.DB(storage, cache_size=cache_size)

    def open_sql_db(self, database: str, location: str, cache_size: int, full_sync: bool = True) -> Any:
        """RelStorage 4 with its default options (history-preserving, a 10 MB local cache in
        memory, no persistent cache file): psycopg2 on PostgreSQL, sqlite3 on SQLite.  SQLite:
        ``synchronous=FULL`` as AmberDB's SQLiteStorage, unless ``full_sync`` is False
        (RelStorage's own default, NORMAL: WAL mode may then lose the last commits on power
        loss)."""
        missing = relstorage_missing(database)
        if missing:
            raise UnavailableError(missing)
        from relstorage.options import Options
        from relstorage.storage import RelStorage

        if database == "postgresql":
            from relstorage.adapters.postgresql import PostgreSQLAdapter

            options = Options(driver="psycopg2")
            adapter: Any = PostgreSQLAdapter(dsn=location, options=options)
        elif database == "sqlite":
            from relstorage.adapters.sqlite.adapter import Sqlite3Adapter

            options = Options(driver="sqlite3")
            pragmas = {"synchronous": SQLITE_FULL} if full_sync else {}
            adapter = Sqlite3Adapter(os.path.join(location, SQLITE_DIR), pragmas=pragmas, options=options)
        else:
            raise ValueError(f"unknown SQL database {database!r}")
        storage = RelStorage(adapter, options=options)
        if database == "sqlite":
            _check_synchronous(storage, SQLITE_FULL if full_sync else SQLITE_NORMAL)
        return ZODB.DB(storage, cache_size=cache_size)

    def sql_counts(self, database: str, location: str) -> tuple[int, int]:
        query = "SELECT count(DISTINCT zoid), count(*) FROM object_state"
        if database == "postgresql":
            import psycopg2

            conn = psycopg2.connect(location)
            try:
                with conn.cursor() as cursor:
                    cursor.execute(query)
                    row = cursor.fetchone()
            finally:
                conn.close()
        else:
            conn = sqlite3.connect(os.path.join(location, SQLITE_DIR, "main.sqlite3"))
            try:
                row = conn.execute(query).fetchone()
            finally:
                conn.close()
        assert row is not None
        return int(row[0]), int(row[1])


SQLITE_DIR = "relstorage"
"""RelStorage's SQLite data folder (main.sqlite3, oids.sqlite3) inside the workload's folder."""
SQLITE_NORMAL, SQLITE_FULL = 1, 2


def _check_synchronous(storage: Any, wanted: int) -> None:
    """Raise unless RelStorage's SQLite connections really sync as asked (the pragma is set on
    each connection it opens)."""
    conn, cursor = storage._adapter.connmanager.open()
    try:
        cursor.execute("PRAGMA synchronous")
        got = cursor.fetchone()[0]
    finally:
        conn.close()
    if got != wanted:
        raise AssertionError(f"RelStorage's SQLite connections have synchronous={got}, expected {wanted}")


ENGINE = ZodbEngine()
