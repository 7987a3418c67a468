"""What happens to changes made around the end of a transaction.

As in the ``transaction`` package: a committed transaction accepts no new data managers, so a
change made in an after-commit hook is refused (the hook's error is logged, the object keeps
its committed value); a change made after ``commit()`` returned belongs to the next
transaction.  Changes made in after-abort hooks are discarded with the rest of the aborted
transaction.  Either way the connection keeps working: its next commit writes its next
changes, and it can be closed.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import DB
from amberdb.exceptions import TransactionError
from amberdb.transaction import Status, TransactionManager
from tests.models import Book


def _committed_title(db: DB) -> str:
    manager = TransactionManager()
    reader = db.open(manager)
    try:
        title: str = reader.root()["book"].title
        return title
    finally:
        manager.abort()
        reader.close()


def test_change_in_an_after_commit_hook_is_refused_and_the_connection_keeps_working(
    db: DB, caplog: pytest.LogCaptureFixture
) -> None:
    conn = db.open()
    conn.root.book = book = Book("v1")
    transaction.commit()

    def change_in_hook(ok: bool) -> None:
        book.title = "from the hook"

    book.title = "v2"
    transaction.get().addAfterCommitHook(change_in_hook)
    with caplog.at_level(logging.ERROR, logger="amberdb.transaction"):
        transaction.commit()
    assert "committed" in caplog.text and "Book oid 0x" in caplog.text
    assert book.title == "v2" and book._p_changed is False
    assert _committed_title(db) == "v2"

    book.title = "v3"  # after commit: the next transaction
    transaction.commit()
    assert _committed_title(db) == "v3"
    conn.close()  # nothing uncommitted


def test_change_after_commit_belongs_to_the_next_transaction(db: DB) -> None:
    manager = TransactionManager()
    conn = db.open(manager)
    conn.root()["book"] = book = Book("v1")
    committed = manager.get()
    manager.commit()
    book.title = "v2"
    assert manager.get() is not committed
    manager.abort()
    assert book.title == "v1"
    book.title = "v3"
    manager.commit()
    assert _committed_title(db) == "v3"
    conn.close()


def test_committed_transaction_refuses_to_join(conn: amberdb.Connection) -> None:
    txn = transaction.get()
    conn.root.x = 1
    seen: list[BaseException] = []

    def join_in_hook(ok: bool) -> None:
        try:
            txn.join(conn)
        except TransactionError as exc:
            seen.append(exc)

    txn.addAfterCommitHook(join_in_hook)
    txn.commit()
    assert txn.status == Status.COMMITTED
    assert len(seen) == 1 and "committed" in str(seen[0])
    with pytest.raises(TransactionError, match="already committed"):
        txn.join(conn)


def test_change_in_an_after_abort_hook_is_discarded_and_the_connection_keeps_working(db: DB) -> None:
    conn = db.open()
    conn.root.book = book = Book("v1")
    transaction.commit()

    def change_in_hook() -> None:
        book.title = "from the abort hook"

    book.title = "aborted"
    transaction.get().addAfterAbortHook(change_in_hook)
    transaction.abort()
    assert book.title == "v1"
    book.title = "v2"
    transaction.commit()
    assert _committed_title(db) == "v2"
    conn.close()


def test_change_in_a_before_commit_hook_is_part_of_the_commit(db: DB) -> None:
    conn = db.open()
    conn.root.book = book = Book("v1")
    transaction.commit()
    transaction.get().addBeforeCommitHook(lambda: setattr(book, "title", "from the hook"))
    transaction.commit()
    assert _committed_title(db) == "from the hook"
    conn.close()


def test_abort_lets_go_of_the_transaction_before_telling_synchronizers() -> None:
    manager = TransactionManager()
    txn = manager.begin()
    current_after_abort: list[bool] = []

    class Watcher:
        def newTransaction(self, txn: Any) -> None:
            pass

        def beforeCompletion(self, txn: Any) -> None:
            pass

        def afterCompletion(self, done: Any) -> None:
            current_after_abort.append(manager.get() is done)

    watcher = Watcher()
    manager.registerSynch(watcher)
    txn.abort()
    assert current_after_abort == [False]
    manager.unregisterSynch(watcher)
