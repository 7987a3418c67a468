"""Defects found attacking issue 15 (schema evolution); each xfail(strict) until fixed."""

from __future__ import annotations

import pickletools
from pathlib import Path
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import evolve
from amberdb.metadata import metadata_for_update
from amberdb.record import decode_header
from amberdb.utils import p64
from tests.hostile.assemble import name, number, op, text
from tests.hostile_issue15.helpers import app_module, mapping_holding, redefine, write_raw

ITEM = """
from amberdb import Persistent
class Item(Persistent):
    def __init__(self, n):
        self.n = n
"""


def _fresh(db: amberdb.DB) -> Any:
    manager = transaction.TransactionManager()
    conn = db.open(manager)
    manager.begin()
    return conn


# -- 1: evolve.each's default run name -------------------------------------------------------


def test_each_with_two_different_lambdas_runs_both() -> None:
    with app_module("h15_each_lambda", ITEM) as module:
        db = amberdb.DB(None)
        conn = db.open()
        conn.root()["items"] = amberdb.PersistentList([module.Item(i) for i in range(3)])
        transaction.commit()
        evolve.each(db, "h15_each_lambda.Item", lambda obj: setattr(obj, "a", 1))
        second = evolve.each(db, "h15_each_lambda.Item", lambda obj: setattr(obj, "b", 2))
        transaction.begin()
        assert [getattr(item, "b", None) for item in conn.root()["items"]] == [2, 2, 2]
        assert int(second) == 3 and not second.already_done
        db.close()


def test_each_upgrade_runs_again_after_the_next_version_bump() -> None:
    v1 = """
from amberdb import Persistent
class Person(Persistent):
    _p_version = 1
    def __init__(self, name):
        self.name = name
    @classmethod
    def _p_upgrade(cls, state, version):
        return dict(state, v1=True)
"""
    v2 = v1.replace("_p_version = 1", "_p_version = 2").replace("v1=True", "v2=True")
    with app_module("h15_upgrade", v1.replace("_p_version = 1", "_p_version = 0")) as module:
        db = amberdb.DB(None)
        conn = db.open()
        conn.root()["p"] = module.Person("Ada")
        transaction.commit()
        conn.close()
        # each deployment is a new process: a new DB (no cached objects of the old classes)
        redefine(module, v1)
        evolve.each(amberdb.DB(db.storage), "h15_upgrade.Person", evolve.upgrade)
        redefine(module, v2)
        result = evolve.each(amberdb.DB(db.storage), "h15_upgrade.Person", evolve.upgrade)
        oid = _fresh(db).root()["p"]._p_oid
        raw = db.storage.load(oid)[0]
        state = raw[decode_header(raw).state_offset :]
        assert not result.already_done
        assert b"v2" in state  # written in version 2
        db.close()


# -- 2: a dry run that commits -----------------------------------------------------------------


def test_dry_run_commits_nothing_even_when_a_step_commits() -> None:
    db = amberdb.DB(None)

    def step(conn: Any) -> None:
        conn.root()["x"] = 1
        conn.transaction_manager.commit()  # a migration committing in batches, say
        conn.root()["y"] = 2

    schema = evolve.Schema("dry", {1: step})
    try:
        schema.run(db, dry_run=True)
    except Exception:
        pass  # refusing the commit would be fine too
    assert "x" not in dict(_fresh(db).root())
    db.close()


# -- 3: renaming AmberDB's own metadata class --------------------------------------------------


def test_renaming_the_metadata_class_is_refused_or_can_be_undone(tmp_path: Path) -> None:
    path = str(tmp_path / "data.fs")
    with amberdb.DB(path) as db:
        try:
            db.rename_class("amberdb.metadata.DatabaseMetadata", "gone.Meta")
        except (ValueError, amberdb.DatabaseError):
            return  # refused: fine
    with amberdb.DB(path) as db:
        db.drop_class_alias("amberdb.metadata.DatabaseMetadata")
        assert "amberdb.metadata:DatabaseMetadata" not in db.class_aliases
        db.rename_class("other.A", "other.B")  # and the metadata still works


# -- 4, 5, 6: broken values written back -------------------------------------------------------


def test_a_broken_value_built_twice_is_refused_rather_than_written_back_short() -> None:
    # Fixed by refusing: a broken value keeps one state, so a record building it twice (never
    # what a pickler writes) fails to load with a clear error instead of losing a BUILD later.
    value = (
        name("h15_twice", "Thing")
        + op("EMPTY_TUPLE")
        + op("NEWOBJ")
        + op("EMPTY_DICT")
        + text("a")
        + number(1)
        + op("SETITEM")
        + op("BUILD")
        + op("EMPTY_DICT")
        + text("b")
        + number(2)
        + op("SETITEM")
        + op("BUILD")
    )
    db = amberdb.DB(None, allowed_modules=["h15_twice"])
    write_raw(db.storage, p64(100), mapping_holding(value))
    source = "class Thing:\n    pass\n"
    with app_module("h15_twice", source):
        assert vars(_fresh(db).get(p64(100))["v"]) == {"a": 1, "b": 2}  # what the record says
    db.close()
    db = amberdb.DB(None, allowed_modules=["h15_twice"])
    write_raw(db.storage, p64(100), mapping_holding(value))
    conn = _fresh(db)
    with pytest.raises(amberdb.RecordDecodeError, match=r"oid 0x64.*h15_twice\.Thing twice"):
        conn.get(p64(100))


def test_a_broken_value_keeps_its_module_and_name_exactly() -> None:
    db = amberdb.DB(None)
    write_raw(
        db.storage, p64(100), mapping_holding(name("gone:mod", "Thing") + op("EMPTY_TUPLE") + op("NEWOBJ"))
    )
    conn = _fresh(db)
    holder = conn.get(p64(100))
    holder["other"] = 1
    conn.transaction_manager.commit()
    record = db.storage.load(p64(100))[0]
    strings = [
        arg
        for code, arg, _ in pickletools.genops(record[decode_header(record).state_offset :])
        if isinstance(arg, str)
    ]
    assert [s for s in strings if s in ("gone:mod", "Thing", "gone", "mod:Thing")] == ["gone:mod", "Thing"]
    db.close()


def test_a_container_of_deeply_nested_broken_values_still_commits(tmp_path: Path) -> None:
    source = "class Node:\n    def __init__(self, child):\n        self.child = child\n"
    path = str(tmp_path / "data.fs")
    with app_module("h15_deep", source) as module, amberdb.DB(path, allowed_modules=["h15_deep"]) as db:
        conn = db.open()
        chain = None
        for _ in range(200):
            chain = module.Node(chain)
        conn.root()["chain"] = amberdb.PersistentMapping({"v": chain})
        transaction.commit()  # the C pickler writes it
        conn.close()
    with amberdb.DB(path, allowed_modules=["h15_deep"]) as db:
        conn = _fresh(db)
        holder = conn.root()["chain"]
        assert isinstance(holder["v"], amberdb.Broken)
        holder["other"] = 1
        conn.transaction_manager.commit()


# -- 7: inline adoption ------------------------------------------------------------------------

TAG_PLAIN = "class Tag:\n    def __init__(self, name):\n        self.name = name\n"
TAG_PERSISTENT = (
    "from amberdb import Persistent\nclass Tag(Persistent):\n"
    "    def __init__(self, name):\n        self.name = name\n"
)


def test_inline_object_changed_after_its_container_was_ghosted_is_refused_not_lost() -> None:
    # Fixed by refusing the change (the container reloaded holds another copy): nothing is
    # acknowledged that could be lost.
    with app_module("h15_inline", TAG_PLAIN) as module:
        db = amberdb.DB(None, allowed_modules=["h15_inline"])
        conn = db.open()
        conn.root()["holder"] = amberdb.PersistentMapping({"tag": module.Tag("inline")})
        transaction.commit()
        conn.close()
        redefine(module, TAG_PERSISTENT)
        db = amberdb.DB(db.storage, allowed_modules=["h15_inline"])
        conn = _fresh(db)
        tag = conn.root()["holder"]["tag"]
        assert isinstance(tag, amberdb.Persistent) and tag._p_oid is None
        conn.cache_minimize()  # the container is unchanged: it may become a ghost
        with pytest.raises(amberdb.ConnectionStateError, match="reloaded since"):
            tag.name = "changed"
        assert tag.name == "inline"
        fresh_tag = conn.root()["holder"]["tag"]
        fresh_tag.name = "changed"
        conn.transaction_manager.commit()
        assert _fresh(db).root()["holder"]["tag"].name == "changed"


# -- 8: make_plain on chains -------------------------------------------------------------------


def test_make_plain_converts_a_chain_of_instances(tmp_path: Path) -> None:
    persistent = (
        "from amberdb import Persistent\nclass Node(Persistent):\n"
        "    def __init__(self, name, child=None):\n        self.name, self.child = name, child\n"
    )
    plain = (
        "class Node:\n    def __init__(self, name, child=None):\n"
        "        self.name, self.child = name, child\n"
    )
    path = str(tmp_path / "data.fs")
    with app_module("h15_chain", persistent) as module:
        with amberdb.DB(path) as db:
            conn = db.open()
            conn.root()["chain"] = amberdb.PersistentList([module.Node("a", module.Node("b"))])
            transaction.commit()
            conn.close()
        redefine(module, plain)
        with amberdb.DB(path, allowed_modules=["h15_chain"]) as db:
            evolve.make_plain(db, "h15_chain.Node")
            first = _fresh(db).root()["chain"][0]
            assert type(first) is module.Node and type(first.child) is module.Node
            assert (first.name, first.child.name) == ("a", "b")


# -- 9: damaged claims -------------------------------------------------------------------------


def test_a_damaged_claim_is_treated_as_expired() -> None:
    db = amberdb.DB(None)
    conn = _fresh(db)
    metadata_for_update(conn).update_section("claims", "damaged", 5)
    conn.transaction_manager.commit()
    ran: list[int] = []
    schema = evolve.Schema("damaged", {1: lambda conn: ran.append(1)}, claim_timeout=1)
    assert schema.run(db) == [1] and ran == [1]
    db.close()


# -- 10: concurrent renames ----------------------------------------------------------------------


def test_concurrent_opposite_renames_do_not_make_a_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    import amberdb.db as db_module

    with app_module("h15_cycle", "class B:\n    pass\n"):
        db = amberdb.DB(None, allowed_modules=["h15_cycle"])
        db.rename_class("h15_cycle.Unrelated", "h15_cycle.Other")  # the metadata exists
        original = db_module.metadata_for_update
        interleaved: list[bool] = []

        def racing(conn: Any) -> Any:
            found = original(conn)
            found.section("class_aliases")  # read at this transaction's snapshot
            if not interleaved:
                interleaved.append(True)
                db.rename_class("h15_cycle.B", "h15_cycle.A")  # another process, meanwhile
            return found

        monkeypatch.setattr(db_module, "metadata_for_update", racing)
        try:
            db.rename_class("h15_cycle.A", "h15_cycle.B")
        except (ValueError, amberdb.DatabaseError):
            pass  # refusing the second rename is right
        monkeypatch.undo()
        aliases = db_module.DB(db.storage).class_aliases
        assert not (
            aliases.get("h15_cycle:A") == "h15_cycle:B" and aliases.get("h15_cycle:B") == "h15_cycle:A"
        ), aliases
        db.close()


# -- 11: a NUL in a missing class's name ---------------------------------------------------------


def test_a_nul_in_a_missing_class_name_breaks_only_that_object() -> None:
    from tests.hostile_issue15.helpers import plain_record
    from tests.hostile_issue15.test_attacks import referring_mapping

    db = amberdb.DB(None)
    write_raw(db.storage, p64(50), plain_record("gone:A\x00B", {"x": 1}))
    write_raw(db.storage, p64(51), referring_mapping("gone:A\x00B", p64(50)))
    conn = _fresh(db)
    container = conn.get(p64(51))
    assert container["n"]._p_oid == p64(50)
    try:
        assert conn.get(p64(50)).x == 1
    except amberdb.DatabaseError:
        pass
    db.close()


# -- 12: --rewrite under a steady writer -----------------------------------------------------------


def test_rewrite_makes_progress_while_one_record_keeps_changing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import amberdb.cli.evolution as cli_evolution
    from amberdb.rename import record_globals
    from amberdb.storage.history import iter_current_records

    source = (
        "from amberdb import Persistent\nclass Thing(Persistent):\n"
        "    def __init__(self, n):\n        self.n = n\n"
    )
    with app_module("h15_rw_old", source) as old, app_module("h15_rw_new", source):
        db = amberdb.DB(str(tmp_path / "data.fs"))
        conn = db.open()
        conn.root()["things"] = amberdb.PersistentList([old.Thing(i) for i in range(50)])
        transaction.commit()
        hot = conn.root()["things"][0]
        counter = [0]

        def application_writes() -> None:  # the application changes one instance meanwhile
            counter[0] += 1
            hot.n = counter[0]
            transaction.commit()

        original_batch, original_reread = cli_evolution._rewrite_batch, cli_evolution._reread

        def batch(storage: Any, records: Any, renames: Any) -> int:
            application_writes()
            return original_batch(storage, records, renames)

        def reread(storage: Any, records: Any) -> Any:
            fresh = original_reread(storage, records)
            application_writes()
            return fresh

        monkeypatch.setattr(cli_evolution, "_rewrite_batch", batch)
        monkeypatch.setattr(cli_evolution, "_reread", reread)
        try:
            cli_evolution.rewrite_records(db.storage, {"h15_rw_old:Thing": "h15_rw_new:Thing"}, quiet=True)
        except Exception:
            pass
        still_old = sum(
            "h15_rw_old:Thing" in record_globals(record) for _, _, record in iter_current_records(db.storage)
        )
        assert still_old <= 2  # the hot record (and the list naming it) at most
        db.close()
