"""ZODB's names for what AmberDB spells its own way, checked side by side with ZODB 6."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import amberdb
import amberdb.transaction as amber_transaction
from amberdb import PersistentMapping
from amberdb.storage.file import FileStorage
from amberdb.utils import z64


@pytest.fixture(params=["ZODB", "amberdb"])
def side(request: pytest.FixtureRequest) -> Iterator[SimpleNamespace]:
    """A fresh in-memory database, its module of transactions and a mapping class."""
    if request.param == "ZODB":
        zodb = pytest.importorskip("ZODB")
        # importlib: ruff would take "transaction" for tests/transaction.
        transaction = importlib.import_module("transaction")
        mapping = importlib.import_module("persistent.mapping")
        ns = SimpleNamespace(db=zodb.DB(None), txn=transaction, Mapping=mapping.PersistentMapping)
    else:
        ns = SimpleNamespace(db=amberdb.DB(None), txn=amber_transaction, Mapping=PersistentMapping)
    yield ns
    ns.txn.abort()
    ns.db.close()


def _loaded_child(side: SimpleNamespace) -> tuple[Any, Any]:
    conn = side.db.open()
    conn.root()["child"] = side.Mapping(a=1)
    side.txn.commit()
    child = conn.root()["child"]
    assert child["a"] == 1 and child._p_changed is False
    return conn, child


def test_connection_cache_minimize_and_gc(side: SimpleNamespace) -> None:
    conn, child = _loaded_child(side)
    conn.cacheGC()  # under the cache size: nothing to do
    assert child._p_changed is False
    conn.cacheMinimize()
    assert child._p_changed is None  # a ghost
    assert child["a"] == 1
    conn.close()


def test_db_cache_minimize_covers_this_threads_connections(side: SimpleNamespace) -> None:
    conn, child = _loaded_child(side)
    side.db.cacheMinimize()
    assert child._p_changed is None
    conn.close()


def test_on_close_callback(side: SimpleNamespace) -> None:
    conn = side.db.open()
    closed: list[str] = []
    conn.onCloseCallback(lambda: closed.append("closed"))
    assert closed == []
    conn.close()
    assert closed == ["closed"]


def test_db_counts_size_and_last_transaction(side: SimpleNamespace) -> None:
    db = side.db
    count, size, last = db.objectCount(), db.getSize(), db.lastTransaction()
    assert count == 1 and size > 0 and last != z64  # the root, from the initial transaction
    conn = db.open()
    conn.root()["a"] = side.Mapping()
    conn.root()["b"] = side.Mapping()
    side.txn.commit()
    assert db.objectCount() == 3
    assert db.getSize() > size
    assert db.lastTransaction() > last
    assert db.lastTransaction() == conn.root()._p_serial
    conn.close()


def test_amberdb_spellings_are_the_same_methods() -> None:
    assert amberdb.Connection.cacheMinimize is amberdb.Connection.cache_minimize
    assert amberdb.Connection.cacheGC is amberdb.Connection.cache_gc
    assert amberdb.Connection.onCloseCallback is amberdb.Connection.on_close
    assert amberdb.DB.cacheMinimize is amberdb.DB.cache_minimize
    assert amberdb.DB.getSize is amberdb.DB.storage_size
    assert amberdb.DB.lastTransaction is amberdb.DB.last_tid
    with amberdb.DB(None) as db:
        assert db.objectCount() == len(db) == 1


def test_file_storage_size_is_its_committed_length(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    with amberdb.DB(str(path)) as db:
        assert db.storage_size() == path.stat().st_size
    with FileStorage(str(path), read_only=True) as storage:
        assert storage.size() == path.stat().st_size


def test_get_size_is_the_storage_size() -> None:
    with amberdb.DB(None) as db:
        assert db.getSize() == db.storage_size() == db.storage.get_size() > 0


def test_db_cache_minimize_waits_for_another_threads_boundary() -> None:
    """A connection open in another thread is not ghostified under it: it minimizes itself
    when its transaction ends, in its own thread."""
    with amberdb.DB(None) as db:
        conn = db.open()
        conn.root()["child"] = PersistentMapping(a=1)
        amber_transaction.commit()
        conn.close()

        loaded = threading.Event()
        minimized = threading.Event()
        states: list[Any] = []

        def worker() -> None:
            tm = amber_transaction.TransactionManager()
            mine = db.open(tm)
            child = mine.root()["child"]
            assert child["a"] == 1
            loaded.set()
            minimized.wait()
            states.append(child._p_changed)  # still loaded: the other thread did not touch it
            tm.commit()
            states.append(child._p_changed)  # minimized at the boundary
            mine.close()

        thread = threading.Thread(target=worker)
        thread.start()
        assert loaded.wait(30)
        db.cache_minimize()
        minimized.set()
        thread.join(30)
        assert states == [False, None]


def test_transaction_status_values_match_the_transaction_package() -> None:
    # Synchronizers compare txn.status with the package's Status constants.
    real = importlib.import_module("transaction._transaction").Status
    ours = amber_transaction.Status
    for name in ("ACTIVE", "COMMITTING", "COMMITTED", "DOOMED", "COMMITFAILED"):
        assert getattr(ours, name) == getattr(real, name), name
