"""Storage factories: how :mod:`amberdb.testing` makes, reopens and shares a storage's data.

A storage author subclasses :class:`StorageFactory` (or uses one here) and hands the class
to :func:`amberdb.testing.conformance_suite`.  Each test gets a fresh factory with a fresh
temporary directory of its own.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, ClassVar

from amberdb.storage.base import Storage
from amberdb.storage.file import FileStorage, verify
from amberdb.storage.memory import MemoryStorage
from amberdb.testing.doubles import VoteConflictStorage

__all__ = [
    "ClientStorageFactory",
    "FileStorageFactory",
    "MemoryStorageFactory",
    "PostgreSQLHistoryFreeFactory",
    "PostgreSQLStorageFactory",
    "SQLiteHistoryFreeFactory",
    "SQLiteStorageFactory",
    "StorageFactory",
    "VoteConflictFactory",
]


class StorageFactory:
    """Makes the storages one test uses, all on one set of data in ``directory``.

    Subclasses implement :meth:`create`, and where the storage can do it :meth:`reopen`,
    :meth:`open_second` and :meth:`uri`; the suite skips what a storage cannot do.
    """

    durable: ClassVar[bool] = False
    """True when committed data survives closing the storage and the death of its process."""

    keeps_history: ClassVar[bool] = True
    """False for a history-free storage: it keeps only current states, so snapshot reads
    of older revisions, undo and the history suite's checks do not apply."""

    blocking_timeout: ClassVar[float] = 10.0
    """Seconds a call that must not wait (a thread's second ``begin``) may block before the
    test fails saying so, instead of hanging the test run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.opened: list[Storage] = []

    def create(self) -> Storage:
        """A new writable storage on new, empty data."""
        raise NotImplementedError

    def reopen(self) -> Storage:
        """The data :meth:`create` made, opened again after its storage closed or its process died.

        Only for durable storages.
        """
        raise NotImplementedError(f"{type(self).__name__} storages are not durable")

    def open_second(self, first: Storage) -> Storage:
        """Another storage instance on ``first``'s data while ``first`` stays open, as a second
        process would open it (it may be read-only: a follower of ``first``'s commits).

        The default shares ``first`` itself, for storages that live in one process.
        """
        return first

    def uri(self) -> str | None:
        """A URI another process opens the same data with (:func:`amberdb.open_storage`), or None."""
        return None

    def track(self, storage: Storage) -> Storage:
        """Remember ``storage`` so :meth:`cleanup` closes it; returns it."""
        self.opened.append(storage)
        return storage

    def check(self) -> None:
        """Raise if the data is inconsistent (called after each test, every storage closed)."""

    def cleanup(self) -> None:
        """Close every storage this factory made, then :meth:`check` the data."""
        for storage in reversed(self.opened):
            storage.close()
        self.check()


class MemoryStorageFactory(StorageFactory):
    """MemoryStorage: one process, not durable; a second "process" shares the instance."""

    def create(self) -> Storage:
        """A new MemoryStorage."""
        return self.track(MemoryStorage())


class FileStorageFactory(StorageFactory):
    """FileStorage on ``directory/data.fs``; the second instance is a read-only follower."""

    durable = True
    options: ClassVar[dict[str, Any]] = {}

    @property
    def path(self) -> Path:
        """The data file."""
        return self.directory / "data.fs"

    def create(self) -> Storage:
        """A new FileStorage (the file must not exist yet)."""
        if self.path.exists():
            raise FileExistsError(self.path)
        return self.track(FileStorage(self.path, **self.options))

    def reopen(self) -> Storage:
        """The file opened again, writable."""
        return self.track(FileStorage(self.path, **self.options))

    def open_second(self, first: Storage) -> Storage:
        """A read-only FileStorage on the same file: it follows ``first``'s commits."""
        return self.track(FileStorage(self.path, read_only=True))

    def uri(self) -> str | None:
        """The data file's ``file:`` URI (absolute and percent-encoded: a directory named
        with ``#``, ``?`` or ``%`` names the same file)."""
        return self.path.absolute().as_uri()

    def check(self) -> None:
        """``amberdb.storage.file.verify`` finds nothing wrong."""
        if self.path.exists():
            report = verify(self.path)
            if not report.ok or report.notes:
                raise AssertionError(f"{self.path} does not verify: {report}")


class _SharedDataFactory(StorageFactory):
    """A storage that any number of writable instances open on the same data, as processes
    do (the SQL storages): ``reopen`` and ``open_second`` open it again with :meth:`_open`."""

    durable = True
    history: ClassVar[bool] = True

    def _open(self) -> Storage:
        raise NotImplementedError

    def reopen(self) -> Storage:
        """The data opened again."""
        return self._open()

    def open_second(self, first: Storage) -> Storage:
        """Another writable instance on the same data."""
        return self._open()


class SQLiteStorageFactory(_SharedDataFactory):
    """SQLiteStorage on ``directory/data.sqlite``; the second instance is another writable
    storage on the same file, as a second process opens it."""

    @property
    def path(self) -> Path:
        """The database file."""
        return self.directory / "data.sqlite"

    def _open(self) -> Storage:
        from amberdb.storage.sql.sqlite import SQLiteStorage

        return self.track(SQLiteStorage(self.path, history=self.history, lock_timeout=20))

    def create(self) -> Storage:
        """A new SQLiteStorage (the file must not exist yet)."""
        if self.path.exists():
            raise FileExistsError(self.path)
        return self._open()

    def uri(self) -> str | None:
        """``sqlite:///...`` with the history mode."""
        return f"sqlite://{self.path.absolute()}?history={'true' if self.history else 'false'}"


class SQLiteHistoryFreeFactory(SQLiteStorageFactory):
    """SQLiteStorage in history-free mode."""

    history = False
    keeps_history = False


class PostgreSQLStorageFactory(_SharedDataFactory):
    """PostgreSQLStorage in a schema of its own (``search_path``) of the database
    :attr:`base_uri` names; the schema is dropped at cleanup.  Set ``base_uri`` (a
    ``postgresql://`` URI of an existing database) before the suite runs."""

    base_uri: ClassVar[str | None] = None
    _numbers = itertools.count(1)

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        if self.base_uri is None:
            raise RuntimeError("set PostgreSQLStorageFactory.base_uri to a postgresql:// URI first")
        self.schema = f"amberdb_kit_{os.getpid()}_{next(self._numbers)}"
        self._admin(f"CREATE SCHEMA {self.schema}")

    def _admin(self, sql: str) -> None:
        import psycopg

        assert self.base_uri is not None
        with psycopg.connect(self.base_uri, autocommit=True) as conn:
            conn.execute(sql)

    def _uri(self) -> str:
        assert self.base_uri is not None
        joiner = "&" if "?" in self.base_uri else "?"
        return f"{self.base_uri}{joiner}options=-csearch_path%3D{self.schema}"

    def _open(self) -> Storage:
        from amberdb.storage.sql.postgresql import PostgreSQLStorage

        return self.track(PostgreSQLStorage(self._uri(), history=self.history, lock_timeout=20))

    def create(self) -> Storage:
        """A new PostgreSQLStorage in the factory's empty schema."""
        return self._open()

    def uri(self) -> str | None:
        """The ``postgresql://`` URI with the schema and the history mode."""
        return f"{self._uri()}&history={'true' if self.history else 'false'}"

    def cleanup(self) -> None:
        """Close the storages, then drop the schema."""
        try:
            super().cleanup()
        finally:
            self._admin(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


class PostgreSQLHistoryFreeFactory(PostgreSQLStorageFactory):
    """PostgreSQLStorage in history-free mode."""

    history = False
    keeps_history = False


class VoteConflictFactory(StorageFactory):
    """:class:`VoteConflictStorage` over what ``inner`` (another factory class) makes."""

    inner: ClassVar[type[StorageFactory]] = MemoryStorageFactory

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self._inner = self.inner(directory)
        self.durable = self._inner.durable  # type: ignore[misc]

    def create(self) -> Storage:
        """The wrapper over a new inner storage."""
        return self.track(VoteConflictStorage(self._inner.create()))

    def reopen(self) -> Storage:
        """The wrapper over the inner data, reopened."""
        return self.track(VoteConflictStorage(self._inner.reopen()))

    def open_second(self, first: Storage) -> Storage:
        """The wrapper over the inner factory's second instance."""
        assert isinstance(first, VoteConflictStorage)
        second = self._inner.open_second(first.inner)
        return first if second is first.inner else self.track(VoteConflictStorage(second))

    def cleanup(self) -> None:
        """Close the wrappers, then let the inner factory check its data."""
        for storage in reversed(self.opened):
            storage.close()
        self._inner.cleanup()


class ClientStorageFactory(StorageFactory):
    """:class:`~amberdb.ClientStorage` of a :class:`~amberdb.StorageServer` (a thread of this
    process, on 127.0.0.1) serving a FileStorage on ``directory/data.fs``.

    A second instance is another client of the same server; :meth:`reopen` restarts the
    server on the file, as after a crash of everything.
    """

    durable = True
    client_options: ClassVar[dict[str, Any]] = {"timeout": 10.0}

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.server: Any = None
        self.served: FileStorage | None = None
        self.port = 0

    @property
    def path(self) -> Path:
        """The server's data file."""
        return self.directory / "data.fs"

    def _start(self) -> None:
        from amberdb.server import StorageServer

        self.served = FileStorage(self.path)
        # A restarted server keeps its port, so a URI handed out before still names it.
        self.server = StorageServer(self.served, ("127.0.0.1", self.port)).start()
        self.port = self.server.address[1]

    def _stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.served is not None:
            self.served.close()
            self.served = None

    def _client(self) -> Storage:
        from amberdb.server import ClientStorage

        return self.track(ClientStorage(self.server.address, **self.client_options))

    def create(self) -> Storage:
        """A client of a new server on a new file."""
        if self.server is None:
            if self.path.exists():
                raise FileExistsError(self.path)
            self._start()
        return self._client()

    def reopen(self) -> Storage:
        """The server restarted on the file, and a new client of it."""
        self._stop()
        self._start()
        return self._client()

    def open_second(self, first: Storage) -> Storage:
        """Another client of the same server."""
        return self._client()

    def uri(self) -> str | None:
        """``amberdb://127.0.0.1:port`` of the server (started now if it is not running)."""
        if self.server is None:
            if self.path.exists():
                return None
            self._start()
        host, port = self.server.address
        return f"amberdb://{host}:{port}"

    def cleanup(self) -> None:
        """Close the clients, then the server and its file, then verify the file."""
        for storage in reversed(self.opened):
            storage.close()
        self._stop()
        if self.path.exists():
            report = verify(self.path)
            if not report.ok or report.notes:
                raise AssertionError(f"{self.path} does not verify: {report}")
