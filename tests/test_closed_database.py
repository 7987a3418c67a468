"""Closing a database ends its connections; what is durable is never reported as failed.

After ``db.close()`` its connections refuse loads, changes and commits with a
ConnectionStateError that says the database is closed, and they stop taking part in the
transactions of the managers they were registered with, so other databases used in the same
thread go on working.  A commit whose data managers all finished is reported as committed
even when a synchronizer or an after-commit hook fails afterwards (those errors are logged).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

import amberdb
import amberdb.exceptions
import amberdb.transaction as transaction
from amberdb import DB
from amberdb.exceptions import ConnectionStateError
from tests.models import Book


def _committed_title(db: DB, key: str = "book") -> str:
    manager = transaction.TransactionManager()
    reader = db.open(manager)
    try:
        title: str = reader.root()[key].title
        return title
    finally:
        manager.abort()
        reader.close()


def test_commits_on_another_database_work_after_one_was_closed_with_a_connection_open() -> None:
    db1, db2 = DB(None), DB(None)
    left_open = db1.open()
    left_open.root.book = Book("db1")
    transaction.commit()
    db1.close()

    conn2 = db2.open()
    conn2.root.book = Book("db2")
    transaction.commit()  # db1's connection must not take part
    transaction.abort()
    transaction.begin()
    conn2.root.book.title = "again"
    transaction.commit()
    assert _committed_title(db2) == "again"
    conn2.close()
    db2.close()


def test_connections_of_a_closed_database_refuse_loads_changes_and_commits() -> None:
    db = DB(None)
    conn = db.open()
    conn.root.book = book = Book("v1")
    conn.root.other = other = Book("other")
    transaction.commit()
    other._p_deactivate()
    db.close()

    assert not conn.opened
    with pytest.raises(ConnectionStateError, match="database .*is closed"):
        conn.root()
    with pytest.raises(ConnectionStateError, match="database .*is closed"):
        conn.get(book._p_oid)
    with pytest.raises(ConnectionStateError, match="database .*is closed"):
        other.title  # noqa: B018 - loading the ghost
    with pytest.raises(ConnectionStateError, match=r"Book oid 0x.*database .*is closed.*'title'"):
        book.title = "v2"
    assert book.title == "v1" and book._p_changed is False
    with pytest.raises(ConnectionStateError, match="database .*is closed"):
        conn.add(Book("new"))
    conn.close()  # nothing to do, and no error


def test_uncommitted_changes_of_a_closed_database_fail_the_commit_and_abort_cleanly() -> None:
    db1, db2 = DB(None), DB(None)
    conn1, conn2 = db1.open(), db2.open()
    conn1.root.book = Book("lost with db1")
    conn2.root.book = Book("in the same transaction")
    db1.close()
    with pytest.raises(ConnectionStateError, match="database .*is closed"):
        transaction.commit()
    transaction.abort()
    assert "book" not in conn2.root()  # all or nothing: db2's part was not written either
    conn2.root.book = Book("next")
    transaction.commit()
    assert _committed_title(db2) == "next"
    conn2.close()
    db2.close()


def test_closing_the_database_runs_the_connections_close_callbacks() -> None:
    db = DB(None)
    conn = db.open()
    calls: list[str] = []
    conn.on_close(lambda: calls.append("closed"))
    db.close()
    assert calls == ["closed"]
    conn.close()
    assert calls == ["closed"]


class _FailingSynchronizer:
    """A synchronizer whose afterCompletion always raises."""

    def newTransaction(self, txn: Any) -> None:
        pass

    def beforeCompletion(self, txn: Any) -> None:
        pass

    def afterCompletion(self, txn: Any) -> None:
        raise RuntimeError("synchronizer broke after the commit")


def test_durable_commit_is_reported_as_committed_when_a_synchronizer_fails_after_it(
    db: DB, caplog: pytest.LogCaptureFixture
) -> None:
    manager = transaction.TransactionManager()
    conn = db.open(manager)
    failing = _FailingSynchronizer()
    manager.registerSynch(failing)
    conn.root()["book"] = Book("durable")
    with caplog.at_level(logging.ERROR, logger="amberdb.transaction"):
        manager.commit()  # must not raise: the data is on disk
    assert "synchronizer broke after the commit" in caplog.text
    assert _committed_title(db) == "durable"
    manager.unregisterSynch(failing)
    conn.close()


def test_connection_closed_from_another_thread_leaves_its_first_threads_manager(db: DB) -> None:
    opened: list[amberdb.Connection] = []
    ready, finished = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            opened.append(db.open())  # registered with this thread's manager
            ready.set()
            finished.wait(10)
            transaction.begin()  # the connection, closed and reused elsewhere, must not react
            transaction.abort()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    assert ready.wait(10)
    conn = opened[0]
    conn.close()  # from this thread: must unregister from the worker's manager
    reused = db.open()
    assert reused is conn
    calls: list[str] = []
    original = conn.newTransaction

    def spy(txn: Any, sync: bool = True) -> None:
        calls.append(threading.current_thread().name)
        original(txn, sync)

    conn.newTransaction = spy  # type: ignore[method-assign]
    finished.set()
    thread.join(10)
    assert not errors
    assert calls == []
    del conn.newTransaction
    reused.close()


class _StorageFailingAfterFinish:
    """A memory storage that fails every call made after a ``finish`` (as if closed then)."""

    def __init__(self) -> None:
        from amberdb.storage.memory import MemoryStorage

        self._inner = MemoryStorage()
        self.finished = False

    def finish(self) -> bytes:
        tid: bytes = self._inner.finish()
        self.finished = True
        return tid

    def __getattr__(self, name: str) -> Any:
        if self.finished and name not in ("read_only", "name"):
            raise amberdb.exceptions.StorageError(f"{name}() called after finish()")
        return getattr(self._inner, name)


def test_commit_is_reported_as_committed_when_the_storage_fails_after_finish(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = _StorageFailingAfterFinish()
    db = DB(storage)  # type: ignore[arg-type]
    storage.finished = False  # the root's creation
    manager = transaction.TransactionManager()
    conn = db.open(manager)
    conn.root()["book"] = Book("durable")
    with caplog.at_level(logging.ERROR, logger="amberdb.transaction"):
        manager.commit()  # durable once finish() returned: must not raise
    assert storage.finished
    storage.finished = False
    assert _committed_title(db) == "durable"
    conn.close()
    db.close()
