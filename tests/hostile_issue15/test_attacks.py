"""Attacks on issue 15 that AmberDB handles: kept as regression guards."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import evolve
from amberdb.broken import PersistentBroken
from amberdb.metadata import metadata_for_update
from amberdb.record import encode_record
from amberdb.rename import record_globals
from amberdb.utils import p64
from tests.hostile.assemble import call, name, number, op, program, text
from tests.hostile_issue15.helpers import PM, app_module, mapping_holding, plain_record, write_raw


def _fresh(db: amberdb.DB) -> Any:
    manager = transaction.TransactionManager()
    conn = db.open(manager)
    manager.begin()
    return conn


HOSTILE_HEADERS = [
    "",
    ":",
    "a:b:c",
    "os:system",
    "builtins:type",
    "builtins:eval",
    "builtins:__import__",
    "subprocess:Popen",
    "gone_mod:f.<locals>.C",
    "gone_mod:__class__",
    "amberdb.persistent:Persistent",
    "amberdb.broken:PersistentBroken",
    "amberdb.broken:Broken",
    "never_there_mod_h15." + "x" * 2000 + ":Y",
    "not an identifier:\n",
    "__main__:Thing",
]


def referring_mapping(ref_class: str, oid: bytes) -> bytes:
    """A version 1 PersistentMapping record whose data is ``{"n": <reference to oid>}``."""
    state = program(
        op("EMPTY_DICT"),
        text("data"),
        op("EMPTY_DICT"),
        text("n"),
        call("amberdb.record", "ref", number(0)),
        op("SETITEM"),
        op("SETITEM"),
    )
    return encode_record(PM, [(oid, ref_class)], state)


@pytest.mark.parametrize("header", HOSTILE_HEADERS)
def test_hostile_header_class_names_load_broken_or_fail_cleanly(header: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    db = amberdb.DB(None)
    write_raw(db.storage, p64(50), plain_record(header, {"cmd": f"touch {marker}"}))
    write_raw(db.storage, p64(51), referring_mapping(header, p64(50)))
    conn = _fresh(db)
    container = conn.get(p64(51))  # a container referring to it loads
    try:
        obj = container["n"]
        obj._p_activate()
        if isinstance(obj, amberdb.Broken):
            assert obj.__broken_state__ == {"cmd": f"touch {marker}"}
            with pytest.raises(amberdb.BrokenModified):
                obj.cmd = "x"
    except amberdb.DatabaseError:
        pass
    container["more"] = 1  # and changes and commits, keeping the reference
    conn.transaction_manager.commit()
    for _ in range(2):  # transaction starts run _repair_broken
        conn.transaction_manager.begin()
        conn.transaction_manager.commit()
    assert not marker.exists()
    again = _fresh(db).get(p64(51))
    assert again["more"] == 1 and again["n"]._p_oid == p64(50)
    db.close()


def test_hostile_metadata_state_is_plain_data_only(tmp_path: Path) -> None:
    """A DatabaseMetadata record whose state calls os.system runs nothing; the DB opens."""

    class _Call:
        def __reduce__(self) -> Any:
            return os.system, (f"touch {tmp_path / 'ran'}",)

    path = str(tmp_path / "data.fs")
    with amberdb.DB(path) as db:
        db.rename_class("h15_meta.A", "h15_meta.B")
        oid = db._metadata_oid
        assert oid is not None
        tampered = encode_record(
            "amberdb.metadata:DatabaseMetadata", [], pickle.dumps({"class_aliases": _Call()}, protocol=5)
        )
        write_raw(db.storage, oid, tampered)
    with amberdb.DB(path) as db:  # opens, with the renames unreadable (logged)
        conn = _fresh(db)
        conn.root()["x"] = 1
        conn.transaction_manager.commit()
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "aliases",
    [
        {"h15_alias:Thing": "os:system"},
        {"h15_alias:Thing": "builtins:eval"},
        {"h15_alias:Thing": "builtins:__import__"},
        {"h15_alias:Thing": "h15_alias:Other", "h15_alias:Other": "h15_alias:Thing"},
        {"h15_alias:Thing": 5},
        {7: "os:system"},
        {"amberdb.record:ref": "gone:X"},
        {"h15_alias:Thing": "amberdb.metadata:DatabaseMetadata"},
    ],
)
def test_hostile_class_aliases_make_nothing_dangerous_loadable(
    aliases: dict[Any, Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    path = str(tmp_path / "data.fs")
    with amberdb.DB(path) as db:
        conn = _fresh(db)
        metadata = metadata_for_update(conn)
        metadata.class_aliases = aliases
        conn.root()["list"] = amberdb.PersistentList([1])
        conn.transaction_manager.commit()
        # a record naming the aliased class as its own class, and one using it as a callable
        write_raw(db.storage, p64(60), plain_record("h15_alias:Thing", {"cmd": f"touch {marker}"}))
        write_raw(db.storage, p64(61), mapping_holding(call("h15_alias", "Thing", text(f"touch {marker}"))))
    with amberdb.DB(path) as db:
        conn = _fresh(db)
        assert conn.root()["list"][0] == 1  # references still load as references
        obj = conn.get(p64(60))
        try:
            obj._p_activate()
            assert isinstance(obj, amberdb.Broken) or type(obj).__name__ == "DatabaseMetadata"
        except amberdb.DatabaseError:
            pass
        try:
            value = conn.get(p64(61))["v"]
            assert isinstance(value, amberdb.Broken)
        except amberdb.DatabaseError:
            pass
        conn.root()["x"] = 1
        conn.transaction_manager.commit()
    assert not marker.exists()


def test_rename_class_refuses_self_renames_cycles_and_bad_names() -> None:
    db = amberdb.DB(None)
    with pytest.raises(ValueError):
        db.rename_class("a.B", "a.B")
    db.rename_class("a.B", "a.C")
    db.rename_class("a.C", "a.D")
    with pytest.raises(ValueError, match="circle"):
        db.rename_class("a.D", "a.B")
    for bad in ("", "nodots", "a.1B", "a:", ":B", "a.B.", "a b.C"):
        with pytest.raises(ValueError):
            db.rename_class(bad, "x.Y")
    with pytest.raises(TypeError):
        db.rename_class(5, "x.Y")  # type: ignore[arg-type]
    assert db.class_aliases == {"a:B": "a:C", "a:C": "a:D"}
    db.close()


def test_broken_values_round_trip_byte_faithfully_in_their_globals() -> None:
    """Odd ways to build values of missing classes load broken and are written back as built."""
    shapes = {
        "newobj": name("h15_rt", "Thing") + op("EMPTY_TUPLE") + op("NEWOBJ"),
        "reduce": call("h15_rt", "make", number(7), text("z")),
        "newobj_ex": name("h15_rt", "Thing")
        + op("EMPTY_TUPLE")
        + op("EMPTY_DICT")
        + text("k")
        + number(3)
        + op("SETITEM")
        + op("NEWOBJ_EX"),
        "appends": name("h15_rt", "Bag")
        + op("EMPTY_TUPLE")
        + op("NEWOBJ")
        + op("MARK")
        + number(1)
        + number(2)
        + op("APPENDS"),
        "setitems": name("h15_rt", "Table")
        + op("EMPTY_TUPLE")
        + op("NEWOBJ")
        + op("MARK")
        + text("k")
        + number(1)
        + op("SETITEMS"),
        "class_as_key": op("EMPTY_DICT") + name("h15_rt", "Thing") + number(1) + op("SETITEM"),
        "inst": op("MARK") + number(1) + op("INST", b"h15_rt\nThing\n"),
        "global": op("GLOBAL", b"h15_rt\nThing\n"),
        "missing_in_os": name("os", "h15_nothere") + op("EMPTY_TUPLE") + op("NEWOBJ"),
    }
    db = amberdb.DB(None)
    for index, value in enumerate(shapes.values()):
        oid = p64(100 + index)
        record = mapping_holding(value)
        write_raw(db.storage, oid, record)
        conn = _fresh(db)
        holder = conn.get(oid)
        holder["other"] = 1
        conn.transaction_manager.commit()
        assert record_globals(db.storage.load(oid)[0]) == record_globals(record)
        conn.close()
    db.close()


def test_refused_globals_inside_states_are_not_turned_into_broken_values(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    db = amberdb.DB(None)
    for index, (module, qualname) in enumerate(
        [("os", "system"), ("builtins", "eval"), ("subprocess", "getoutput"), ("gone_mod", "__init__")]
    ):
        write_raw(
            db.storage, p64(70 + index), mapping_holding(call(module, qualname, text(f"touch {marker}")))
        )
        with pytest.raises(amberdb.UnsafeGlobalError):
            _fresh(db).get(p64(70 + index))["v"]
    assert not marker.exists()
    db.close()


def test_a_huge_reduce_argument_to_a_missing_callable_stays_proportional() -> None:
    db = amberdb.DB(None)
    # a missing callable given bytes-of-size-N args: kept as given, nothing sized by a number
    write_raw(db.storage, p64(80), mapping_holding(call("h15_huge", "make", number(10**12))))
    value = _fresh(db).get(p64(80))["v"]
    assert isinstance(value, amberdb.Broken) and value.__broken_args__ == (10**12,)
    db.close()


def test_p_version_hostile_values_fail_cleanly() -> None:
    source = """
from amberdb import Persistent
class V(Persistent):
    _p_version = 2
    @classmethod
    def _p_upgrade(cls, state, version):
        return dict(state, upgraded_from=version)
class Bad(Persistent):
    _p_version = 1
    @classmethod
    def _p_upgrade(cls, state, version):
        return [1]
"""
    with app_module("h15_version", source):
        db = amberdb.DB(None)
        bad = [
            ("h15_version:V", -1),
            ("h15_version:V", "2"),
            ("h15_version:V", None),
            ("h15_version:V", True),
        ]
        bad.append(("h15_version:Bad", 0))
        for index, (cls, version) in enumerate(bad):
            write_raw(db.storage, p64(90 + index), plain_record(cls, {"a": 1, "_p_version": version}))
            with pytest.raises(amberdb.RecordDecodeError, match="oid 0x"):
                _fresh(db).get(p64(90 + index))._p_activate()
        write_raw(db.storage, p64(99), plain_record("h15_version:V", ({"a": 1, "_p_version": 1}, {"s": 2})))
        obj = _fresh(db).get(p64(99))
        assert (obj.a, obj.s, obj.upgraded_from) == (1, 2, 1)
        db.close()


def test_persistent_broken_header_gives_a_read_only_object() -> None:
    db = amberdb.DB(None)
    write_raw(db.storage, p64(40), plain_record("amberdb.broken:PersistentBroken", {"x": 1}))
    obj = _fresh(db).get(p64(40))
    assert isinstance(obj, PersistentBroken) and obj.x == 1
    with pytest.raises(amberdb.BrokenModified):
        obj.x = 2
    db.close()


def test_schema_keyboard_interrupt_in_a_step_releases_the_claim() -> None:
    db = amberdb.DB(None)

    def interrupted(conn: Any) -> None:
        conn.root()["half"] = 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve.Schema("ki", {1: interrupted}).run(db)
    assert evolve._read(db)["claims"] == {}  # type: ignore[index]
    assert "half" not in dict(_fresh(db).root())
    ran: list[int] = []
    assert evolve.Schema("ki", {1: lambda conn: ran.append(1)}).run(db) == [1] and ran == [1]
    db.close()


def test_schema_dry_run_with_a_raising_step_changes_nothing() -> None:
    db = amberdb.DB(None)

    def boom(conn: Any) -> None:
        conn.root()["x"] = 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        evolve.Schema("dry-raise", {1: boom}).run(db, dry_run=True)
    assert dict(_fresh(db).root()) == {} and evolve.Schema("dry-raise", {1: boom}).generation(db) == 0
    db.close()


def test_each_func_raising_resumes_after_the_last_committed_batch() -> None:
    source = (
        "from amberdb import Persistent\nclass Item(Persistent):\n"
        "    def __init__(self, n):\n        self.n = n\n"
    )
    with app_module("h15_resume", source) as module:
        db = amberdb.DB(None)
        conn = db.open()
        conn.root()["items"] = amberdb.PersistentList([module.Item(i) for i in range(10)])
        transaction.commit()
        seen: list[int] = []

        def func(obj: Any) -> None:
            if obj.n == 6 and not seen.count(-1):
                seen.append(-1)
                raise RuntimeError("crash")
            obj.done = obj.done + 1 if hasattr(obj, "done") else 1
            seen.append(obj.n)

        with pytest.raises(RuntimeError):
            evolve.each(db, "h15_resume.Item", func, batch_size=3, name="resume")
        result = evolve.each(db, "h15_resume.Item", func, batch_size=3, name="resume")
        assert int(result) == 4  # 6..9, after the 2 committed batches
        transaction.begin()
        assert [item.done for item in conn.root()["items"]] == [1] * 10  # nobody twice
        assert evolve.each(db, "h15_resume.Item", func, name="resume").already_done
        db.close()


def test_each_skips_broken_objects_class_filter_and_sees_old_names() -> None:
    source = "from amberdb import Persistent\nclass Item(Persistent):\n    pass\n"
    with app_module("h15_old", source) as module:
        db = amberdb.DB(None)
        conn = db.open()
        conn.root()["a"] = module.Item()
        transaction.commit()
        write_raw(db.storage, p64(200), plain_record("h15_gone:Item", {"x": 1}))
        db.rename_class("h15_gone.Item", "h15_old.Item")
        got: list[Any] = []
        assert int(evolve.each(db, module.Item, got.append)) == 2
        assert all(obj.__class__ is module.Item for obj in got)
        db.close()
