"""Hostile storage URIs: each fails with a message naming the URI and what is wrong in it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import FileStorage, MemoryStorage, open_storage
from amberdb.exceptions import StorageError
from amberdb.storage import uri as uris
from amberdb.testing import FileStorageFactory

pytestmark = pytest.mark.usefixtures("no_leftover_schemes")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        # Defect: the last of two values won silently -- here a read-only URI opened writable.
        ("read_only=true&read_only=false", r"option 'read_only' is given twice"),
        ("fsync=1&fsync=1", r"option 'fsync' is given twice"),
        # Defect: urllib's "bad query field: 'read_only'" named neither the URI nor the fix.
        ("read_only", r"option 'read_only' has no value.*read_only=true"),
        ("read_only=true&", r"empty option"),
        ("&read_only=true", r"empty option"),
    ],
)
def test_a_bad_query_names_the_uri_and_the_problem(tmp_path: Path, query: str, message: str) -> None:
    target = tmp_path / "data.fs"
    uri = f"file:{target}?{query}"
    with pytest.raises(ValueError, match=message) as info:
        open_storage(uri)
    assert uri in str(info.value)
    with pytest.raises(ValueError, match=message):
        amberdb.DB(uri)
    assert not target.exists()  # refused before anything was opened or created


def test_registering_a_built_in_scheme_is_refused() -> None:
    # Defect: register_scheme("file", opener) returned quietly and then open_storage kept
    # using the built-in opener, never the registered one.
    with pytest.raises(ValueError, match=r"'file' is built in"):
        uris.register_scheme("file", lambda uri, read_only: MemoryStorage())
    with pytest.raises(ValueError, match=r"'memory' is built in"):
        uris.register_scheme("Memory", lambda uri, read_only: MemoryStorage())


@pytest.mark.parametrize("name", ["a #1", "50%41", "what?", "sp ace"])
def test_the_kits_file_uri_names_the_factorys_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # Defect: FileStorageFactory.uri() was f"file://{path}", unquoted: a directory with '#',
    # '?' or '%' in its name gave a URI of another file (or a refused one), and a relative
    # directory one naming a host.
    monkeypatch.chdir(tmp_path)
    for directory in (tmp_path / "absolute" / name, Path("relative") / name):
        directory.mkdir(parents=True)
        factory = FileStorageFactory(directory)
        storage = factory.create()
        db = amberdb.DB(storage)
        tm = transaction.TransactionManager()
        db.open(tm).root()["here"] = True
        tm.commit()
        uri = factory.uri()
        assert uri is not None
        follower = amberdb.DB(uri, read_only=True)
        assert follower.open(transaction.TransactionManager()).root()["here"] is True
        follower.close()
        db.close()


def test_read_only_is_never_dropped_silently(tmp_path: Path) -> None:
    # Defect: DB(..., read_only=True) gave a writable database, and commits went through,
    # when it was handed a writable storage object, None, or a URI whose registered opener
    # ignored read_only: the flag applied only to paths and file: URIs.
    uris.register_scheme("ignores-read-only", lambda uri, read_only: MemoryStorage())
    with pytest.raises(ValueError, match=r"scheme 'ignores-read-only' ignored read_only=True"):
        open_storage("ignores-read-only:", read_only=True)
    with pytest.raises(ValueError, match=r"ignored read_only=True"):
        amberdb.DB("ignores-read-only:", read_only=True)
    with pytest.raises(ValueError, match=r"in-memory database cannot be read-only"):
        amberdb.DB(None, read_only=True)
    writable = MemoryStorage()
    with pytest.raises(ValueError, match=r"read_only=True.*writable storage <MemoryStorage"):
        amberdb.DB(writable, read_only=True)
    assert writable.last_tid() == b"\0" * 8  # refused before anything was written
    # What works: a storage opened read-only, with or without the flag.
    path = tmp_path / "data.fs"
    amberdb.DB(path).close()
    for db in (
        amberdb.DB(FileStorage(path, read_only=True), read_only=True),
        amberdb.DB(path, read_only=True),
    ):
        assert db.read_only
        db.close()


def test_a_memory_uri_with_a_fragment_is_refused_as_a_file_uri_is() -> None:
    # Defect: "memory:#anything" opened a MemoryStorage, the fragment ignored, while a
    # file: URI with one is refused.
    with pytest.raises(ValueError, match=r"memory: URI 'memory:#x' has a fragment"):
        open_storage("memory:#x")


def test_a_uri_naming_a_place_that_cannot_hold_a_database_says_so(tmp_path: Path) -> None:
    # Defects: a path in a missing directory failed naming the writer's lock file
    # (".../nowhere/data.fs.lock"); a device such as /dev/null got an OSError naming no
    # file at all ("[Errno 22] Invalid argument", from fsync), after creating
    # /dev/null.lock beside it.
    missing = tmp_path / "nowhere" / "data.fs"
    with pytest.raises(StorageError, match=r"data.fs: its directory .*nowhere does not exist") as info:
        amberdb.DB(missing.as_uri())
    assert ".lock" not in str(info.value)
    assert not missing.parent.exists()
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    for uri in (fifo.as_uri(), str(tmp_path)):
        with pytest.raises(StorageError, match=r"is not a regular file"):
            open_storage(uri)
        with pytest.raises(StorageError, match=r"is not a regular file"):
            open_storage(uri, read_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-fifo"]  # no lock file beside them
