"""A commit that fails at any point leaves every object as committed: the family of a defect
found in review (objects serialized before a failing store kept their uncommitted state).

A wrapper storage fails the N-th call to one of its methods; each test enumerates every
call a commit makes, for commits kept in memory, moved to the spill file part-way
(``COMMIT_BUFFER_SIZE``), and spilled by a savepoint, on storages that report conflicts at
store and at vote.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.storage.base import Storage, TransactionMeta
from amberdb.storage.memory import MemoryStorage
from amberdb.testing import StorageWrapper, VoteConflictStorage
from amberdb.utils import Oid, Tid

from .models import Book

connection_module = importlib.import_module("amberdb.connection")  # amberdb.connection is also a function


class InjectedFaultError(Exception):
    """The failure the storage was told to raise."""


class FailingStorage(StorageWrapper):
    """Wraps ``inner``; the ``countdown``-th call of ``method`` raises InjectedFaultError."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.method = ""
        self.countdown = -1
        self.calls: dict[str, int] = {}
        self.committing = False
        self.just_finished = False

    def arm(self, method: str, countdown: int) -> None:
        self.method, self.countdown, self.calls = method, countdown, {}

    def _count(self, method: str) -> None:
        """Count a call of ``method``; raise when it is the one armed."""
        self.calls[method] = self.calls.get(method, 0) + 1
        if method == self.method:
            self.countdown -= 1
            if self.countdown == 0:
                raise InjectedFaultError(f"{method} call {self.calls[method]}")

    @property
    def name(self) -> str:
        return "failing"

    def poll_invalidations(self, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
        # Only the poll a commit makes right after its finish is a fault point here; a
        # failing poll at a transaction boundary is the next begin()'s error.
        if self.just_finished:
            self.just_finished = False
            self._count("poll_after_finish")
        return super().poll_invalidations(since)

    def begin(self, meta: TransactionMeta) -> None:
        self._count("begin")
        super().begin(meta)
        self.committing = True

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        self._count("store")
        super().store(oid, base_tid, record)

    def vote(self) -> None:
        self._count("vote")
        super().vote()

    def finish(self) -> Tid:
        self.committing = False
        tid = super().finish()
        self.just_finished = True
        return tid

    def abort(self) -> None:
        self.committing = False
        super().abort()


BOOKS = 6


def _setup(inner: Storage) -> tuple[amberdb.DB, FailingStorage]:
    storage = FailingStorage(inner)
    db = amberdb.DB(storage)
    with db.transaction() as conn:
        conn.root.books = [Book(f"b{i}") for i in range(BOOKS)]
    return db, storage


def _change_everything(conn: amberdb.Connection, savepoint: bool) -> None:
    books = conn.root.books
    for i, book in enumerate(books[: BOOKS // 2]):
        book.title = f"changed {i}"
    if savepoint:
        transaction.savepoint()
    for i, book in enumerate(books[BOOKS // 2 :]):
        book.title = f"changed later {i}"
    conn.root.added = Book("new")


def _calls_of_a_commit(inner: Storage, method: str, savepoint: bool) -> int:
    db, storage = _setup(inner)
    conn = db.open()
    _change_everything(conn, savepoint)
    storage.arm(method, -1)
    transaction.commit()
    calls = storage.calls.get(method, 0)
    conn.close()
    db.close()
    return calls


STORAGES = {"store-conflicts": MemoryStorage, "vote-conflicts": lambda: VoteConflictStorage(MemoryStorage())}


@pytest.mark.parametrize("kind", sorted(STORAGES))
@pytest.mark.parametrize("method", ["begin", "store", "vote"])
@pytest.mark.parametrize("how", ["in memory", "moved to the spill", "savepoint"])
def test_a_commit_failing_at_any_call_leaves_objects_as_committed(
    kind: str, method: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "moved to the spill":
        monkeypatch.setattr(connection_module, "COMMIT_BUFFER_SIZE", 40)
    savepoint = how == "savepoint"
    calls = _calls_of_a_commit(STORAGES[kind](), method, savepoint)
    assert calls >= 1
    for failing_call in range(1, calls + 1):
        db, storage = _setup(STORAGES[kind]())
        conn = db.open()
        books = conn.root.books
        _change_everything(conn, savepoint)
        storage.arm(method, failing_call)
        with pytest.raises(InjectedFaultError):
            transaction.commit()
        transaction.abort()
        storage.arm("", -1)
        # Every object reads as committed, whether it is still loaded or not ...
        assert [book.title for book in books] == [f"b{i}" for i in range(BOOKS)], (method, failing_call)
        assert "added" not in conn.root()
        # ... and the same changes then commit in full.
        _change_everything(conn, savepoint)
        transaction.commit()
        other = db.open(transaction.TransactionManager())
        titles = [book.title for book in other.root.books]
        assert titles[: BOOKS // 2] == [f"changed {i}" for i in range(BOOKS // 2)]
        assert other.root.added.title == "new"
        other.close()
        conn.close()
        db.close()


@pytest.mark.parametrize("kind", sorted(STORAGES))
def test_a_poll_failing_after_finish_leaves_the_commit_done(kind: str) -> None:
    """The poll after a durable finish may fail (a network storage): the commit is still
    reported as done, and the connection forgets its cache instead (storage invariant 6)."""
    db, storage = _setup(STORAGES[kind]())
    conn = db.open()
    books = conn.root.books
    _change_everything(conn, False)
    storage.arm("poll_after_finish", 1)
    transaction.commit()
    assert storage.calls.get("poll_after_finish") == 1
    storage.arm("", -1)
    assert books[0]._p_status == "ghost"  # forgotten: the poll could not tell what changed
    assert [book.title for book in books[: BOOKS // 2]] == [f"changed {i}" for i in range(BOOKS // 2)]
    other = db.open(transaction.TransactionManager())
    assert other.root.added.title == "new"
    other.close()
    conn.close()
    db.close()
