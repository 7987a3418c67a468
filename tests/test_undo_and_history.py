"""db.history, db.undo_log / undo_info / undo and db.pack, as a user calls them, on every storage."""

from __future__ import annotations

import time

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import UndoError
from amberdb.testing.objects import MergingCounter
from amberdb.utils import p64, time_from_tid

from .models import Book


def _note(description: str, user: str = "") -> None:
    current = transaction.get()
    current.note(description)
    if user:
        current.user = user


def test_history_of_an_object(db: amberdb.DB) -> None:
    conn = db.open()
    book = conn.root()["book"] = Book("first")
    _note("add the book", "ann")
    transaction.commit()
    tids = [db.last_tid()]
    for title in ("second", "third"):
        book.title = title
        _note(f"retitle to {title}")
        transaction.commit()
        tids.append(db.last_tid())
    history = db.history(book, size=10)
    assert [entry["tid"] for entry in history] == tids[::-1]
    described = [entry["description"] for entry in history]
    assert described == ["retitle to third", "retitle to second", "add the book"]
    assert history[-1]["user_name"].endswith("ann")
    assert all(entry["size"] > 0 for entry in history)
    assert history[0]["time"] == pytest.approx(time_from_tid(tids[-1]))
    assert abs(history[0]["time"] - time.time()) < 60
    assert db.history(book._p_oid) == history[:1]
    assert db.history(int.from_bytes(book._p_oid, "big"), 2) == history[:2]
    # The history agrees with historical connections and with the iterator.
    for entry, title in zip(history, ["third", "second", "first"]):
        old = db.open(transaction.TransactionManager(), at=entry["tid"])
        assert old.root()["book"].title == title
        old.close()
    logged = {txn.tid: txn.meta.description for txn in db.storage.iterator()}
    assert all(logged[entry["tid"]] == entry["description"] for entry in history)
    with pytest.raises(ValueError):
        db.history(Book("never stored"))
    with pytest.raises(KeyError):
        db.history(p64(10**6))


def test_undo_log_and_undo_info(db: amberdb.DB) -> None:
    conn = db.open()
    for i in range(25):
        conn.root()["x"] = i
        _note(f"set x to {i}", user="bob")
        transaction.get().extension["step"] = i
        transaction.commit()
    log = db.undo_log()
    assert len(log) == 20
    assert [entry["description"] for entry in log[:3]] == ["set x to 24", "set x to 23", "set x to 22"]
    assert set(log[0]) >= {"id", "time", "user_name", "description"}
    assert log[0]["step"] == 24
    assert [entry["step"] for entry in db.undo_log(2, -2)] == [22, 21]
    assert [entry["step"] for entry in db.undo_info(0, 100, {"step": 3})] == [3]
    assert db.undoLog(0, 1) == db.undo_log(0, 1)
    tens = db.undo_log(0, 30, lambda e: e.get("step", 1) % 10 == 0)
    assert [entry["step"] for entry in tens] == [20, 10, 0]
    assert [entry["step"] for entry in db.undo_log(1, 2, lambda e: e.get("step", 1) % 10 == 0)] == [10]


def test_undo_the_last_transaction_and_an_older_one(db: amberdb.DB) -> None:
    conn = db.open()
    root = conn.root()
    root["a"], root["b"] = Book("a1"), Book("b1")
    transaction.commit()
    root["a"].title = "a2"
    _note("bad change to a")
    transaction.commit()
    bad = db.undo_log()[0]["id"]
    root["b"].title = "b2"
    transaction.commit()
    db.undo(bad)
    transaction.commit()  # what ZODB users write after db.undo(): harmless here
    assert root["a"].title == "a1"
    assert root["b"].title == "b2"
    # The undo is itself in the log, and undoing it redoes the change.
    undo_entry = db.undo_log()[0]
    assert "undo" in undo_entry["description"]
    db.undo(undo_entry["id"])
    transaction.begin()
    assert root["a"].title == "a2"


def test_refused_undo_names_the_oids(db: amberdb.DB) -> None:
    conn = db.open()
    book = conn.root()["book"] = Book("one")
    transaction.commit()
    book.title = "two"
    transaction.commit()
    changed = db.undo_log()[0]["id"]
    book.title = "three"
    transaction.commit()
    before = db.last_tid()
    with pytest.raises(UndoError) as info:
        db.undo(changed)
    assert info.value.oids == (book._p_oid,)
    assert hex(int.from_bytes(book._p_oid, "big")) in str(info.value)
    assert "Book" in str(info.value)
    assert db.last_tid() == before
    assert book.title == "three"


def test_undo_resolves_with_p_resolveConflict() -> None:
    db = amberdb.DB(None, allowed_classes=[MergingCounter])
    conn = db.open()
    counter = conn.root()["counter"] = MergingCounter()
    transaction.commit()
    counter.count += 5
    transaction.commit()
    five = db.undo_log()[0]["id"]
    counter.count += 2
    transaction.commit()
    db.undo(five)  # take the +5 back, keep the later +2
    transaction.begin()
    assert counter.count == 2
    db.close()


def test_undo_with_bad_ids(db: amberdb.DB) -> None:
    with pytest.raises(TypeError):
        db.undo("not an id")  # type: ignore[arg-type]
    with pytest.raises(UndoError):
        db.undo(p64(12345))


def test_pack_through_the_database(db: amberdb.DB) -> None:
    conn = db.open()
    root = conn.root()
    root["keep"] = Book("kept")
    root["drop"] = Book("dropped")
    transaction.commit()
    for i in range(5):
        root["keep"].title = f"kept {i}"
        transaction.commit()
    dropped = root["drop"]._p_oid
    del root["drop"]
    transaction.commit()
    objects_before, size_before = len(db), db.storage_size()
    reports: list[tuple[int, int]] = []
    db.pack(progress=lambda done, total: reports.append((done, total)))
    assert len(db) == objects_before - 1
    assert db.storage_size() < size_before
    assert reports and reports[-1][0] == reports[-1][1]
    with pytest.raises(KeyError):
        db.storage.load(dropped)
    transaction.begin()
    assert root["keep"].title == "kept 4"
    assert len(db.history(root["keep"], 10)) == 1
    fresh = db.open(transaction.TransactionManager())
    assert fresh.root()["keep"].title == "kept 4"
    fresh.close()
    with pytest.raises(ValueError):
        db.pack(days=-1)


def test_pack_days_keeps_recent_history(db: amberdb.DB) -> None:
    conn = db.open()
    conn.root()["x"] = Book("a")
    transaction.commit()
    conn.root()["x"].title = "b"
    transaction.commit()
    db.pack(days=1)  # a day ago: nothing is that old
    assert len(db.history(conn.root()["x"], 10)) == 2
    assert len(db.undo_log()) == 3
