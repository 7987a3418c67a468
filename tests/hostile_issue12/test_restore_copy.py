"""Restores (begin(meta, tid=...)) and copy_transactions_from, memory <-> file, attacked."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.exceptions import StorageError, StorageTransactionError, UndoError
from amberdb.storage.base import Storage, TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.memory import MemoryStorage
from amberdb.testing import VoteConflictStorage
from amberdb.utils import p64, u64, z64

from ..models import Book


def _storages(tmp_path: Path, name: str) -> list[Storage]:
    return [MemoryStorage(), FileStorage(tmp_path / f"{name}.fs")]


def _fill(storage: Storage, rounds: int) -> None:
    db = amberdb.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    for i in range(rounds):
        root[f"b{i}"] = Book(f"book {i}")
        if i:
            root[f"b{i - 1}"].title += " (changed)"
        tm.get().note(f"round {i} ✓")
        tm.get().setUser(f"üser {i}")
        tm.commit()
    conn.close()


def _listing(storage: Storage) -> list[tuple[bytes, TransactionMeta, list[tuple[bytes, bytes, bytes]]]]:
    return [
        (txn.tid, txn.meta, sorted((r.oid, r.tid, r.record) for r in txn.records))
        for txn in storage.iterator()
    ]


@pytest.mark.parametrize("direction", ["memory->file", "file->memory", "file->file", "memory->memory"])
def test_copy_both_ways_incrementally_keeps_everything(tmp_path: Path, direction: str) -> None:
    kinds = direction.split("->")

    def make(kind: str, name: str) -> Storage:
        return MemoryStorage() if kind == "memory" else FileStorage(tmp_path / f"{name}.fs")

    source, dest = make(kinds[0], "source"), make(kinds[1], "dest")
    try:
        _fill(source, 5)
        assert dest.copy_transactions_from(source) == 6
        assert dest.copy_transactions_from(source) == 0
        _fill(source, 3)  # 3 more transactions (root exists: DB() adds none)
        assert dest.copy_transactions_from(source) == 3
        assert _listing(dest) == _listing(source)
        assert dest.undo_log(0, 100) == source.undo_log(0, 100)
        assert dest.last_tid() == source.last_tid()
        for oid in {r.oid for txn in source.iterator() for r in txn.records}:
            assert dest.history(oid, 100) == source.history(oid, 100)
            assert dest.load(oid) == source.load(oid)
        # new_oid never hands out a copied oid (invariant 5).
        copied = {u64(r.oid) for txn in source.iterator() for r in txn.records}
        fresh = u64(dest.new_oid())
        assert fresh > max(copied)
        # The copy is a working database that commits on top of the copied history.
        db = amberdb.DB(dest)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()["new"] = Book("after the copy")
        tm.commit()
        assert conn.root()["b0"].title == "book 0 (changed)"
        conn.close()
    finally:
        source.close()
        dest.close()


def test_copy_of_a_file_survives_reopen_with_and_without_index(tmp_path: Path) -> None:
    source = MemoryStorage()
    _fill(source, 4)
    expected = _listing(source)
    with FileStorage(tmp_path / "dest.fs") as dest:
        dest.copy_transactions_from(source)
    with FileStorage(tmp_path / "dest.fs") as dest:
        assert _listing(dest) == expected
        assert u64(dest.new_oid()) > max(u64(r[0]) for _, _, recs in expected for r in recs)
    (tmp_path / "dest.fs.index").unlink()
    with FileStorage(tmp_path / "dest.fs") as dest:
        assert _listing(dest) == expected
        assert u64(dest.new_oid()) > max(u64(r[0]) for _, _, recs in expected for r in recs)


@pytest.mark.parametrize("kind", ["memory", "file", "vote-conflicts"])
def test_restore_tids_at_or_below_the_last_are_refused(tmp_path: Path, kind: str) -> None:
    storage: Storage = {
        "memory": MemoryStorage,
        "file": lambda: FileStorage(tmp_path / "data.fs"),
        "vote-conflicts": lambda: VoteConflictStorage(MemoryStorage()),
    }[kind]()
    try:
        storage.begin(TransactionMeta())
        storage.store(p64(1), z64, b"x")
        storage.vote()
        last = storage.finish()
        for tid in (last, p64(u64(last) - 1), z64):
            with pytest.raises(StorageTransactionError):
                storage.begin(TransactionMeta(), tid=tid)
                storage.store(p64(1), z64, b"y")
                storage.vote()
            storage.abort()
        assert storage.load(p64(1)) == (b"x", last)
        # In a thread whose transaction is open, a restore refuses at once (no self-deadlock).
        storage.begin(TransactionMeta())
        with pytest.raises(StorageTransactionError):
            storage.begin(TransactionMeta(), tid=p64(u64(last) + 10))
        storage.abort()
        # A valid restore, then an ordinary commit after it.
        storage.begin(TransactionMeta(), tid=p64(u64(last) + 10))
        storage.store(p64(1), z64, b"restored")  # base tid ignored
        storage.vote()
        assert storage.finish() == p64(u64(last) + 10)
        storage.begin(TransactionMeta())
        storage.store(p64(1), p64(u64(last) + 10), b"after")
        storage.vote()
        assert storage.finish() > p64(u64(last) + 10)
    finally:
        storage.close()


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_begin_after_the_largest_tid_fails_without_wedging_the_storage(tmp_path: Path, kind: str) -> None:
    storage: Storage = MemoryStorage() if kind == "memory" else FileStorage(tmp_path / "data.fs")
    try:
        storage.begin(TransactionMeta(), tid=b"\xff" * 8)
        storage.store(p64(1), z64, b"x")
        storage.vote()
        storage.finish()
        with pytest.raises((ValueError, StorageError)):  # tids are used up
            storage.begin(TransactionMeta())
        outcome: list[str] = []

        def other() -> None:
            try:
                storage.begin(TransactionMeta())
            except Exception as exc:
                outcome.append(type(exc).__name__)
            else:  # pragma: no cover
                outcome.append("began")
                storage.abort()

        worker = threading.Thread(target=other, daemon=True)
        worker.start()
        worker.join(3)
        assert not worker.is_alive(), "another thread's begin() blocks forever after the failed begin"
        assert outcome and outcome != ["began"]
    finally:
        if kind == "memory":
            storage.abort()  # frees the leaked lock so close() cannot hang
        storage.close()


def test_undo_in_a_copy_of_a_packed_storage_does_not_pretend(tmp_path: Path) -> None:
    source = MemoryStorage()
    db = amberdb.DB(source)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    book = conn.root()["b"] = Book("v1")
    tm.commit()
    book.title = "v2"
    tm.commit()
    t2 = db.last_tid()
    conn.root()["other"] = 1  # a later transaction that leaves the book alone
    tm.commit()
    source.pack(t2)
    with pytest.raises(UndoError):
        db.undo(t2)  # the source refuses: the state before t2 was packed away
    for dest in (MemoryStorage(), FileStorage(tmp_path / "copy.fs")):
        dest.copy_transactions_from(source)
        copy = amberdb.DB(dest)
        try:
            if t2 not in [entry["id"] for entry in copy.undo_log(0, 100)]:
                continue  # the copy knows t2 is packed: fine
            try:
                copy.undo(t2)
            except UndoError:
                continue
            ctm = transaction.TransactionManager()
            c = copy.open(ctm)
            # Either refused, or really undone: the book as it was before t2.
            assert c.root()["b"].title == "v1", f"{dest!r}: undo of t2 reported success, changed nothing"
        finally:
            copy.close()
    db.close()


def test_copy_into_a_destination_with_a_diverging_history_is_refused(tmp_path: Path) -> None:
    dest = FileStorage(tmp_path / "dest.fs")
    _fill(dest, 2)  # its own root and books
    source = MemoryStorage()
    _fill(source, 3)  # another database, committed later: every tid is above dest's
    try:
        with pytest.raises(StorageError, match="diverge"):
            dest.copy_transactions_from(source)
    finally:
        source.close()
        dest.close()
