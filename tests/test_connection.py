"""Connections and databases: roots, adding, getting, caching, closing, errors."""

from __future__ import annotations

import gc

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import DB, PersistentList, PersistentMapping
from amberdb.exceptions import (
    ConflictError,
    ConnectionStateError,
    InvalidObjectReference,
    POSKeyError,
    ReadOnlyError,
)
from amberdb.storage.base import TransactionMeta
from amberdb.storage.memory import MemoryStorage
from amberdb.utils import p64, z64
from tests.models import Book, Node


def test_root_is_a_persistent_mapping_with_attribute_access(conn: amberdb.Connection) -> None:
    root = conn.root()
    assert isinstance(root, PersistentMapping)
    conn.root.books = PersistentList()
    assert root["books"] is conn.root.books
    assert "books" in dir(conn.root)
    with pytest.raises(AttributeError, match="the root has no 'missing'"):
        conn.root.missing  # noqa: B018
    del conn.root.books
    assert "books" not in root


def test_objects_reachable_from_the_root_are_saved_implicitly(db: DB) -> None:
    conn = db.open()
    conn.root.library = library = PersistentMapping()
    library["zodb"] = Book("ZODB")
    transaction.commit()
    assert library["zodb"]._p_oid is not None
    other = db.open(transaction.TransactionManager())
    assert other.root.library["zodb"].title == "ZODB"
    assert other.root.library["zodb"] is not library["zodb"]
    other.close()
    conn.close()


def test_get_returns_same_object_for_same_oid(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("x")
    transaction.commit()
    assert conn.get(book._p_oid) is book
    assert conn[book._p_oid] is book


def test_missing_oid_raises_poskeyerror(conn: amberdb.Connection) -> None:
    with pytest.raises(POSKeyError, match="no record for oid 0x7b") as caught:
        conn.get(p64(123))
    assert isinstance(caught.value, KeyError)


def test_add_rejects_object_of_another_database() -> None:
    first, second = amberdb.connection(None), amberdb.connection(None)
    book = Book("x")
    first.add(book)
    with pytest.raises(InvalidObjectReference, match=r"tests\.models:Book oid 0x1 already belongs to"):
        second.add(book)
    transaction.abort()
    first.close()
    second.close()


def test_storing_reference_to_object_of_another_connection_is_refused(db: DB) -> None:
    tm = transaction.TransactionManager()
    other = db.open(tm)
    other.root.book = Book("theirs")
    tm.commit()
    conn = db.open()
    conn.root.stolen = other.root.book
    with pytest.raises(InvalidObjectReference, match="cannot store a reference to tests.models:Book oid 0x1"):
        transaction.commit()
    transaction.abort()
    conn.close()
    other.close()


def test_add_rejects_non_persistent_objects(conn: amberdb.Connection) -> None:
    with pytest.raises(TypeError, match="only persistent objects can be added, not dict"):
        conn.add({})  # type: ignore[arg-type]


def test_abort_makes_added_objects_unsaved_again(conn: amberdb.Connection) -> None:
    book = Book("x")
    conn.add(book)
    transaction.abort()
    assert (book._p_jar, book._p_oid, book._p_status) == (None, None, "unsaved")
    conn.add(book)
    transaction.commit()
    assert book._p_status == "saved"


def test_close_with_uncommitted_changes_is_refused(db: DB) -> None:
    conn = db.open()
    conn.root.x = 1
    with pytest.raises(ConnectionStateError, match="uncommitted changes"):
        conn.close()
    transaction.abort()
    conn.close()
    with pytest.raises(ConnectionStateError, match="connection is closed"):
        conn.get(p64(0))


def test_closed_connection_is_reused_with_its_cache(db: DB) -> None:
    conn = db.open()
    conn.root.book = book = Book("x")
    transaction.commit()
    conn.close()
    again = db.open()
    assert again is conn
    assert again.root.book is book
    again.close()


def test_cache_ghostifies_least_recent_objects_beyond_cache_size() -> None:
    db = DB(None, cache_size=10)
    conn = db.open()
    conn.root.nodes = nodes = PersistentList(Node(i) for i in range(100))
    transaction.commit()
    conn.cache_minimize()
    total = sum(node.value for node in nodes)
    assert total == sum(range(100))
    transaction.commit()  # a transaction boundary trims the cache
    loaded = [node for node in nodes if node._p_changed is not None]
    assert len(loaded) <= 10
    assert sum(node.value for node in nodes) == total
    conn.close()
    db.close()


def test_objects_nothing_refers_to_are_freed() -> None:
    db = DB(None, cache_size=0)
    conn = db.open()
    conn.root.nodes = PersistentList(Node(i) for i in range(50))
    transaction.commit()
    conn.cache_minimize()
    gc.collect()
    assert len(conn._cache) <= 2  # the root and the (ghost) list at most
    assert conn.root.nodes[49].value == 49
    conn.close()
    db.close()


def test_cache_minimize_ghostifies_unchanged_objects(conn: amberdb.Connection) -> None:
    conn.root.a = a = Book("a")
    conn.root.b = b = Book("b")
    transaction.commit()
    a.title = "changed"
    conn.cache_minimize()
    assert a._p_changed is True
    assert b._p_changed is None


def test_db_transaction_commits_on_success_and_aborts_on_error(db: DB) -> None:
    with db.transaction() as conn:
        conn.root.book = Book("committed")
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.root.book.title = "lost"
        raise RuntimeError("boom")
    with db.transaction() as conn:
        assert conn.root.book.title == "committed"


def test_connection_shortcut_closes_its_database() -> None:
    conn = amberdb.connection(None)
    db = conn.db()
    conn.close()
    assert db.closed
    with pytest.raises(ConnectionStateError, match="database on memory is closed"):
        db.open()


def test_explicit_transaction_manager_is_used(db: DB) -> None:
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    assert conn.transaction_manager is tm
    conn.root.x = 1
    transaction.commit()  # the thread's manager knows nothing of conn
    tm.abort()
    assert "x" not in conn.root()
    with tm:
        conn.root.x = 2
    assert conn.root.x == 2
    conn.close()


def test_snapshot_isolation_between_connections(db: DB) -> None:
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db.open(tm1), db.open(tm2)
    c1.root.book = Book("v1")
    tm1.commit()
    tm2.begin()
    book2 = c2.root.book
    book2._p_deactivate()
    c1.root.book.title = "v2"
    tm1.commit()
    assert book2.title == "v1"  # c2 still reads its snapshot, even after a reload
    tm2.abort()
    assert c2.root.book.title == "v2"
    c1.close()
    c2.close()


def test_write_conflict_names_oid_and_class_and_writes_nothing(db: DB) -> None:
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db.open(tm1), db.open(tm2)
    c1.root.book = Book("v1")
    tm1.commit()
    tm2.begin()
    c2.root.book.title = "from c2"
    c1.root.book.title = "from c1"
    tm1.commit()
    with pytest.raises(ConflictError, match=r"oid 0x1, class tests\.models:Book"):
        tm2.commit()
    tm2.abort()
    assert c2.root.book.title == "from c1"
    c1.close()
    c2.close()


def test_read_only_database_refuses_commits(db_path: str) -> None:
    with DB(db_path) as db, db.transaction() as conn:
        conn.root.book = Book("x")
    db = DB(db_path, read_only=True)
    conn = db.open()
    assert conn.root.book.title == "x"
    conn.root.book.title = "y"
    with pytest.raises(ReadOnlyError, match="read-only"):
        transaction.commit()
    transaction.abort()
    conn.close()
    db.close()


def test_db_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="DB\\(\\) takes None, a URI, a file path or a storage, not int"):
        DB(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_size must be >= 0"):
        DB(None, cache_size=-1)


def test_cache_gc_bounds_memory_within_one_transaction() -> None:
    db = DB(None, cache_size=20)
    conn = db.open()
    conn.root.nodes = PersistentList(Node(i) for i in range(500))
    transaction.commit()
    conn.cache_minimize()
    total = 0
    for i, node in enumerate(conn.root.nodes):
        total += node.value
        if i % 50 == 49:
            conn.cache_gc()
            assert conn._cache.loaded_count <= 20
    assert total == sum(range(500))
    conn.close()
    db.close()


class _RootCreatedMeanwhile(MemoryStorage):
    """A storage whose first root load misses: another process creates the root right after."""

    def __init__(self, other: amberdb.DB) -> None:
        super().__init__()
        self._other = other
        self._raced = False

    def load(self, oid: bytes, before: bytes | None = None) -> tuple[bytes, bytes]:
        if oid == z64 and not self._raced:
            self._raced = True
            record = self._other.storage.load(z64)[0]
            try:
                super().load(oid, before)
            except POSKeyError:
                # The other process commits its root between our load and our store.
                self.begin(TransactionMeta(description="the other process's root"))
                self.store(z64, z64, record)
                self.vote()
                self.finish()
                raise
        return super().load(oid, before)


def test_a_root_created_by_another_process_meanwhile_is_loaded() -> None:
    source = amberdb.DB(None)
    storage = _RootCreatedMeanwhile(source)
    db = amberdb.DB(storage)  # its own root creation conflicts: it takes the other's root
    conn = db.open(transaction.TransactionManager())
    assert dict(conn.root()) == {}
    assert [txn.meta.description for txn in storage.iterator()] == ["the other process's root"]
    conn.close()
    db.close()
    source.close()
