"""A four-step rolling upgrade with versioned classes, scripted with real processes that
commit concurrently to one SQLite database.

The application's ``people.Person`` goes from v1 (``name``) to v2 (``first``/``last``,
``_p_version = 2``).  Step 1: v1 and v1.5 run together (v1.5 reads both forms and writes
the old one); step 2: v2 and v1.5 together; step 3: v2 and ``evolve.each(db, "people.Person",
evolve.upgrade)``; step 4: v2 only, whose class no longer reads the old form.  At each step
every writer reports the writes it saw committed, all of which must be there at the end, and
reads every person with its own version of the class.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import amberdb
from amberdb.record import decode_header
from amberdb.storage.history import iter_current_records
from tests.evolve.helpers import result_of, run_child, spawn_child, state_reader, wait_ready, write_module
from tests.server.procs import Processes

COMMITS = 10  # per writer and step
SHARED = 4  # people every writer renames (conflicts between the versions)
WRITERS = ["s1-v1", "s1-v15", "s2-v2", "s2-v15", "s3-v2", "s4-v2a", "s4-v2b"]

V1 = """
    from amberdb import Persistent

    VERSION = "v1"


    class Person(Persistent):
        def __init__(self, name):
            self.name = name

        def full(self):
            return self.name

        def rename(self, first, last):
            self.name = f"{first} {last}"


    def make(first, last):
        return Person(f"{first} {last}")
"""

# Reads both forms, writes the old one (its _p_version is the old 0).
V15 = """
    from amberdb import Persistent

    VERSION = "v1.5"


    class Person(Persistent):
        _p_version = 0

        def __init__(self, name):
            self.name = name

        @classmethod
        def _p_upgrade(cls, state, version):
            if version != 2:
                raise ValueError(f"v1.5 cannot read version {version}")
            first, last = state.pop("first"), state.pop("last")
            return {**state, "name": f"{first} {last}"}

        def full(self):
            return self.name

        def rename(self, first, last):
            self.name = f"{first} {last}"


    def make(first, last):
        return Person(f"{first} {last}")
"""

V2 = """
    from amberdb import Persistent

    VERSION = "v2"


    class Person(Persistent):
        _p_version = 2

        def __init__(self, first, last):
            self.first = first
            self.last = last

        @classmethod
        def _p_upgrade(cls, state, version):
            UPGRADE
            first, _, last = state.pop("name").partition(" ")
            return {**state, "first": first, "last": last}

        def full(self):
            return f"{self.first} {self.last}"

        def rename(self, first, last):
            self.first, self.last = first, last


    def make(first, last):
        return Person(first, last)
"""
V2_UPGRADING = V2.replace("UPGRADE", "assert version == 0, version")
V2_STRICT = V2.replace("UPGRADE", 'raise RuntimeError(f"step 4: no state of version {version} may be left")')

SETUP = """
    import people
    db = amberdb.DB(amberdb.SQLiteStorage(sys.argv[1]))
    root = db.open().root()
    root["lists"] = amberdb.PersistentMapping({writer: amberdb.PersistentList() for writer in sys.argv[3:]})
    shared = [people.make(f"shared{n}", "initial") for n in range(int(sys.argv[2]))]
    root["shared"] = amberdb.PersistentList(shared)
    transaction.commit()
    db.close()
    out("ready")
"""

WRITER = """
    import people
    path, writer, commits, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    db = amberdb.DB(amberdb.SQLiteStorage(path, lock_timeout=20))
    conn = db.open()
    print("READY", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    acked, retries = [], 0
    for k in range(commits):
        first, last = f"{writer}-{k}", f"L{k}"
        for attempt in transaction.attempts(100):
            with attempt:
                if attempt.number > 1:
                    retries += 1
                root = conn.root()
                root["lists"][writer].append(people.make(first, last))
                shared = root["shared"]
                shared[k % len(shared)].rename(first, "shared")
        acked.append(f"{first} {last}")  # its commit returned
    transaction.begin()  # a snapshot with what the others wrote meanwhile
    root = conn.root()
    seen = {name: [person.full() for person in found] for name, found in root["lists"].items()}
    shared = [person.full() for person in root["shared"]]
    transaction.abort()
    db.close()
    out({"version": people.VERSION, "acked": acked, "seen": seen, "shared": shared, "retries": retries})
"""

EACH = """
    import people
    from amberdb import evolve
    path, go = sys.argv[1], sys.argv[2]
    db = amberdb.DB(amberdb.SQLiteStorage(path, lock_timeout=20))
    print("READY", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)  # the writer is under way
    result = evolve.each(db, "people.Person", evolve.upgrade, batch_size=7)
    db.close()
    out({"version": people.VERSION, "each": int(result), "conflicts": result.conflicts})
"""

READ_ALL = """
    import people
    db = amberdb.DB(amberdb.SQLiteStorage(sys.argv[1]))
    conn = db.open()
    from amberdb.storage.history import iter_current_records
    names = []
    for oid, _tid, record in iter_current_records(db.storage):
        obj = conn.get(oid)
        if isinstance(obj, people.Person):
            names.append(obj.full())
    lists = {name: [person.full() for person in found] for name, found in conn.root()["lists"].items()}
    db.close()
    out({"version": people.VERSION, "people": len(names), "lists": lists})
"""


class Rollout:
    """One module directory per software version, and the database they share."""

    def __init__(self, tmp_path: Path, procs: Processes) -> None:
        self.procs = procs
        self.path = tmp_path / "people.sqlite"
        self.tmp_path = tmp_path
        self.versions: dict[str, Path] = {}
        for version, source in (("v1", V1), ("v15", V15), ("v2", V2_UPGRADING), ("v2strict", V2_STRICT)):
            directory = tmp_path / version
            directory.mkdir()
            write_module(directory, "people", source)
            self.versions[version] = directory
        self.steps = 0

    def step(self, *roles: tuple[str, str]) -> list[dict[str, Any]]:
        """Run ``(version, writer name or "each")`` processes at once; their reports."""
        self.steps += 1
        go = self.tmp_path / f"go-{self.steps}"
        started: list[subprocess.Popen[str]] = []
        for version, role in roles:
            modules = self.versions[version]
            if role == "each":
                started.append(spawn_child(self.procs, modules, EACH, self.path, go))
            else:
                started.append(spawn_child(self.procs, modules, WRITER, self.path, role, COMMITS, go))
        for proc in started:
            wait_ready(proc, timeout=30)
        go.touch()
        return [result_of(proc, timeout=90) for proc in started]


def _check_writers(reports: list[dict[str, Any]], versions: list[str]) -> None:
    """Every writer read every person with its own class and saw its own acked writes."""
    for report, version in zip(reports, versions, strict=True):
        if "acked" not in report:
            continue
        assert report["version"] == version
        writer = report["acked"][0].rpartition("-")[0]
        assert report["seen"][writer] == report["acked"]
        assert all(name.endswith(" shared") or name.endswith(" initial") for name in report["shared"])


def test_four_step_rolling_upgrade(tmp_path: Path, procs: Processes) -> None:
    rollout = Rollout(tmp_path, procs)
    run_child(procs, rollout.versions["v1"], SETUP, rollout.path, SHARED, *WRITERS)
    acked: dict[str, list[str]] = {}

    # 1: v1.5 rolls out next to v1: both write the old form, each reads the other's
    reports = rollout.step(("v1", "s1-v1"), ("v15", "s1-v15"))
    _check_writers(reports, ["v1", "v1.5"])
    # 2: v2 rolls out next to v1.5: v2 writes the new form, v1.5 reads it (and writes the old)
    reports += rollout.step(("v2", "s2-v2"), ("v15", "s2-v15"))
    _check_writers(reports[2:], ["v2", "v1.5"])
    # 3: v1.5 is gone; every stored person is rewritten in the new form while v2 writes
    migration = rollout.step(("v2", "s3-v2"), ("v2", "each"))
    _check_writers(migration, ["v2", "v2"])
    reports += migration[:1]
    assert migration[1]["each"] >= SHARED + 4 * COMMITS  # all that existed when it started, at least
    # 4: only v2, and a v2 that can no longer read the old form
    reports += rollout.step(("v2strict", "s4-v2a"), ("v2strict", "s4-v2b"))
    _check_writers(reports[5:], ["v2", "v2"])

    for report in reports:
        writer = report["acked"][0].rpartition("-")[0]
        acked[writer] = report["acked"]
    assert sorted(acked) == sorted(WRITERS)
    final = run_child(procs, rollout.versions["v2strict"], READ_ALL, rollout.path)
    assert final["people"] == SHARED + len(WRITERS) * COMMITS
    assert final["lists"] == acked  # no acknowledged write was lost

    with amberdb.DB(amberdb.SQLiteStorage(str(rollout.path), read_only=True), read_only=True) as db:
        reader = state_reader(db)
        versions = {}
        for oid, _tid, record in iter_current_records(db.storage):
            header = decode_header(record)
            if header.class_name == "people:Person":
                versions[oid] = reader.state(oid, record, header).get("_p_version")
    assert len(versions) == final["people"]
    assert set(versions.values()) == {2}, "a person is still stored in the old form"
