"""Transactions at the object level: all-or-nothing, savepoints, subtransactions, metadata."""

from __future__ import annotations

import json
import resource
import tracemalloc

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import DB, PersistentList, PersistentMapping
from amberdb.exceptions import DoomedTransactionError, SerializationError, TransactionFailedError
from amberdb.utils import z64
from tests.models import Book, Node


def test_abort_discards_every_change(conn: amberdb.Connection) -> None:
    conn.root.books = books = PersistentList([Book("a")])
    transaction.commit()
    books[0].title = "changed"
    books.append(Book("new"))
    transaction.abort()
    assert [b.title for b in conn.root.books] == ["a"]


def test_failed_commit_writes_nothing_and_must_be_aborted(db: DB) -> None:
    conn = db.open()
    conn.root.good = Book("good")
    conn.root.bad = Book("bad")
    transaction.commit()
    last = db.storage.last_tid()
    conn.root.good.title = "would be written"
    conn.root.bad.hook = lambda: 0
    with pytest.raises(SerializationError, match="'hook'"):
        transaction.commit()
    assert db.storage.last_tid() == last
    with pytest.raises(TransactionFailedError):
        transaction.commit()
    transaction.abort()
    assert conn.root.good.title == "good"
    conn.close()


def test_doomed_transaction_cannot_commit(conn: amberdb.Connection) -> None:
    conn.root.x = 1
    transaction.doom()
    assert transaction.isDoomed()
    with pytest.raises(DoomedTransactionError, match="doomed"):
        transaction.commit()
    transaction.abort()
    assert "x" not in conn.root()


def test_transaction_metadata_is_stored(db: DB) -> None:
    conn = db.open()
    txn = transaction.get()
    txn.user = "alice"
    txn.note("first line")
    txn.note("second line")
    txn.setExtendedInfo("request", "/books/1")
    conn.root.x = 1
    transaction.commit()
    last = list(db.storage.iterator())[-1]  # type: ignore[attr-defined]
    assert last.meta.user == "alice"
    assert last.meta.description == "first line\nsecond line"
    assert json.loads(last.meta.extension) == {"request": "/books/1"}
    conn.close()


def test_extension_that_is_not_json_is_refused_clearly(conn: amberdb.Connection) -> None:
    transaction.get().setExtendedInfo("when", object())
    conn.root.x = 1
    with pytest.raises(SerializationError, match="extension metadata must be JSON"):
        transaction.commit()
    transaction.abort()


def test_hooks_run_around_commit(conn: amberdb.Connection) -> None:
    calls: list[object] = []
    txn = transaction.get()
    txn.addBeforeCommitHook(lambda: calls.append("before"))
    txn.addAfterCommitHook(lambda ok: calls.append(("after", ok)))
    conn.root.x = 1
    transaction.commit()
    assert calls == ["before", ("after", True)]


def test_savepoint_rollback_restores_objects(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("v1")
    transaction.commit()
    book.title = "v2"
    keep = Book("kept")
    conn.root.kept = keep
    savepoint = transaction.savepoint()
    book.title = "v3"
    lost = Book("lost")
    conn.root.lost = lost
    savepoint.rollback()
    assert book.title == "v2"
    assert conn.root.kept is keep and keep.title == "kept"
    assert "lost" not in conn.root()
    assert lost._p_status == "unsaved"
    savepoint.rollback()  # a savepoint can be rolled back to repeatedly
    assert book.title == "v2"
    transaction.commit()
    conn.cache_minimize()
    assert (conn.root.book.title, conn.root.kept.title) == ("v2", "kept")


def test_nested_savepoints(conn: amberdb.Connection) -> None:
    conn.root.log = log = PersistentList()
    transaction.commit()
    log.append(1)
    first = transaction.savepoint()
    log.append(2)
    second = transaction.savepoint()
    log.append(3)
    second.rollback()
    assert list(log) == [1, 2]
    first.rollback()
    assert list(log) == [1]
    transaction.commit()
    conn.cache_minimize()
    assert list(conn.root.log) == [1]


def test_subtransaction_commit_and_abort(conn: amberdb.Connection) -> None:
    conn.root.log = log = PersistentList()
    transaction.commit()
    log.append("a")
    transaction.commit(True)
    log.append("b")
    transaction.abort(True)  # back to the last subtransaction; the outer one goes on
    assert list(log) == ["a"]
    log.append("c")
    transaction.commit(1)
    transaction.commit()
    conn.cache_minimize()
    assert list(conn.root.log) == ["a", "c"]


def test_abort_after_subtransactions_discards_everything(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("v1")
    transaction.commit()
    book.title = "v2"
    new = Book("new")
    conn.root.new = new
    transaction.commit(True)
    transaction.abort()
    assert book.title == "v1"
    assert "new" not in conn.root()
    assert new._p_status == "unsaved" and new.title == "new"


def test_new_object_spilled_and_evicted_keeps_its_state_after_abort() -> None:
    db = DB(None, cache_size=0)
    conn = db.open()
    chain = Node("head", Node("middle", Node("tail")))
    conn.root.chain = chain
    transaction.commit(True)
    middle = chain.next
    tail = middle.next
    del chain
    conn.cache_minimize()
    transaction.abort()
    assert middle._p_status == "unsaved" and middle.value == "middle"
    assert tail._p_status == "unsaved" and tail.value == "tail"
    conn.close()
    db.close()


def test_big_transaction_with_subtransactions_runs_in_bounded_memory() -> None:
    """Memory held after each subtransaction stays flat as the transaction grows."""
    db = DB(None, cache_size=100)
    conn = db.open()
    conn.root.nodes = nodes = amberdb.PersistentList()
    transaction.commit()
    tracemalloc.start()
    peaks = []
    for batch in range(6):
        for i in range(2_000):
            conn.add(Node("x" * 100 + str(i)))
        nodes.append(batch)
        transaction.commit(True)
        peaks.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    transaction.commit()
    # The objects (2,000 x ~400 bytes per batch) went to the spill file; what stays is the
    # spill index.  Growth per batch must be far below the batch's object footprint.
    growth_per_batch = (peaks[-1] - peaks[1]) / (len(peaks) - 2)
    assert growth_per_batch < 2_000 * 200, peaks
    assert len(db) == 2 + 6 * 2_000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
    conn.close()
    db.close()


def test_objects_committed_through_subtransactions_get_the_final_serial(conn: amberdb.Connection) -> None:
    book = Book("x")
    conn.root.book = book
    transaction.commit(True)
    assert book._p_serial == z64
    transaction.commit()
    assert book._p_serial == conn.db().storage.last_tid()
    assert book._p_status == "saved"


def test_mapping_changes_inside_savepoints(conn: amberdb.Connection) -> None:
    conn.root.m = m = PersistentMapping()
    transaction.commit()
    m["a"] = 1
    sp = transaction.savepoint()
    m["b"] = 2
    sp.rollback()
    assert dict(m) == {"a": 1}
