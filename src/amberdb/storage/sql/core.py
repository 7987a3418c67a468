"""What the SQL storages share: commits, polling, the record cache, history and pack in SQL.

A subclass supplies a *dialect* -- how to connect, take the cross-process commit lock,
insert rows and write a few statements -- and the schema of its database; everything else
is here, written once.

Tables (the same in both databases; each dialect module shows its DDL):

``amberdb_schema(name, value)``
    ``version`` (the schema version), ``history`` (``true``/``false``), ``database_id`` (random,
    made with the database: a cache file of another database is never trusted) and
    ``packed_tid`` (the newest pack time, empty when never packed).
``amberdb_transaction(tid, username, description, extension)``
    One row per committed transaction, metadata as bytes (user and description UTF-8).
``amberdb_oid(next_oid)``
    One row: the next oid no storage has reserved (each reserves blocks of 100).
``amberdb_object(zoid, tid, state, refs)``, primary key ``(zoid, tid)``, index on ``tid``
    One row per revision.  ``state`` is the record, opaque; ``refs`` the oids its header
    refers to (NULL when the record has no readable header), so pack finds what is reachable
    with a recursive query inside the database.  A history-free database keeps one row per
    oid: a commit deletes the older revisions of what it writes.

Integers: oids and tids are unsigned 64-bit values and SQL has only signed ones, so a value
``v`` is kept as ``v - 2**63`` -- a bijection that keeps order (tids pass ``2**63`` in 2038).
The root oid ``z64`` is therefore ``-9223372036854775808`` in the tables.

Commits.  ``begin`` and ``store`` only buffer (past 16 MiB in a spill file); the database sees
the transaction at ``vote``: the dialect starts a write transaction holding the commit lock,
one statement reads the newest tid and the committed tid of every stored oid (conflicts for
the whole transaction in one round trip), the rows go in, and the transaction stays open
until ``finish`` commits it (or ``abort`` rolls it back).  So the lock is held from vote to
finish only, and since the next committer takes it only after this commit is visible, tid
order is visibility order: a reader that sees tid ``t`` sees every tid below it.  That is
what makes a poll (``max(tid)``, then the rows with ``since < tid <= max``) an atomic
observation without a read transaction left open.

Reads never hold a transaction open between statements (each statement is its own
snapshot), so no session sits "idle in transaction" blocking VACUUM or checkpoints.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from functools import partial
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, unquote

from amberdb.exceptions import (
    ConflictError,
    CorruptedDataError,
    POSKeyError,
    ReadConflictError,
    ReadOnlyError,
    RecordDecodeError,
    StorageError,
    StorageForkedError,
    StorageTransactionError,
    TransientStorageError,
    UndoError,
    VoteConflictError,
)
from amberdb.record import references
from amberdb.storage.base import (
    DataRecord,
    PackProgress,
    Revision,
    Storage,
    TransactionInfo,
    TransactionMeta,
    TransactionRecord,
    UndoResolver,
)
from amberdb.storage.forks import GENERATION
from amberdb.storage.history import (
    newer_than,
    newest_first_slice,
    pack_time,
    start_copy,
    transaction_tid,
    undo_transaction,
)
from amberdb.storage.record_cache import RecordCache
from amberdb.storage.spill import StoreBuffer
from amberdb.storage.uri import flag_value
from amberdb.utils import Oid, Tid, oid_repr, z64

__all__ = [
    "SCHEMA_VERSION",
    "SMALL_TRANSACTION",
    "UPGRADES",
    "SQLStorage",
    "from_sql",
    "seconds",
    "split_uri_options",
    "storage_options",
    "to_sql",
    "upgrade_schema",
]

SCHEMA_VERSION = 1
"""The schema this code creates and reads; see :meth:`SQLStorage.upgrade_schema`."""

_OFFSET = 1 << 63
_ROOT_SQL = -_OFFSET
_LAST_OID = b"\xff" * 8
_SPILL_AT = 16 << 20
_INSERT_CHUNK = 1000
_INSERT_BYTES = 16 << 20  # rows go to the database once they hold this many bytes of records
SMALL_TRANSACTION = 50  # records in a transaction whose rows go in one batch (bigger: bulk copies)
_ITERATOR_BATCH = 100
_ITERATOR_BYTES = 8 << 20  # ... or fewer transactions, holding at most this many bytes of records
_COPY_BATCH = 1000  # restored transactions per database commit
_COPY_BYTES = 64 << 20  # ... or records in them
_SIBLINGS_MAX = 200_000  # remembered siblings in all (then forgotten at once)
_OID_BLOCK = 100  # oids reserved at first, doubling with each reservation up to:
_OID_BLOCK_MAX = 12_800
_IDLE, _OPEN, _VOTED = "idle", "open", "voted"

T = TypeVar("T")

# Upgrades from each older schema version to the next: version -> step(storage, cursor).
# Empty while version 1 is the only one; a step added here runs only through
# ``amberdb upgrade-schema`` (SQLStorage.upgrade_schema), never by a plain open.
UPGRADES: dict[int, Callable[[SQLStorage, Any], None]] = {}


_UPGRADING: ContextVar[bool] = ContextVar("amberdb_sql_upgrading", default=False)


def upgrade_schema(uri: str) -> tuple[int, int]:
    """Upgrade the schema of the SQL database ``uri`` names to :data:`SCHEMA_VERSION`, one
    step of :data:`UPGRADES` at a time, in one transaction holding the commit lock; return the
    versions before and after.  Nothing else upgrades a schema: a plain open refuses an older
    one, so a database is changed only when its operator asks."""
    from amberdb.storage.uri import open_storage

    token = _UPGRADING.set(True)
    try:
        storage = open_storage(uri)
    finally:
        _UPGRADING.reset(token)
    try:
        if not isinstance(storage, SQLStorage):
            raise ValueError(f"{storage.name} is not a SQL storage: only those have a schema to upgrade")
        return storage._write_transaction(storage._upgrade, "upgrading the schema")
    finally:
        storage.close()


def to_sql(value: bytes) -> int:
    """An oid or tid as the signed integer the tables hold (order kept)."""
    return int.from_bytes(value, "big") - _OFFSET


def from_sql(value: int) -> bytes:
    """The oid or tid a table's signed integer holds."""
    return (value + _OFFSET).to_bytes(8, "big")


def split_uri_options(
    shown: str, query: str, known: tuple[str, ...], *, repeatable: str = ""
) -> tuple[dict[str, str], list[str], list[tuple[str, str]]]:
    """A URI's query split into AmberDB's options (``known``, each at most once), the values
    of the ``repeatable`` one, and the rest -- refused unless ``repeatable`` is set, for the
    SQL storages whose driver takes the others (libpq does).  ``shown`` names the URI in
    errors (without secrets)."""
    ours: dict[str, str] = {}
    repeated: list[str] = []
    rest: list[tuple[str, str]] = []
    for field in query.split("&") if query else ():
        if "=" not in field:
            raise ValueError(f"option {unquote(field)!r} has no value in storage URI {shown}")
        ((key, value),) = parse_qsl(field, keep_blank_values=True)
        if repeatable and key == repeatable:
            repeated.append(value)
        elif key in known:
            if key in ours:
                raise ValueError(f"option {key!r} is given twice in storage URI {shown}")
            ours[key] = value
        elif repeatable:
            rest.append((key, value))
        else:
            raise ValueError(
                f"unknown option {key!r} in storage URI {shown}: known options are {', '.join(known)}"
            )
    return ours, repeated, rest


_NUMBERS: dict[str, type[int] | type[float]] = {
    "cache_size": int,
    "read_ahead": int,
    "lock_timeout": float,
    "replica_timeout": float,
}


def storage_options(shown: str, options: dict[str, str]) -> dict[str, Any]:
    """Keyword arguments of a SQL storage from URI options: flags (``history``,
    ``read_only``), numbers and ``cache_path``; a bad value names the option and the URI."""
    kwargs: dict[str, Any] = {}
    for key, text in options.items():
        if key in ("history", "read_only"):
            flag = flag_value(text)
            if flag is None:
                raise ValueError(f"option {key}={text!r} in storage URI {shown} is not true or false")
            kwargs[key] = flag
        elif key in _NUMBERS:
            try:
                kwargs[key] = _NUMBERS[key](text)
            except ValueError:
                raise ValueError(f"option {key}={text!r} in storage URI {shown} is not a number") from None
        else:
            kwargs[key] = text
    return kwargs


def seconds(value: object, name: str) -> float:
    """``value`` as a number of seconds above 0 and finite; ValueError naming ``name`` else."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, not {value!r:.40}") from None
    if not 0 < number < float("inf"):
        raise ValueError(f"{name} must be above 0 and finite, not {value!r:.40}")
    return number


def _refs(record: bytes) -> list[int] | None:
    try:
        return [to_sql(oid) for oid in references(record)]
    except (RecordDecodeError, ValueError):
        # Not a record with a readable header (tools and tests store raw bytes): pack will
        # refuse to collect rather than guess what it refers to.
        return None


def _text(value: bytes | memoryview | None) -> str:
    return bytes(value or b"").decode("utf-8", "surrogatepass")


class SQLStorage:
    """A storage whose records live in SQL tables (see the module docstring)."""

    kind: ClassVar[str] = "sql"
    """Names the database in messages: ``"SQLite"``, ``"PostgreSQL"``."""

    def __init__(
        self,
        *,
        name: str,
        history: bool,
        read_only: bool,
        cache_size: int,
        cache_path: str | os.PathLike[str] | None,
        read_ahead: int = 256,
    ) -> None:
        if not isinstance(history, bool):
            raise TypeError(f"history must be True or False, not {history!r:.40}")
        if not isinstance(read_ahead, int) or read_ahead < 0:
            raise ValueError(f"read_ahead must be an int >= 0, not {read_ahead!r:.40}")
        self._read_ahead = read_ahead
        # oid -> (the references of a record read on a miss, its place among them).
        self._siblings: dict[Oid, tuple[list[Oid], int]] = {}
        self._name = name
        self._history = history
        self._read_only = read_only
        self._closed = False
        self._pool: list[Any] = []
        self._pool_lock = threading.Lock()
        self._writer_conn: Any = None
        self._cache = RecordCache(cache_size, cache_path)
        # Serialises polls (they move _newest and the cache together) and guards the
        # store-after-read check of loads (_generation).
        self._poll_lock = threading.RLock()
        self._generation = 0
        self._newest = z64
        self._packed_tid: Tid | None = None
        self._database_id = ""
        # One transaction at a time per storage instance, from begin to finish/abort; the
        # database's own lock (cross-process) is held only from vote to finish.
        self._commit_lock = threading.Lock()
        self._state = _IDLE
        self._owner: int | None = None
        self._meta = TransactionMeta()
        self._restore_tid: Tid | None = None
        self._buffer = StoreBuffer(_SPILL_AT)
        self._read_current: dict[Oid, Tid] = {}
        # The committed revisions a conflicting vote read (under the commit lock, which this
        # transaction keeps until it ends): what load() answers for them meanwhile.
        self._conflict_states: dict[Oid, tuple[bytes, Tid]] = {}
        # (tid before, tid of, oids of) this storage's last commit, when nothing else came
        # between: what a poll from "before" answers without a query.
        self._recent: tuple[Tid, Tid, list[Oid]] | None = None
        self._tid = z64
        self._in_write = False
        self._seen_at_vote = z64
        self._oid_lock = threading.Lock()
        # Table integers (signed): no block reserved yet is the lowest value, not 0.
        self._next_oid = _ROOT_SQL
        self._oid_end = _ROOT_SQL
        self._oid_block = _OID_BLOCK
        self.lock_timeout = 60.0
        self._process = GENERATION.value

    def _open(self) -> None:
        """Connect, create or check the schema, and take the first poll; subclasses call it."""
        try:
            self._check_schema()
            self._poll(z64)
        except BaseException:
            self.close()
            raise

    # -- the dialect (subclasses) ---------------------------------------------------------------

    def _connect(self, write: bool) -> Any:
        """A new DB-API connection in autocommit mode."""
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        """``text`` (written with ``%s`` placeholders) in the driver's parameter style."""
        return text

    def _ids(self, ids: list[int]) -> tuple[str, Any]:
        """``(fragment, parameter)`` testing a column against a list: ``= ANY(%s)``."""
        raise NotImplementedError

    def _refs_value(self, refs: list[int] | None) -> Any:
        """The parameter for the ``refs`` column."""
        raise NotImplementedError

    def _unnest_refs(self) -> tuple[str, str]:
        """``(FROM item, column)`` turning ``s.refs`` into one row per referenced oid."""
        raise NotImplementedError

    def _unreadable_refs(self) -> str:
        """A condition true when row ``s`` has no list of integer oids in ``refs``."""
        return "s.refs IS NULL"

    def _newest_rows_sql(self, ids_fragment: str) -> str:
        """SELECT zoid, tid, state: per listed oid the newest revision with tid <= %s."""
        raise NotImplementedError

    def _small_transaction(self) -> bool:
        return not self._buffer.spilled and len(self._buffer) < SMALL_TRANSACTION

    def _batched(self, conn: Any, small: bool) -> AbstractContextManager[Any]:
        """A block whose statements go to the database together (PostgreSQL's pipeline
        mode); ``small`` is False for a transaction big enough to be copied in bulk."""
        return nullcontext()

    def _begin_write(self, conn: Any) -> None:
        """Start a write transaction on ``conn`` holding the cross-process commit lock."""
        raise NotImplementedError

    def _end_write(self, conn: Any, commit: bool) -> None:
        """Commit or roll back the write transaction and release the commit lock."""
        raise NotImplementedError

    def _insert_objects(self, cursor: Any, rows: list[tuple[int, int, bytes, Any]]) -> None:
        """Insert ``(zoid, tid, state, refs)`` rows."""
        cursor.executemany(
            self._sql("INSERT INTO amberdb_object (zoid, tid, state, refs) VALUES (%s, %s, %s, %s)"), rows
        )

    def _create_schema(self, cursor: Any) -> None:
        """Create the tables (inside a write transaction holding the commit lock)."""
        raise NotImplementedError

    def _has_schema(self, cursor: Any) -> bool:
        """True when the ``amberdb_schema`` table exists."""
        raise NotImplementedError

    def _is_disconnect(self, exc: BaseException) -> bool:
        """True when ``exc`` means the connection is gone (it is then thrown away)."""
        return False

    def _is_busy(self, exc: BaseException) -> bool:
        """True when ``exc`` means the database stayed locked past the timeout."""
        return False

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exception classes (translated at the boundary)."""
        raise NotImplementedError

    # -- properties -------------------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        """True when writes raise ReadOnlyError."""
        return self._read_only

    @property
    def name(self) -> str:
        """Where the data lives, without any password."""
        return self._name

    @property
    def history_preserving(self) -> bool:
        """True when every revision is kept (False: only current states)."""
        return self._history

    @property
    def packed_tid(self) -> Tid | None:
        """The newest pack time seen by the last poll (None when never packed)."""
        return self._packed_tid

    @property
    def record_cache(self) -> RecordCache:
        """The records cache shared by every connection of this storage."""
        return self._cache

    def __repr__(self) -> str:
        mode = "history-preserving" if self._history else "history-free"
        state = "closed" if self._closed else f"last tid {oid_repr(self._newest)}"
        return f"<{type(self).__name__} {self._name} ({mode}), {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"storage {self._name} is closed")
        if self._process != GENERATION.value:
            # The parent's database connections would carry two processes' messages at once.
            raise StorageForkedError(
                f"storage {self._name} was opened before os.fork(): open it again in the child process"
            )

    # -- connections ------------------------------------------------------------------------------

    def _take(self) -> Any:
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        return self._connect(False)

    def _give_back(self, conn: Any) -> None:
        with self._pool_lock:
            if not self._closed and len(self._pool) < 16:
                self._pool.append(conn)
                return
        _close_quietly(conn)

    def _read(self, action: Callable[[Any], T], doing: str) -> T:
        """Run ``action(cursor)`` on a pooled connection; a dropped connection is replaced
        once (a database restart costs the reader nothing), then reported as transient."""
        self._check_open()
        for attempt in (1, 2):
            conn = None
            try:
                conn = self._take()
                cursor = self._cursor(conn)
                try:
                    result = action(cursor)
                finally:
                    cursor.close()
            except BaseException as exc:
                if conn is not None:
                    _close_quietly(conn)
                if not isinstance(exc, self._driver_errors()):
                    raise
                if self._is_disconnect(exc) and attempt == 1:
                    # The server went away: every pooled session is as dead as this one.
                    with self._pool_lock:
                        pool, self._pool = self._pool, []
                    for stale in pool:
                        _close_quietly(stale)
                    continue
                raise self._translate(exc, doing) from exc
            self._give_back(conn)
            return result
        raise AssertionError("unreachable")

    def _read_for_load(self, action: Callable[[Any], T], doing: str) -> T:
        """Where loads read: the primary here; a storage with read replicas overrides it."""
        return self._read(action, doing)

    def _cursor(self, conn: Any) -> Any:
        """A cursor for reads (PostgreSQL's asks for binary results: bytea as bytes, not hex)."""
        return conn.cursor()

    def _translate(self, exc: BaseException, doing: str) -> StorageError:
        if self._is_disconnect(exc):
            return TransientStorageError(
                f"{self._name}: lost the connection to {self.kind} while {doing}: {exc}"
            )
        if self._is_busy(exc):
            return TransientStorageError(
                f"{self._name}: the database stayed locked by another process for more than"
                f" {self.lock_timeout:g} s while {doing}; try again ({exc})"
            )
        return StorageError(f"{self._name}: {self.kind} failed while {doing}: {exc}")

    # -- schema -----------------------------------------------------------------------------------

    def _schema_values(self, cursor: Any) -> dict[str, str]:
        cursor.execute("SELECT name, value FROM amberdb_schema")
        values: dict[str, str] = {}
        for name, value in cursor.fetchall():
            if name in values:
                raise CorruptedDataError(f"{self._name}: amberdb_schema holds {name!r} twice")
            values[name] = value
        return values

    def _check_schema(self) -> None:
        def read(cursor: Any) -> dict[str, str] | None:
            return self._schema_values(cursor) if self._has_schema(cursor) else None

        values = self._read(read, "reading the schema")
        if values is None:
            if self._read_only:
                raise StorageError(
                    f"{self._name} holds no AmberDB database, and a read-only storage creates none"
                )
            values = self._write_schema()
        self._accept_schema(values)

    def _write_schema(self) -> dict[str, str]:
        return self._write_transaction(self._create_if_missing, "creating the schema")

    def _create_if_missing(self, cursor: Any) -> dict[str, str]:
        if not self._has_schema(cursor):  # another process may have made it meanwhile
            self._create_schema(cursor)
            rows = [
                ("version", str(SCHEMA_VERSION)),
                ("history", "true" if self._history else "false"),
                ("database_id", os.urandom(16).hex()),
                ("packed_tid", ""),
            ]
            cursor.executemany(self._sql("INSERT INTO amberdb_schema (name, value) VALUES (%s, %s)"), rows)
        return self._schema_values(cursor)

    def _accept_schema(self, values: dict[str, str]) -> None:
        try:
            version = int(values.get("version", ""))
        except ValueError:
            raise StorageError(
                f"{self._name}: the amberdb_schema table holds no readable version"
                f" ({values.get('version')!r})"
            ) from None
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self._name} has schema version {version}, newer than the {SCHEMA_VERSION} this"
                " AmberDB knows: upgrade AmberDB to open it"
            )
        if version < SCHEMA_VERSION and not _UPGRADING.get():
            raise StorageError(
                f"{self._name} has schema version {version}, older than this AmberDB's {SCHEMA_VERSION}:"
                " back it up, then run 'amberdb upgrade-schema URI' to upgrade it"
            )
        if values.get("history") not in ("true", "false"):
            raise CorruptedDataError(
                f"{self._name}: amberdb_schema.history is {values.get('history')!r}, not 'true' or 'false'"
            )
        history = values["history"] == "true"
        if history != self._history:
            have = "history-preserving" if history else "history-free"
            asked = "true" if self._history else "false"
            mode = "true" if history else "false"
            raise StorageError(
                f"{self._name} is a {have} database but was opened with history={asked}: open it with"
                f" history={mode} (in a URI, ?history={mode})"
            )
        self._database_id = values.get("database_id") or ""
        if not self._database_id:
            raise CorruptedDataError(f"{self._name}: amberdb_schema holds no database_id")
        self._packed_tid = self._packed_value(values.get("packed_tid"))

    def _packed_value(self, text: str | None) -> Tid | None:
        if not text:
            return None
        if len(text) != 16 or any(c not in "0123456789abcdefABCDEF" for c in text):
            raise CorruptedDataError(
                f"{self._name}: amberdb_schema.packed_tid is {text!r:.40}, not a tid (16 hex digits)"
            )
        return bytes.fromhex(text)

    def _upgrade(self, cursor: Any) -> tuple[int, int]:
        before = int(self._schema_values(cursor)["version"])
        for version in range(before, SCHEMA_VERSION):
            step = UPGRADES.get(version)
            if step is None:
                raise StorageError(f"{self._name}: no upgrade from schema version {version} is known")
            step(self, cursor)
        if before < SCHEMA_VERSION:
            cursor.execute(
                self._sql("UPDATE amberdb_schema SET value = %s WHERE name = 'version'"),
                (str(SCHEMA_VERSION),),
            )
        return before, max(before, SCHEMA_VERSION)

    def schema_version(self) -> int:
        """The schema version the database has now."""
        values = self._read(self._schema_values, "reading the schema")
        return int(values["version"])

    # -- reading ----------------------------------------------------------------------------------

    def load(self, oid: Oid, before: Tid | None = None) -> tuple[bytes, Tid]:
        """Return ``(record, tid)`` of the newest revision (strictly before ``before``)."""
        if self._closed or self._process != GENERATION.value:
            self._check_open()
        if before is None:
            hit = self._cache.load(oid)
            if hit is not None:
                if self._conflict_states:
                    return self._conflict_states.get(oid, hit)
                return hit
            if self._conflict_states and oid in self._conflict_states:
                return self._conflict_states[oid]
            if oid in self._siblings:
                hit = self._read_siblings(oid)
                if hit is not None:
                    return hit
            record, tid = self._load_current(oid)
            if self._read_ahead:
                self._note_references(record)
            return record, tid
        hit = self._cache.load_before(oid, before)
        if hit is not None:
            return hit
        return self._load_before(oid, before)

    def _load_current(self, oid: Oid) -> tuple[bytes, Tid]:
        generation = self._generation
        newest = self._newest
        zoid = to_sql(oid)
        if self._history:
            sql = self._sql(
                "SELECT tid, state FROM amberdb_object WHERE zoid = %s AND tid <= %s"
                " ORDER BY tid DESC LIMIT 1"
            )
            params: tuple[Any, ...] = (zoid, to_sql(newest))
        else:
            sql = self._sql("SELECT tid, state FROM amberdb_object WHERE zoid = %s")
            params = (zoid,)

        def query(cursor: Any) -> Any:
            cursor.execute(sql, params)
            return cursor.fetchall()

        rows = self._read_for_load(query, f"loading oid {oid_repr(oid)}")
        if not rows:
            self._check_open()
            raise POSKeyError(oid)
        tid = from_sql(rows[0][0])
        record = self._state_bytes(rows[0][1], oid, tid)
        self._cache_current(generation, oid, tid, record)
        return record, tid

    def _state_bytes(self, value: Any, oid: Oid, tid: Tid) -> bytes:
        """A ``state`` column's value as the record, or CorruptedDataError naming the row
        (another program may have written anything there)."""
        if isinstance(value, bytes):
            return value
        if isinstance(value, (memoryview, bytearray)):
            return bytes(value)
        raise CorruptedDataError(
            f"{self._name}: amberdb_object.state of oid {oid_repr(oid)} at tid {oid_repr(tid)} is"
            f" {'NULL' if value is None else type(value).__name__}, not a record (bytes)"
        )

    def _cache_current(self, generation: int, oid: Oid, tid: Tid, record: bytes) -> None:
        # A poll applied while the row was on its way may have ended an older revision that
        # this row is: only a read with no poll in between is stored as current.
        with self._poll_lock:
            if generation == self._generation:
                self._cache.store(oid, tid, record)

    def _load_before(self, oid: Oid, before: Tid) -> tuple[bytes, Tid]:
        zoid = to_sql(oid)
        if not self._history:
            record, tid = self._load_current(oid)
            if tid < before:
                return record, tid
            raise ReadConflictError(
                f"{self._name} keeps no history: oid {oid_repr(oid)} changed at {oid_repr(tid)}, after"
                f" this snapshot ({oid_repr(before)}), and its older state is gone (not in the"
                " cache either); retry the transaction",
                oid=oid,
            )
        sql = self._sql(
            "SELECT s.tid, s.state, (SELECT min(n.tid) FROM amberdb_object n"
            " WHERE n.zoid = s.zoid AND n.tid > s.tid)"
            " FROM amberdb_object s WHERE s.zoid = %s AND s.tid < %s ORDER BY s.tid DESC LIMIT 1"
        )

        def query(cursor: Any) -> Any:
            cursor.execute(sql, (zoid, to_sql(before)))
            return cursor.fetchall()

        generation = self._generation
        rows = self._read_for_load(query, f"loading oid {oid_repr(oid)} before {oid_repr(before)}")
        if not rows:
            self._check_open()
            raise POSKeyError(oid, f"no revision of oid {oid_repr(oid)} before tid {oid_repr(before)}")
        tid, end = from_sql(rows[0][0]), rows[0][2]
        record = self._state_bytes(rows[0][1], oid, tid)
        if end is None:
            self._cache_current(generation, oid, tid, record)
        elif from_sql(end) <= self._newest:
            self._cache.store(oid, tid, record, from_sql(end))
        return record, tid

    def _note_references(self, record: bytes) -> None:
        """Remember the objects ``record`` refers to as siblings: the first miss on one of
        them reads the next ``read_ahead`` of them in one query (an application that loads
        one item of a container usually goes on with the next)."""
        try:
            refs = references(record)
        except (RecordDecodeError, ValueError):
            return
        if len(refs) < 2:
            return
        if len(self._siblings) > _SIBLINGS_MAX:
            self._siblings.clear()  # a hint only: forgetting costs round trips, never answers
        self._remember_siblings(refs, 0)

    def _remember_siblings(self, refs: list[Oid], start: int) -> None:
        # A few windows ahead at a time: the horizon moves on as windows are read, so a
        # record with a million references costs no more than one with a thousand.
        siblings = self._siblings
        for position in range(start, min(len(refs), start + 4 * self._read_ahead)):
            siblings.setdefault(refs[position], (refs, position))

    def _read_siblings(self, oid: Oid) -> tuple[bytes, Tid] | None:
        found = self._siblings.pop(oid, None)
        if found is None:
            return None
        refs, position = found
        end = position + self._read_ahead
        window = refs[position:end]
        for other in window:
            self._siblings.pop(other, None)
        if end < len(refs) and refs[end] not in self._siblings:
            self._remember_siblings(refs, end)
        loaded = self._prefetch(window)
        for record in loaded:
            self._note_references(record)
        return self._cache.load(oid)

    def prefetch(self, oids: Iterable[Oid]) -> None:
        """Load the current revisions of ``oids`` not cached yet, in one query (batched)."""
        self._check_open()
        self._prefetch(oids)

    def _prefetch(self, oids: Iterable[Oid]) -> list[bytes]:
        wanted = [oid for oid in dict.fromkeys(oids) if self._cache.load(oid) is None]
        if not wanted:
            return []
        generation = self._generation
        newest = self._newest
        fragment, param = self._ids([to_sql(oid) for oid in wanted])
        sql = self._sql(self._newest_rows_sql(fragment))

        def query(cursor: Any) -> Any:
            cursor.execute(sql, (param, to_sql(newest) if self._history else _OFFSET - 1))
            return cursor.fetchall()

        records = []
        for zoid, tid, state in self._read_for_load(query, f"prefetching {len(wanted)} objects"):
            record = self._state_bytes(state, from_sql(zoid), from_sql(tid))
            self._cache_current(generation, from_sql(zoid), from_sql(tid), record)
            records.append(record)
        return records

    def current_records(self, after: Oid | None = None, limit: int = 1000) -> list[tuple[Oid, Tid, bytes]]:
        """Up to ``limit`` current records of the oids above ``after``, in oid order
        (storage/base.py): one query walking the ``(zoid, tid)`` primary key from ``after``.

        History-preserving, each oid's newest revision up to the last poll's tid (what
        ``load`` answers); history-free, its one row.  The record cache is neither asked nor
        filled: a walk over every object would only push out what connections use.
        """
        if type(limit) is not int or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r:.40}")
        self._check_open()
        if after is None:
            low = _ROOT_SQL
        elif after == _LAST_OID:
            return []  # nothing lies above it (and its successor has no table integer)
        else:
            low = to_sql(after) + 1
        if self._history:
            sql = self._sql(
                "SELECT o.zoid, o.tid, o.state FROM amberdb_object o WHERE o.zoid >= %s"
                " AND o.tid = (SELECT max(x.tid) FROM amberdb_object x WHERE x.zoid = o.zoid AND x.tid <= %s)"
                " ORDER BY o.zoid LIMIT %s"
            )
            params: tuple[Any, ...] = (low, to_sql(self._newest), limit)
        else:
            sql = self._sql(
                "SELECT zoid, tid, state FROM amberdb_object WHERE zoid >= %s ORDER BY zoid LIMIT %s"
            )
            params = (low, limit)

        def query(cursor: Any) -> Any:
            cursor.execute(sql, params)
            return cursor.fetchall()

        shown = "the start" if after is None else f"oid {oid_repr(after)}"
        rows = self._read_for_load(query, f"listing {limit} current records after {shown}")
        found: list[tuple[Oid, Tid, bytes]] = []
        for zoid, tid, state in rows:
            oid, serial = from_sql(zoid), from_sql(tid)
            found.append((oid, serial, self._state_bytes(state, oid, serial)))
        return found

    def last_tid(self) -> Tid:
        """The newest tid the last poll (or this storage's own finish) saw."""
        self._check_open()
        return self._newest

    def __len__(self) -> int:
        def query(cursor: Any) -> int:
            cursor.execute("SELECT count(DISTINCT zoid) FROM amberdb_object")
            return int(cursor.fetchall()[0][0])

        return self._read(query, "counting objects")

    def get_size(self) -> int:
        """The bytes of every revision's record and transaction metadata, plus 40 per row
        for keys (a scan of the tables: the files may hold free space a pack left)."""

        def query(cursor: Any) -> int:
            cursor.execute(
                "SELECT (SELECT coalesce(sum(length(state)) + 40 * count(*), 0) FROM amberdb_object),"
                " (SELECT coalesce(sum(length(username) + length(description) + length(extension))"
                " + 40 * count(*), 0) FROM amberdb_transaction)"
            )
            objects, transactions = cursor.fetchall()[0]
            return int(objects) + int(transactions)

        return self._read(query, "measuring the database")

    # -- polling ----------------------------------------------------------------------------------

    def poll_invalidations(self, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
        """``(newest tid, oids changed after since)`` from the database (invariant 7).

        Right after this storage's own commit, a poll from the tid before it is answered
        from memory: nothing else committed in between (checked under the commit lock), so
        that commit's oids are the answer, observed at the moment it finished.
        """
        self._check_open()
        with self._poll_lock:
            recent = self._recent
            if recent is not None and since == recent[0] and recent[1] == self._newest:
                return recent[1], list(recent[2])
        return self._poll(since)

    def _poll(self, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
        with self._poll_lock:
            cached = self._cache.last_tid
            head = self._read(lambda cur: self._poll_head(cur, since, cached), "polling for changes")
            newest, packed, since_known, cached_known, database_id, first_after = head
            if database_id != self._database_id:
                raise StorageError(
                    f"{self._name}: the database was replaced (its id changed from {self._database_id}"
                    f" to {database_id}); open the storage again"
                )
            cache_id = f"{database_id}:{packed.hex() if packed else ''}".encode()
            if self._cache.database_id != cache_id or not cached_known or newest < cached:
                # Another database's cache file, a pack this cache has not seen (it removed
                # revisions the cache may hold), or a database restored to an older state.
                self._cache.clear(cache_id, newest)
                self._generation += 1
                cached = newest
            self._packed_tid = packed
            low = min(since, cached)
            rows: list[tuple[int, Any, int]] = []
            if newest > low:
                rows = self._read(lambda cur: self._changes(cur, low, cached, newest), "polling for changes")
            if newest > cached:
                self._advance_cache(rows, cached, newest, first_after)
            self._newest = newest
            if not since_known or since > newest:
                return newest, None
            since_sql = to_sql(since)
            return newest, [from_sql(zoid) for zoid, _, last in rows if last > since_sql]

    def _poll_head(
        self, cursor: Any, since: Tid, cached: Tid
    ) -> tuple[Tid, Tid | None, bool, bool, str, int | None]:
        cursor.execute(
            self._sql(
                "SELECT (SELECT max(tid) FROM amberdb_transaction),"
                " (SELECT count(*) FROM amberdb_transaction WHERE tid = %s),"
                " (SELECT count(*) FROM amberdb_transaction WHERE tid = %s),"
                " (SELECT value FROM amberdb_schema WHERE name = 'packed_tid'),"
                " (SELECT value FROM amberdb_schema WHERE name = 'database_id'),"
                " (SELECT min(tid) FROM amberdb_transaction WHERE tid > %s)"
            ),
            (to_sql(since), to_sql(cached), to_sql(cached)),
        )
        newest, since_count, cached_count, packed, database_id, first_after = cursor.fetchall()[0]
        return (
            from_sql(newest) if newest is not None else z64,
            self._packed_value(packed),
            since == z64 or since_count > 0,
            cached == z64 or cached_count > 0,
            database_id or "",
            first_after,
        )

    def _changes(self, cursor: Any, low: Tid, cached: Tid, newest: Tid) -> list[tuple[int, Any, int]]:
        # Per oid changed in (low, newest]: the first change after the cache's tid (where its
        # cached revision ended) and the last one (compared with since).  History-free, a
        # later commit may have replaced the row of a change up to newest: every row above
        # low counts (naming a later change too is only early).
        high = to_sql(newest) if self._history else _OFFSET - 1
        cursor.execute(
            self._sql(
                "SELECT zoid, min(CASE WHEN tid > %s THEN tid END), max(tid) FROM amberdb_object"
                " WHERE tid > %s AND tid <= %s GROUP BY zoid"
            ),
            (to_sql(cached), to_sql(low), high),
        )
        return [(zoid, first, last) for zoid, first, last in cursor.fetchall()]

    def _advance_cache(
        self, rows: list[tuple[int, Any, int]], cached: Tid, newest: Tid, first_after: int | None
    ) -> None:
        self._generation += 1
        cached_sql = to_sql(cached)
        changed = [(first, zoid) for zoid, first, last in rows if last > cached_sql]
        if not self._history:
            # Only current rows are kept, so where a cached revision ended is known only when
            # its successor is the first transaction after the cache's tid (nothing can lie
            # between); the others are forgotten.
            exact = [from_sql(zoid) for first, zoid in changed if first == first_after]
            self._cache.drop(from_sql(zoid) for first, zoid in changed if first != first_after)
            if exact and first_after is not None:
                self._cache.invalidate(from_sql(first_after), exact)
            self._cache.invalidate(newest, ())
            return
        by_tid: dict[int, list[Oid]] = {}
        for first, zoid in changed:
            by_tid.setdefault(first, []).append(from_sql(zoid))
        for first in sorted(by_tid):
            self._cache.invalidate(from_sql(first), by_tid[first])
        self._cache.invalidate(newest, ())

    # -- history ----------------------------------------------------------------------------------

    def iterator(self, start: Tid | None = None, stop: Tid | None = None) -> Iterator[TransactionRecord]:
        """Committed transactions with ``start <= tid <= stop``, oldest first, in batches."""
        self._check_open()

        def newest(cursor: Any) -> Any:
            cursor.execute("SELECT max(tid) FROM amberdb_transaction")
            return cursor.fetchall()[0][0]

        high = self._read(newest, "listing transactions")
        if high is None:
            return
        if stop is not None:
            high = min(high, to_sql(stop))
        low = to_sql(start) if start is not None else _ROOT_SQL
        while low <= high:
            batch = self._read(partial(self._transactions, low=low, high=high), "listing transactions")
            if not batch:
                return
            yield from batch
            low = to_sql(batch[-1].tid) + 1

    def _transactions(self, cursor: Any, low: int, high: int) -> list[TransactionRecord]:
        # Up to _ITERATOR_BATCH transactions, cut at _ITERATOR_BYTES of records (at least
        # one transaction), so listing big transactions holds few of them at a time.
        cursor.execute(
            self._sql(
                "SELECT t.tid, t.username, t.description, t.extension,"
                " (SELECT coalesce(sum(length(s.state)), 0) FROM amberdb_object s WHERE s.tid = t.tid)"
                " FROM amberdb_transaction t WHERE t.tid >= %s AND t.tid <= %s ORDER BY t.tid LIMIT %s"
            ),
            (low, high, _ITERATOR_BATCH),
        )
        metas: list[tuple[Any, ...]] = []
        size = 0
        for row in cursor.fetchall():
            if metas and size + int(row[4] or 0) > _ITERATOR_BYTES:
                break
            metas.append(row[:4])
            size += int(row[4] or 0)
        if not metas:
            return []
        last = metas[-1][0]
        cursor.execute(
            self._sql(
                "SELECT tid, zoid, state FROM amberdb_object WHERE tid >= %s AND tid <= %s ORDER BY tid, zoid"
            ),
            (low, last),
        )
        known = {row[0] for row in metas}
        records: dict[int, list[DataRecord]] = {}
        for tid, zoid, state in cursor.fetchall():
            oid, tid_bytes = from_sql(zoid), from_sql(tid)
            if tid not in known:
                # load() would serve it, a copy would silently leave it out: refuse instead.
                raise CorruptedDataError(
                    f"{self._name}: amberdb_object holds oid {oid_repr(oid)} at tid {oid_repr(tid_bytes)},"
                    " a transaction missing from amberdb_transaction"
                )
            records.setdefault(tid, []).append(
                DataRecord(oid, tid_bytes, self._state_bytes(state, oid, tid_bytes))
            )
        return [
            TransactionRecord(
                from_sql(tid),
                TransactionMeta(_text(user), _text(description), bytes(extension or b"")),
                records.get(tid, []),
            )
            for tid, user, description, extension in metas
        ]

    def undo_log(self, first: int = 0, last: int = -20) -> list[TransactionInfo]:
        """Undoable transactions, newest first (none in a history-free database)."""
        self._check_open()
        if not self._history:
            return []
        packed = to_sql(self._packed_tid) if self._packed_tid is not None else _ROOT_SQL

        def entries() -> Iterator[TransactionInfo]:
            high = _OFFSET - 1
            while True:
                rows = self._read(partial(self._log_rows, packed=packed, high=high), "reading the undo log")
                for tid, user, description, extension in rows:
                    meta = TransactionMeta(_text(user), _text(description), bytes(extension or b""))
                    yield TransactionInfo(from_sql(tid), meta)
                if len(rows) < _ITERATOR_BATCH:
                    return
                high = rows[-1][0] - 1

        return newest_first_slice(entries(), first, last)

    def _log_rows(self, cursor: Any, packed: int, high: int) -> list[Any]:
        cursor.execute(
            self._sql(
                "SELECT tid, username, description, extension FROM amberdb_transaction"
                " WHERE tid > %s AND tid <= %s ORDER BY tid DESC LIMIT %s"
            ),
            (packed, high, _ITERATOR_BATCH),
        )
        return list(cursor.fetchall())

    def history(self, oid: Oid, size: int = 1) -> list[Revision]:
        """Up to ``size`` revisions of ``oid``, newest first."""
        self._check_open()

        def query(cursor: Any) -> Any:
            cursor.execute(
                self._sql(
                    "SELECT s.tid, length(s.state), t.username, t.description, t.extension"
                    " FROM amberdb_object s JOIN amberdb_transaction t ON t.tid = s.tid"
                    " WHERE s.zoid = %s ORDER BY s.tid DESC LIMIT %s"
                ),
                (to_sql(oid), max(size, 1)),
            )
            return cursor.fetchall()

        rows = self._read(query, f"reading the history of oid {oid_repr(oid)}")
        if not rows:
            raise POSKeyError(oid)
        for tid, length, _, _, _ in rows:
            if length is None:
                raise CorruptedDataError(
                    f"{self._name}: amberdb_object.state of oid {oid_repr(oid)} at tid"
                    f" {oid_repr(from_sql(tid))} is NULL, not a record"
                )
        return [
            Revision(from_sql(tid), TransactionMeta(_text(u), _text(d), bytes(e or b"")), int(length))
            for tid, length, u, d, e in rows
        ]

    def undo(self, tid: Tid, meta: TransactionMeta, resolve: UndoResolver | None = None) -> Tid:
        """Commit a transaction restoring the states from before ``tid`` (see Storage.undo)."""
        self._check_open()
        if not self._history:
            raise UndoError(f"{self._name} is history-free: it keeps no older states to undo to")
        return undo_transaction(self, tid, meta, resolve, self._packed_tid)

    def copy_transactions_from(self, other: Storage) -> int:
        """Copy ``other``'s transactions newer than ours, tids and metadata kept.

        Many transactions go into one database transaction (up to ``_COPY_BATCH`` of them or
        ``_COPY_BYTES`` of records), so a copy costs a commit per batch, not per transaction.
        An interrupted copy keeps the batches committed before it; run again, it goes on
        after them.
        """
        self._check_open()
        newest = start_copy(self, other, self._mark_packed)
        if self._state != _IDLE and self._owner == threading.get_ident():
            raise StorageTransactionError("copy_transactions_from() while this thread's transaction is open")
        copied = 0
        with self._commit_lock:
            conn = self._writer()
            batch = _CopyBatch(self)
            try:
                for txn in newer_than(other, newest):
                    if not self._in_write:
                        self._begin_write(conn)
                        self._in_write = True
                        newest = self._committed_tids(conn.cursor())[0]
                    if txn.tid <= newest:
                        raise StorageTransactionError(
                            f"cannot copy transaction {oid_repr(txn.tid)} of {other.name} into {self._name}:"
                            f" it is not above the newest one there, {oid_repr(newest)}"
                        )
                    batch.add(txn)
                    newest = txn.tid
                    copied += 1
                    if batch.rows >= _INSERT_CHUNK or batch.size >= _INSERT_BYTES:
                        batch.flush(conn.cursor())
                    if batch.transactions >= _COPY_BATCH or batch.committed_size >= _COPY_BYTES:
                        batch.flush(conn.cursor())
                        self._end_write(conn, commit=True)
                        self._in_write = False
                        batch.committed()
                if self._in_write:
                    batch.flush(conn.cursor())
                    self._end_write(conn, commit=True)
                    self._in_write = False
            except self._driver_errors() as exc:
                raise self._write_failed(exc, "copying transactions") from exc
            except BaseException:
                self._rollback_quietly()
                raise
        self._poll(self._newest)
        return copied

    def _mark_packed(self, tid: Tid) -> None:
        self._write_transaction(lambda cur: self._set_packed(cur, tid), "recording the pack time")

    def _set_packed(self, cursor: Any, tid: Tid) -> None:
        current = self._schema_values(cursor).get("packed_tid", "")
        if current and bytes.fromhex(current) >= tid:
            return
        cursor.execute(
            self._sql("UPDATE amberdb_schema SET value = %s WHERE name = 'packed_tid'"), (tid.hex(),)
        )

    def _write_transaction(self, action: Callable[[Any], T], doing: str) -> T:
        """Run ``action(cursor)`` in a write transaction of its own, under the commit lock."""
        self._check_open()
        if self._read_only:
            raise ReadOnlyError(f"{self._name} is read-only")
        conn = self._connect(True)
        try:
            self._begin_write(conn)
            try:
                result = action(conn.cursor())
            except BaseException:
                self._end_write(conn, commit=False)
                raise
            self._end_write(conn, commit=True)
            return result
        except self._driver_errors() as exc:
            raise self._translate(exc, doing) from exc
        finally:
            _close_quietly(conn)

    # -- pack -------------------------------------------------------------------------------------

    def pack(
        self, pack_tid: Tid | float, referencesf: object = None, *, progress: PackProgress | None = None
    ) -> None:
        """Remove what no snapshot at or after ``pack_tid`` sees, and garbage, inside the database.

        The reachable set is found by a recursive query over the ``refs`` column, without
        the commit lock; then, holding it, what committers wrote meanwhile is added and the
        rest deleted in one transaction (so an interrupted pack leaves the data as before).
        """
        self._check_open()
        if self._read_only:
            raise ReadOnlyError(f"{self._name} is read-only")
        wanted = pack_time(pack_tid)
        if self._state != _IDLE and self._owner == threading.get_ident():
            raise StorageTransactionError("pack() while this thread's transaction is open: end it first")
        conn = self._connect(True)
        try:
            cursor = conn.cursor()
            cursor.execute("SELECT max(tid) FROM amberdb_transaction")
            newest = cursor.fetchall()[0][0]
            if newest is None:
                return
            cut = min(to_sql(wanted), newest) if self._history else newest
            self._prepare_pack_table(cursor)
            if progress is not None:
                progress(0, 3)
            self._mark_live(cursor, cut, _ROOT_SQL, initial=True)
            if progress is not None:
                progress(1, 3)
            self._begin_write(conn)
            try:
                # Objects committed while the first pass ran, and what they reach.
                self._mark_live(cursor, cut, newest, initial=False)
                self._refuse_unknown_references(cursor, cut)
                if progress is not None:
                    progress(2, 3)
                self._delete_unreachable(cursor, cut)
                self._set_packed(cursor, from_sql(cut))
            except BaseException:
                self._end_write(conn, commit=False)
                raise
            self._end_write(conn, commit=True)
            if progress is not None:
                progress(3, 3)
        except self._driver_errors() as exc:
            raise self._translate(exc, "packing") from exc
        finally:
            _close_quietly(conn)
        self._poll(self._newest)

    def _prepare_pack_table(self, cursor: Any) -> None:
        cursor.execute("CREATE TEMPORARY TABLE IF NOT EXISTS amberdb_pack_live (zoid BIGINT PRIMARY KEY)")
        cursor.execute("DELETE FROM amberdb_pack_live")

    def _mark_live(self, cursor: Any, cut: int, after: int, *, initial: bool) -> None:
        # The revisions that count for an oid: its newest at or before the cut and all later
        # ones.  The first pass starts from the root and from every oid written after the
        # cut; the second from the oids written after the first pass's newest tid.
        seeds = (
            "SELECT %s UNION SELECT zoid FROM amberdb_object WHERE tid > %s"
            if initial
            else "SELECT zoid FROM amberdb_object WHERE tid > %s"
        )
        seed_params: tuple[int, ...] = (_ROOT_SQL, cut) if initial else (after,)
        unnest, ref = self._unnest_refs()
        cursor.execute(
            self._sql(
                "INSERT INTO amberdb_pack_live (zoid) "
                f"WITH RECURSIVE live(zoid) AS ({seeds} UNION "
                f"SELECT {ref} FROM live JOIN amberdb_object s ON s.zoid = live.zoid, {unnest}"
                f" WHERE {ref} IS NOT NULL AND s.tid >= COALESCE((SELECT max(x.tid) FROM amberdb_object x"
                " WHERE x.zoid = s.zoid AND x.tid <= %s), %s)"
                + (
                    ""
                    if initial
                    else f" AND NOT EXISTS (SELECT 1 FROM amberdb_pack_live p WHERE p.zoid = {ref})"
                )
                + ") SELECT zoid FROM live"
                + (
                    ""
                    if initial
                    else " WHERE NOT EXISTS (SELECT 1 FROM amberdb_pack_live p WHERE p.zoid = live.zoid)"
                )
            ),
            (*seed_params, cut, _ROOT_SQL),
        )

    def _refuse_unknown_references(self, cursor: Any, cut: int) -> None:
        cursor.execute(
            self._sql(
                "SELECT s.zoid, s.tid FROM amberdb_object s JOIN amberdb_pack_live p ON p.zoid = s.zoid"
                f" WHERE {self._unreadable_refs()} AND s.tid >= COALESCE((SELECT max(x.tid)"
                " FROM amberdb_object x WHERE x.zoid = s.zoid AND x.tid <= %s), %s) LIMIT 1"
            ),
            (cut, _ROOT_SQL),
        )
        found = cursor.fetchall()
        if found:
            zoid, tid = found[0]
            raise StorageError(
                f"{self._name}: cannot pack: the record of oid {oid_repr(from_sql(zoid))} at tid"
                f" {oid_repr(from_sql(tid))} has no readable header (no list of references in"
                " amberdb_object.refs), so what it refers to is unknown and collecting anything could"
                " drop a reachable object"
            )

    def _delete_unreachable(self, cursor: Any, cut: int) -> None:
        cursor.execute(
            self._sql(
                "DELETE FROM amberdb_object WHERE tid <= %s"
                " AND NOT EXISTS (SELECT 1 FROM amberdb_pack_live p WHERE p.zoid = amberdb_object.zoid)"
            ),
            (cut,),
        )
        cursor.execute(
            self._sql(
                "DELETE FROM amberdb_object WHERE tid < %s AND tid < (SELECT max(x.tid) FROM amberdb_object x"
                " WHERE x.zoid = amberdb_object.zoid AND x.tid <= %s)"
            ),
            (cut, cut),
        )
        cursor.execute(
            self._sql(
                "DELETE FROM amberdb_transaction WHERE tid <= %s"
                " AND tid < (SELECT max(tid) FROM amberdb_transaction)"
                " AND NOT EXISTS (SELECT 1 FROM amberdb_object s WHERE s.tid = amberdb_transaction.tid)"
            ),
            (cut,),
        )
        cursor.execute("DELETE FROM amberdb_pack_live")

    # -- writing ----------------------------------------------------------------------------------

    def new_oid(self) -> Oid:
        """A fresh oid from a block this instance reserved in the database."""
        self._check_open()
        if self._read_only:
            raise ReadOnlyError(f"{self._name} is read-only")
        with self._oid_lock:
            if self._next_oid >= self._oid_end:
                first, count = self._read(self._allocate_oids, "allocating oids")
                self._next_oid, self._oid_end = first, first + count
            oid = self._next_oid
            self._next_oid += 1
        return from_sql(oid)

    def _allocate_oids(self, cursor: Any) -> tuple[int, int]:
        # One autocommit statement: the row is locked only while it runs, and a vote's
        # bump (_bump_oids) updates it only when a restore stored oids beyond it.
        block = self._oid_block
        cursor.execute(
            self._sql("UPDATE amberdb_oid SET next_oid = next_oid + %s RETURNING next_oid"), (block,)
        )
        # A storage that keeps creating objects reserves bigger blocks (a reservation is a
        # commit: 100 of them per 10,000 objects cost a quarter of the time of adding them).
        self._oid_block = min(block * 2, _OID_BLOCK_MAX)
        rows = cursor.fetchall()
        if len(rows) != 1 or not isinstance(rows[0][0], int):
            raise CorruptedDataError(
                f"{self._name}: amberdb_oid must hold one row with the next free oid; it holds {len(rows)}"
            )
        if rows[0][0] > 0:
            raise StorageError(f"{self._name} has used up its oids (2**63 of them)")
        return int(rows[0][0]) - block, block

    def _bump_oids(self, cursor: Any, highest: int) -> None:
        if highest < self._oid_end:
            return  # below a block this storage reserved: the counter is past it already
        if highest < _OFFSET - 1:
            cursor.execute(
                self._sql("UPDATE amberdb_oid SET next_oid = %s WHERE next_oid <= %s"), (highest + 1, highest)
            )

    def begin(self, meta: TransactionMeta, tid: Tid | None = None) -> None:
        """Start a commit (this instance's commits go one at a time; the database is not
        touched until vote)."""
        self._check_open()
        if self._read_only:
            raise ReadOnlyError(f"{self._name} is read-only")
        if tid is not None and (not isinstance(tid, bytes) or len(tid) != 8):
            raise TypeError(f"tid must be 8 bytes, got {tid!r:.80}")
        if self._state != _IDLE and self._owner == threading.get_ident():
            raise StorageTransactionError("begin() called twice without finish() or abort()")
        self._commit_lock.acquire()
        if self._closed:
            self._commit_lock.release()
            raise StorageError(f"storage {self._name} is closed")
        self._state = _OPEN
        self._owner = threading.get_ident()
        self._meta = meta
        self._restore_tid = tid
        self._buffer = StoreBuffer(_SPILL_AT)
        self._read_current = {}

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        """Buffer a revision of ``oid``; conflicts are found at vote (invariant 2)."""
        self._check_owner("store", _OPEN)
        if len(oid) != 8 or len(base_tid) != 8:
            raise ValueError("oid and base_tid must be 8 bytes")
        if oid[0] & 0x80:
            raise ValueError(
                f"oid {oid_repr(oid)} is above 2**63-1, the largest oid AmberDB's storages keep"
                " (FileStorage's limit too, so that databases copy between them)"
            )
        self._buffer.store(oid, base_tid, bytes(record))

    def _check_owner(self, action: str, state: str) -> None:
        if self._process != GENERATION.value:
            self._check_open()  # StorageForkedError: the transaction is the parent's
        if self._state != state or self._owner != threading.get_ident():
            whose = "" if self._owner in (None, threading.get_ident()) else " (of another thread)"
            raise StorageTransactionError(
                f"{action}() needs {'an open' if state == _OPEN else 'a voted'} transaction of this"
                f" thread; the storage's is {self._state}{whose}"
            )

    def check_current(self, oid: Oid, serial: Tid) -> None:
        """Make the vote fail with ReadConflictError unless ``serial`` is still ``oid``'s
        committed tid then (checked in the vote's conflict query, under the commit lock)."""
        self._check_owner("check_current", _OPEN)
        self._read_current[oid] = serial

    def vote(self) -> None:
        """Write the transaction inside a database transaction holding the commit lock.

        One statement reads the newest tid and the committed tid of every stored oid.
        Conflicts raise VoteConflictError with the transaction still open and the lock still
        held: the caller stores resolved records and votes again (nobody can commit in
        between, so that revote succeeds), or aborts.
        """
        self._check_owner("vote", _OPEN)
        conn = self._writer()
        try:
            # Round trip 1: begin, lock, read the committed tids; round trip 2: the writes
            # (where the driver can send statements without waiting for each answer).
            with self._batched(conn, True):
                if not self._in_write:  # (a revote holds the lock already)
                    self._begin_write(conn)
                    self._in_write = True
                identity = conn.cursor()
                identity.execute("SELECT value FROM amberdb_schema WHERE name = 'database_id'")
                newest, committed = self._committed_tids(conn.cursor())
                found = identity.fetchall()
            if not found or found[0][0] != self._database_id:
                raise StorageError(
                    f"{self._name}: the database was replaced since this storage opened it (its id is"
                    f" no longer {self._database_id}): nothing was committed; open the storage again"
                )
            stale = {
                oid: (committed.get(oid, z64), serial)
                for oid, serial in self._read_current.items()
                if committed.get(oid, z64) != serial
            }
            if stale:
                self._end_write(conn, commit=False)
                self._in_write = False
                oid, serials = next(iter(stale.items()))
                raise ReadConflictError(oid=oid, serials=serials)
            if self._restore_tid is None:
                conflicts = {
                    oid: (committed.get(oid, z64), base)
                    for oid, base in self._buffer.bases()
                    if committed.get(oid, z64) != base
                }
                if conflicts:
                    # The lock stays held (nothing is written yet), so the revote with the
                    # resolved records cannot meet a newer conflict: one resolution per
                    # commit however hot the object.  The resolver loads the committed states
                    # next: read them now, in one query, for load() to answer.
                    self._conflict_states.update(self._committed_states(conn, conflicts))
                    raise VoteConflictError(conflicts)
            tid = transaction_tid(newest, self._restore_tid, self._name)
            with self._batched(conn, self._small_transaction()):
                self._write_rows(conn.cursor(), tid)
        except VoteConflictError:
            raise  # still open, lock held: the caller stores resolved records and votes again
        except (ConflictError, StorageTransactionError):
            self._rollback_quietly()
            raise
        except self._driver_errors() as exc:
            raise self._write_failed(exc, "voting") from exc
        except BaseException:
            self._rollback_quietly()
            raise
        self._tid = tid
        self._seen_at_vote = newest
        self._state = _VOTED

    def _writer(self) -> Any:
        if self._writer_conn is None:
            try:
                self._writer_conn = self._connect(True)
            except self._driver_errors() as exc:
                raise self._translate(exc, "connecting to commit") from exc
        return self._writer_conn

    def _committed_states(
        self, conn: Any, conflicts: dict[Oid, tuple[Tid, Tid]]
    ) -> dict[Oid, tuple[bytes, Tid]]:
        """The committed revision of each conflicting oid, read under the commit lock."""
        fragment, param = self._ids([to_sql(oid) for oid in conflicts])
        cursor = self._cursor(conn)
        cursor.execute(self._sql(self._newest_rows_sql(fragment)), (param, _OFFSET - 1))
        found: dict[Oid, tuple[bytes, Tid]] = {}
        for zoid, tid, state in cursor.fetchall():
            oid, tid_bytes = from_sql(zoid), from_sql(tid)
            if conflicts[oid][0] == tid_bytes:
                found[oid] = (self._state_bytes(state, oid, tid_bytes), tid_bytes)
        return found

    def _committed_tids(self, cursor: Any) -> tuple[Tid, dict[Oid, Tid]]:
        ids = [to_sql(oid) for oid in self._buffer.oids()]
        ids.extend(to_sql(oid) for oid in self._read_current)
        fragment, param = self._ids(ids)
        cursor.execute(
            self._sql(
                "SELECT NULL, max(tid) FROM amberdb_transaction UNION ALL"
                f" SELECT zoid, max(tid) FROM amberdb_object WHERE zoid {fragment} GROUP BY zoid"
            ),
            (param,),
        )
        newest = z64
        committed: dict[Oid, Tid] = {}
        for zoid, tid in cursor.fetchall():
            if zoid is None:
                newest = from_sql(tid) if tid is not None else z64
            else:
                committed[from_sql(zoid)] = from_sql(tid)
        return newest, committed

    def _write_rows(self, cursor: Any, tid: Tid) -> None:
        if tid >= b"\xff\xff\xff\xff\xff\xff\xff\xff":
            raise StorageTransactionError(f"tid {oid_repr(tid)} is out of range")
        tid_sql = to_sql(tid)
        meta = self._meta
        cursor.execute(
            self._sql(
                "INSERT INTO amberdb_transaction (tid, username, description, extension)"
                " VALUES (%s, %s, %s, %s)"
            ),
            (
                tid_sql,
                meta.user.encode("utf-8", "surrogatepass"),
                meta.description.encode("utf-8", "surrogatepass"),
                bytes(meta.extension),
            ),
        )
        highest = _ROOT_SQL
        rows: list[tuple[int, int, bytes, Any]] = []
        size = 0
        for oid, _base, record in self._buffer.entries():
            zoid = to_sql(oid)
            highest = max(highest, zoid)
            rows.append((zoid, tid_sql, record, self._refs_value(_refs(record))))
            size += len(record)
            if len(rows) >= _INSERT_CHUNK or size >= _INSERT_BYTES:
                self._store_rows(cursor, rows)
                rows, size = [], 0
        if rows:
            self._store_rows(cursor, rows)
        self._bump_oids(cursor, highest)
        self._note_stored(highest)

    def _note_stored(self, highest: int) -> None:
        """Never hand out an oid up to ``highest``, which was stored (a restore, or a caller's
        choice of oid)."""
        with self._oid_lock:
            if highest >= self._next_oid:
                self._next_oid = self._oid_end = highest + 1

    def _store_rows(self, cursor: Any, rows: list[tuple[int, int, bytes, Any]]) -> None:
        if not self._history:
            fragment, param = self._ids([row[0] for row in rows])
            cursor.execute(self._sql(f"DELETE FROM amberdb_object WHERE zoid {fragment}"), (param,))
        self._insert_objects(cursor, rows)

    def finish(self) -> Tid:
        """Commit the voted transaction and return its tid.

        If the connection drops during the commit, the outcome is looked up: the tid is
        returned if the transaction is there, else TransientStorageError says it is not.
        """
        self._check_owner("finish", _VOTED)
        tid = self._tid
        oids = self._buffer.oids() if self._seen_at_vote == self._newest else None
        try:
            self._end_write(self._writer_conn, commit=True)
            self._in_write = False
        except self._driver_errors() as exc:
            self._in_write = False
            self._drop_writer()
            # The session may still be completing the commit whose answer was lost: only
            # once it has ended is a look for the tid final.
            settled = self._settle_lost_commit()
            committed = self._committed(tid) if settled else None
            if not committed:
                self._end()
                if committed is None:
                    raise StorageError(
                        f"{self._name}: lost the connection while committing transaction {oid_repr(tid)},"
                        " and could not find out whether it committed: look for it"
                        f" (amberdb undo-log), then retry or not ({exc})"
                    ) from exc
                raise self._translate(
                    exc, f"committing transaction {oid_repr(tid)} (it did not commit)"
                ) from exc
        try:
            with self._poll_lock:
                if oids is not None and self._newest == self._seen_at_vote:
                    # Nothing else committed between our last poll and our tid: the cache
                    # moves to our tid (where the revisions we replaced ended, exactly) and
                    # the connection's poll after finish is answered without a query.
                    self._generation += 1
                    self._cache.invalidate(tid, oids)
                    self._recent = (self._newest, tid, oids)
                    self._newest = tid
                else:
                    try:
                        self._poll(self._newest)
                    except StorageError:
                        pass  # the commit stands; the connection's own poll will tell
        finally:
            self._end()
        return tid

    def _settle_lost_commit(self) -> bool:
        """After a commit whose answer was lost: wait until the session that sent it has
        ended its transaction (True), or give up (False).  Nothing to wait for here."""
        return True

    def _committed(self, tid: Tid) -> bool:
        """Whether transaction ``tid`` is in the database (asked again for up to 30 s)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                rows = self._read(
                    lambda cur: (
                        cur.execute(
                            self._sql("SELECT count(*) FROM amberdb_transaction WHERE tid = %s"),
                            (to_sql(tid),),
                        ),
                        cur.fetchall(),
                    )[1],
                    "checking whether a commit went through",
                )
                return bool(rows[0][0])
            except TransientStorageError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def abort(self) -> None:
        """Forget this thread's open or voted transaction (rolled back in the database); a
        no-op when this thread has none (another thread's transaction is left alone)."""
        if self._state == _IDLE or self._owner != threading.get_ident():
            return
        if self._process != GENERATION.value:
            raise StorageForkedError(
                f"storage {self._name} was opened before os.fork(): its transaction belongs to the"
                " parent process, which ends it"
            )
        self._rollback_quietly()
        self._end()

    def _write_failed(self, exc: BaseException, doing: str) -> StorageError:
        """End the writer's failed transaction and return the error to raise."""
        if self._in_write:
            self._rollback_quietly()
        else:
            # The begin or the lock failed: the session is dead, or inside a failed
            # transaction (a lock timeout); a fresh one serves the next write.
            self._drop_writer()
        return self._translate(exc, doing)

    def _rollback_quietly(self) -> None:
        if not self._in_write:
            return
        self._in_write = False
        conn = self._writer_conn
        if conn is None:
            return  # closed meanwhile (close() from another thread): the session is gone
        try:
            self._end_write(conn, commit=False)
        except self._driver_errors():
            self._drop_writer()

    def _drop_writer(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            _close_quietly(conn)

    def _end(self) -> None:
        self._conflict_states = {}
        self._state = _IDLE
        self._owner = None
        self._buffer.close()
        self._buffer = StoreBuffer(_SPILL_AT)
        self._restore_tid = None
        self._commit_lock.release()

    def close(self) -> None:
        """Abort any open transaction, close every connection and save the cache file."""
        if self._closed:
            return
        if self._process != GENERATION.value:
            # A child after fork(): the connections are the parent's (closing one would end
            # the parent's session too); forget them.
            self._closed = True
            self._writer_conn, self._pool = None, []
            self._forget_connections()
            self._cache.close()
            return
        if self._state != _IDLE:
            if self._owner == threading.get_ident():
                self._rollback_quietly()
                self._end()
            else:
                # Another thread's transaction, perhaps waiting for the commit lock on the
                # writer: cut that short rather than wait for it (its vote fails, and closing
                # the session rolls its transaction back).
                self._interrupt_writer()
        self._closed = True
        self._drop_writer()
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            _close_quietly(conn)
        self._cache.close()

    def _forget_connections(self) -> None:
        """In a forked child: drop references to connections of other pools (replicas)."""

    def _interrupt_writer(self) -> None:
        """Cut short the statement another thread runs on the writer session (close())."""


class _CopyBatch:
    """Rows of copied transactions waiting to be inserted together (copy_transactions_from)."""

    def __init__(self, storage: SQLStorage) -> None:
        self.storage = storage
        self.meta_rows: list[tuple[int, bytes, bytes, bytes]] = []
        self.object_rows: dict[tuple[int, int], tuple[int, int, bytes, Any]] = {}
        self.highest = _ROOT_SQL
        self.rows = self.size = 0
        self.transactions = self.committed_size = 0

    def add(self, txn: TransactionRecord) -> None:
        tid = to_sql(txn.tid)
        meta = txn.meta
        self.meta_rows.append(
            (
                tid,
                meta.user.encode("utf-8", "surrogatepass"),
                meta.description.encode("utf-8", "surrogatepass"),
                bytes(meta.extension),
            )
        )
        refs_value = self.storage._refs_value
        history = self.storage.history_preserving
        for rec in txn.records:
            if rec.oid[0] & 0x80:
                raise ValueError(
                    f"oid {oid_repr(rec.oid)} of transaction {oid_repr(txn.tid)} is above 2**63-1, the"
                    " largest oid AmberDB's storages keep"
                )
            zoid = to_sql(rec.oid)
            self.highest = max(self.highest, zoid)
            # History-free keeps one row per oid: a later transaction's row replaces it.
            key = (zoid, tid if history else 0)
            self.object_rows[key] = (zoid, tid, rec.record, refs_value(_refs(rec.record)))
            self.size += len(rec.record)
            self.committed_size += len(rec.record)
        self.rows = len(self.object_rows)
        self.transactions += 1

    def flush(self, cursor: Any) -> None:
        storage = self.storage
        if self.meta_rows:
            cursor.executemany(
                storage._sql(
                    "INSERT INTO amberdb_transaction (tid, username, description, extension)"
                    " VALUES (%s, %s, %s, %s)"
                ),
                self.meta_rows,
            )
        rows = list(self.object_rows.values())
        for start in range(0, len(rows), _INSERT_CHUNK):
            storage._store_rows(cursor, rows[start : start + _INSERT_CHUNK])
        if rows:
            storage._bump_oids(cursor, self.highest)
            storage._note_stored(self.highest)
        self.meta_rows, self.object_rows = [], {}
        self.rows = self.size = 0

    def committed(self) -> None:
        self.transactions = self.committed_size = 0


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        pass
