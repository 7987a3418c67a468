"""Schema generations: steps run once and in order, even with two processes racing; a failing
step leaves the previous generation; dry runs commit nothing; ``check`` refuses databases
that are too old or too new."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import evolve
from tests.evolve.helpers import result_of, spawn_child, wait_ready, write_module
from tests.server.procs import Processes

APPSCHEMA = """
    import os
    import time

    import amberdb
    from amberdb import evolve

    MARKERS = None


    def mark(generation, conn):
        with open(MARKERS, "a") as f:
            f.write(f"{generation} {os.getpid()}\\n")
        time.sleep(0.15)  # a wide window for the other process


    def create(conn):
        mark(1, conn)
        conn.root()["log"] = amberdb.PersistentList(["created"])


    def add_settings(conn):
        mark(2, conn)
        conn.root()["settings"] = amberdb.PersistentMapping(theme="dark")
        conn.root()["log"].append("settings")


    def count(conn):
        mark(3, conn)
        conn.root()["log"].append(f"count {len(conn.root()['log'])}")


    SCHEMA = evolve.Schema("app", steps={1: create, 2: add_settings, 3: count}, minimum=3)
"""

RACER = """
    import appschema
    appschema.MARKERS = sys.argv[2]
    db = amberdb.DB(amberdb.SQLiteStorage(sys.argv[1]))
    print("READY", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(sys.argv[3]) and time.monotonic() < deadline:
        time.sleep(0.005)
    ran = appschema.SCHEMA.run(db)
    generation = appschema.SCHEMA.check(db)
    root = db.open().root()
    out({"ran": list(ran), "generation": generation, "log": list(root["log"]),
         "settings": dict(root["settings"]), "pid": os.getpid()})
    db.close()
"""


def test_two_processes_racing_run_each_step_once_in_order(tmp_path: Path, procs: Processes) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    write_module(modules, "appschema", APPSCHEMA)
    path, markers, go = tmp_path / "data.sqlite", tmp_path / "markers", tmp_path / "go"
    amberdb.DB(amberdb.SQLiteStorage(str(path))).close()  # with its root: see the test below
    racers = [spawn_child(procs, modules, RACER, path, markers, go) for _ in range(2)]
    for racer in racers:
        wait_ready(racer, timeout=30)
    go.touch()
    results = [result_of(racer, timeout=60) for racer in racers]

    lines = [line.split() for line in markers.read_text().splitlines()]
    assert [generation for generation, _pid in lines] == ["1", "2", "3"]
    assert sorted(results[0]["ran"] + results[1]["ran"]) == [1, 2, 3]
    for result in results:
        assert result["generation"] == 3
        assert result["log"] == ["created", "settings", "count 2"]
        assert result["settings"] == {"theme": "dark"}
        ran_here = [int(generation) for generation, pid in lines if int(pid) == result["pid"]]
        assert ran_here == result["ran"]


def test_a_database_whose_root_another_process_creates_meanwhile_opens(tmp_path: Path) -> None:
    """Two processes opening a new database at once (seen in the race above, about once in 20
    runs on a busy machine): the one whose root creation conflicts must use the other's root.
    Here the other process's commit is made to fall between this one's load and its store."""
    path = str(tmp_path / "data.sqlite")
    storage = amberdb.SQLiteStorage(path)
    load = storage.load
    created: list[bool] = []

    def load_after_the_other_created_the_root(oid: bytes, *args: Any) -> Any:
        if not created:
            created.append(True)
            try:
                return load(oid, *args)  # no root yet: POSKeyError ...
            finally:
                amberdb.DB(amberdb.SQLiteStorage(path)).close()  # ... and now there is one
        return load(oid, *args)

    storage.load = load_after_the_other_created_the_root  # type: ignore[method-assign,assignment]
    try:
        db = amberdb.DB(storage)
    except amberdb.POSKeyError:
        storage.close()
        raise
    assert created == [True]
    conn = db.open(transaction.TransactionManager())
    assert dict(conn.root()) == {}
    conn.close()
    db.close()


# -- in this process: failures, dry runs, check ------------------------------------------


class StepFailedError(Exception):
    pass


def _steps(fail_at: int | None = None) -> dict[int, Any]:
    def first(conn: amberdb.Connection) -> None:
        conn.root()["people"] = amberdb.PersistentList(amberdb.PersistentMapping(name=n) for n in "abc")

    def second(conn: amberdb.Connection) -> None:
        for person in conn.root()["people"]:
            person["second"] = True
        if fail_at == 2:
            raise StepFailedError("step 2 is broken")

    def third(conn: amberdb.Connection) -> None:
        conn.root()["third"] = True

    return {1: first, 2: second, 3: third}


def _generation_and_tid(schema: evolve.Schema, db: amberdb.DB) -> tuple[int, bytes]:
    return schema.generation(db), db.last_tid()


def test_failing_step_stops_at_the_previous_generation_and_a_rerun_continues(tmp_path: Path) -> None:
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        broken = evolve.Schema("app", steps=_steps(fail_at=2))
        with pytest.raises(StepFailedError):
            broken.run(db)
        assert broken.generation(db) == 1
        conn = db.open(transaction.TransactionManager())
        assert [dict(person) for person in conn.root()["people"]] == [{"name": n} for n in "abc"]
        assert "third" not in conn.root()
        conn.close()

        fixed = evolve.Schema("app", steps=_steps())
        assert fixed.run(db) == [2, 3]
        assert fixed.generation(db) == 3
        assert fixed.run(db) == []
        conn = db.open(transaction.TransactionManager())
        assert [dict(person) for person in conn.root()["people"]] == [
            {"name": n, "second": True} for n in "abc"
        ]
        assert conn.root()["third"] is True
        conn.close()


def test_dry_run_commits_nothing_and_reports_changed_classes(tmp_path: Path) -> None:
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        schema = evolve.Schema("app", steps=_steps())
        assert evolve.Schema("app", steps={1: _steps()[1]}).run(db) == [1]
        before = _generation_and_tid(schema, db)
        dry = schema.run(db, dry_run=True)
        assert list(dry) == [2, 3]
        assert dry.changed == {"amberdb.containers.PersistentMapping": 4}  # 3 people and the root
        assert dry.changed_by_generation[2] == {"amberdb.containers.PersistentMapping": 3}
        assert _generation_and_tid(schema, db) == before
        conn = db.open(transaction.TransactionManager())
        assert "third" not in conn.root()
        assert all("second" not in person for person in conn.root()["people"])
        conn.close()
        real = schema.run(db)
        assert list(real) == [2, 3]
        assert real.changed == dry.changed


def test_check_refuses_too_old_and_too_new_databases(tmp_path: Path) -> None:
    with amberdb.DB(str(tmp_path / "data.fs")) as db:
        steps = _steps()
        needs_two = evolve.Schema("app", steps=steps, minimum=2)
        with pytest.raises(evolve.SchemaTooOld):
            needs_two.check(db)
        evolve.Schema("app", steps={1: steps[1]}).run(db)
        with pytest.raises(evolve.SchemaTooOld):
            needs_two.check(db)
        needs_two.run(db)
        assert needs_two.check(db) == 3

        older_code = evolve.Schema("app", steps={1: steps[1], 2: steps[2]})
        tid = db.last_tid()
        with pytest.raises(evolve.GenerationTooHigh):
            older_code.check(db)
        with pytest.raises(evolve.GenerationTooHigh):
            older_code.run(db)
        with pytest.raises(evolve.GenerationTooHigh):
            older_code.run(db, dry_run=True)
        assert db.last_tid() == tid
        assert evolve.Schema("other", steps={1: steps[3]}).check(db) == 0  # schemas are separate
