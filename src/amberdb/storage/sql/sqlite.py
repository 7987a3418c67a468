"""SQLiteStorage: an AmberDB database in one SQLite file, shared by the processes of one machine.

Nothing to run: every process opens the file (``sqlite:///path/to/db.sqlite``).  The tables
are those of :mod:`amberdb.storage.sql.core`; in SQLite::

    CREATE TABLE amberdb_schema (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE amberdb_transaction (tid INTEGER PRIMARY KEY, username BLOB NOT NULL,
                                      description BLOB NOT NULL, extension BLOB NOT NULL);
    CREATE TABLE amberdb_object (zoid INTEGER NOT NULL, tid INTEGER NOT NULL,
                                 state BLOB NOT NULL, refs TEXT,  -- JSON array of oids
                                 PRIMARY KEY (zoid, tid));
    CREATE INDEX amberdb_object_tid ON amberdb_object (tid);
    CREATE TABLE amberdb_oid (next_oid INTEGER NOT NULL);  -- one row: the next free oid

Durability: WAL mode with ``synchronous=FULL``, so a transaction whose ``finish`` returned is
on disk, as with FileStorage (``NORMAL`` -- RelStorage's choice -- may lose the last commits
on power loss).  The WAL is checkpointed automatically and cut back to
``journal_size_limit`` after a commit that finds it bigger than that, so it does not grow
without bound while readers come and go.

The commit lock.  SQLite's own write lock is taken by polling with sleeps, which starves
some of several busy writers.  Writers here first take an ``flock`` on ``path +
".commit-lock"`` -- a blocking kernel lock, so a waiter is woken when it is released instead
of sleeping past its turn -- and only then ``BEGIN IMMEDIATE``, held from vote to finish.
A wait longer than ``lock_timeout`` seconds raises TransientStorageError.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Collection
from typing import Any
from urllib.parse import quote

from amberdb.exceptions import StorageError, TransientStorageError
from amberdb.storage.forks import GENERATION
from amberdb.storage.sql.core import SQLStorage, seconds, split_uri_options, storage_options
from amberdb.storage.uri import local_file

__all__ = ["SQLiteStorage", "open_sqlite_uri"]

_WAL_LIMIT = 64 << 20
_URI_OPTIONS = ("history", "read_only", "cache_size", "cache_path", "read_ahead", "lock_timeout")


class SQLiteStorage(SQLStorage):
    """An AmberDB storage in a SQLite database file (WAL mode, ``synchronous=FULL``).

    ``history`` keeps every revision (undo, historical connections); False keeps only
    current states.  ``cache_size`` bounds the records cache shared by this storage's
    connections (bytes); ``cache_path`` keeps it in a file between runs.  ``read_ahead``: a
    miss on one of the objects a just-read record refers to reads that many of them in one
    query (0: off).  ``lock_timeout``
    bounds every wait for another process's lock (seconds).
    """

    kind = "SQLite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        history: bool = True,
        read_only: bool = False,
        cache_size: int = 64 << 20,
        cache_path: str | os.PathLike[str] | None = None,
        read_ahead: int = 256,
        lock_timeout: float = 30.0,
    ) -> None:
        timeout = seconds(lock_timeout, "lock_timeout")  # before anything is opened
        self._path = os.path.abspath(os.fspath(path))
        super().__init__(
            name=self._path,
            history=history,
            read_only=read_only,
            cache_size=cache_size,
            cache_path=cache_path,
            read_ahead=read_ahead,
        )
        self.lock_timeout = timeout
        if read_only and not os.path.exists(self._path):
            raise FileNotFoundError(f"no SQLite database at {self._path} (a read-only storage creates none)")
        self._lock_fd = -1
        self._held_fd = -1  # the descriptor holding the commit lock now (-1: none)
        self._flock_mutex = threading.Lock()
        self._poll_conn: Any = None
        self._file_id: tuple[int, int] | None = None
        self._data_version: int | None = None
        if not read_only:
            self._lock_fd = os.open(self._path + ".commit-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._open()

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    # -- dialect ----------------------------------------------------------------------------------

    def _connect(self, write: bool) -> Any:
        if self._read_only:
            conn = sqlite3.connect(
                f"file:{quote(self._path)}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=self.lock_timeout,
            )
        else:
            conn = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=self.lock_timeout
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _sql(self, text: str) -> str:
        return text.replace("%s", "?")

    def _ids(self, ids: list[int]) -> tuple[str, Any]:
        return "IN (SELECT value FROM json_each(?))", json.dumps(ids)

    def _refs_value(self, refs: list[int] | None) -> Any:
        return None if refs is None else json.dumps(refs)

    def _unnest_refs(self) -> tuple[str, str]:
        # Only a JSON array is walked (anything else is refused by _unreadable_refs).
        valid = "CASE WHEN json_valid(s.refs) THEN CASE WHEN json_type(s.refs) = 'array' THEN s.refs END END"
        return f"json_each(coalesce({valid}, '[]')) AS r", "r.value"

    def _unreadable_refs(self) -> str:
        return (
            "(s.refs IS NULL OR NOT json_valid(s.refs) OR json_type(s.refs) != 'array'"
            " OR EXISTS (SELECT 1 FROM json_each(s.refs) e WHERE e.type != 'integer'))"
        )

    def _newest_rows_sql(self, ids_fragment: str) -> str:
        # SQLite returns the other columns of the row that max() picked.
        return (
            f"SELECT zoid, max(tid), state FROM amberdb_object WHERE zoid {ids_fragment} AND tid <= %s"
            " GROUP BY zoid"
        )

    def _check_file(self) -> None:
        """StorageError when the file at the path is no longer the one this storage opened
        (a backup restored under its name): its readers would see the old file and its
        commits would go into a deleted one."""
        try:
            found = os.stat(self._path)
        except FileNotFoundError:
            raise StorageError(
                f"{self._name}: the database file was removed; open the storage again"
            ) from None
        identity = (found.st_dev, found.st_ino)
        if self._file_id is None:
            self._file_id = identity
        elif identity != self._file_id:
            raise StorageError(
                f"{self._name}: the database file was replaced since this storage opened it (a restore?):"
                " open the storage again"
            )

    def _begin_write(self, conn: Any) -> None:
        self._check_file()
        self._take_commit_lock()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release_commit_lock()
            raise

    def _end_write(self, conn: Any, commit: bool) -> None:
        try:
            conn.execute("COMMIT" if commit else "ROLLBACK")
        finally:
            self._release_commit_lock()

    def _take_commit_lock(self) -> None:
        if not self._flock_mutex.acquire(timeout=self.lock_timeout):
            raise TransientStorageError(
                f"{self._name}: another thread of this process held the commit lock for more than"
                f" {self.lock_timeout:g} s"
            )
        try:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held_fd = self._lock_fd
                return
            except BlockingIOError:
                pass
            self._held_fd = self._wait_for_flock()
        except BaseException:
            self._flock_mutex.release()
            raise

    def _wait_for_flock(self) -> int:
        """A descriptor of the lock file holding the lock, within ``lock_timeout``.

        A blocking flock has no timeout, so it waits in a helper thread, on a descriptor of
        its own: when the wait is given up, the helper closes that descriptor (releasing the
        lock if it got it) and never touches the storage's, which a later commit may hold or
        close() may have closed.
        """
        fd = os.open(self._path + ".commit-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        state = {"got": False, "abandoned": False}
        done = threading.Event()
        guard = threading.Lock()

        def wait() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                with guard:
                    state["abandoned"] = True
                os.close(fd)
                done.set()
                return
            with guard:
                if not state["abandoned"]:
                    state["got"] = True
                    done.set()
                    return
            os.close(fd)  # given up meanwhile: closing releases the lock

        threading.Thread(target=wait, name="amberdb-sqlite-commit-lock", daemon=True).start()
        done.wait(self.lock_timeout)
        with guard:
            if state["got"]:
                return fd
            state["abandoned"] = True
        raise TransientStorageError(
            f"{self._name}: another process held the commit lock for more than {self.lock_timeout:g} s"
        )

    def _release_commit_lock(self) -> None:
        fd, self._held_fd = self._held_fd, -1
        try:
            if fd == self._lock_fd:
                fcntl.flock(fd, fcntl.LOCK_UN)
            elif fd >= 0:
                os.close(fd)  # a waiter's own descriptor: closing it releases the lock
        finally:
            self._flock_mutex.release()

    def _create_schema(self, cursor: Any) -> None:
        for statement in (
            "CREATE TABLE amberdb_schema (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE amberdb_transaction (tid INTEGER PRIMARY KEY, username BLOB NOT NULL,"
            " description BLOB NOT NULL, extension BLOB NOT NULL)",
            "CREATE TABLE amberdb_object (zoid INTEGER NOT NULL, tid INTEGER NOT NULL, state BLOB NOT NULL,"
            " refs TEXT, PRIMARY KEY (zoid, tid))",
            "CREATE INDEX amberdb_object_tid ON amberdb_object (tid)",
            "CREATE TABLE amberdb_oid (next_oid INTEGER NOT NULL)",
        ):
            cursor.execute(statement)
        cursor.execute("INSERT INTO amberdb_oid (next_oid) VALUES (?)", (-(1 << 63) + 1,))

    def _has_schema(self, cursor: Any) -> bool:
        cursor.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'amberdb_schema'")
        return bool(cursor.fetchall()[0][0])

    def _is_busy(self, exc: BaseException) -> bool:
        text = str(exc).lower()
        return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    # -- polling ----------------------------------------------------------------------------------

    def _poll(self, since: bytes) -> tuple[bytes, Collection[bytes] | None]:
        # SQLite's change counter: PRAGMA data_version on one connection changes whenever
        # another connection (this storage's writer included) commits.  Unchanged since the
        # last poll, and asked from the newest tid, nothing can have changed: no query.
        with self._poll_lock:
            self._check_open()
            self._check_file()
            try:
                if self._poll_conn is None:
                    self._poll_conn = self._connect(False)
                version = self._poll_conn.execute("PRAGMA data_version").fetchall()[0][0]
            except sqlite3.Error as exc:
                raise self._translate(exc, "polling for changes") from exc
            if version == self._data_version and since == self._newest:
                return self._newest, ()
            result = super()._poll(since)
            self._data_version = version
            return result

    # -- upkeep -----------------------------------------------------------------------------------

    def finish(self) -> bytes:
        """Commit the voted transaction; then cut the WAL back if it grew past its limit."""
        tid = super().finish()
        try:
            if os.path.getsize(self._path + "-wal") > 2 * _WAL_LIMIT:
                # On a connection of its own: the writer's may already be another thread's.
                self._read(
                    lambda cursor: cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall(),
                    "checkpointing the WAL",
                )
        except (OSError, StorageError):
            pass  # the automatic checkpoints go on; the commit stands
        return tid

    def close(self) -> None:
        """Close every connection and the commit-lock file; save the cache file."""
        poll_conn, self._poll_conn = self._poll_conn, None
        if poll_conn is not None and self._process == GENERATION.value:
            poll_conn.close()
        super().close()
        # (In a forked child the descriptor is the child's own copy: closing it is safe; the
        # flock is shared with the parent's description and is left alone.)
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)


def open_sqlite_uri(uri: str, read_only: bool) -> SQLiteStorage:
    """Open ``sqlite:///abs/path.sqlite`` or ``sqlite:relative.sqlite`` (options: history,
    read_only, cache_size, cache_path, lock_timeout)."""
    path, query = local_file(uri)
    ours, _, _ = split_uri_options(repr(uri), query, _URI_OPTIONS)
    kwargs = storage_options(repr(uri), ours)
    if read_only:
        kwargs["read_only"] = True
    return SQLiteStorage(path, **kwargs)
