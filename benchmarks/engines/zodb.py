"""ZODB side of the benchmarks: ZODB 6 on FileStorage with the C ``persistent`` and ``BTrees``."""

from __future__ import annotations

import importlib.util
from typing import Any

import persistent
import persistent.list
import ZODB
import ZODB.FileStorage
import ZODB.POSException

import transaction
from benchmarks.engines import UnavailableError


class Item(persistent.Persistent):
    """A small object with five attributes (the same shape as the AmberDB one)."""

    def __init__(self, n: int) -> None:
        self.a = n
        self.b = f"item {n}"
        self.c = n * 0.5
        self.d = n % 7
        self.e = "x"


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


ENGINE = ZodbEngine()
