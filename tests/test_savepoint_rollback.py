"""Rolling back to a savepoint restores every object to its state at that savepoint.

New objects included: one added before the savepoint stays part of the transaction (same
oid, state as at the savepoint) and its later changes are tracked and committed; one added
after it leaves the transaction (unsaved again, keeping what it holds).  The same holds for
``commit(True)`` / ``abort(True)`` and for nested savepoints.
"""

from __future__ import annotations

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import DB, PersistentList, PersistentMapping
from amberdb.btrees import OOBTree
from tests.models import Book, Node


def _committed(db: DB, key: str) -> object:
    manager = transaction.TransactionManager()
    reader = db.open(manager)
    try:
        value = reader.root()[key]
        return list(value) if isinstance(value, PersistentList) else value.title
    finally:
        manager.abort()
        reader.close()


def test_new_object_changed_after_a_savepoint_rolls_back_and_stays_added(db: DB) -> None:
    conn = db.open()
    conn.root.log = log = PersistentList([1])
    oid_before = None
    savepoint = transaction.savepoint()
    oid_before = log._p_oid
    log.append(2)
    savepoint.rollback()
    assert list(log) == [1]
    assert log._p_status == "added" and log._p_oid == oid_before
    log.append(3)  # tracked again
    assert log._p_changed is True
    transaction.commit()
    assert _committed(db, "log") == [1, 3]
    conn.close()


def test_nested_savepoints_with_a_new_object(db: DB) -> None:
    conn = db.open()
    conn.root.log = log = PersistentList([1])
    first = transaction.savepoint()
    log.append(2)
    second = transaction.savepoint()
    log.append(3)
    second.rollback()
    assert list(log) == [1, 2]
    log.append(4)
    second.rollback()  # again: still valid
    assert list(log) == [1, 2]
    first.rollback()
    assert list(log) == [1]
    log.append(5)
    transaction.commit()
    assert _committed(db, "log") == [1, 5]
    conn.close()


def test_memory_and_storage_agree_after_rolling_back_a_new_object(db: DB) -> None:
    conn = db.open()
    conn.root.log = log = PersistentList()
    log.append(1)
    transaction.savepoint()
    log.append(2)
    savepoint = transaction.savepoint()
    log.append(3)
    savepoint.rollback()
    transaction.commit()
    assert list(log) == [1, 2]
    assert _committed(db, "log") == [1, 2]
    conn.close()


def test_subtransactions_roll_back_new_objects(db: DB) -> None:
    conn = db.open()
    conn.root.book = book = Book("v1")
    transaction.commit(True)
    book.title = "v2"
    transaction.abort(True)
    assert book.title == "v1" and book._p_status == "added"
    book.title = "v3"
    transaction.commit(True)
    book.title = "v4"
    transaction.abort(True)
    assert book.title == "v3"
    transaction.commit()
    assert _committed(db, "book") == "v3"
    conn.close()


def test_object_added_after_the_savepoint_leaves_the_transaction(db: DB) -> None:
    conn = db.open()
    conn.root.kept = kept = Book("kept")
    savepoint = transaction.savepoint()
    kept_oid = kept._p_oid
    late = Book("late")
    conn.root.late = late
    transaction.savepoint()  # the late object reaches the spill too
    late.title = "changed late"
    savepoint.rollback()
    assert "late" not in conn.root()
    assert late._p_status == "unsaved" and late._p_oid is None and late.title == "changed late"
    assert kept._p_oid == kept_oid and kept.title == "kept"
    transaction.commit()
    assert _committed(db, "kept") == "kept"
    conn.close()


def test_evicted_new_objects_roll_back_to_their_savepoint_state() -> None:
    db = DB(None, cache_size=0)
    conn = db.open()
    conn.root.chain = chain = Node("head", Node("middle"))
    first = transaction.savepoint()
    middle = chain.next
    middle.value = "middle v2"
    tail = middle.next = Node("tail")
    transaction.savepoint()
    conn.cache_minimize()  # new objects in the spill may be evicted
    first.rollback()
    assert middle.value == "middle" and middle.next is None
    assert tail._p_status == "unsaved" and tail.value == "tail"
    transaction.commit()
    conn.close()
    reader = db.open()
    assert reader.root.chain.next.value == "middle"
    reader.close()
    db.close()


@pytest.mark.parametrize("make", [PersistentMapping, OOBTree])
def test_mappings_added_before_a_savepoint_roll_back(db: DB, make: type) -> None:
    conn = db.open()
    conn.root.m = m = make()
    m["a"] = 1
    savepoint = transaction.savepoint()
    m["b"] = 2
    del m["a"]
    savepoint.rollback()
    assert dict(m.items()) == {"a": 1}
    m["c"] = 3
    transaction.commit()
    conn.close()
    reader = db.open()
    assert dict(reader.root.m.items()) == {"a": 1, "c": 3}
    reader.close()


def test_rollback_then_abort_leaves_new_objects_unsaved(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("v1")
    savepoint = transaction.savepoint()
    book.title = "v2"
    savepoint.rollback()
    transaction.abort()
    assert book._p_status == "unsaved" and book.title == "v1"
    assert "book" not in conn.root()
