"""Historical connections: db.open(at=...) / db.open(before=...) show the database as it was."""

from __future__ import annotations

import datetime
import time

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import POSKeyError, ReadOnlyError
from amberdb.utils import p64, u64

from .models import Book


def _commit_versions(db: amberdb.DB) -> list[bytes]:
    """Commit root['x'] = 1, 2, 3 (and a Book in the second); return the three tids."""
    tids = []
    for value in (1, 2, 3):
        with db.transaction() as conn:
            conn.root()["x"] = value
            if value == 2:
                conn.root()["book"] = Book("then")
        tids.append(db.last_tid())
    return tids


def test_at_and_before_show_the_database_as_it_was(db: amberdb.DB) -> None:
    t1, t2, t3 = _commit_versions(db)
    for kwargs, expected in [
        ({"at": t1}, 1),
        ({"before": t2}, 1),
        ({"at": t2}, 2),
        ({"before": t3}, 2),
        ({"at": t3}, 3),
        ({"at": datetime.datetime.now() + datetime.timedelta(seconds=5)}, 3),
    ]:
        conn = db.open(transaction.TransactionManager(), **kwargs)  # type: ignore[arg-type]
        assert conn.root()["x"] == expected, kwargs
        assert conn.before is not None
        conn.close()
    old = db.open(transaction.TransactionManager(), at=t1)
    assert "book" not in old.root()
    old.close()


def test_a_historical_connection_keeps_its_view_and_refuses_changes(db: amberdb.DB) -> None:
    _, t2, _ = _commit_versions(db)
    manager = transaction.TransactionManager()
    conn = db.open(manager, at=t2)
    book = conn.root()["book"]
    with db.transaction() as writer:
        writer.root()["book"].title = "now"
        writer.root()["x"] = 4
    manager.begin()  # a new transaction does not move it
    assert book.title == "then" and conn.root()["x"] == 2
    with pytest.raises(ReadOnlyError, match=r"oid 0x.*read-only"):
        book.title = "changed"
    assert book.title == "then" and not book._p_changed
    with pytest.raises(ReadOnlyError):
        conn.root()["y"] = 1
    with pytest.raises(ReadOnlyError):
        conn.add(Book("new"))
    manager.abort()
    conn.close()
    # Not pooled: the next connection shows the newest state.
    current = db.open(transaction.TransactionManager())
    assert current.before is None and current.root()["x"] == 4
    current.close()


def test_before_the_first_transaction_nothing_exists(db: amberdb.DB) -> None:
    first = db.last_tid()  # the root's creation
    conn = db.open(transaction.TransactionManager(), before=first)
    with pytest.raises(POSKeyError):
        conn.root()
    conn.close()


def test_bad_moments_are_refused(db: amberdb.DB) -> None:
    with pytest.raises(ValueError, match="not both"):
        db.open(at=db.last_tid(), before=db.last_tid())
    with pytest.raises(TypeError, match="8-byte tid or a datetime"):
        db.open(at=time.time())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        db.open(before=b"short")
    with pytest.raises(ValueError):
        db.open(before=p64(0))


def test_closing_the_database_closes_historical_connections(db: amberdb.DB) -> None:
    t1, _, _ = _commit_versions(db)
    conn = db.open(transaction.TransactionManager(), at=p64(u64(t1)))
    db.close()
    with pytest.raises(amberdb.ConnectionStateError, match="closed"):
        conn.root()
