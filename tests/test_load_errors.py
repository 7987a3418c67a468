"""A stored state that does not fit its class fails the load cleanly.

Every such failure is a RecordDecodeError (a DatabaseError) naming the oid and the class,
with the original error as ``__cause__``; the object stays a ghost, and loading it again
fails the same way, never leaving a half-set object behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import DB, Persistent, PersistentList, PersistentMapping
from amberdb.btrees import IIBTree, IITreeSet, OOBTree
from amberdb.exceptions import DatabaseError, POSKeyError, RecordDecodeError
from amberdb.persistent import class_name
from amberdb.serialize import ObjectWriter
from amberdb.storage.base import TransactionMeta
from amberdb.utils import Oid, oid_repr, p64
from tests.models import Book, Compact, Slotted


class HalfSetter(Persistent):
    """Sets one attribute of its state, then fails: the load must not leave it half-set."""

    def __setstate__(self, state: Any) -> None:
        self.first = state["first"]
        raise ValueError("this state is from a newer version of the application")


def _overwrite_state(db: DB, oid: Oid, cls: type, state: Any) -> None:
    """Commit ``state`` as the record of ``oid`` directly through the storage."""
    record = ObjectWriter(db._resolver, _no_references).serialize_state(class_name(cls), state)
    storage = db.storage
    _, serial = storage.load(oid)
    storage.begin(TransactionMeta(description="a state of the wrong shape"))
    storage.store(oid, serial, record)
    storage.vote()
    storage.finish()


def _instance_attributes(obj: Any) -> dict[str, Any]:
    """What the object holds, read without loading it."""
    try:
        return dict(object.__getattribute__(obj, "__dict__"))
    except AttributeError:
        return {}


def _no_references(obj: Any) -> Oid:
    raise AssertionError("the states written by these tests hold no references")


@pytest.fixture
def reader_db() -> Iterator[DB]:
    database = DB(None)
    yield database
    database.close()


WRONG_SHAPES = [
    pytest.param(lambda: Book("x"), [1, 2], id="list-for-dict"),
    pytest.param(lambda: Compact(1, 2), (1,), id="setstate-unpacking"),
    pytest.param(lambda: Slotted(1, 2), "a string", id="str-for-slots"),
    pytest.param(lambda: PersistentList([1]), 7, id="int-for-list"),
    pytest.param(lambda: PersistentMapping(a=1), [("a", 1)], id="pairs-for-mapping"),
    pytest.param(lambda: HalfSetter(), {"first": 1}, id="setstate-raises"),
]


@pytest.mark.parametrize(("make", "bad_state"), WRONG_SHAPES)
def test_state_of_the_wrong_shape_is_a_decode_error_naming_oid_and_class(
    reader_db: DB, make: Any, bad_state: Any
) -> None:
    writer = reader_db.open()
    obj = make()
    writer.root.obj = obj
    transaction.commit()
    oid = obj._p_oid
    cls = obj.__class__
    _overwrite_state(reader_db, oid, cls, bad_state)
    manager = transaction.TransactionManager()
    conn = reader_db.open(manager)  # a connection of its own: the writer's cache has the object
    ghost = conn.root()["obj"]
    for _ in range(2):  # the second load fails the same way
        with pytest.raises(RecordDecodeError) as failure:
            ghost._p_activate()
        message = str(failure.value)
        assert oid_repr(oid) in message
        assert cls.__qualname__ in message
        assert failure.value.__cause__ is not None
        assert ghost._p_status == "ghost"
        assert not _instance_attributes(ghost)
    with pytest.raises(RecordDecodeError, match=oid_repr(oid)):
        conn.get(oid)._p_activate()
    manager.abort()
    conn.close()
    writer.close()


def test_get_of_an_unloadable_record_raises_every_time(reader_db: DB) -> None:
    writer = reader_db.open()
    writer.root.book = book = Book("x")
    transaction.commit()
    oid = book._p_oid
    _overwrite_state(reader_db, oid, Book, [1])
    conn = reader_db.open(transaction.TransactionManager())
    for _ in range(2):
        with pytest.raises(RecordDecodeError, match=f"{oid_repr(oid)}.*Book"):
            conn.get(oid)
    conn.close()
    writer.close()


@pytest.mark.parametrize(
    ("make", "node_state"),
    [
        pytest.param(OOBTree, (b"",), id="bucket-tuple-too-short"),
        pytest.param(IIBTree, (b"\x01\x00\x00\x00", b"", None), id="bucket-keys-without-values"),
        pytest.param(IITreeSet, [1, 2, 3], id="set-list-for-tuple"),
    ],
)
def test_btree_bucket_of_the_wrong_shape_is_a_decode_error(reader_db: DB, make: Any, node_state: Any) -> None:
    writer = reader_db.open()
    tree = make()
    if hasattr(tree, "add"):
        tree.add(1)
    else:
        tree[1] = 1
    writer.root.tree = tree
    transaction.commit()
    bucket = tree._children[0]
    oid, cls = bucket._p_oid, bucket.__class__
    _overwrite_state(reader_db, oid, cls, node_state)
    conn = reader_db.open(transaction.TransactionManager())
    with pytest.raises(RecordDecodeError, match=f"{oid_repr(oid)}.*{cls.__qualname__}") as failure:
        list(conn.root()["tree"])
    assert isinstance(failure.value, DatabaseError)
    assert failure.value.__cause__ is not None
    conn.close()
    writer.close()


def test_a_failed_load_leaves_the_connection_usable(conn: amberdb.Connection) -> None:
    conn.root.good = Book("good")
    conn.root.bad = Book("bad")
    transaction.commit()
    _overwrite_state(conn.db(), conn.root.bad._p_oid, Book, [1])
    other = conn.db().open(transaction.TransactionManager())
    with pytest.raises(RecordDecodeError):
        other.root()["bad"].title  # noqa: B018
    assert other.root()["good"].title == "good"
    other.close()


def test_reference_to_a_missing_record_names_the_oid_and_the_class(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("x")
    transaction.commit()
    missing = p64(999)

    def dangling(obj: Any) -> Oid:
        return missing

    state = {"title": "x", "authors": (), "sequel": Book("never stored")}
    record = ObjectWriter(conn.db()._resolver, dangling).serialize_state(class_name(Book), state)
    storage = conn.db().storage
    storage.begin(TransactionMeta(description="a dangling reference"))
    storage.store(book._p_oid, storage.load(book._p_oid)[1], record)
    storage.vote()
    storage.finish()
    reader = conn.db().open(transaction.TransactionManager())
    sequel = reader.root()["book"].sequel
    for _ in range(2):
        with pytest.raises(POSKeyError, match=r"0x3e7.*tests\.models:Book") as failure:
            sequel.title  # noqa: B018
        assert isinstance(failure.value.__cause__, POSKeyError)
        assert sequel._p_status == "ghost"
    reader.close()
