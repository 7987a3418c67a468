"""Fixtures shared by the object-level tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction


@pytest.fixture(autouse=True)
def _fresh_thread_transaction() -> Iterator[None]:
    """Each test starts and ends with no transaction in progress on this thread."""
    transaction.abort()
    yield
    transaction.abort()


@pytest.fixture
def db() -> Iterator[amberdb.DB]:
    """An in-memory database."""
    database = amberdb.DB(None)
    yield database
    database.close()


@pytest.fixture
def conn(db: amberdb.DB) -> Iterator[amberdb.Connection]:
    """A connection to the in-memory database, on the thread's transaction manager."""
    connection = db.open()
    yield connection
    transaction.abort()
    connection.close()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """Path of a not-yet-existing database file."""
    return str(tmp_path / "data.fs")
