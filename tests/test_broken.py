"""Broken objects in one process: classes that disappear, come back, or never were.

The multi-process versions (a module deleted between processes) are in tests/evolve/.
"""

from __future__ import annotations

import copyreg
import pickle
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.broken import BrokenValue, PersistentBroken
from amberdb.record import decode_header, encode_record
from amberdb.rename import record_globals
from amberdb.storage.base import TransactionMeta
from amberdb.utils import p64, z64


@pytest.fixture
def fleeting() -> Iterator[types.ModuleType]:
    """A module ``fleeting_models`` defining a persistent Book and plain values, removable."""
    module = types.ModuleType("fleeting_models")
    exec(
        """
from amberdb import Persistent
class Book(Persistent):
    def __init__(self, title):
        self.title = title
class Tag:
    def __init__(self, name):
        self.name = name
class Bag(list):
    pass
class Table(dict):
    pass
class Point:
    def __new__(cls, x, y):
        obj = object.__new__(cls)
        obj.x, obj.y = x, y
        return obj
    def __getnewargs__(self):
        return (self.x, self.y)
""",
        module.__dict__,
    )
    sys.modules["fleeting_models"] = module
    yield module
    sys.modules.pop("fleeting_models", None)


def _forget(module: types.ModuleType) -> None:
    """Take the module away: its persistent classes can no longer be found by name."""
    from amberdb.persistent import _classes_by_name

    sys.modules.pop(module.__name__, None)
    for name in [name for name in _classes_by_name if name.startswith(module.__name__ + ":")]:
        del _classes_by_name[name]


def _restore(module: types.ModuleType) -> None:
    from amberdb.persistent import _classes_by_name

    sys.modules[module.__name__] = module
    _classes_by_name[f"{module.__name__}:Book"] = module.Book


def test_missing_persistent_class_loads_broken_and_neighbours_keep_working(
    fleeting: types.ModuleType, tmp_path: Any
) -> None:
    storage = str(tmp_path / "data.fs")
    db = amberdb.DB(storage, allowed_classes=[fleeting.Tag])
    conn = db.open()
    conn.root()["book"] = fleeting.Book("Dune")
    conn.root()["shelf"] = amberdb.PersistentList([conn.root()["book"]])
    conn.root()["count"] = 1
    transaction.commit()
    oid = conn.root()["book"]._p_oid
    db.close()

    _forget(fleeting)
    db = amberdb.DB(storage)
    conn = db.open()
    root = conn.root()
    book = root["book"]
    assert isinstance(book, amberdb.Broken) and isinstance(book, amberdb.Persistent)
    assert (type(book).__module__, type(book).__name__) == ("fleeting_models", "Book")
    assert book.__broken_state__ == {"title": "Dune"}
    assert book.title == "Dune"  # attributes of the kept state read
    with pytest.raises(AttributeError, match="broken"):
        book.nothing  # noqa: B018
    with pytest.raises(amberdb.BrokenModified, match=r"fleeting_models\.Book oid 0x"):
        book.title = "Changed"
    with pytest.raises(amberdb.BrokenModified):
        del book.title
    with pytest.raises(amberdb.BrokenModified):
        book._p_changed = True
    book._v_scratch = 1  # volatile attributes are allowed
    # the container changes and commits, keeping the reference
    root["shelf"].append("more")
    root["count"] = 2
    transaction.commit()
    assert root["shelf"][0] is book
    # the broken object's own record is untouched
    record = db.storage.load(oid)[0]
    assert decode_header(record).class_name == "fleeting_models:Book"
    db.close()

    _restore(fleeting)
    db = amberdb.DB(storage)
    conn = db.open()
    book = conn.root()["book"]
    assert type(book) is fleeting.Book or book.__class__ is fleeting.Book
    assert book.title == "Dune" and conn.root()["shelf"][0] is book
    assert list(conn.root()["shelf"])[1:] == ["more"] and conn.root()["count"] == 2
    db.close()


def test_broken_values_inside_a_state_round_trip_through_commits(
    fleeting: types.ModuleType, tmp_path: Any
) -> None:
    storage = str(tmp_path / "data.fs")
    db = amberdb.DB(storage, allowed_modules=["fleeting_models"])
    conn = db.open()
    values: dict[str, Any] = {
        "tag": fleeting.Tag("red"),
        "bag": fleeting.Bag([1, 2, fleeting.Tag("in bag")]),
        "table": fleeting.Table(a=1, b=[2]),
        "point": fleeting.Point(3, 4),
        "cls": fleeting.Tag,
    }
    conn.root()["values"] = amberdb.PersistentMapping(values)
    transaction.commit()
    values_oid = conn.root()["values"]._p_oid
    db.close()

    _forget(fleeting)
    db = amberdb.DB(storage, allowed_modules=["fleeting_models"])
    conn = db.open()
    loaded = conn.root()["values"]
    tag = loaded["tag"]
    assert isinstance(tag, amberdb.Broken) and isinstance(tag, BrokenValue)
    assert (type(tag).__module__, type(tag).__name__) == ("fleeting_models", "Tag")
    assert tag.name == "red" and tag.__broken_state__ == {"name": "red"}
    with pytest.raises(amberdb.BrokenModified):
        tag.name = "blue"
    assert isinstance(loaded["cls"], type) and issubclass(loaded["cls"], amberdb.Broken)
    loaded["extra"] = "added while broken"
    transaction.commit()
    record = db.storage.load(values_oid)[0]
    assert {"fleeting_models:Tag", "fleeting_models:Bag", "fleeting_models:Point"} <= record_globals(record)
    db.close()

    _restore(fleeting)
    db = amberdb.DB(storage, allowed_modules=["fleeting_models"])
    conn = db.open()
    loaded = conn.root()["values"]
    assert type(loaded["tag"]) is fleeting.Tag and loaded["tag"].name == "red"
    bag = loaded["bag"]
    assert type(bag) is fleeting.Bag and bag[:2] == [1, 2] and bag[2].name == "in bag"
    assert type(loaded["table"]) is fleeting.Table and dict(loaded["table"]) == {"a": 1, "b": [2]}
    assert type(loaded["point"]) is fleeting.Point and (loaded["point"].x, loaded["point"].y) == (3, 4)
    assert loaded["cls"] is fleeting.Tag
    assert loaded["extra"] == "added while broken"
    db.close()


def _write_raw(storage: Any, oid: bytes, record: bytes) -> None:
    storage.begin(TransactionMeta())
    try:
        base = storage.load(oid)[1]
    except amberdb.POSKeyError:
        base = z64
    storage.store(oid, base, record)
    storage.vote()
    storage.finish()


class _Call:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Any:
        return self.func, self.args


def test_records_naming_dangerous_classes_run_nothing(tmp_path: Any) -> None:
    import os

    marker = tmp_path / "ran"
    db = amberdb.DB(None)
    state = pickle.dumps({"x": 1}, protocol=5)
    _write_raw(db.storage, p64(50), encode_record("os:system", [], state))
    # a state calling os.system is still refused (it exists: it is not allowed, not missing)
    tampered = pickle.dumps({"x": _Call(os.system, f"touch {marker}")}, protocol=5)
    _write_raw(db.storage, p64(51), encode_record("amberdb.containers:PersistentMapping", [], tampered))
    conn = db.open()
    obj = conn.get(p64(50))
    assert isinstance(obj, PersistentBroken) and type(obj).__qualname__ == "system"
    assert obj.__broken_state__ == {"x": 1}
    with pytest.raises(amberdb.UnsafeGlobalError, match=r"posix\.system|os\.system"):
        conn.get(p64(51))
    assert not marker.exists()
    conn.close()
    db.close()


def test_a_module_outside_allowed_modules_is_not_imported(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "ondemand_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(
        "from amberdb import Persistent\nclass Thing(Persistent):\n    pass\nclass Value:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    storage = str(tmp_path / "data.fs")
    with amberdb.DB(storage) as db:
        _write_raw(
            db.storage,
            p64(60),
            encode_record("ondemand_pkg.models:Thing", [], pickle.dumps({"v": 1}, protocol=5)),
        )
    try:
        db = amberdb.DB(storage)  # not allowed: broken, and nothing imported
        obj = db.open(transaction.TransactionManager()).get(p64(60))
        assert isinstance(obj, amberdb.Broken) and "ondemand_pkg.models" not in sys.modules
        db.close()
        db = amberdb.DB(storage, allowed_modules=["ondemand_pkg"])  # allowed: imported on demand
        obj = db.open(transaction.TransactionManager()).get(p64(60))
        assert not isinstance(obj, amberdb.Broken) and obj.v == 1
        assert type(obj).__module__ == "ondemand_pkg.models"
        db.close()
    finally:
        for name in ("ondemand_pkg", "ondemand_pkg.models"):
            sys.modules.pop(name, None)


def test_broken_value_rebuilds_how_it_was_made() -> None:
    from amberdb.broken import broken_class

    cls = broken_class("gone.module:Thing", "test", persistent=False)
    called = cls(1, 2)  # REDUCE: a call
    called.__setstate__({"a": 1})
    assert called.__reduce_ex__(5)[:3] == (cls, (1, 2), {"a": 1})
    made = cls.__new__(cls, 3)  # NEWOBJ: __new__ only
    reduced = made.__reduce_ex__(5)
    assert reduced[0] is copyreg.__newobj__ and reduced[1] == (cls, 3)  # type: ignore[attr-defined]
    keyword = cls.__new__(cls, 4, k=5)
    assert keyword.__reduce_ex__(5)[0] is copyreg.__newobj_ex__  # type: ignore[attr-defined]
    assert repr(made).startswith("<broken gone.module.Thing")


def test_class_that_became_persistent_is_stored_as_its_own_record_at_its_next_change(
    fleeting: types.ModuleType, tmp_path: Any
) -> None:
    storage = str(tmp_path / "data.fs")
    db = amberdb.DB(storage, allowed_modules=["fleeting_models"])
    conn = db.open()
    conn.root()["holder"] = amberdb.PersistentMapping({"tag": fleeting.Tag("inline")})
    transaction.commit()
    holder_oid = conn.root()["holder"]._p_oid
    db.close()

    class Tag(amberdb.Persistent):
        def __init__(self, name: str) -> None:
            self.name = name

    Tag.__module__ = "fleeting_models"
    Tag.__qualname__ = "Tag"
    fleeting.Tag = Tag
    from amberdb.persistent import _classes_by_name

    _classes_by_name["fleeting_models:Tag"] = Tag
    db = amberdb.DB(storage, allowed_modules=["fleeting_models"])
    conn = db.open()
    tag = conn.root()["holder"]["tag"]
    assert isinstance(tag, Tag) and tag.name == "inline" and tag._p_oid is None
    before = db.storage.last_tid()
    transaction.commit()
    assert db.storage.last_tid() == before  # loading alone writes nothing
    tag.name = "changed"
    transaction.commit()
    assert tag._p_oid is not None
    holder_record = db.storage.load(holder_oid)[0]
    assert (tag._p_oid, "fleeting_models:Tag") in decode_header(holder_record).refs
    db.close()
    db = amberdb.DB(storage, allowed_modules=["fleeting_models"])
    again = db.open().root()["holder"]["tag"]
    assert again.name == "changed" and again._p_oid == tag._p_oid
    db.close()
    del _classes_by_name["fleeting_models:Tag"]


def test_a_cached_broken_object_becomes_its_class_again_at_the_next_transaction(
    fleeting: types.ModuleType, tmp_path: Any
) -> None:
    path = str(tmp_path / "data.fs")
    with amberdb.DB(path) as db:
        conn = db.open()
        conn.root()["book"] = fleeting.Book("Emma")
        transaction.commit()
        conn.close()
    _forget(fleeting)
    with amberdb.DB(path) as db:
        conn = db.open()
        book = conn.root()["book"]
        assert isinstance(book, amberdb.Broken) and book.title == "Emma"
        transaction.commit()
        transaction.begin()
        assert isinstance(book, amberdb.Broken)  # still missing: still broken
        _restore(fleeting)
        transaction.begin()
        assert not isinstance(book, amberdb.Broken)
        assert book.__class__ is fleeting.Book and book.title == "Emma"
        assert conn.root()["book"] is book
        book.title = "Emma (2nd ed.)"
        transaction.commit()
        conn.close()
    with amberdb.DB(path) as db:
        assert db.open().root()["book"].title == "Emma (2nd ed.)"
