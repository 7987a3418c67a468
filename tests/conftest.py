"""Fixtures shared by the object-level tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.storage import uri as uris
from amberdb.storage.base import Storage
from amberdb.storage.file import FileStorage
from amberdb.storage.memory import MemoryStorage
from amberdb.testing import VoteConflictStorage
from tests.server.procs import Processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Start child processes with this; whatever still runs at the end of the test is killed."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.cleanup()


@pytest.fixture(autouse=True)
def _fresh_thread_transaction() -> Iterator[None]:
    """Each test starts and ends with no transaction in progress on this thread."""
    transaction.abort()
    yield
    transaction.abort()


def _open_storage(kind: str, directory: Path) -> Storage:
    if kind == "memory":
        return MemoryStorage()
    if kind == "file":
        return FileStorage(directory / "data.fs")
    return VoteConflictStorage(MemoryStorage())


@pytest.fixture(params=["memory", "file", "vote-conflicts"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[amberdb.DB]:
    """A database on each kind of storage: the object layer works the same on all of them.

    ``vote-conflicts`` finds conflicts only at vote and locks only there, as a remote
    storage may (amberdb.testing.VoteConflictStorage).
    """
    database = amberdb.DB(_open_storage(request.param, tmp_path))
    yield database
    database.close()


@pytest.fixture
def conn(db: amberdb.DB) -> Iterator[amberdb.Connection]:
    """A connection to the database, on the thread's transaction manager."""
    connection = db.open()
    yield connection
    transaction.abort()
    connection.close()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """Path of a not-yet-existing database file."""
    return str(tmp_path / "data.fs")


@pytest.fixture
def no_leftover_schemes() -> Iterator[None]:
    """Storage URI schemes a test registers are forgotten after it."""
    before = dict(uris._registered)
    yield
    uris._registered.clear()
    uris._registered.update(before)
