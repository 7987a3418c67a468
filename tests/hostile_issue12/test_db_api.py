"""DB.history / undo_log / undo_info / pack called the way careless users call them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.exceptions import POSKeyError
from amberdb.storage.file import FileStorage
from amberdb.storage.memory import MemoryStorage
from amberdb.utils import p64

from ..models import Book


def test_history_of_an_object_of_another_database_is_refused() -> None:
    mine, theirs = amberdb.DB(None), amberdb.DB(None)
    try:
        tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
        c1, c2 = mine.open(tm1), theirs.open(tm2)
        c1.root()["b"] = Book("mine")
        tm1.get().note("my book")
        tm1.commit()
        c2.root()["x"] = Book("theirs")
        tm2.get().note("their book")
        tm2.commit()
        book = c1.root()["b"]
        assert book._p_oid == c2.root()["x"]._p_oid  # both oid 1: the trap
        with pytest.raises(ValueError):
            theirs.history(book)
    finally:
        mine.close()
        theirs.close()


def test_history_with_odd_arguments(db: amberdb.DB) -> None:
    conn = db.open()
    book = conn.root()["b"] = Book("v0")
    transaction.commit()
    for bad in (-1, 2**64, b"short", b"x" * 9, 3.5, None, "0x01"):
        with pytest.raises((ValueError, TypeError)):
            db.history(bad)
    assert db.history(book, size=0) == []
    assert db.history(book, size=-5) == []
    assert len(db.history(book, size=10**9)) == 1
    # A ghost: history needs no load.
    db.cache_minimize()
    assert db.history(book)[0]["tid"] == db.last_tid()
    # Added but never committed: no revisions.
    fresh = Book("unsaved")
    conn.add(fresh)
    if fresh._p_oid is not None:
        with pytest.raises(POSKeyError):
            db.history(fresh)
    transaction.abort()


def _grid_log(db: amberdb.DB) -> list[bytes]:
    return [entry["id"] for entry in db.undo_log(0, 10**6)]


def test_undo_log_slices_follow_zodb_convention(db: amberdb.DB) -> None:
    conn = db.open()
    for i in range(30):
        conn.root()["x"] = i
        transaction.get().note(f"step {i}")
        transaction.commit()
    everything = _grid_log(db)
    assert len(everything) == 31
    cases = [(0, 0), (0, 1), (0, -1), (3, -2), (3, 5), (5, 3), (0, 10**9), (29, -20), (31, -5), (40, 50)]
    for first, last in cases:
        stop = first - last if last < 0 else last
        expected = everything[first : max(first, stop)]
        assert [e["id"] for e in db.undo_log(first, last)] == expected, (first, last)
        # A filter that keeps everything changes nothing (first/last count kept entries).
        assert [e["id"] for e in db.undo_log(first, last, lambda e: True)] == expected, (first, last)
        assert [e["id"] for e in db.undo_info(first, last)] == expected, (first, last)
    with pytest.raises(ValueError):
        db.undo_log(-1, 5)
    # A filter that keeps every third entry: first/last count the kept ones.
    thirds = everything[::3]
    assert [e["id"] for e in db.undo_log(2, -4, lambda e: e["id"] in thirds)] == thirds[2:6]


def test_pack_with_threads_committing_keeps_their_commits() -> None:
    db = amberdb.DB(MemoryStorage())
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    for i in range(4):
        conn.root()[i] = Book("start")
        conn.root()[f"box{i}"] = amberdb.PersistentMapping()  # each writer's own: no contention
    tm.commit()
    stop = threading.Event()
    counts = [0] * 4
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        wtm = transaction.TransactionManager()
        c = db.open(wtm)
        try:
            while not stop.is_set():
                for attempt in wtm.attempts(20):
                    with attempt:
                        c.root()[n].title = f"{counts[n] + 1}"
                counts[n] += 1
                # garbage every round: an object made unreachable right away
                for attempt in wtm.attempts(20):
                    with attempt:
                        c.root()[f"box{n}"]["tmp"] = Book("garbage")
                for attempt in wtm.attempts(20):
                    with attempt:
                        del c.root()[f"box{n}"]["tmp"]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            wtm.abort()
            c.close()

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for w in workers:
        w.start()
    try:
        for _ in range(20):
            db.pack()
            time.sleep(0.005)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert not errors
    db.pack()
    tm.begin()
    assert [conn.root()[n].title for n in range(4)] == [str(c) for c in counts]
    # After a full pack only reachable objects remain, each with one revision.
    assert len(db) == 9
    for n in range(4):
        assert len(db.history(conn.root()[n], 100)) == 1
    assert db.undo_log() == []
    db.close()


def test_pack_arguments(db: amberdb.DB) -> None:
    with pytest.raises(ValueError):
        db.pack(days=-1)
    conn = db.open()
    conn.root()["b"] = Book("x")
    transaction.commit()
    db.pack(t=0)  # before everything: nothing goes, the log stays
    assert len(db.undo_log()) == 2
    db.pack(t=time.time() + 10**6)  # the future: packs now
    assert db.undo_log() == []


def test_follower_db_log_and_history_see_what_last_tid_sees(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    writer = amberdb.DB(str(path))
    wtm = transaction.TransactionManager()
    wconn = writer.open(wtm)
    wconn.root()["a"] = Book("a")
    wtm.commit()
    reader = amberdb.DB(FileStorage(path, read_only=True), read_only=True)
    try:
        wconn.root()["b"] = Book("b")
        wtm.get().note("the new one")
        wtm.commit()
        oid = wconn.root()["b"]._p_oid
        log = reader.undo_log()
        history = None
        try:
            history = reader.history(oid)
        except POSKeyError:
            pass
        newest = reader.last_tid()
        assert newest == writer.last_tid()
        assert log[0]["id"] == newest, "undo_log answered from before the writer's commit"
        assert history is not None and history[0]["tid"] == newest
    finally:
        reader.close()
        wtm.abort()
        writer.close()


def test_history_and_undo_log_on_file_match_memory_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    db = amberdb.DB(str(path))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    book = conn.root()["b"] = Book("0")
    tm.commit()
    for i in range(1, 40):
        book.title = str(i)
        tm.get().note(f"ünïcode step {i} \U0001f600")
        tm.get().setUser(f"user-{i} ✓")
        if i % 5 == 0:
            tm.get().extension["k"] = i
        tm.commit()
    history = db.history(book, 100)
    log = db.undo_log(0, 100)
    oid = book._p_oid
    db.close()
    for remove_index in (False, True):
        if remove_index:
            (tmp_path / "data.fs.index").unlink()
        again = amberdb.DB(str(path))
        assert again.history(oid, 100) == history
        assert again.undo_log(0, 100) == log
        again.close()
    assert [h["description"] for h in history[:2]] == [
        "ünïcode step 39 \U0001f600",
        "ünïcode step 38 \U0001f600",
    ]
    assert log[4]["k"] == 35


def test_history_int_oid_equals_bytes_oid(db: amberdb.DB) -> None:
    conn = db.open()
    conn.root()["b"] = Book("x")
    transaction.commit()
    assert db.history(1) == db.history(p64(1)) == db.history(conn.root()["b"])


def test_filtered_undo_log_lists_each_transaction_once_while_others_commit() -> None:
    db = amberdb.DB(None)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    for i in range(400):
        conn.root()["x"] = i
        tm.get().extension["k"] = i
        tm.commit()

    def commit_elsewhere() -> None:
        other_tm = transaction.TransactionManager()
        other = db.open(other_tm)
        for j in range(10):
            other.root()["y"] = j
            other_tm.commit()
        other.close()

    calls = []

    def keep_even(entry: dict) -> bool:
        calls.append(1)
        if len(calls) == 1:  # another thread commits while the log is being read
            worker = threading.Thread(target=commit_elsewhere)
            worker.start()
            worker.join(30)
        return entry.get("k", 1) % 2 == 0

    try:
        ks = [entry["k"] for entry in db.undo_log(0, 100, keep_even)]
        assert len(ks) == len(set(ks)), "an entry is listed twice"
        assert ks == sorted(ks, reverse=True)
    finally:
        tm.abort()
        db.close()
