"""An object is marked changed, and its new value written, only once its connection accepted
the change.

A change its connection refuses (closed, or an explicit manager with no transaction begun)
raises and leaves nothing behind: the value is the old one, the object is not marked
changed, and the next user of the (pooled) connection neither sees the refused value nor
loses its own later change.  A mutation that fails on its own (``remove`` of a missing item,
``del`` of a missing key) does not mark the object either, so the connection stays free of
a transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import DB, Persistent, PersistentList, PersistentMapping
from amberdb.btrees import IIBTree, IISet, IITreeSet, Length, OOBTree, OOBucket, check
from amberdb.exceptions import ConnectionStateError, NoTransactionError
from tests.models import Book, Slotted, Temperature


@dataclass
class Case:
    """An object to store, a change to make to it, and how to read what it holds."""

    make: Callable[[], Persistent]
    change: Callable[[Any], object]
    read: Callable[[Any], object]

    def objects(self, obj: Any) -> list[Persistent]:
        """The persistent objects a change of ``obj`` may touch (a tree's nodes and buckets)."""
        if hasattr(obj, "_children"):
            found: list[Persistent] = [obj]
            for child in obj._children:
                found.extend(self.objects(child))
            return found
        return [obj]


def _book() -> Book:
    book = Book("title")
    book.extra = 1
    return book


def _items(mapping: Any) -> list[tuple[Any, Any]]:
    return list(mapping.items())


def _big_tree() -> IIBTree:
    return IIBTree({i: i for i in range(0, 2000, 2)})


CASES = {
    "setattr": Case(_book, lambda b: setattr(b, "title", "new"), lambda b: (b.title, b.extra)),
    "delattr": Case(_book, lambda b: delattr(b, "extra"), lambda b: (b.title, hasattr(b, "extra"))),
    "mark _p_changed": Case(_book, lambda b: setattr(b, "_p_changed", True), lambda b: b.title),
    "slot": Case(lambda: Slotted(1, 2), lambda s: setattr(s, "x", 9), lambda s: (s.x, s.y)),
    "property": Case(Temperature, lambda t: setattr(t, "celsius", 30), lambda t: t.kelvin),
    "list append": Case(lambda: PersistentList([1]), lambda x: x.append(2), list),
    "list extend": Case(lambda: PersistentList([1]), lambda x: x.extend([2, 3]), list),
    "list insert": Case(lambda: PersistentList([1]), lambda x: x.insert(0, 0), list),
    "list setitem": Case(lambda: PersistentList([1]), lambda x: x.__setitem__(0, 5), list),
    "list delitem": Case(lambda: PersistentList([1]), lambda x: x.__delitem__(0), list),
    "list pop": Case(lambda: PersistentList([1]), lambda x: x.pop(), list),
    "list remove": Case(lambda: PersistentList([1]), lambda x: x.remove(1), list),
    "list clear": Case(lambda: PersistentList([1]), lambda x: x.clear(), list),
    "list reverse": Case(lambda: PersistentList([1, 2]), lambda x: x.reverse(), list),
    "list sort": Case(lambda: PersistentList([2, 1]), lambda x: x.sort(), list),
    "list iadd": Case(lambda: PersistentList([1]), lambda x: x.__iadd__([2]), list),
    "list imul": Case(lambda: PersistentList([1]), lambda x: x.__imul__(2), list),
    "mapping setitem": Case(lambda: PersistentMapping(a=1), lambda m: m.__setitem__("b", 2), dict),
    "mapping delitem": Case(lambda: PersistentMapping(a=1), lambda m: m.__delitem__("a"), dict),
    "mapping update": Case(lambda: PersistentMapping(a=1), lambda m: m.update(b=2), dict),
    "mapping pop": Case(lambda: PersistentMapping(a=1), lambda m: m.pop("a"), dict),
    "mapping popitem": Case(lambda: PersistentMapping(a=1), lambda m: m.popitem(), dict),
    "mapping setdefault": Case(lambda: PersistentMapping(a=1), lambda m: m.setdefault("b", 2), dict),
    "mapping clear": Case(lambda: PersistentMapping(a=1), lambda m: m.clear(), dict),
    "btree insert": Case(lambda: OOBTree({1: 1}), lambda t: t.__setitem__(2, 2), _items),
    "btree replace": Case(lambda: OOBTree({1: 1}), lambda t: t.__setitem__(1, 9), _items),
    "btree delete": Case(lambda: OOBTree({1: 1, 2: 2}), lambda t: t.__delitem__(1), _items),
    "btree empties": Case(lambda: OOBTree({1: 1}), lambda t: t.__delitem__(1), _items),
    "btree clear": Case(lambda: OOBTree({1: 1}), lambda t: t.clear(), _items),
    "btree split": Case(_big_tree, lambda t: t.update({i: i for i in range(1, 2000, 2)}), _items),
    "tree set add": Case(lambda: IITreeSet([1]), lambda s: s.add(2), list),
    "tree set remove": Case(lambda: IITreeSet([1, 2]), lambda s: s.remove(1), list),
    "bucket setitem": Case(lambda: OOBucket({1: 1}), lambda b: b.__setitem__(2, 2), _items),
    "bucket delitem": Case(lambda: OOBucket({1: 1}), lambda b: b.__delitem__(1), _items),
    "set add": Case(lambda: IISet([1]), lambda s: s.add(2), list),
    "set remove": Case(lambda: IISet([1]), lambda s: s.remove(1), list),
    "length": Case(Length, lambda n: n.change(3), lambda n: n()),
}


def _store(db: DB, case: Case) -> tuple[amberdb.Connection, Any, object]:
    conn = db.open()
    conn.root.obj = obj = case.make()
    transaction.commit()
    before = case.read(obj)  # also loads every bucket, so the change itself does not load
    return conn, obj, before


def _assert_untouched(case: Case, obj: Any, before: object) -> None:
    assert case.read(obj) == before
    for part in case.objects(obj):
        assert part._p_changed is False, part
    if hasattr(obj, "_children"):
        check(obj)


def _committed(db: DB, case: Case) -> object:
    """What the database holds for ``obj``, read through a fresh connection."""
    manager = transaction.TransactionManager()
    reader = db.open(manager)
    try:
        return case.read(reader.root()["obj"])
    finally:
        manager.abort()
        reader.close()


@pytest.mark.parametrize("name", CASES)
def test_change_after_close_is_refused_and_leaves_nothing_behind(db: DB, name: str) -> None:
    case = CASES[name]
    conn, obj, before = _store(db, case)
    conn.close()
    with pytest.raises(ConnectionStateError, match="closed"):
        case.change(obj)
    _assert_untouched(case, obj, before)

    again = db.open()  # the pooled connection, with obj in its cache
    assert again is conn
    assert case.read(again.root()["obj"]) == before
    case.change(obj)
    transaction.commit()
    assert _committed(db, case) == case.read(obj)
    again.close()


@pytest.mark.parametrize("name", CASES)
def test_change_without_a_transaction_on_an_explicit_manager_leaves_nothing_behind(db: DB, name: str) -> None:
    case = CASES[name]
    manager = transaction.TransactionManager(explicit=True)
    conn = db.open(manager)
    manager.begin()
    conn.root()["obj"] = obj = case.make()
    manager.commit()
    before = case.read(obj)
    with pytest.raises(NoTransactionError):
        case.change(obj)
    _assert_untouched(case, obj, before)

    manager.begin()
    case.change(obj)
    manager.commit()
    assert _committed(db, case) == case.read(obj)
    conn.close()


FAILING_MUTATIONS: dict[str, tuple[Callable[[], Persistent], Callable[[Any], object], type[Exception]]] = {
    "list remove missing": (lambda: PersistentList([1]), lambda x: x.remove(7), ValueError),
    "list pop empty": (PersistentList, lambda x: x.pop(), IndexError),
    "list pop out of range": (lambda: PersistentList([1]), lambda x: x.pop(5), IndexError),
    "list setitem out of range": (lambda: PersistentList([1]), lambda x: x.__setitem__(5, 0), IndexError),
    "list delitem out of range": (lambda: PersistentList([1]), lambda x: x.__delitem__(-3), IndexError),
    "mapping delitem missing": (lambda: PersistentMapping(a=1), lambda m: m.__delitem__("z"), KeyError),
    "mapping pop missing": (lambda: PersistentMapping(a=1), lambda m: m.pop("z"), KeyError),
    "mapping popitem empty": (PersistentMapping, lambda m: m.popitem(), KeyError),
    "delattr missing": (_book, lambda b: delattr(b, "missing"), AttributeError),
    "btree delete missing": (lambda: OOBTree({1: 1}), lambda t: t.__delitem__(7), KeyError),
    "bucket delete missing": (lambda: OOBucket({1: 1}), lambda b: b.__delitem__(7), KeyError),
    "tree set remove missing": (lambda: IITreeSet([1]), lambda s: s.remove(7), KeyError),
    "set remove missing": (lambda: IISet([1]), lambda s: s.remove(7), KeyError),
}


@pytest.mark.parametrize("name", FAILING_MUTATIONS)
def test_failed_mutation_neither_marks_nor_joins(conn: amberdb.Connection, name: str) -> None:
    make, mutate, error = FAILING_MUTATIONS[name]
    conn.root.obj = obj = make()
    transaction.commit()
    with pytest.raises(error):
        mutate(obj)
    assert obj._p_changed is False
    conn.close()  # refused if the failed mutation had joined the transaction


def test_delete_of_an_unset_slot_neither_marks_nor_joins(conn: amberdb.Connection) -> None:
    conn.root.obj = obj = Slotted(1, 2)
    transaction.commit()
    del obj.y
    transaction.commit()
    with pytest.raises(AttributeError):
        del obj.y
    assert obj._p_changed is False
    conn.close()


def test_write_through_a_ghost_of_a_closed_connection_is_refused(db: DB) -> None:
    conn = db.open()
    conn.root.book = book = Book("old")
    transaction.commit()
    book._p_deactivate()
    conn.close()
    with pytest.raises(ConnectionStateError, match="closed"):
        book.title = "new"
    assert book._p_status == "ghost"
    again = db.open()
    assert again.root.book.title == "old"
    again.close()
