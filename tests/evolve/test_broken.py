"""Broken objects: a stored object whose class is missing loads as a ``amberdb.Broken``
standing in for it, read-only and kept as stored, without taking its neighbours down."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.record import encode_record
from amberdb.storage.base import Storage, TransactionMeta
from amberdb.utils import z64
from tests.evolve.helpers import delete_module, run_child, write_module
from tests.server.procs import Processes

LIBRARY = """
    from amberdb import Persistent


    class Book(Persistent):
        def __init__(self, title, pages):
            self.title = title
            self.pages = pages


    class Tag:
        def __init__(self, label, weight):
            self.label = label
            self.weight = weight
"""

STORE = """
    import library
    db = amberdb.DB(sys.argv[1], allowed_modules=["library"])
    conn = db.open()
    root = conn.root()
    books = amberdb.PersistentList([library.Book("Dune", 412), library.Book("Emma", 474)])
    root["books"] = books
    root["shelf"] = amberdb.PersistentMapping(first=books[0])
    sibling = amberdb.PersistentMapping(tag=library.Tag("sf", 3), tags=[library.Tag("old", 1)], note="n")
    root["sibling"] = sibling
    root["plain"] = amberdb.PersistentMapping(x=1)
    transaction.commit()
    out({"oids": [oid_repr(book._p_oid) for book in books]})
    db.close()
"""

WITHOUT_MODULE = """
    db = amberdb.DB(sys.argv[1], allowed_modules=["library"])
    conn = db.open()
    root = conn.root()
    report = {"plain": root["plain"]["x"]}
    books = root["books"]
    book = books[0]
    cls = type(book)
    report["broken"] = isinstance(book, amberdb.Broken)
    report["module"], report["name"] = cls.__module__, cls.__name__
    report["state"] = book.__broken_state__
    report["title_attr"] = book.title
    report["same_as_shelf"] = root["shelf"]["first"] is book
    try:
        book.title = "changed"
    except amberdb.BrokenModified as exc:
        report["modified_error"] = str(exc)
    try:
        book.pages += 1
    except amberdb.BrokenModified as exc:
        report["modified_error_2"] = str(exc)
    transaction.abort()
    # the neighbours change and commit, keeping their references to the broken objects
    books.append("added without the module")
    root["shelf"]["second"] = books[1]
    tag = root["sibling"]["tag"]
    report["tag_broken"] = isinstance(tag, amberdb.Broken)
    report["tag_module"], report["tag_name"] = type(tag).__module__, type(tag).__name__
    report["tag_state"] = tag.__broken_state__
    root["sibling"]["note"] = "changed without the module"
    transaction.commit()
    # a new transaction sees the committed neighbours and the same broken objects
    transaction.begin()
    report["after_commit"] = [
        isinstance(books[0], amberdb.Broken), books[2], root["shelf"]["second"] is books[1],
        books[1].__broken_state__,
    ]
    out(report)
    db.close()
"""

RESTORED = """
    import library
    db = amberdb.DB(sys.argv[1], allowed_modules=["library"])
    root = db.open().root()
    books = root["books"]
    sibling = root["sibling"]
    out({
        "types": [type(b).__module__ + "." + type(b).__name__ for b in books[:2]],
        "broken": [isinstance(b, amberdb.Broken) for b in books[:2]],
        "books": [[b.title, b.pages] for b in books[:2]],
        "added": books[2],
        "shelf": [root["shelf"]["first"] is books[0], root["shelf"]["second"] is books[1]],
        "tag": [type(sibling["tag"]) is library.Tag, sibling["tag"].label, sibling["tag"].weight],
        "tags": [[type(t) is library.Tag, t.label, t.weight] for t in sibling["tags"]],
        "note": sibling["note"],
    })
    db.close()
"""


def test_broken_persistent_objects_and_values_round_trip(tmp_path: Path, procs: Processes) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    path = tmp_path / "data.fs"
    write_module(modules, "library", LIBRARY)
    oids = run_child(procs, modules, STORE, path)["oids"]

    delete_module(modules, "library")
    seen = run_child(procs, modules, WITHOUT_MODULE, path)
    assert seen["plain"] == 1
    assert seen["broken"] is True
    assert (seen["module"], seen["name"]) == ("library", "Book")
    assert seen["state"] == {"title": "Dune", "pages": 412}
    assert seen["title_attr"] == "Dune"
    assert seen["same_as_shelf"] is True
    for key in ("modified_error", "modified_error_2"):
        assert oids[0] in seen[key] and "library.Book" in seen[key], seen[key]
    assert seen["tag_broken"] is True
    assert (seen["tag_module"], seen["tag_name"]) == ("library", "Tag")
    assert seen["tag_state"] == {"label": "sf", "weight": 3}
    assert seen["after_commit"] == [True, "added without the module", True, {"title": "Emma", "pages": 474}]

    write_module(modules, "library", LIBRARY)
    restored = run_child(procs, modules, RESTORED, path)
    assert restored == {
        "types": ["library.Book", "library.Book"],
        "broken": [False, False],
        "books": [["Dune", 412], ["Emma", 474]],
        "added": "added without the module",
        "shelf": [True, True],
        "tag": [True, "sf", 3],
        "tags": [[True, "old", 1]],
        "note": "changed without the module",
    }


def _store_raw(storage: Storage, record: bytes) -> bytes:
    oid = storage.new_oid()
    storage.begin(TransactionMeta(description="written behind the object layer"))
    storage.store(oid, z64, record)
    storage.vote()
    storage.finish()
    return oid


def test_record_naming_os_system_as_its_class_loads_broken_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    state = pickle.dumps({"command": f"touch {marker}", "args": (f"touch {marker}",)}, protocol=5)
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        oid = _store_raw(db.storage, encode_record("os:system", [], state))
        conn = db.open(transaction.TransactionManager())
        obj = conn.get(oid)
        obj._p_activate()
        assert isinstance(obj, amberdb.Broken)
        assert (type(obj).__module__, type(obj).__name__) == ("os", "system")
        assert obj.__broken_state__ == {"command": f"touch {marker}", "args": (f"touch {marker}",)}
        with pytest.raises(amberdb.BrokenModified, match="os.system"):
            obj.command = "x"
        conn.close()
    assert not marker.exists()


ONDEMAND = """
    from amberdb import Persistent


    class Gadget(Persistent):
        def __init__(self, size):
            self.size = size
"""

ON_DEMAND_STORE = """
    import ondemand
    db = amberdb.DB(sys.argv[1])
    db.open().root()["gadget"] = ondemand.Gadget(7)
    transaction.commit()
    db.close()
    out("stored")
"""

ON_DEMAND_LOAD = """
    report = {}
    db = amberdb.DB(sys.argv[1])  # ondemand not allowed: broken, and not imported
    gadget = db.open().root()["gadget"]
    broken = isinstance(gadget, amberdb.Broken)
    report["outside"] = [broken, gadget.__broken_state__, "ondemand" in sys.modules]
    transaction.abort()
    db.close()
    db = amberdb.DB(sys.argv[1], allowed_modules=["ondemand"])  # imported on demand
    gadget = db.open().root()["gadget"]
    report["inside"] = [
        isinstance(gadget, amberdb.Broken), type(gadget).__module__, type(gadget).__name__, gadget.size,
        "ondemand" in sys.modules and type(gadget) is sys.modules["ondemand"].Gadget,
    ]
    transaction.abort()
    db.close()
    out(report)
"""


def test_allowed_modules_are_imported_on_demand_and_only_them(tmp_path: Path, procs: Processes) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    path = tmp_path / "data.fs"
    write_module(modules, "ondemand", ONDEMAND)
    run_child(procs, modules, ON_DEMAND_STORE, path)
    report = run_child(procs, modules, ON_DEMAND_LOAD, path)
    assert report["outside"] == [True, {"size": 7}, False]
    assert report["inside"] == [False, "ondemand", "Gadget", 7, True]
