"""Class renames: ``db.rename_class`` recorded in the database, ``DB(class_aliases=...)`` for
one process, and the ``amberdb rename-class --rewrite`` command when it exists."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import amberdb
from amberdb.record import decode_header
from amberdb.rename import record_globals
from amberdb.storage.history import iter_current_records
from tests.evolve.helpers import delete_module, result_of, run_child, spawn_child, wait_ready, write_module
from tests.server.procs import Processes

LIBRARY = """
    from amberdb import Persistent


    class Book(Persistent):
        def __init__(self, title, pages):
            self.title = title
            self.pages = pages
"""

CATALOG = """
    from amberdb import Persistent


    class Publication(Persistent):
        def __init__(self, title, pages):
            self.title = title
            self.pages = pages

        def label(self):
            return f"{self.title} ({self.pages} pages)"
"""

STORE = """
    import library
    for path, rename in ((sys.argv[1], True), (sys.argv[2], False)):
        db = amberdb.DB(amberdb.SQLiteStorage(path))
        conn = db.open()
        conn.root()["books"] = amberdb.PersistentList([library.Book("Dune", 412), library.Book("Emma", 474)])
        transaction.commit()
        if rename:
            db.rename_class("library.Book", "catalog.Publication")
        db.close()
    out("stored")
"""

LOAD = """
    import catalog  # the application imports its classes
    aliases = json.loads(sys.argv[2])
    db = amberdb.DB(amberdb.SQLiteStorage(sys.argv[1]), class_aliases=aliases or None)
    conn = db.open()
    books = conn.root()["books"]
    seen = [[type(b).__module__, type(b).__name__, isinstance(b, amberdb.Broken), b.label()] for b in books]
    books[0].pages += 1  # writes the record under the new name
    transaction.commit()
    out({"seen": seen, "oid": books[0]._p_oid.hex(), "library_imported": "library" in sys.modules})
    db.close()
"""

EXPECTED = [
    ["catalog", "Publication", False, "Dune (412 pages)"],
    ["catalog", "Publication", False, "Emma (474 pages)"],
]


def test_rename_recorded_in_the_database_and_rename_for_one_process(tmp_path: Path, procs: Processes) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    renamed, unrenamed = tmp_path / "renamed.sqlite", tmp_path / "unrenamed.sqlite"
    write_module(modules, "library", LIBRARY)
    run_child(procs, modules, STORE, renamed, unrenamed)
    delete_module(modules, "library")
    write_module(modules, "catalog", CATALOG)

    # process B: the rename recorded by process A applies, nothing given to DB()
    seen = run_child(procs, modules, LOAD, renamed, "{}")
    assert seen["seen"] == EXPECTED
    assert seen["library_imported"] is False
    # one process's alias, the database knowing of no rename
    aliased = run_child(procs, modules, LOAD, unrenamed, '{"library.Book": "catalog.Publication"}')
    assert aliased["seen"] == EXPECTED

    for path, result in ((renamed, seen), (unrenamed, aliased)):
        storage = amberdb.SQLiteStorage(str(path))
        try:
            record = storage.load(bytes.fromhex(result["oid"]))[0]
            assert decode_header(record).class_name == "catalog:Publication"
        finally:
            storage.close()
    # without the alias, the database that recorded no rename has broken books
    broken = run_child(
        procs,
        modules,
        """
        db = amberdb.DB(amberdb.SQLiteStorage(sys.argv[1]))
        books = db.open().root()["books"]
        out([type(books[1]).__name__, isinstance(books[1], amberdb.Broken), type(books[1]).__module__])
        db.close()
        """,
        unrenamed,
    )
    assert broken == ["Book", True, "library"]


WAITING_READER = """
    import catalog
    db = amberdb.DB(amberdb.SQLiteStorage(sys.argv[1]))
    conn = db.open()
    first = conn.root()["books"][0]
    before = [type(first).__module__, isinstance(first, amberdb.Broken)]
    transaction.abort()
    print("READY", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.02)
    transaction.begin()  # its next transaction
    book = conn.root()["books"][0]
    fresh = db.open(transaction.TransactionManager()).root()["books"][1]
    fresh_title = fresh.title
    out({"before": before, "after": [type(book).__module__, isinstance(book, amberdb.Broken), book.title],
         "other_connection": [type(fresh).__module__, isinstance(fresh, amberdb.Broken), fresh_title]})
    db.close()
"""

STORE_ONE = """
    import library
    db = amberdb.DB(amberdb.SQLiteStorage(sys.argv[1]))
    db.open().root()["books"] = amberdb.PersistentList([library.Book("Dune", 412), library.Book("Emma", 474)])
    transaction.commit()
    out("stored")
"""

RENAME = """
    db = amberdb.DB(amberdb.SQLiteStorage(sys.argv[1]))
    db.rename_class("library.Book", "catalog.Publication")
    db.close()
    out("renamed")
"""


@pytest.fixture(scope="module")
def rename_seen_by_a_running_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A process that loaded broken books, then (after another process recorded the rename)
    loads them again in its next transaction: what it saw."""
    tmp_path = tmp_path_factory.mktemp("running")
    procs = Processes(tmp_path)
    try:
        modules = tmp_path / "modules"
        modules.mkdir()
        path = tmp_path / "data.sqlite"
        write_module(modules, "library", LIBRARY)
        run_child(procs, modules, STORE_ONE, path)
        delete_module(modules, "library")
        write_module(modules, "catalog", CATALOG)
        go = tmp_path / "go"
        reader = spawn_child(procs, modules, WAITING_READER, path, go)
        wait_ready(reader, timeout=30)
        run_child(procs, modules, RENAME, path)
        go.touch()
        yield result_of(reader)
    finally:
        procs.cleanup()


def test_a_running_process_sees_a_rename_in_its_next_transaction(
    rename_seen_by_a_running_process: dict[str, Any],
) -> None:
    result = rename_seen_by_a_running_process
    assert result["before"] == ["library", True]
    assert result["other_connection"] == ["catalog", False, "Emma"]


def test_a_running_connection_reloads_its_broken_objects_after_a_rename(
    rename_seen_by_a_running_process: dict[str, Any],
) -> None:
    assert rename_seen_by_a_running_process["after"] == ["catalog", False, "Dune"]


def _records_naming(path: Path, name: str) -> list[str]:
    """The oids (hex) of the current records naming class ``name`` anywhere (header or pickle)."""
    storage = amberdb.SQLiteStorage(str(path))
    try:
        return [
            oid.hex() for oid, _tid, record in iter_current_records(storage) if name in record_globals(record)
        ]
    finally:
        storage.close()


def test_cli_rename_class_rewrite_leaves_no_record_naming_the_old_class(
    tmp_path: Path, procs: Processes
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    path = tmp_path / "data.sqlite"
    write_module(modules, "library", LIBRARY)
    run_child(
        procs,
        modules,
        """
        import library
        db = amberdb.DB(amberdb.SQLiteStorage(sys.argv[1]))
        books = amberdb.PersistentList([library.Book(f"t{i}", i) for i in range(50)])
        root = db.open().root()
        root["books"] = books
        root["kinds"] = amberdb.PersistentMapping(book=library.Book)  # the class as a value
        transaction.commit()
        out("stored")
        """,
        path,
    )
    assert len(_records_naming(path, "library:Book")) == 52  # the books, the list, the mapping
    delete_module(modules, "library")
    write_module(modules, "catalog", CATALOG)
    done = procs.cli("rename-class", f"sqlite://{path}", "library.Book", "catalog.Publication", "--rewrite")
    assert done.returncode == 0, done.stderr
    assert _records_naming(path, "library:Book") == []
    loaded = run_child(
        procs,
        modules,
        """
        import catalog
        db = amberdb.DB(amberdb.SQLiteStorage(sys.argv[1]))
        root = db.open().root()
        books = root["books"]
        out([[isinstance(b, catalog.Publication) for b in books].count(True), books[7].label(),
             root["kinds"]["book"] is catalog.Publication])
        db.close()
        """,
        path,
    )
    assert loaded == [50, "t7 (7 pages)", True]
