"""db.undo as a demanding user drives it: chains, redo, racing threads, caches, deletions."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import UndoError
from amberdb.exceptions import ConflictError, POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.memory import MemoryStorage
from amberdb.testing import VoteConflictStorage
from amberdb.testing.objects import MergingCounter
from amberdb.utils import p64, z64

from ..models import Book


def _commit(note: str = "") -> bytes:
    if note:
        transaction.get().note(note)
    transaction.commit()
    return _last_tid()


_DB: list[amberdb.DB] = []


def _last_tid() -> bytes:
    return _DB[-1].last_tid()


@pytest.fixture
def tdb(db: amberdb.DB) -> amberdb.DB:
    _DB.append(db)
    yield db
    _DB.remove(db)


def test_undo_chain_undo_redo_undo(tdb: amberdb.DB) -> None:
    conn = tdb.open()
    book = conn.root()["b"] = Book("v0")
    _commit()
    book.title = "v1"
    t1 = _commit("to v1")
    undo1 = tdb.undo(t1)
    transaction.begin()
    assert book.title == "v0"
    redo = tdb.undo(undo1)
    transaction.begin()
    assert book.title == "v1"
    tdb.undo(redo)
    transaction.begin()
    assert book.title == "v0"
    # The log lists the undos newest first, each undoable.
    ids = [entry["id"] for entry in tdb.undo_log(0, 3)]
    assert ids[1:] == [redo, undo1]


def test_undo_of_older_transaction_after_the_later_one_was_undone(tdb: amberdb.DB) -> None:
    conn = tdb.open()
    book = conn.root()["b"] = Book("v0")
    _commit()
    book.title = "v1"
    t1 = _commit("to v1")
    book.title = "v2"
    t2 = _commit("to v2")
    tdb.undo(t2)
    transaction.begin()
    assert book.title == "v1"
    tdb.undo(t1)  # as if t2 had never been: t1 is the newest change of the book
    transaction.begin()
    assert book.title == "v0"


def test_undo_of_a_transaction_storing_one_oid_twice() -> None:
    for storage in (MemoryStorage(), VoteConflictStorage(MemoryStorage())):
        storage.begin(TransactionMeta())
        storage.store(p64(1), z64, b"first")
        storage.vote()
        t0 = storage.finish()
        storage.begin(TransactionMeta(description="twice"))
        storage.store(p64(1), t0, b"second")
        storage.store(p64(1), t0, b"third")
        storage.vote()
        t1 = storage.finish()
        assert storage.load(p64(1)) == (b"third", t1)
        assert [rev.tid for rev in storage.history(p64(1), 10)] == [t1, t0]
        undo = storage.undo(t1, TransactionMeta())
        assert storage.load(p64(1)) == (b"first", undo)


def test_undo_of_a_transaction_storing_one_oid_twice_on_file(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data.fs")
    try:
        storage.begin(TransactionMeta())
        storage.store(p64(1), z64, b"first")
        storage.vote()
        t0 = storage.finish()
        storage.begin(TransactionMeta(description="twice"))
        storage.store(p64(1), t0, b"second")
        storage.store(p64(1), t0, b"third")
        storage.vote()
        t1 = storage.finish()
        history = storage.history(p64(1), 10)
        assert [rev.tid for rev in history] == [t1, t0]
        assert history[0].size == len(b"third")
        [txn] = list(storage.iterator(t1, t1))
        assert [(r.oid, r.record) for r in txn.records] == [(p64(1), b"third")]
        undo = storage.undo(t1, TransactionMeta())
        assert storage.load(p64(1)) == (b"first", undo)
        assert storage.load(p64(1), before=undo) == (b"third", t1)
    finally:
        storage.close()
    with FileStorage(tmp_path / "data.fs") as again:
        assert [rev.tid for rev in again.history(p64(1), 10)] == [undo, t1, t0]


def test_undo_of_the_root_creation_leaves_a_working_database(tdb: amberdb.DB) -> None:
    conn = tdb.open()
    conn.root()["x"] = 1
    _commit()
    first = tdb.undo_log(0, 100)[-1]
    assert first["description"] == "initial database creation"
    tdb.undo(first["id"])
    transaction.begin()
    assert conn.root()["x"] == 1
    other = tdb.open(transaction.TransactionManager())
    assert dict(other.root()) == {"x": 1}
    other.close()


def test_undo_of_a_change_to_an_object_later_removed_from_the_graph(tdb: amberdb.DB) -> None:
    conn = tdb.open()
    book = conn.root()["b"] = Book("v0")
    _commit()
    book.title = "v1"
    t1 = _commit("retitle")
    del conn.root()["b"]
    t2 = _commit("remove")
    tdb.undo(t1)
    tdb.undo(t2)
    transaction.begin()
    assert conn.root()["b"].title == "v0"


def test_undo_while_a_connection_holds_an_uncommitted_change_conflicts(tdb: amberdb.DB) -> None:
    conn = tdb.open()
    book = conn.root()["b"] = Book("v0")
    _commit()
    book.title = "v1"
    t1 = _commit()
    book.title = "mine, not committed"
    done = []
    worker = threading.Thread(target=lambda: done.append(tdb.undo(t1)))
    worker.start()
    worker.join(30)
    assert done
    with pytest.raises(ConflictError):
        transaction.commit()
    transaction.abort()
    assert book.title == "v0"


def test_every_connection_sees_the_undone_state(tdb: amberdb.DB) -> None:
    conn = tdb.open()
    conn.root()["b"] = Book("v0")
    _commit()
    conn.root()["b"].title = "v1"
    t1 = _commit()
    # A pooled connection with the book loaded.
    pooled_tm = transaction.TransactionManager()
    pooled = tdb.open(pooled_tm)
    assert pooled.root()["b"].title == "v1"
    pooled.close()
    # A connection in another thread with the book loaded, waiting for its next boundary.
    ready, go, seen = threading.Event(), threading.Event(), []

    def other_thread() -> None:
        tm = transaction.TransactionManager()
        c = tdb.open(tm)
        assert c.root()["b"].title == "v1"
        ready.set()
        go.wait(30)
        tm.begin()
        seen.append(c.root()["b"].title)
        tm.abort()
        c.close()

    worker = threading.Thread(target=other_thread)
    worker.start()
    assert ready.wait(30)
    tdb.undo(t1)
    go.set()
    worker.join(30)
    assert seen == ["v0"]
    transaction.begin()
    assert conn.root()["b"].title == "v0"
    again = tdb.open(pooled_tm)
    assert again.root()["b"].title == "v0"
    again.close()


def test_undo_with_threads_committing_loses_no_update(tdb: amberdb.DB) -> None:
    """Ten threads add to one counter while the main thread undoes one big addition."""
    conn = tdb.open()
    counter = conn.root()["c"] = MergingCounter()
    _commit()
    counter.count += 1000
    big = _commit("add 1000")
    errors: list[BaseException] = []

    def adder() -> None:
        tm = transaction.TransactionManager()
        c = tdb.open(tm)
        try:
            for _ in range(20):
                for attempt in tm.attempts(50):
                    with attempt:
                        c.root()["c"].count += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            tm.abort()
            c.close()

    workers = [threading.Thread(target=adder) for _ in range(10)]
    for worker in workers:
        worker.start()
    undone = False
    for _ in range(10):
        try:
            tdb.undo(big)
            undone = True
            break
        except ConflictError:
            continue  # a transient conflict (VoteConflictStorage retried and gave up): again
    for worker in workers:
        worker.join(120)
    assert not errors
    transaction.begin()
    assert undone
    assert conn.root()["c"].count == 200


def test_undo_with_bad_ids(tdb: amberdb.DB) -> None:
    for bad in (None, 5, "abcdefgh", b"short", bytearray(8)):
        with pytest.raises(TypeError):
            tdb.undo(bad)  # type: ignore[arg-type]
    with pytest.raises(UndoError):
        tdb.undo(p64(12345))
    with pytest.raises(UndoError):
        tdb.undo(b"\xff" * 8)


def test_undo_of_a_transaction_of_another_database_is_refused(tdb: amberdb.DB) -> None:
    other = amberdb.DB(None)
    tm = transaction.TransactionManager()
    c = other.open(tm)
    c.root()["x"] = 1
    tm.commit()
    foreign = other.last_tid()
    other.close()
    with pytest.raises(UndoError):
        tdb.undo(foreign)


def test_historical_connection_after_pack_raises_poskeyerror_never_old_data() -> None:
    db = amberdb.DB(None)
    conn = db.open()
    book = conn.root()["b"] = Book("v1")
    _DB.append(db)
    try:
        t1 = _commit()
        book.title = "v2"
        t2 = _commit()
        book.title = "v3"
        _commit()
        db.storage.pack(t2)
        old = db.open(transaction.TransactionManager(), at=t1)
        try:
            with pytest.raises(POSKeyError):
                _ = old.root()["b"].title
        finally:
            old.close()
        mid = db.open(transaction.TransactionManager(), at=t2)
        assert mid.root()["b"].title == "v2"
        mid.close()
        with pytest.raises(UndoError):
            db.undo(t2)
    finally:
        _DB.remove(db)
        db.close()
