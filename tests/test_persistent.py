"""The object model: life cycle, ghosts, _p_ and _v_ attributes, state hooks."""

from __future__ import annotations

import copy
import pickle

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import Persistent, PersistentList
from amberdb.exceptions import ConnectionStateError
from amberdb.utils import z64
from tests.models import Book, Compact, Image, ListBook, Slotted, Temperature


def reload(conn: amberdb.Connection, obj: Persistent) -> None:
    """Make obj a ghost so that its next access loads it from the storage."""
    obj._p_deactivate()
    assert obj._p_changed is None


def test_unsaved_object_has_no_oid_and_is_unchanged_after_writes() -> None:
    book = Book("ZODB")
    book.title = "other"
    assert (book._p_changed, book._p_oid, book._p_jar, book._p_serial) == (False, None, None, z64)
    assert book._p_status == "unsaved"
    assert book._p_mtime is None


def test_status_walks_the_life_cycle(conn: amberdb.Connection) -> None:
    book = Book("ZODB")
    conn.add(book)
    assert book._p_status == "added"
    transaction.commit()
    assert book._p_status == "saved"
    assert book._p_mtime is not None and book._p_mtime > 1e9
    book.title = "x"
    assert book._p_status == "changed"
    transaction.abort()
    assert book._p_status == "ghost"


def test_reading_p_attributes_and_dict_does_not_load_a_ghost(conn: amberdb.Connection) -> None:
    conn.root.book = Book("ZODB")
    transaction.commit()
    book = conn.root.book
    reload(conn, book)
    for name in ("_p_oid", "_p_jar", "_p_serial", "_p_changed", "_p_status", "_p_mtime", "_p_estimated_size"):
        getattr(book, name)
    assert book.__dict__ == {}
    assert book.__class__ is Book
    assert isinstance(book, Book)
    assert "Book" in repr(book)
    assert book._p_changed is None
    assert book.title == "ZODB"
    assert book._p_changed is False
    assert type(book) is Book


def test_methods_and_class_defaults_load_the_ghost_first(conn: amberdb.Connection) -> None:
    conn.root.book = Book("ZODB", publisher="O'Reilly")
    transaction.commit()
    book = conn.root.book
    reload(conn, book)
    # The class default must not hide the stored value of a ghost.
    assert book.publisher == "O'Reilly"
    reload(conn, book)
    book.add_author("Jim")
    assert book._p_changed is True
    transaction.commit()
    reload(conn, book)
    assert book.authors == ("Jim",)


def test_class_default_supplies_attribute_missing_from_older_records(conn: amberdb.Connection) -> None:
    book = Book("old")  # like a record written before the class had ``publisher``
    assert "publisher" not in book.__dict__
    conn.root.book = book
    transaction.commit()
    reload(conn, book)
    assert book.publisher == "UNKNOWN"


def test_setting_p_changed_none_ghostifies_only_unchanged_objects(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("ZODB")
    transaction.commit()
    book.title = "changed"
    book._p_changed = None
    assert book._p_changed is True  # a changed object keeps its changes
    book._p_invalidate()
    assert book._p_changed is None  # invalidation discards them
    assert book.title == "ZODB"


def test_p_activate_and_p_deactivate(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("ZODB")
    transaction.commit()
    book._p_deactivate()
    assert book._p_status == "ghost"
    book._p_activate()
    assert book._p_status == "saved"
    assert book._p_estimated_size > 0


def test_p_changed_false_forgets_the_change(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("ZODB")
    transaction.commit()
    book.title = "not saved"
    book._p_changed = False
    transaction.commit()
    reload(conn, book)
    assert book.title == "ZODB"


def test_plain_list_attribute_changes_need_p_changed(db: amberdb.DB) -> None:
    conn = db.open()
    conn.root.book = book = ListBook("ZODB")
    transaction.commit()
    book.add_author("unmarked", mark=False)
    assert book._p_changed is False  # documented: mutating a plain list does not mark
    transaction.commit()
    book.add_author("marked", mark=True)
    assert book._p_changed is True
    transaction.commit()
    other = db.open(transaction.TransactionManager())
    assert other.root.book.authors == ["unmarked", "marked"]
    other.close()
    conn.close()


def test_volatile_attributes_are_not_saved_not_marking_and_vanish_on_ghostify(
    conn: amberdb.Connection,
) -> None:
    conn.root.image = image = Image(3)
    transaction.commit()
    Image.computations = 0
    assert image.image() == "###"
    assert image.image() == "###"
    assert Image.computations == 1
    assert image._p_changed is False  # _v_ writes do not mark the object changed
    assert "_v_image" not in image.__getstate__()
    image._p_deactivate()
    assert not hasattr(image, "_v_image")
    assert image.image() == "###"
    assert Image.computations == 2


def test_property_setter_marks_object_changed(conn: amberdb.Connection) -> None:
    conn.root.t = t = Temperature()
    transaction.commit()
    t.celsius = 20.0
    assert t._p_changed is True
    transaction.commit()
    reload(conn, t)
    assert t.celsius == pytest.approx(20.0)


def test_getstate_setstate_overrides_are_honoured(conn: amberdb.Connection) -> None:
    conn.root.c = c = Compact(1, 2)
    transaction.commit()
    reload(conn, c)
    assert (c.a, c.b, c.version) == (1, 2, "v2")
    assert c._p_changed is False  # writes inside __setstate__ do not mark it changed


def test_slots_subclass_round_trips(conn: amberdb.Connection) -> None:
    conn.root.s = s = Slotted(1, [2])
    transaction.commit()
    reload(conn, s)
    assert (s.x, s.y, s.private()) == (1, [2], "hidden")
    s.x = 10
    assert s._p_changed is True
    transaction.commit()
    reload(conn, s)
    assert s.x == 10


def test_class_defined_in_a_function_round_trips(conn: amberdb.Connection) -> None:
    class Local(Persistent):
        def __init__(self) -> None:
            self.value = 41

    conn.root.local = local = Local()
    transaction.commit()
    reload(conn, local)
    assert local.value == 41


def test_eq_and_hash_of_ghosts_use_identity_without_loading(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("ZODB")
    transaction.commit()
    reload(conn, book)
    assert {book: 1}[book] == 1
    assert book == book
    assert book._p_changed is None


def test_copy_and_pickle_outside_the_database_give_unsaved_copies(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("ZODB")
    transaction.commit()
    reload(conn, book)
    duplicate = copy.deepcopy(book)
    assert type(duplicate) is Book and duplicate.title == "ZODB" and duplicate._p_oid is None
    assert pickle.loads(pickle.dumps(duplicate)).title == "ZODB"


def test_ghost_of_closed_connection_raises_clearly(db: amberdb.DB) -> None:
    conn = db.open()
    conn.root.book = book = Book("ZODB")
    transaction.commit()
    book._p_deactivate()
    conn.close()
    with pytest.raises(
        ConnectionStateError, match=r"cannot load tests\.models:Book oid 0x1: its connection is closed"
    ):
        book.title  # noqa: B018


def test_persistent_list_round_trip(conn: amberdb.Connection) -> None:
    conn.root.items = items = PersistentList([1, 2])
    transaction.commit()
    items.append(3)
    assert items._p_changed
    transaction.commit()
    reload(conn, items)
    assert items == [1, 2, 3]
    assert len(items) == 3


class Audited(Persistent):
    """Defines its own __setattr__, which must run in every state."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.value = 0

    def __setattr__(self, name: str, value: object) -> None:
        if not name.startswith(("_p_", "_v_", "log")):
            self.__dict__.setdefault("log", []).append(name)
        super().__setattr__(name, value)


def test_changed_object_reports_its_real_class_and_returns_to_it(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("ZODB")
    transaction.commit()
    assert type(book) is Book
    book.title = "changed"
    book.title = "changed twice"  # a changed object writes at plain-object speed
    assert book.__class__ is Book and isinstance(book, Book)
    assert type(book).__name__ == "Book" and type(book) is not Book
    assert copy.copy(book).__class__ is Book
    transaction.commit()
    assert type(book) is Book and book._p_status == "saved"
    book.title = "again"
    transaction.abort()
    assert book._p_status == "ghost" and book.title == "changed twice" and type(book) is Book


def test_class_with_own_setattr_keeps_its_hook_when_changed(conn: amberdb.Connection) -> None:
    conn.root.audited = audited = Audited()
    transaction.commit()
    audited.value = 1
    audited.value = 2
    assert type(audited) is Audited
    assert audited.log[-2:] == ["value", "value"]
    assert audited._p_changed is True
    transaction.commit()
    audited._p_deactivate()
    assert audited.value == 2


def test_p_changed_false_returns_a_changed_object_to_its_class(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("ZODB")
    transaction.commit()
    book.title = "x"
    book._p_changed = False
    assert type(book) is Book
    book.title = "y"  # tracked again
    assert book._p_changed is True


def test_non_string_keys_in_instance_dict_round_trip(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("x")
    book.__dict__[1] = "one"  # odd, but Python allows it, so loading must keep it
    book._p_changed = True
    transaction.commit()
    book._p_deactivate()
    assert book.__dict__ == {} and book.title == "x"
    assert book.__dict__[1] == "one"
