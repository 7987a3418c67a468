"""DB: a database: one storage, the class allow-list, and a pool of connections.

``DB(None)`` is an in-memory database, ``DB("path/to/file.fs")`` opens (creating if needed)
a FileStorage, ``DB("memory:")`` or ``DB("file:///data.fs?read_only=true")`` opens what the URI
names (:mod:`amberdb.storage.uri`), and ``DB(storage)`` uses any
:class:`~amberdb.storage.base.Storage`.
``db.open()`` hands out a connection, reusing closed ones (and their warm caches) from a
pool; ``amberdb.connection(...)`` is the one-line shortcut whose close also closes the
database.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from amberdb import transaction as _transaction
from amberdb.conflict import resolve as _resolve_conflict
from amberdb.connection import Connection
from amberdb.containers import PersistentMapping
from amberdb.exceptions import ConflictError, ConnectionStateError, POSKeyError, RecordDecodeError
from amberdb.metadata import METADATA_CLASS, metadata_for_update, read_metadata
from amberdb.record import decode_header
from amberdb.serialize import ClassResolver, ObjectReader, ObjectWriter, is_own_module, normalize_class_name
from amberdb.storage.base import PackProgress, Storage, TransactionMeta
from amberdb.storage.history import log_slice
from amberdb.storage.uri import open_storage
from amberdb.utils import Oid, Tid, oid_repr, p64, tid_from_time, time_from_tid, u64, z64

__all__ = ["DB", "connection"]

log = logging.getLogger("amberdb.db")

_R = TypeVar("_R")

DEFAULT_CACHE_SIZE = 10_000
DEFAULT_POOL_SIZE = 7


def _open_storage(storage: Storage | str | os.PathLike[str] | None, read_only: bool) -> Storage:
    if storage is None:
        if read_only:
            raise ValueError("DB(None, read_only=True): a new in-memory database cannot be read-only")
        from amberdb.storage.memory import MemoryStorage

        return MemoryStorage()
    if isinstance(storage, (str, os.PathLike)):
        return open_storage(storage, read_only=read_only)
    if not isinstance(storage, Storage):
        raise TypeError(
            f"DB() takes None, a URI, a file path or a storage, not {type(storage).__qualname__} "
            f"{storage!r:.80}"
        )
    if read_only and not storage.read_only:
        # Dropping the flag would let commits through a database asked to be read-only.
        raise ValueError(
            f"DB(storage, read_only=True) got the writable storage {storage!r}: open the storage "
            "read-only (e.g. FileStorage(path, read_only=True)), or give DB a path or URI"
        )
    return storage


class DB:
    """A database: hands out connections to one storage."""

    def __init__(
        self,
        storage: Storage | str | os.PathLike[str] | None = None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        pool_size: int = DEFAULT_POOL_SIZE,
        allowed_modules: Iterable[str] = (),
        allowed_classes: Iterable[Any] | Mapping[str, Any] = (),
        read_only: bool = False,
        class_aliases: Mapping[str, Any] | None = None,
    ) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}")
        self.storage: Storage = _open_storage(storage, read_only)
        self.cache_size = cache_size
        self.pool_size = pool_size
        self._resolver = ClassResolver(allowed_modules, allowed_classes)
        if class_aliases:
            self._resolver.set_aliases(class_aliases)
        # The metadata object (amberdb.metadata) once found; connections that see the oid
        # watched change (the root, while there is none) call _metadata_changed.
        self._metadata_oid: Oid | None = None
        self._metadata_watch: Oid = z64
        # The newest tid the last read of the renames covered: connections moving to a tid
        # not above it need not read them again.
        self._metadata_read_at: Tid = z64
        self._metadata_lock = threading.Lock()
        # Guards the pool and the set of connections.
        self._lock = threading.RLock()
        self._pool: list[Connection] = []
        self._connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._closed = False
        self._ensure_root()
        self._metadata_changed()

    def _ensure_root(self) -> None:
        try:
            self.storage.load(z64)
        except POSKeyError:
            if self.storage.read_only:
                return
            root: PersistentMapping[Any, Any] = PersistentMapping()
            record = ObjectWriter(self._resolver, _no_references).serialize(root)
            self.storage.begin(TransactionMeta(description="initial database creation"))
            try:
                self.storage.store(z64, z64, record)
                self.storage.vote()
                self.storage.finish()
            except ConflictError:
                # Another process (or DB) created the root since the load: use theirs, once
                # this storage has caught up with that commit (a SQL storage loads as of its
                # last poll).
                self.storage.abort()
                self.storage.poll_invalidations(self.storage.last_tid())
                self.storage.load(z64)
            except BaseException:
                self.storage.abort()
                raise

    @property
    def read_only(self) -> bool:
        """True when the storage refuses writes."""
        return self.storage.read_only

    # -- class renames kept in the database --------------------------------------------------

    def rename_class(self, old: str, new: Any) -> None:
        """Record in the database that class ``old`` is now ``new`` (a name or the class).

        Every process and client of the database loads records naming ``old`` as ``new``
        from its next transaction on, so the old module can be deleted at once.  Names are
        ``"package.module.Class"`` (or ``"package.module:Outer.Inner"``).  The records
        keep the old name until they are written again, or until ``amberdb rename-class
        URI OLD NEW --rewrite`` rewrites them.
        """
        old_name = normalize_class_name(old)
        new_name = normalize_class_name(new)
        if old_name == new_name:
            raise ValueError(f"rename_class({old!r}, {new!r}): the names are the same")
        if is_own_module(old_name.partition(":")[0]):
            raise ValueError(f"rename_class({old!r}, ...): AmberDB's own classes cannot be renamed")

        def record(conn: Connection) -> dict[str, str]:
            metadata = metadata_for_update(conn)
            aliases = metadata.section("class_aliases")
            seen, name = {old_name}, new_name
            while name in aliases:  # old -> new -> ... must not lead back to old
                name = aliases[name]
                if name in seen:
                    raise ValueError(
                        f"renaming {old_name} to {new_name} would make the renames go round in a circle"
                    )
                seen.add(name)
            if aliases.get(old_name) != new_name:
                metadata.update_section("class_aliases", old_name, new_name)
                conn.transaction_manager.get().note(f"amberdb: rename class {old_name} to {new_name}")
            aliases[old_name] = new_name
            return aliases

        aliases = self.transaction(attempts=10)(record)()
        self._resolver.set_stored_aliases(aliases)
        self._metadata_changed()

    def drop_class_alias(self, old: str) -> None:
        """Forget a rename recorded by :meth:`rename_class` (once no record names ``old``)."""
        old_name = normalize_class_name(old)

        def drop(conn: Connection) -> None:
            metadata = read_metadata(conn)
            if metadata is not None and old_name in metadata.section("class_aliases"):
                metadata.update_section("class_aliases", old_name, None)

        self.transaction(attempts=10)(drop)()
        self._metadata_changed()

    @property
    def class_aliases(self) -> dict[str, Any]:
        """The renames in force: those recorded in the database and ``DB(class_aliases=...)``."""
        return self._resolver.aliases

    def _metadata_changed(self, seen_at: Tid | None = None) -> None:
        """Read the renames recorded in the database again (its metadata object changed, in a
        transaction up to ``seen_at`` when given: one read serves every connection)."""
        with self._metadata_lock:
            if seen_at is not None and seen_at <= self._metadata_read_at:
                return
            try:
                read_at = self.storage.last_tid()  # what the read below sees at least
                aliases = self._stored_aliases()
            except Exception as exc:  # a damaged record or a failing storage must not stop the database
                log.warning("cannot read the class renames recorded in %s: %s", self.storage.name, exc)
                return
            self._metadata_read_at = max(self._metadata_read_at, read_at)
            if aliases is not None:
                self._resolver.set_stored_aliases(aliases)

    def _stored_aliases(self) -> dict[str, str] | None:
        """The ``class_aliases`` of the metadata record, straight from the storage."""
        storage = self.storage
        oid = self._metadata_oid
        if oid is None:
            try:
                root_record = storage.load(z64)[0]
            except POSKeyError:
                return None
            found = [ref for ref, name in decode_header(root_record).refs if name == METADATA_CLASS]
            if not found:
                return None
            oid = self._metadata_oid = self._metadata_watch = found[0]
        record = storage.load(oid)[0]
        reader = ObjectReader(self._resolver, _no_ghosts)
        state = reader.state(oid, record, reader.header(oid, record))
        aliases = state.get("class_aliases", {}) if isinstance(state, dict) else None
        if not isinstance(aliases, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in aliases.items()
        ):
            raise ValueError(f"its class_aliases are not a dict of names: {aliases!r:.200}")
        return aliases

    def register_class(self, cls: Any, name: str | None = None) -> None:
        """Allow records to load ``cls``; ``name`` maps an old ``module.Class`` name to it."""
        self._resolver.register(cls, name)

    def open(
        self,
        transaction_manager: Any = None,
        *,
        at: bytes | datetime.datetime | None = None,
        before: bytes | datetime.datetime | None = None,
    ) -> Connection:
        """A connection, bound to ``transaction_manager`` (default: the thread's manager).

        With ``at`` (a tid or a datetime) the connection is *historical*: it shows the
        database as it was right after that moment -- with ``before``, right before it --
        keeps that view across transactions, and refuses every change with ReadOnlyError.
        """
        if self._closed:
            raise ConnectionStateError(
                f"cannot open a connection: the database on {self.storage.name} is closed"
            )
        manager = _transaction.manager if transaction_manager is None else transaction_manager
        historical = None if at is None and before is None else _read_before(at, before)
        with self._lock:
            connection = self._pool.pop() if self._pool and historical is None else None
            if connection is None:
                connection = Connection(self, self.cache_size, before=historical)
                self._connections.add(connection)
        connection.attach(manager)
        return connection

    # -- what connections use (they learn of changes from the storage, not from the DB) --

    @property
    def class_resolver(self) -> ClassResolver:
        """The classes records may name: what every connection loads and writes through."""
        return self._resolver

    def release_connection(self, connection: Connection) -> None:
        """Take back a connection that closed, keeping up to ``pool_size`` for reuse."""
        with self._lock:
            if self._closed:
                return
            if connection.before is not None:
                self._connections.discard(connection)  # its cache shows the past: not reused
                return
            self._pool.append(connection)
            while len(self._pool) > self.pool_size:
                dropped = self._pool.pop(0)
                self._connections.discard(dropped)

    def transaction(self, attempts: int = 1) -> TransactionScope:
        """A transaction on a connection of its own, as a ``with`` block or a decorator.

        ``with db.transaction() as conn:`` commits when the block ends and aborts if it
        raises.  ``@db.transaction(attempts=3)`` on a function ``f(conn, ...)`` runs it in a
        transaction and retries it on ConflictError and other transient errors.  The
        connection has a transaction manager of its own, so either works alongside whatever
        transaction the thread has open.
        """
        return TransactionScope(self, attempts)

    def __len__(self) -> int:
        """The number of objects in the storage."""
        return len(self.storage)

    def last_tid(self) -> Tid:
        """The tid of the storage's newest committed transaction (``z64`` when there is none).

        Asked through a poll, so a storage following another process's commits (a read-only
        FileStorage) answers with the newest, not with what it last took in.
        """
        storage = self.storage
        return storage.poll_invalidations(storage.last_tid())[0]

    def storage_size(self) -> int:
        """The storage's size in bytes (its ``get_size()``): FileStorage's committed file
        length, the records of a MemoryStorage."""
        return self.storage.get_size()

    getSize = storage_size

    # -- history and upkeep -----------------------------------------------------------------

    def pack(self, t: float | None = None, days: float = 0, progress: PackProgress | None = None) -> None:
        """Remove old revisions and garbage (objects unreachable from the root).

        Keeps everything a snapshot at or after the pack time can see: the time is ``t``
        (POSIX seconds; now when None) minus ``days`` days.  Other connections and threads
        go on reading and committing meanwhile, and their commits are kept.  ``progress``
        receives ``(done, total)`` updates.  Transactions up to the pack time cannot be
        undone afterwards.
        """
        self._check_open("pack")
        if days < 0:
            raise ValueError(f"days must be >= 0, got {days}")
        when = (time.time() if t is None else float(t)) - days * 86400.0
        self.storage.pack(tid_from_time(max(when, 0.0)), progress=progress)

    def history(self, oid_or_object: Any, size: int = 1) -> list[dict[str, Any]]:
        """The revisions of an object (or an oid), newest first, as dicts with ``tid``,
        ``time`` (POSIX seconds), ``user_name``, ``description`` and ``size`` (record bytes),
        plus the keys of the transaction's extension metadata."""
        self._check_open("read history")
        oid = _oid_of(oid_or_object)
        jar = getattr(oid_or_object, "_p_jar", None)
        if isinstance(jar, Connection) and jar.db() is not self:
            raise ValueError(
                f"{type(oid_or_object).__qualname__} oid {oid_repr(oid)} belongs to another database"
                f" ({jar!r}): ask that database for its history"
            )
        self._catch_up()
        return [
            _describe(revision.tid, revision.meta, size=revision.size)
            for revision in self.storage.history(oid, size)
        ]

    def undo_log(
        self,
        first: int = 0,
        last: int = -20,
        filter: Any = None,  # ZODB's name for it
    ) -> list[dict[str, Any]]:
        """The undoable transactions, newest first, as dicts with ``id`` (pass it to
        :meth:`undo`), ``time``, ``user_name``, ``description`` and the extension's keys.

        ``first``/``last`` as in ZODB: from the ``first``-th newest up to the ``last``-th,
        a negative ``last`` counting from ``first``.  ``filter(entry) -> bool`` keeps some.
        """
        self._check_open("read the undo log")
        self._catch_up()
        if filter is None:
            infos = self.storage.undo_log(first, last)
            return [_describe(info.tid, info.meta, id=info.tid) for info in infos]
        # As in ZODB, first/last count the entries the filter keeps: read the log in pages.
        # Commits meanwhile push entries to later positions, so a page may repeat some of the
        # previous one: only entries older than the last one read count.
        start, stop = log_slice(first, last)
        kept: list[dict[str, Any]] = []
        read, page = 0, max(100, stop)
        oldest: Tid | None = None
        while len(kept) < stop:
            infos = self.storage.undo_log(read, read + page)
            for info in infos:
                if oldest is not None and info.tid >= oldest:
                    continue
                oldest = info.tid
                entry = _describe(info.tid, info.meta, id=info.tid)
                if filter(entry):
                    kept.append(entry)
            if len(infos) < page:
                break
            read += page
        return kept[start:stop]

    undoLog = undo_log

    def undo_info(
        self, first: int = 0, last: int = -20, specification: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """:meth:`undo_log`, keeping entries whose keys equal every item of ``specification``."""
        wanted = dict(specification or {})
        return self.undo_log(
            first, last, lambda entry: all(entry.get(key) == value for key, value in wanted.items())
        )

    undoInfo = undo_info

    def undo(self, id: bytes, txn: Any = None) -> Tid:
        """Undo transaction ``id`` (an ``id`` from :meth:`undo_log`) and return the new tid.

        Commits at once, in a transaction of its own, restoring every object that ``id``
        changed to its state from before it; the connections see it from their next
        transaction.  Raises UndoError naming the oids when later transactions changed the
        same objects and ``_p_resolveConflict`` cannot merge the change.  Undoing an undo
        redoes.  ``txn`` is accepted for ZODB's signature and not used.
        """
        self._check_open("undo")
        if not isinstance(id, bytes) or len(id) != 8:
            raise TypeError(f"undo() takes an id from undo_log() (8 bytes), not {id!r:.80}")
        resolver = self._resolver

        def merge(oid: Oid, undone: bytes, committed: bytes, restored: bytes) -> bytes:
            return _resolve_conflict(resolver, oid, undone, committed, restored)

        meta = TransactionMeta(description=f"undo of transaction {oid_repr(id)}")
        return self.storage.undo(id, meta, merge)

    def _catch_up(self) -> None:
        """Let a storage that follows another process's commits take them in (a poll), so
        the history answered is as new as :meth:`last_tid`."""
        storage = self.storage
        storage.poll_invalidations(storage.last_tid())

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ConnectionStateError(f"cannot {what}: the database on {self.storage.name} is closed")

    def cache_minimize(self) -> None:
        """Turn the unchanged loaded objects of every connection's cache into ghosts.

        Pooled connections and those this thread opened are minimized now; a connection open
        in another thread minimizes at its next transaction boundary, in that thread.
        """
        with self._lock:
            for connection in list(self._connections):
                connection.minimize_for_db()

    # ZODB's names for the same things.
    cacheMinimize = cache_minimize
    getSize = storage_size
    lastTransaction = last_tid

    def objectCount(self) -> int:
        """ZODB's name for ``len(db)``: the number of objects in the storage."""
        return len(self)

    def close(self) -> None:
        """Close the storage and every connection.  Idempotent.

        Connections still open stop taking part in their transaction manager's transactions
        and refuse further use with a ConnectionStateError saying the database is closed.
        Uncommitted changes they hold make their transaction's commit fail; abort it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pool.clear()
            connections = list(self._connections)
        try:
            for connection in connections:
                connection.database_closed()
        finally:
            self.storage.close()

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    def __repr__(self) -> str:
        return f"<DB on {self.storage.name}{' (closed)' if self._closed else ''}>"

    def __enter__(self) -> DB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TransactionScope:
    """What :meth:`DB.transaction` returns: a context manager, or a retrying decorator."""

    def __init__(self, db: DB, attempts: int) -> None:
        if attempts < 1:
            raise ValueError(f"db.transaction() needs attempts >= 1, got {attempts}")
        self._db = db
        self._attempts = attempts
        self._manager: _transaction.TransactionManager | None = None
        self._connection: Connection | None = None

    def __enter__(self) -> Connection:
        if self._attempts > 1:
            raise TypeError(
                "db.transaction(attempts=N) retries only as a decorator (a with block cannot run "
                "again); use it as @db.transaction(attempts=N), or loop over "
                "manager.attempts(N) around your with block"
            )
        if self._connection is not None:
            raise RuntimeError("this db.transaction() block is already in use; call db.transaction() again")
        manager = self._manager = _transaction.TransactionManager()
        self._connection = self._db.open(manager)
        manager.begin()
        return self._connection

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        manager, connection = self._manager, self._connection
        assert manager is not None and connection is not None
        self._manager = self._connection = None
        try:
            if exc_type is None:
                try:
                    manager.commit()
                except BaseException:
                    manager.abort()
                    raise
            else:
                manager.abort()
        finally:
            connection.close()

    def __call__(self, func: Callable[..., _R]) -> Callable[..., _R]:
        """Decorate ``func(conn, *args, **kwargs)`` to run in a (retried) transaction."""

        @functools.wraps(func)
        def run_in_transaction(*args: Any, **kwargs: Any) -> _R:
            manager = _transaction.TransactionManager()
            connection = self._db.open(manager)
            try:
                for attempt in manager.attempts(self._attempts):
                    with attempt:
                        result = func(connection, *args, **kwargs)
                return result
            finally:
                manager.abort()
                connection.close()

        return run_in_transaction


def _read_before(at: bytes | datetime.datetime | None, before: bytes | datetime.datetime | None) -> Tid:
    """The tid a historical connection reads before, from ``open``'s ``at`` or ``before``."""
    if at is not None and before is not None:
        raise ValueError("db.open() takes at= or before=, not both")
    moment = at if at is not None else before
    if isinstance(moment, datetime.datetime):
        tid = tid_from_time(moment.timestamp())
    elif isinstance(moment, bytes) and len(moment) == 8:
        tid = moment
    else:
        raise TypeError(f"db.open(at=/before=) takes an 8-byte tid or a datetime, not {moment!r:.80}")
    if at is not None:
        if tid == b"\xff" * 8:
            raise ValueError("db.open(at=...): no tid comes after the largest one")
        tid = p64(u64(tid) + 1)
    if tid == z64:
        raise ValueError("db.open(before=...): nothing was committed before tid 0x0")
    return tid


def _oid_of(oid_or_object: Any) -> Oid:
    """The oid of a stored object, an 8-byte oid, or an integer oid."""
    if isinstance(oid_or_object, bytes):
        if len(oid_or_object) != 8:
            raise ValueError(f"an oid is 8 bytes, got {oid_or_object!r:.80}")
        return oid_or_object
    if isinstance(oid_or_object, int) and not isinstance(oid_or_object, bool):
        return p64(oid_or_object)
    oid = getattr(oid_or_object, "_p_oid", None)
    if isinstance(oid, bytes):
        return oid
    raise ValueError(
        f"{type(oid_or_object).__qualname__} object has no oid: it is not a stored persistent"
        " object (commit it first), nor an oid"
    )


def _describe(tid: Tid, meta: TransactionMeta, **fields: Any) -> dict[str, Any]:
    """ZODB's dict for a transaction or revision: its extension's keys, then ours."""
    entry: dict[str, Any] = {}
    if meta.extension:
        try:
            extension = json.loads(meta.extension)
        except ValueError:
            extension = None
        if isinstance(extension, dict):
            entry.update(extension)
    entry.update(tid=tid, time=time_from_tid(tid), user_name=meta.user, description=meta.description)
    entry.update(fields)
    return entry


def _no_ghosts(oid: Oid, name: str) -> Any:
    raise RecordDecodeError(
        f"the database metadata refers to oid {oid_repr(oid)} ({name}): it holds plain data only"
    )


def _no_references(obj: Any) -> Oid:
    raise ValueError(
        f"the initial root cannot refer to other objects ({oid_repr(getattr(obj, '_p_oid', None))})"
    )


def connection(storage: Storage | str | os.PathLike[str] | None = None, **options: Any) -> Connection:
    """Open a database and return a connection to it; closing the connection closes the db."""
    db = DB(storage, **options)
    conn = db.open()
    conn.on_close(db.close)
    return conn
