"""The cache evicts only objects whose current state it can load back.

Saved objects load from the storage, and objects (new ones too) whose state a savepoint put
in the spill load from there.  An added object with no record anywhere, or a changed one,
is never turned into a ghost: not by the cache bound, ``cache_gc()``, ``cache_minimize()``,
``_p_deactivate()`` nor ``_p_invalidate()``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import DB, PersistentList
from tests.models import Book, Node

EVICTIONS: dict[str, Callable[[amberdb.Connection, Book], None]] = {
    "cache_gc": lambda conn, obj: conn.cache_gc(),
    "cache_minimize": lambda conn, obj: conn.cache_minimize(),
    "_p_deactivate": lambda conn, obj: obj._p_deactivate(),
    "_p_changed = None": lambda conn, obj: setattr(obj, "_p_changed", None),
    "_p_invalidate": lambda conn, obj: obj._p_invalidate(),
}


@pytest.fixture
def small_db() -> DB:
    database = DB(None, cache_size=0)
    yield database
    database.close()


@pytest.mark.parametrize("evict", EVICTIONS)
def test_explicitly_added_object_survives_eviction_and_commits(small_db: DB, evict: str) -> None:
    conn = small_db.open()
    book = Book("added")
    conn.add(book)
    EVICTIONS[evict](conn, book)
    assert book._p_status == "added"
    assert book.title == "added"
    conn.root.book = book
    transaction.commit()
    assert _committed_title(small_db) == "added"
    conn.close()


@pytest.mark.parametrize("evict", EVICTIONS)
def test_object_added_after_a_savepoint_survives_eviction(small_db: DB, evict: str) -> None:
    conn = small_db.open()
    conn.root.first = Book("first")
    transaction.savepoint()
    book = Book("after the savepoint")
    conn.add(book)
    conn.root.book = book
    EVICTIONS[evict](conn, book)
    assert book.title == "after the savepoint"
    transaction.commit()
    assert _committed_title(small_db) == "after the savepoint"
    conn.close()


@pytest.mark.parametrize("evict", ["cache_gc", "cache_minimize"])
def test_changed_new_object_survives_eviction(small_db: DB, evict: str) -> None:
    conn = small_db.open()
    conn.root.book = book = Book("v1")
    transaction.savepoint()
    book.title = "v2"
    EVICTIONS[evict](conn, book)
    assert book._p_changed is True and book.title == "v2"
    transaction.commit()
    assert _committed_title(small_db) == "v2"
    conn.close()


def test_new_objects_in_the_spill_may_be_evicted_and_load_back(small_db: DB) -> None:
    conn = small_db.open()
    conn.root.nodes = nodes = PersistentList()
    transaction.commit()
    for i in range(50):
        nodes.append(Node(i))
    transaction.savepoint()
    conn.cache_minimize()
    assert conn._cache.loaded_count == 0  # everything is in the spill or the storage
    assert [node.value for node in nodes] == list(range(50))
    transaction.commit()
    conn.close()
    reader = small_db.open(transaction.TransactionManager())
    assert [node.value for node in reader.root()["nodes"]] == list(range(50))
    reader.close()


def test_cache_bound_at_a_transaction_boundary_keeps_added_objects() -> None:
    db = DB(None, cache_size=0)
    conn = db.open()
    manager = transaction.TransactionManager()
    other = db.open(manager)
    book = Book("kept")
    conn.add(book)
    manager.commit()  # another manager's boundary: this connection's cache is not trimmed
    assert book.title == "kept"
    conn.root.book = book
    transaction.commit()
    assert _committed_title(db) == "kept"
    other.close()
    conn.close()
    db.close()


def _committed_title(db: DB) -> str:
    manager = transaction.TransactionManager()
    reader = db.open(manager)
    try:
        title: str = reader.root()["book"].title
        return title
    finally:
        manager.abort()
        reader.close()
