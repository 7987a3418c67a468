"""Class renames recorded in the database, aliases per process, and the evolution commands."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.metadata import DatabaseMetadata
from amberdb.rename import record_globals
from amberdb.storage.history import iter_current_records

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def _run(directory: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=directory,
        env={"PYTHONPATH": f"{SRC}:{directory}", "PATH": "/usr/bin:/bin"},
    )


def _cli(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amberdb", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=directory,
        env={"PYTHONPATH": f"{SRC}:{directory}", "PATH": "/usr/bin:/bin"},
    )


LIBRARY = """
    from amberdb import Persistent
    class Book(Persistent):
        def __init__(self, title):
            self.title = title
    class Note:
        def __init__(self, text):
            self.text = text
"""
CATALOG = """
    from amberdb import Persistent
    class Publication(Persistent):
        def __init__(self, title):
            self.title = title
    class Remark:
        def __init__(self, text):
            self.text = text
"""
STORE = """
    import sys, amberdb, amberdb.transaction as transaction
    from library import Book, Note
    db = amberdb.DB(sys.argv[1], allowed_modules=["library", "catalog"])
    conn = db.open()
    conn.root()["books"] = amberdb.PersistentList([Book(f"b{i}") for i in range(30)])
    conn.root()["notes"] = amberdb.PersistentMapping({"n": Note("hello"), "kind": Book})
    transaction.commit()
    db.close()
"""


def test_rename_recorded_in_one_process_is_seen_by_another_after_the_old_module_is_gone(
    tmp_path: Path,
) -> None:
    data = str(tmp_path / "data.fs")
    _write_module(tmp_path, "library", LIBRARY)
    assert _run(tmp_path, STORE, data).returncode == 0
    renamed = _run(
        tmp_path,
        """
        import sys, amberdb
        db = amberdb.DB(sys.argv[1])
        db.rename_class("library.Book", "catalog.Publication")
        print(db.class_aliases)
        db.close()
        """,
        data,
    )
    assert renamed.returncode == 0, renamed.stderr
    (tmp_path / "library.py").unlink()
    _write_module(tmp_path, "catalog", CATALOG)
    loaded = _run(
        tmp_path,
        """
        import sys, amberdb
        db = amberdb.DB(sys.argv[1], allowed_modules=["catalog"])
        books = db.open().root()["books"]
        print(type(books[0]).__module__, type(books[0]).__qualname__, books[0].title, len(books))
        print(isinstance(db.open().root()["notes"]["n"], amberdb.Broken))
        """,
        data,
    )
    assert loaded.returncode == 0, loaded.stderr
    lines = loaded.stdout.split("\n")
    assert lines[0] == "catalog Publication b0 30"
    assert lines[1] == "True"  # library.Note was not renamed: broken, not lost


def test_rename_is_seen_by_another_database_from_its_next_transaction(tmp_path: Path) -> None:
    storage = amberdb.MemoryStorage()
    writer = amberdb.DB(storage)
    reader = amberdb.DB(storage)
    conn = reader.open(transaction.TransactionManager())
    assert reader.class_aliases == {}
    writer.rename_class("library.Book", "catalog.Publication")
    conn.transaction_manager.begin()
    assert reader.class_aliases == {"library:Book": "catalog:Publication"}
    with pytest.raises(ValueError, match="circle"):
        writer.rename_class("catalog.Publication", "library.Book")
    with pytest.raises(ValueError, match="same"):
        writer.rename_class("a.B", "a:B")
    with pytest.raises(ValueError, match="not a class name"):
        writer.rename_class("nodots", "a.B")
    writer.drop_class_alias("library.Book")
    conn.transaction_manager.begin()
    assert reader.class_aliases == {}
    assert isinstance(getattr(conn.root(), "_amberdb_metadata"), DatabaseMetadata)  # noqa: B009
    assert list(conn.root().keys()) == []  # the root's mapping stays the application's
    conn.close()
    reader.close()


def test_process_aliases_and_their_priority(tmp_path: Path) -> None:
    class Publication(amberdb.Persistent):
        pass

    storage = amberdb.MemoryStorage()
    db = amberdb.DB(storage, class_aliases={"library.Book": Publication})
    resolver = db.class_resolver
    assert resolver.persistent_class("library:Book") is Publication
    assert resolver.names_for(amberdb.persistent.class_name(Publication)) == {
        amberdb.persistent.class_name(Publication),
        "library:Book",
    }
    db.rename_class("library.Book", "elsewhere.Other")  # recorded, but this process's own wins
    assert resolver.persistent_class("library:Book") is Publication


def test_concurrent_renames_of_different_classes_merge(tmp_path: Path) -> None:
    storage = amberdb.MemoryStorage()
    db = amberdb.DB(storage)
    db.rename_class("seed.A", "seed.B")  # the metadata object exists
    first = transaction.TransactionManager()
    second = transaction.TransactionManager()
    one, two = db.open(first), db.open(second)
    first.begin()
    second.begin()
    from amberdb.metadata import metadata_for_update

    metadata_for_update(one).update_section("class_aliases", "x:One", "y:One")
    metadata_for_update(two).update_section("class_aliases", "x:Two", "y:Two")
    first.commit()
    second.commit()  # merged key by key
    third = transaction.TransactionManager()
    three = db.open(third)
    third.begin()
    assert metadata_for_update(three).section("class_aliases") == {
        "seed:A": "seed:B",
        "x:One": "y:One",
        "x:Two": "y:Two",
    }
    third.abort()
    # the same key twice conflicts, even to one value
    first.begin()
    second.begin()
    metadata_for_update(one).update_section("generations", "app", 1)
    metadata_for_update(two).update_section("generations", "app", 1)
    first.commit()
    with pytest.raises(amberdb.ConflictError):
        second.commit()
    second.abort()


def test_cli_rename_class_rewrite_leaves_no_record_naming_the_old_class(tmp_path: Path) -> None:
    data = str(tmp_path / "data.fs")
    _write_module(tmp_path, "library", LIBRARY)
    assert _run(tmp_path, STORE, data).returncode == 0
    done = _cli(tmp_path, "rename-class", data, "library.Book", "catalog.Publication", "--rewrite", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rewritten"] >= 31  # 30 books, the list naming them, the mapping holding the class
    done = _cli(tmp_path, "rename-class", data, "library.Note", "catalog.Remark", "--rewrite", "--json")
    assert done.returncode == 0, done.stderr
    with amberdb.DB(data, read_only=True) as db:
        for _oid, _tid, record in iter_current_records(db.storage):
            assert not {"library:Book", "library:Note"} & record_globals(record)
    (tmp_path / "library.py").unlink()
    _write_module(tmp_path, "catalog", CATALOG)
    # a database without the recorded renames (dropped) still loads everything
    with amberdb.DB(data, allowed_modules=["catalog"]) as db:
        db.drop_class_alias("library.Book")
        db.drop_class_alias("library.Note")
    with amberdb.DB(data, allowed_modules=["catalog"]) as db:
        root = db.open().root()
        assert type(root["books"][3]).__name__ == "Publication" and root["books"][3].title == "b3"
        assert type(root["notes"]["n"]).__name__ == "Remark" and root["notes"]["n"].text == "hello"
        assert root["notes"]["kind"].__name__ == "Publication"
    again = _cli(tmp_path, "rename-class", data, "library.Book", "catalog.Publication", "--rewrite", "--json")
    assert json.loads(again.stdout)["rewritten"] == 0  # nothing left: running it again is harmless


def test_cli_info_lists_missing_classes_and_verify_warns(tmp_path: Path) -> None:
    data = str(tmp_path / "data.fs")
    _write_module(tmp_path, "library", LIBRARY)
    assert _run(tmp_path, STORE, data).returncode == 0
    (tmp_path / "library.py").unlink()
    info = _cli(tmp_path, "info", data, "--json")
    assert info.returncode == 0, info.stderr
    missing = json.loads(info.stdout)["missing_classes"]
    assert missing["library:Book"]["count"] >= 30 and "library:Note" in missing
    text = _cli(tmp_path, "info", data)
    assert "missing classes" in text.stdout and "library:Book" in text.stdout
    verify = _cli(tmp_path, "verify", data)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "warning:" in verify.stdout and "library.Book" in verify.stdout
    _write_module(tmp_path, "library", LIBRARY)
    assert json.loads(_cli(tmp_path, "info", data, "--json").stdout)["missing_classes"] == {}


def test_cli_evolve_runs_a_schema(tmp_path: Path) -> None:
    data = str(tmp_path / "data.fs")
    _write_module(tmp_path, "library", LIBRARY)
    assert _run(tmp_path, STORE, data).returncode == 0
    _write_module(
        tmp_path,
        "library_evolve",
        """
        from amberdb import evolve

        def add_isbn(conn):
            for book in conn.root()["books"]:
                book.isbn = "isbn-" + book.title

        def count(conn):
            conn.root()["evolved"] = len(conn.root()["books"])

        schema = evolve.Schema("library", steps={1: add_isbn, 2: count}, minimum=1)
        """,
    )
    dry = _cli(tmp_path, "evolve", data, "library_evolve:schema", "--dry-run", "--allow", "library", "--json")
    assert dry.returncode == 0, dry.stderr
    report: dict[str, Any] = json.loads(dry.stdout)
    assert report["generation_after"] == 0 and report["generations"] == [1, 2]
    assert report["changed"]["1"] == {"library.Book": 30}
    done = _cli(tmp_path, "evolve", data, "library_evolve:schema", "--allow", "library")
    assert done.returncode == 0, done.stderr
    assert "generation 0 -> 2" in done.stdout
    again = _cli(tmp_path, "evolve", data, "library_evolve:schema", "--allow", "library", "--json")
    assert json.loads(again.stdout)["generations"] == []
    bad = _cli(tmp_path, "evolve", data, "library_evolve:nothing")
    assert bad.returncode == 2 and "not an amberdb.evolve.Schema" in bad.stderr
    _write_module(tmp_path, "raising_evolve", "raise RuntimeError('boom at import')\n")
    bad = _cli(tmp_path, "evolve", data, "raising_evolve:schema")
    assert bad.returncode == 2 and "RuntimeError: boom at import" in bad.stderr
    bad = _cli(tmp_path, "evolve", data, "no_such_module:schema")
    assert bad.returncode == 2 and "cannot import no_such_module" in bad.stderr
