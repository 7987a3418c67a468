"""PostgreSQLStorage: an AmberDB database in PostgreSQL tables, through psycopg 3.

Needs ``pip install amberdb[postgresql]``.  The tables are those of
:mod:`amberdb.storage.sql.core`; in PostgreSQL::

    CREATE TABLE amberdb_schema (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE amberdb_transaction (tid BIGINT PRIMARY KEY, username BYTEA NOT NULL,
                                      description BYTEA NOT NULL, extension BYTEA NOT NULL);
    CREATE TABLE amberdb_object (zoid BIGINT NOT NULL, tid BIGINT NOT NULL, state BYTEA NOT NULL,
                                 refs BIGINT[], PRIMARY KEY (zoid, tid));
    CREATE INDEX amberdb_object_tid ON amberdb_object (tid);
    CREATE TABLE amberdb_oid (next_oid BIGINT NOT NULL);

The tables live in the connection's current schema (``search_path``), so one PostgreSQL
database can hold several AmberDB databases.  The commit lock is a transaction-level advisory
lock (``pg_advisory_xact_lock``, keyed by the tables' identity) taken at vote and released by the
COMMIT of finish.  PostgreSQL makes a commit visible only after its WAL record is flushed and
releases the transaction's locks after that, so the next committer
reads ``max(tid)`` only once this commit is visible: tid order is visibility order, at one
commit per WAL flush for the whole database -- RelStorage's rule, kept (its attempt to let
go earlier made rows visible out of order).

Sessions: every read runs in autocommit mode (one statement, one snapshot), so a session is
``idle`` between transactions, never ``idle in transaction``; the writer is in a
transaction only from vote to finish, and ``idle_in_transaction_session_timeout`` (60 s by
default) ends one an application left hanging there.

Read replicas (``replicas=`` DSNs, ``?replica=`` in a URI) serve loads.  Polls, commits and
conflict checks go to the primary.  A load goes to a replica only once the replica has
replayed the newest tid this storage has seen (polled or committed), so no connection reads
older data than it already knew; a replica that lags more than ``replica_timeout`` seconds
behind, or fails, is passed over for the primary (a failed one for 30 s).

DSNs are passed to libpq as given; :attr:`PostgreSQLStorage.name` and every message show
them without their password.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from amberdb.storage.sql.core import (
    SMALL_TRANSACTION,
    SQLStorage,
    seconds,
    split_uri_options,
    storage_options,
    to_sql,
)

__all__ = ["PostgreSQLStorage", "open_postgresql_uri", "safe_dsn"]

T = TypeVar("T")

_LOCK_KEY = 0x616D6265  # "ambe": with the schema's hash, the advisory lock every committer takes
_REPLICA_RETRY = 30.0
# The lock is keyed by the amberdb_transaction table this session's search_path finds (or,
# before the tables exist, by the schema they go into): every committer reaching the same
# tables takes the same lock, and several AmberDB databases can share one PostgreSQL database.
_LOCK_SQL = (
    "SELECT pg_advisory_xact_lock(%s, hashtext(coalesce(to_regclass('amberdb_transaction')::oid::text,"
    " current_schema())))"
)
_URI_OPTIONS = (
    "history",
    "read_only",
    "cache_size",
    "cache_path",
    "read_ahead",
    "lock_timeout",
    "replica_timeout",
)


def _psycopg() -> Any:
    """The psycopg module, imported at first use (it takes a few hundred ms to import)."""
    try:
        import psycopg
        import psycopg.conninfo
        import psycopg.errors
    except ImportError:
        raise ImportError("PostgreSQLStorage needs psycopg 3: pip install 'amberdb[postgresql]'") from None
    return psycopg


def safe_dsn(dsn: str) -> str:
    """``dsn`` as ``postgresql://user@host:port/dbname``, without password or other secrets."""
    pg = _psycopg()
    try:
        params = pg.conninfo.conninfo_to_dict(dsn)
    except pg.ProgrammingError:
        return "postgresql://(unparsable DSN)"
    user = params.get("user") or ""
    host = params.get("host") or params.get("hostaddr") or ""
    port = params.get("port")
    where = f"{host}:{port}" if port else str(host)
    if where.startswith("/"):
        where = f"[{where}]"
    return f"postgresql://{quote(str(user)) + '@' if user else ''}{where}/{params.get('dbname') or ''}"


class PostgreSQLStorage(SQLStorage):
    """An AmberDB storage in a PostgreSQL database.

    ``dsn`` is a libpq connection string or URI.  ``history`` keeps every revision (undo,
    historical connections); False keeps only current states.  ``replicas`` are DSNs of hot
    standbys that serve loads.  ``cache_size`` bounds the records cache shared by this
    storage's connections (bytes); ``cache_path`` keeps it in a file between runs.
    ``read_ahead``: a miss on one of the objects a just-read record refers to reads that
    many of them in one query (0: off).
    ``lock_timeout`` bounds a wait for the commit lock (seconds).
    """

    kind = "PostgreSQL"

    def __init__(
        self,
        dsn: str,
        *,
        history: bool = True,
        replicas: Iterable[str] = (),
        read_only: bool = False,
        cache_size: int = 64 << 20,
        cache_path: str | os.PathLike[str] | None = None,
        read_ahead: int = 256,
        lock_timeout: float = 60.0,
        replica_timeout: float = 5.0,
        idle_in_transaction_timeout: float = 60.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self._pg = _psycopg()
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str, not {type(dsn).__qualname__}")
        try:
            self._pg.conninfo.conninfo_to_dict(dsn)
        except self._pg.ProgrammingError:
            # libpq's message quotes the text it could not parse, which may be a password.
            raise ValueError(
                "the PostgreSQL DSN does not parse (libpq refused it; it is not shown here, since it may"
                " hold a password): check its quoting and percent-encoding"
            ) from None
        timeouts = (  # checked before anything is opened
            seconds(lock_timeout, "lock_timeout"),
            seconds(replica_timeout, "replica_timeout"),
            seconds(idle_in_transaction_timeout, "idle_in_transaction_timeout"),
            max(1, int(seconds(connect_timeout, "connect_timeout"))),
        )
        self._dsn = dsn
        self._replica_dsns = [str(replica) for replica in replicas]
        super().__init__(
            name=safe_dsn(dsn),
            history=history,
            read_only=read_only,
            cache_size=cache_size,
            cache_path=cache_path,
            read_ahead=read_ahead,
        )
        self.lock_timeout, self.replica_timeout, self._idle_timeout, self._connect_timeout = timeouts
        self._replica_pools: list[list[Any]] = [[] for _ in self._replica_dsns]
        self._replica_seen = [-(1 << 63)] * len(self._replica_dsns)
        self._replica_down_until = [0.0] * len(self._replica_dsns)
        self._replica_lock = threading.Lock()
        self._committing_pid = 0
        # Replicas found behind: checked once per load (no waiting) until seen caught up.
        self._replica_lagging = [False] * len(self._replica_dsns)
        self._replica_next = 0
        self.replica_loads = 0
        """Loads a replica answered (for tests and monitoring)."""
        self._open()

    def __repr__(self) -> str:
        replicas = f", {len(self._replica_dsns)} replicas" if self._replica_dsns else ""
        return super().__repr__()[:-1] + replicas + ">"

    # -- dialect ----------------------------------------------------------------------------------

    def _connect(self, write: bool) -> Any:
        return self._connect_to(self._dsn, write)

    def _connect_to(self, dsn: str, write: bool = False) -> Any:
        conn = self._pg.connect(
            dsn, autocommit=True, connect_timeout=self._connect_timeout, application_name="amberdb"
        )
        try:
            self._configure(conn, write)
        except BaseException:
            _close(conn)
            raise
        return conn

    def _configure(self, conn: Any, write: bool) -> None:
        # Readers commit only oid reservations, which need not wait for the WAL flush: a
        # reservation lost in a crash is harmless, since every vote moves the counter past
        # the oids it stores.  Writers keep synchronous_commit as the server has it.
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false),"
            " set_config('lock_timeout', %s, false),"
            " set_config('synchronous_commit', CASE WHEN %s THEN current_setting('synchronous_commit')"
            " ELSE 'off' END, false)",
            # At least 1 ms: PostgreSQL reads 0 as "wait forever".
            (f"{max(1, int(self._idle_timeout * 1000))}", f"{max(1, int(self.lock_timeout * 1000))}", write),
        )

    def _ids(self, ids: list[int]) -> tuple[str, Any]:
        return "= ANY(%s::bigint[])", ids

    def _refs_value(self, refs: list[int] | None) -> Any:
        return refs

    def _unnest_refs(self) -> tuple[str, str]:
        return "unnest(s.refs) AS r(ref)", "r.ref"

    def _unreadable_refs(self) -> str:
        return "(s.refs IS NULL OR array_position(s.refs, NULL) IS NOT NULL)"

    def _cursor(self, conn: Any) -> Any:
        return conn.cursor(binary=True)

    def _newest_rows_sql(self, ids_fragment: str) -> str:
        return (
            f"SELECT DISTINCT ON (zoid) zoid, tid, state FROM amberdb_object WHERE zoid {ids_fragment}"
            " AND tid <= %s ORDER BY zoid, tid DESC"
        )

    def _batched(self, conn: Any, small: bool) -> AbstractContextManager[Any]:
        # COPY cannot run in pipeline mode: a big transaction's rows are copied outside one.
        return conn.pipeline() if small else nullcontext()

    def _begin_write(self, conn: Any) -> None:
        conn.execute("BEGIN")
        conn.execute(_LOCK_SQL, (_LOCK_KEY,))

    def _end_write(self, conn: Any, commit: bool) -> None:
        if commit:
            # Known before the COMMIT is sent: if its answer is lost, the session that may
            # still be completing it is found by this pid (_settle_lost_commit).
            self._committing_pid = conn.info.backend_pid
        conn.execute("COMMIT" if commit else "ROLLBACK")

    def _settle_lost_commit(self) -> bool:
        # The committing session holds the advisory lock until its COMMIT has ended either
        # way: taking the lock on a fresh session proves it has.  One still stuck (waiting
        # for a synchronous standby, say) is terminated, which ends its transaction too.
        pid, deadline = self._committing_pid, time.monotonic() + max(30.0, self.lock_timeout)
        errors = self._pg.errors
        while time.monotonic() < deadline:
            try:
                conn = self._connect(True)
            except self._pg.OperationalError:
                time.sleep(0.2)  # the server is restarting: its recovery settles it
                continue
            try:
                conn.execute("SELECT set_config('lock_timeout', '2000', false)")
                conn.execute("BEGIN")
                try:
                    conn.execute(_LOCK_SQL, (_LOCK_KEY,))
                except errors.LockNotAvailable:
                    conn.execute("ROLLBACK")
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE pid = %s AND application_name = 'amberdb'",
                        (pid,),
                    )
                    continue
                conn.execute("ROLLBACK")
                return True
            except self._pg.OperationalError:
                time.sleep(0.2)
            finally:
                _close(conn)
        return False

    def _insert_objects(self, cursor: Any, rows: list[tuple[int, int, bytes, Any]]) -> None:
        if len(rows) < SMALL_TRANSACTION:
            cursor.executemany(
                "INSERT INTO amberdb_object (zoid, tid, state, refs) VALUES (%s, %s, %s, %s::bigint[])", rows
            )
            return
        with cursor.copy("COPY amberdb_object (zoid, tid, state, refs) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int8", "bytea", "int8[]"])
            for row in rows:
                copy.write_row(row)

    def _create_schema(self, cursor: Any) -> None:
        for statement in (
            "CREATE TABLE amberdb_schema (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE amberdb_transaction (tid BIGINT PRIMARY KEY, username BYTEA NOT NULL,"
            " description BYTEA NOT NULL, extension BYTEA NOT NULL)",
            "CREATE TABLE amberdb_object (zoid BIGINT NOT NULL, tid BIGINT NOT NULL, state BYTEA NOT NULL,"
            " refs BIGINT[], PRIMARY KEY (zoid, tid))",
            "CREATE INDEX amberdb_object_tid ON amberdb_object (tid)",
            "CREATE TABLE amberdb_oid (next_oid BIGINT NOT NULL)",
        ):
            cursor.execute(statement)
        cursor.execute("INSERT INTO amberdb_oid (next_oid) VALUES (%s)", (-(1 << 63) + 1,))

    def _has_schema(self, cursor: Any) -> bool:
        cursor.execute("SELECT to_regclass('amberdb_schema') IS NOT NULL")
        return bool(cursor.fetchall()[0][0])

    def _is_disconnect(self, exc: BaseException) -> bool:
        errors = self._pg.errors
        if not isinstance(exc, self._pg.OperationalError):
            return False
        return not isinstance(exc, (errors.LockNotAvailable, errors.QueryCanceled))

    def _is_busy(self, exc: BaseException) -> bool:
        errors = self._pg.errors
        return isinstance(
            exc,
            (
                errors.LockNotAvailable,
                errors.QueryCanceled,
                errors.SerializationFailure,
                errors.DeadlockDetected,
            ),
        )

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        error: type[BaseException] = self._pg.Error
        return (error,)

    # -- replicas ---------------------------------------------------------------------------------

    def _read_for_load(self, action: Callable[[Any], T], doing: str) -> T:
        index = self._pick_replica()
        if index is None:
            return self._read(action, doing)
        conn = None
        try:
            conn = self._replica_conn(index)
            if not self._replica_caught_up(index, conn):
                self._give_replica_back(index, conn)
                return self._read(action, doing)
            cursor = conn.cursor()
            try:
                result = action(cursor)
            finally:
                cursor.close()
        except self._pg.Error:
            if conn is not None:
                _close(conn)
            self._replica_failed(index)
            return self._read(action, doing)
        self._give_replica_back(index, conn)
        self.replica_loads += 1
        return result

    def _pick_replica(self) -> int | None:
        if not self._replica_dsns:
            return None
        now = time.monotonic()
        with self._replica_lock:
            for step in range(len(self._replica_dsns)):
                index = (self._replica_next + step) % len(self._replica_dsns)
                if self._replica_down_until[index] <= now:
                    self._replica_next = index + 1
                    return index
        return None

    def _replica_conn(self, index: int) -> Any:
        with self._replica_lock:
            pool = self._replica_pools[index]
            if pool:
                return pool.pop()
        return self._connect_to(self._replica_dsns[index])

    def _give_replica_back(self, index: int, conn: Any) -> None:
        with self._replica_lock:
            if not self._closed and len(self._replica_pools[index]) < 16:
                self._replica_pools[index].append(conn)
                return
        _close(conn)

    def _replica_caught_up(self, index: int, conn: Any) -> bool:
        """Whether the replica has replayed every tid this storage has seen (waiting for it
        up to ``replica_timeout``)."""
        needed = to_sql(self._newest)
        if self._replica_seen[index] >= needed:
            return True
        # Found lagging before: one look, no wait, until it has caught up again (else every
        # load would wait replica_timeout).
        timeout = 0.0 if self._replica_lagging[index] else self.replica_timeout
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            row = conn.execute("SELECT max(tid) FROM amberdb_transaction").fetchone()
            seen = row[0] if row is not None and row[0] is not None else -(1 << 63)
            with self._replica_lock:
                self._replica_seen[index] = max(self._replica_seen[index], seen)
            if seen >= needed:
                self._replica_lagging[index] = False
                return True
            if time.monotonic() + pause > deadline:
                self._replica_lagging[index] = True
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _replica_failed(self, index: int) -> None:
        with self._replica_lock:
            self._replica_down_until[index] = time.monotonic() + _REPLICA_RETRY
            pool, self._replica_pools[index] = self._replica_pools[index], []
        for conn in pool:
            _close(conn)

    def _forget_connections(self) -> None:
        self._replica_pools = [[] for _ in self._replica_dsns]

    def _interrupt_writer(self) -> None:
        conn = self._writer_conn
        if conn is not None:
            try:
                conn.cancel()  # a cancel request on a connection of its own: safe from here
            except self._pg.Error:
                pass

    def close(self) -> None:
        """Close every connection (primary and replicas) and save the cache file."""
        super().close()
        with self._replica_lock:
            pools, self._replica_pools = self._replica_pools, [[] for _ in self._replica_dsns]
        for pool in pools:
            for conn in pool:
                _close(conn)


def _close(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        pass


def open_postgresql_uri(uri: str, read_only: bool) -> PostgreSQLStorage:
    """Open ``postgresql://user@host/dbname?history=false&replica=...``: AmberDB's options
    (history, read_only, cache_size, cache_path, lock_timeout, replica (repeatable),
    replica_timeout) are taken out, the rest of the URI goes to libpq."""
    parts = urlsplit(uri)
    ours, replicas, theirs = split_uri_options(_shown(uri), parts.query, _URI_OPTIONS, repeatable="replica")
    query = "&".join(f"{quote(key)}={quote(value)}" for key, value in theirs)
    # By hand: urlunsplit drops the empty authority of postgresql:///db?host=/socket.
    dsn = f"postgresql://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
    kwargs = storage_options(_shown(uri), ours)
    if read_only:
        kwargs["read_only"] = True
    return PostgreSQLStorage(dsn, replicas=replicas, **kwargs)


def _shown(uri: str) -> str:
    """A URI for messages: without its password."""
    parts = urlsplit(uri)
    if parts.password is None:
        return repr(uri.split("?")[0])  # options may hold replica DSNs with passwords
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return repr(urlunsplit((parts.scheme, netloc, parts.path, "", "")))
