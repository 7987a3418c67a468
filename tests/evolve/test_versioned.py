"""Versioned classes (``_p_version``, ``_p_upgrade``), in this process: the classes of each
test are made under a module name of their own, the newer definition replacing the older as
a redefined class does."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import evolve
from amberdb.record import decode_header
from tests.evolve.helpers import state_reader

_modules = itertools.count()


def _module_name() -> str:
    return f"tests_evolve_versioned_app_{next(_modules)}"


def _person_v1(module: str) -> type[amberdb.Persistent]:
    def __init__(self: Any, name: str) -> None:  # noqa: N807
        self.name = name

    return type(
        "Person",
        (amberdb.Persistent,),
        {"__module__": module, "__qualname__": "Person", "__init__": __init__},
    )


Calls = list[tuple[dict[str, Any], int]]


def _person_v2(module: str, calls: Calls | None = None) -> type[amberdb.Persistent]:
    def _p_upgrade(cls: type, state: dict[str, Any], version: int) -> dict[str, Any]:
        if calls is not None:
            calls.append((dict(state), version))
        if version != 0:
            raise amberdb.StateVersionError(f"Person cannot read version {version}")
        first, _, last = state.pop("name").partition(" ")
        return {**state, "first": first, "last": last}

    namespace = {
        "__module__": module,
        "__qualname__": "Person",
        "_p_version": 2,
        "_p_upgrade": classmethod(_p_upgrade),
    }
    return type("Person", (amberdb.Persistent,), namespace)


def _stored_state(db: amberdb.DB, oid: bytes) -> tuple[str, Any]:
    record = db.storage.load(oid)[0]
    header = decode_header(record)
    return header.class_name, state_reader(db).state(oid, record, header)


def test_upgrade_on_load_without_writing_back_and_written_in_the_new_version_when_changed(
    tmp_path: Path,
) -> None:
    module = _module_name()
    v1 = _person_v1(module)
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        conn = db.open()
        conn.root()["people"] = amberdb.PersistentList([v1("Ada Lovelace"), v1("Alan Turing")])
        transaction.commit()
        oids = [person._p_oid for person in conn.root()["people"]]
        conn.close()
        assert _stored_state(db, oids[0]) == (f"{module}:Person", {"name": "Ada Lovelace"})

    calls: Calls = []
    _person_v2(module, calls)
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        tid = db.last_tid()
        conn = db.open()
        ada = conn.root()["people"][0]
        assert (ada.first, ada.last) == ("Ada", "Lovelace")
        assert not hasattr(ada, "name")
        assert ada.first == "Ada"
        assert calls == [({"name": "Ada Lovelace"}, 0)]  # once for the load, not per access
        transaction.commit()  # nothing changed: nothing written
        assert db.last_tid() == tid
        assert not ada._p_changed
        conn.cache_minimize()  # ghosts: the next access loads the old state again
        assert ada.last == "Lovelace"
        assert len(calls) == 2
        transaction.commit()
        assert db.last_tid() == tid
        assert _stored_state(db, oids[0]) == (f"{module}:Person", {"name": "Ada Lovelace"})

        ada.last = "King"
        transaction.commit()
        assert db.last_tid() != tid
        assert _stored_state(db, oids[0])[1] == {"first": "Ada", "last": "King", "_p_version": 2}
        assert _stored_state(db, oids[1])[1] == {"name": "Alan Turing"}  # untouched: still old
        conn.close()

    calls.clear()
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        conn = db.open()
        ada, alan = conn.root()["people"]
        assert (ada.first, ada.last, alan.first, alan.last) == ("Ada", "King", "Alan", "Turing")
        assert calls == [({"name": "Alan Turing"}, 0)]  # the new state needs no upgrade
        conn.close()


def _each_upgrade_scenario(tmp_path: Path, ghosts_in_the_pool: bool) -> None:
    module = _module_name()
    v1 = _person_v1(module)
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        conn = db.open()
        conn.root()["people"] = amberdb.PersistentList(v1(f"P{n} Q{n}") for n in range(5))
        transaction.commit()
        oids = [person._p_oid for person in conn.root()["people"]]
        conn.close()
    _person_v2(module)
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        conn = db.open()
        conn.root()["people"][0].last = "New"  # written in version 2 already
        transaction.commit()
        conn.close()  # back to the pool: its cache holds the other people as ghosts
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        if ghosts_in_the_pool:
            conn = db.open()
            assert all(person._p_state == -1 for person in conn.root()["people"][1:])  # ghosts
            transaction.abort()
            conn.close()
        serials = {oid: db.storage.load(oid)[1] for oid in oids}
        assert evolve.each(db, f"{module}.Person", evolve.upgrade, batch_size=2) == 5
        rewritten = [oid for oid in oids if db.storage.load(oid)[1] != serials[oid]]
        assert rewritten == oids[1:]
        for n, oid in enumerate(oids):
            expected_last = "New" if n == 0 else f"Q{n}"
            assert _stored_state(db, oid)[1] == {"first": f"P{n}", "last": expected_last, "_p_version": 2}


def test_each_upgrade_writes_only_the_objects_loaded_from_another_version(tmp_path: Path) -> None:
    _each_upgrade_scenario(tmp_path, ghosts_in_the_pool=False)


def test_each_upgrade_also_upgrades_objects_cached_as_ghosts(tmp_path: Path) -> None:
    _each_upgrade_scenario(tmp_path, ghosts_in_the_pool=True)


def test_a_state_version_the_class_cannot_read_raises_state_version_error(tmp_path: Path) -> None:
    module = _module_name()
    v1 = _person_v1(module)
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        conn = db.open()
        conn.root()["person"] = v1("Grace Hopper")
        transaction.commit()
        conn.close()
    # a class that sets _p_version and has no _p_upgrade: the default refuses, naming the class
    type("Person", (amberdb.Persistent,), {"__module__": module, "__qualname__": "Person", "_p_version": 3})
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        conn = db.open(transaction.TransactionManager())
        with pytest.raises(amberdb.StateVersionError, match=f"{module}.Person") as caught:
            conn.root()["person"]._p_activate()
        assert "0" in str(caught.value)
        conn.close()
    # a newer state than the class knows: its own _p_upgrade refuses
    _person_v2(module)
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        conn = db.open(transaction.TransactionManager())
        conn.root()["person"].first = "Grace"
        conn.transaction_manager.commit()
        conn.close()
    type("Person", (amberdb.Persistent,), {"__module__": module, "__qualname__": "Person", "_p_version": 1})
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        conn = db.open(transaction.TransactionManager())
        with pytest.raises(amberdb.StateVersionError, match="Person"):
            conn.root()["person"]._p_activate()
        conn.close()
