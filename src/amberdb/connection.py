"""Connection: one snapshot's view of the database as Python objects.

A connection loads objects on demand, keeps them in its cache, notices which ones change,
and takes part in transactions as a *data manager*: the transaction package calls
``tpc_begin``, ``commit``, ``tpc_vote``, ``tpc_finish`` (or ``abort`` / ``tpc_abort``) and
``savepoint``; the connection writes records through its storage.

Snapshot isolation: a connection reads the database as of the last transaction committed
when its own transaction began (``_snapshot``); newer revisions written by other committers
are skipped by loading ``before`` the snapshot.  At each transaction boundary the connection
asks its storage what changed since (``poll_invalidations``) and turns those objects into
ghosts: whoever committed -- another connection, another ``DB``, another process -- the
storage is the one source of invalidations.  A storage that can no longer tell makes the
connection forget every cached object instead.

Committing serializes every changed object first and only then begins the storage's
transaction, so no application code (``__getstate__``, a persistent id) runs while the
storage's commit lock may be held.  Conflicts a storage reports at ``store`` or at ``vote``
are resolved here (``_p_resolveConflict``) and voted again, or raised naming oid and class.

What a connection and its :class:`~amberdb.db.DB` use of each other is small and public:
the DB calls :meth:`Connection.attach` (from ``DB.open``), :meth:`Connection.minimize_for_db`
and :meth:`Connection.database_closed`; the connection uses ``db.storage``,
``db.class_resolver`` and ``db.release_connection``.

Savepoints write the records of changed objects to a spill file and let the objects become
ghosts again, so a transaction can change more objects than fit in memory; the final commit
streams the spill into the storage.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from amberdb.broken import Broken, broken_name
from amberdb.cache import ObjectCache
from amberdb.conflict import resolve
from amberdb.exceptions import (
    ConflictError,
    ConnectionStateError,
    InvalidObjectReference,
    POSKeyError,
    ReadConflictError,
    ReadOnlyError,
    RecordDecodeError,
    SerializationError,
    StateVersionError,
    TransactionError,
    VoteConflictError,
)
from amberdb.persistent import (
    CHANGED,
    GHOST,
    UPTODATE,
    Persistent,
    class_name,
    ghostify,
    make_ghost,
    mark_changed,
    mark_unchanged,
    replace_class,
    restore_state,
)
from amberdb.record import RecordHeader, decode_header
from amberdb.serialize import ObjectReader, ObjectWriter
from amberdb.storage.base import TransactionMeta
from amberdb.storage.spill import SpillFile
from amberdb.utils import Oid, Tid, oid_repr, p64, u64, z64

if TYPE_CHECKING:
    from amberdb.containers import PersistentMapping
    from amberdb.db import DB

__all__ = ["Connection", "RootConvenience"]

_set = object.__setattr__
_get_ident = threading.get_ident
_get_slot = object.__getattribute__
_T = TypeVar("_T")

COMMIT_BUFFER_SIZE = 64 << 20
"""Bytes of serialized records a commit keeps in memory before moving them to a spill file."""

MAX_REVOTES = 10
"""Votes a commit retries after resolving conflicts the storage reported at vote."""


def _exclusive(method: Callable[..., _T]) -> Callable[..., _T]:
    """Refuse the call while another thread is inside the connection (see ``_enter``)."""

    @functools.wraps(method)
    def guarded(self: Connection, *args: Any) -> _T:
        self._enter(method.__name__)
        try:
            return method(self, *args)
        finally:
            self._leave()

    return guarded


class RootConvenience:
    """``conn.root``: call it for the root mapping, or use its keys as attributes."""

    __slots__ = ("_connection",)

    def __init__(self, connection: Connection) -> None:
        _set(self, "_connection", connection)

    def __call__(self) -> PersistentMapping[Any, Any]:
        root: PersistentMapping[Any, Any] = self._connection.get(z64)
        return root

    def __getattr__(self, name: str) -> Any:
        try:
            return self()[name]
        except KeyError:
            raise AttributeError(f"the root has no {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self()[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self()[name]
        except KeyError:
            raise AttributeError(f"the root has no {name!r}") from None

    def __dir__(self) -> list[str]:
        return sorted(key for key in self() if isinstance(key, str))

    def __repr__(self) -> str:
        return f"<root of {self._connection!r}: {' '.join(map(str, sorted(map(str, self()))))}>"


class _ConnectionSavepoint:
    """What ``Connection.savepoint`` returns: rolls the connection back to that moment."""

    def __init__(self, connection: Connection, position: int) -> None:
        self._connection = connection
        self._position = position

    def rollback(self) -> None:
        """Undo every change made since the savepoint."""
        self._connection._rollback(self._position)


class Connection:
    """An object view of the database for one thread and its transaction manager."""

    def __init__(self, db: DB, cache_size: int, before: Tid | None = None) -> None:
        self._db = db
        # A historical connection (db.open(at=/before=)) reads only revisions older than
        # this, never moves, and refuses every change.
        self._before = before
        self._storage = db.storage
        # Optional storage capabilities (storage/base.py): fetching records ahead.
        self._storage_prefetch: Callable[[list[Oid]], None] | None = getattr(self._storage, "prefetch", None)
        # And catching up with other committers before a transaction starts (a round trip).
        self._storage_sync: Callable[[], None] | None = getattr(self._storage, "sync", None)
        self._cache = ObjectCache(cache_size, self._in_spill)
        self._resolver = db.class_resolver
        self._reader = ObjectReader(self._resolver, self._ghost_for)
        self._writer = ObjectWriter(self._resolver, self._reference)
        self.root = RootConvenience(self)
        self.transaction_manager: Any = None
        # The manager registerSynch went to: for a per-thread manager, the opening thread's
        # own, which close() must unregister from whichever thread calls it.
        self._synch_manager: Any = None
        self._opened = False
        self._closed_because = "its connection is closed"
        self._close_callbacks: list[Callable[[], object]] = []
        # The transaction in progress:
        self._joined: Any = None
        self._registered: list[Persistent] = []
        self._added: dict[Oid, Persistent] = {}
        self._spill: SpillFile | None = None
        self._stored: list[Persistent] = []  # objects written by the commit in progress
        self._resolved: list[Oid] = []  # stored as a merge: the objects in memory are stale
        # readCurrent: oid -> the serial read; the commit fails if another committed it since.
        self._read_current: dict[Oid, Tid] = {}
        # A pack drops unreachable objects, but this connection may still hold one (popped
        # out of the graph before the pack) and link it in again.  After each pack it sees,
        # the objects it held then are suspects: a commit that refers to one checks that it
        # still exists, and writes it again if not (see _check_references).
        self._packed_seen: Tid | None = self._storage.packed_tid
        self._pack_suspects: set[Oid] = set()
        # MVCC: reads see transactions up to _snapshot.  The snapshot only ever moves
        # together with the invalidation of what changed up to it (_move_snapshot).
        self._snapshot: Tid = z64
        self._read_before: Tid = p64(1)
        # One thread at a time inside the connection: _user is that thread, _depth its nesting.
        self._use_lock = threading.Lock()
        self._user: int | None = None
        self._depth = 0
        # The thread that opened the connection, and whether DB.cache_minimize() asked from
        # another thread for a minimize at the next transaction boundary (see minimize_for_db).
        self._opener: int | None = None
        self._minimize_later = False
        # More than 0 while a record's state is being unpickled: a record that touches other
        # objects then (a tampered one) is refused (see _refuse_while_unpickling).
        self._unpickling = 0
        # Broken objects in the cache: at each transaction start, those whose class can be
        # found again (imported, renamed) become ghosts of it (see _repair_broken).
        self._broken_oids: set[Oid] = set()

    # -- opening and closing --------------------------------------------------------------

    def attach(self, transaction_manager: Any) -> None:
        """Start serving ``transaction_manager`` at the storage's newest state (called by ``DB.open``).

        Refused while the connection is open: a pooled connection is attached by its DB only.
        """
        if self._opened:
            raise ConnectionStateError(f"{self!r} is already open; use db.open() for another connection")
        self.transaction_manager = transaction_manager
        self._synch_manager = getattr(transaction_manager, "manager", transaction_manager)
        self._opened = True
        self._opener = _get_ident()
        if self._before is not None:
            self._snapshot = p64(u64(self._before) - 1)
            self._read_before = self._before
            self._synch_manager.registerSynch(self)
            return
        try:
            self._synch_manager.registerSynch(self)  # polls too, with a transaction in progress
            self._start_snapshot(sync=True)
        except BaseException:
            # Not handed out (the poll failed): it must not stay registered with the manager,
            # taking part in the thread's transactions, nor leave the pool with its cache.
            self._leave_manager()
            self._db.release_connection(self)
            raise

    def close(self) -> None:
        """Give the connection back to the database's pool.  Idempotent.

        Refused while the connection has uncommitted changes: commit or abort first.
        """
        if not self._opened:
            return
        if self._joined is not None:
            raise ConnectionStateError(
                "cannot close a connection with uncommitted changes; commit or abort the transaction first"
            )
        self._leave_manager()
        callbacks, self._close_callbacks = self._close_callbacks, []
        self._db.release_connection(self)
        for callback in callbacks:
            callback()

    def _leave_manager(self) -> None:
        """Stop taking part in the transaction manager's transactions."""
        self._opened = False
        manager, self._synch_manager = self._synch_manager, None
        if manager is not None:
            manager.unregisterSynch(self)

    def database_closed(self) -> None:
        """The database closed (called by ``DB.close``): this connection can do nothing more.

        Uncommitted changes stay joined to their transaction, whose commit then fails with a
        ConnectionStateError; its abort discards them.
        """
        self._closed_because = f"its database on {self._storage.name} is closed"
        if not self._opened:
            return
        self._leave_manager()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            callback()

    def on_close(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once when this connection is closed."""
        self._close_callbacks.append(callback)

    onCloseCallback = on_close  # ZODB's name

    @property
    def before(self) -> Tid | None:
        """For a historical connection, the tid it reads before (ZODB's ``before``); else None."""
        return self._before

    def _historical_why(self) -> str:
        return (
            f"this connection shows the database as it was before tid {oid_repr(self._before)}"
            " (db.open(at=...) or before=...) and is read-only"
        )

    @property
    def opened(self) -> bool:
        """True between ``DB.open()`` and ``close()``."""
        return self._opened

    def db(self) -> DB:
        """The database this connection belongs to."""
        return self._db

    def _enter(self, action: str, obj: Persistent | None = None) -> None:
        """Note that this thread uses the connection; refuse if another thread is using it.

        A connection serves one thread at a time (its objects, cache and transaction are not
        thread-safe); handing it from thread to thread between uses is fine.
        """
        me = threading.get_ident()
        if self._user == me:
            self._depth += 1
            return
        if not self._use_lock.acquire(blocking=False):
            if obj is not None:
                action = f"{action} {class_name(obj.__class__)} oid {oid_repr(obj._p_oid)}"
            raise ConnectionStateError(
                f"cannot {action}: {self!r} is in use by another thread at the same moment; "
                f"open one connection per thread (db.open() in each thread)"
            )
        self._user = me
        self._depth = 1

    def _leave(self) -> None:
        self._depth -= 1
        if not self._depth:
            self._user = None
            self._use_lock.release()

    def _check_open(self, action: str) -> None:
        if not self._opened:
            raise ConnectionStateError(f"cannot {action}: {self._closed_because}")

    def __repr__(self) -> str:
        state = "open" if self._opened else "closed"
        return f"<Connection {state} on {self._storage.name} at {id(self):#x}>"

    # -- objects --------------------------------------------------------------------------

    @_exclusive
    def get(self, oid: Oid) -> Persistent:
        """The object stored under ``oid``, loaded; POSKeyError if there is none."""
        if not self._opened:
            self._check_open(f"get oid {oid_repr(oid)}")
        if self._unpickling:
            raise RecordDecodeError(
                f"it tried to load oid {oid_repr(oid)}: loading a record never loads another object"
            )
        obj = self._cache.get(oid)
        if obj is not None:
            if obj._p_state != GHOST:
                self._cache.touch(oid, obj)
            return obj
        record, serial = self._load(oid)
        return self._new_object(oid, record, serial)

    def _new_object(self, oid: Oid, record: bytes, serial: Tid) -> Persistent:
        """The object for ``oid`` (not cached yet), made from its ``record``."""
        header = self._reader.header(oid, record)
        cls = self._reader.record_class(oid, header)
        obj = make_ghost(cls, oid, self)
        self._cache.add(oid, obj)
        if cls._p_broken:
            self._broken_oids.add(oid)
        try:
            self._restore(obj, oid, record, serial, header)
        except BaseException:
            # Nothing else can hold this fresh ghost unless its own state refers to it; a
            # later get() must load (and fail) again rather than hand out a ghost that fails.
            if self._cache.get(oid) is obj:
                self._cache.remove(oid)
            raise
        return obj

    def __getitem__(self, oid: Oid) -> Persistent:
        return self.get(oid)

    @_exclusive
    def get_with_record(self, oid: Oid, record: bytes, serial: Tid) -> Persistent:
        """:meth:`get`, given the object's record a storage just listed (``current_records``).

        The record is used only when it is the revision this connection's view shows: its
        serial is not newer than the snapshot, and the listing came after the snapshot was
        taken (the caller's promise: then no newer revision existed at the snapshot either).
        Otherwise, or for an object changed or spilled in this transaction, this is ``get``.
        """
        if not self._opened or self._unpickling or serial > self._snapshot or self._in_spill(oid):
            return self.get(oid)
        obj = self._cache.get(oid)
        if obj is not None:
            if obj._p_state != GHOST:
                self._cache.touch(oid, obj)
                return obj
            self._restore(obj, oid, record, serial, self._reader.header(oid, record))
            return obj
        return self._new_object(oid, record, serial)

    @property
    def prefetches(self) -> bool:
        """Whether :meth:`prefetch` does anything here (the storage can fetch ahead)."""
        return self._storage_prefetch is not None

    def prefetch(self, *objects_or_oids: Any) -> None:
        """Say that these objects (or oids, or iterables of either) will be loaded soon.

        A storage that talks to a server (:class:`~amberdb.ClientStorage`) then asks for
        every record not yet cached in one batch, without waiting; loading the ghosts one by
        one afterwards finds them there.  Other storages ignore it.  Objects already loaded,
        and objects of other connections, are skipped.
        """
        prefetch = self._storage_prefetch
        if prefetch is None:
            return
        self._check_open("prefetch")
        wanted: list[Oid] = []

        def take(item: Any) -> None:
            if isinstance(item, bytes):
                if len(item) != 8:
                    raise TypeError(f"prefetch() takes 8-byte oids or persistent objects, not {item!r:.40}")
                wanted.append(item)
            elif isinstance(item, Persistent):
                if item._p_jar is self and item._p_state == GHOST:
                    wanted.append(item._p_oid)  # type: ignore[arg-type]
            elif isinstance(item, (str, dict)) or not hasattr(item, "__iter__"):
                raise TypeError(
                    f"prefetch() takes oids, persistent objects or iterables of them, not {item!r:.40}"
                )
            else:
                for inner in item:
                    take(inner)

        for item in objects_or_oids:
            take(item)
        if wanted:
            prefetch(wanted)

    def release(self, objects: Iterable[Persistent]) -> None:
        """Turn these objects (unchanged, saved) into ghosts and stop holding them: a migration
        walking millions of objects keeps only what it still uses in memory."""
        cache = self._cache
        for obj in objects:
            if obj._p_jar is self and obj._p_oid is not None:
                obj._p_deactivate()
                cache.release(obj._p_oid)

    def pending_changes(self) -> list[Persistent]:
        """The objects this transaction changed or added so far (each once), not yet committed."""
        seen: set[int] = set()
        pending: list[Persistent] = []
        for obj in [*self._registered, *self._added.values()]:
            if id(obj) not in seen:
                seen.add(id(obj))
                pending.append(obj)
        return pending

    @_exclusive
    def add(self, obj: Persistent) -> None:
        """Make ``obj`` part of this database; it is written at the next commit.

        Objects reachable from stored objects are added implicitly; call this to get an oid
        before committing, or for objects nothing refers to yet.
        """
        self._check_open("add an object")
        if not isinstance(obj, Persistent):
            raise TypeError(f"only persistent objects can be added, not {type(obj).__qualname__} {obj!r:.80}")
        jar = obj._p_jar
        if jar is self:
            return
        if jar is not None and not self._holds_inline(jar):
            raise InvalidObjectReference(
                f"{class_name(obj.__class__)} oid {oid_repr(obj._p_oid)} already belongs to {jar!r}; "
                f"an object can belong to one connection only"
            )
        self._assign(obj)
        self._join()

    def _assign(self, obj: Persistent) -> Oid:
        if self._before is not None:
            raise ReadOnlyError(f"cannot add {class_name(obj.__class__)}: {self._historical_why()}")
        if self._storage.read_only:
            raise ReadOnlyError(f"cannot add {class_name(obj.__class__)}: the database is read-only")
        oid = self._storage.new_oid()
        _set(obj, "_p_oid", oid)
        _set(obj, "_p_jar", self)
        _set(obj, "_p_serial", z64)
        _set(obj, "_p_state", UPTODATE)
        self._added[oid] = obj
        self._cache.add(oid, obj)
        return oid

    def _reference(self, obj: Persistent) -> Oid:
        """The oid to store for a reference to ``obj``, adding it when new."""
        jar = obj._p_jar
        if jar is self:
            return obj._p_oid  # type: ignore[return-value]
        if jar is None or self._holds_inline(jar):
            return self._assign(obj)
        raise InvalidObjectReference(
            f"cannot store a reference to {class_name(obj.__class__)} oid {oid_repr(obj._p_oid)}: "
            f"it belongs to {jar!r}, not {self!r}"
        )

    def _holds_inline(self, jar: Any) -> bool:
        """Whether ``jar`` is that of an object a record of this connection held inline."""
        return type(jar) is _InlineJar and jar.connection is self

    def _in_spill(self, oid: Oid) -> bool:
        """Whether a savepoint of this transaction holds a state of ``oid``."""
        spill = self._spill
        return spill is not None and oid in spill

    # hot path: called for every reference in every record loaded.
    def _ghost_for(self, oid: Oid, name: str) -> Persistent:
        obj = self._cache.get(oid)
        if obj is None:
            cls = self._resolver.persistent_class(name)
            obj = make_ghost(cls, oid, self)
            self._cache.add(oid, obj)
            if cls._p_broken:
                self._broken_oids.add(oid)
        return obj

    def cache_minimize(self) -> None:
        """Turn every unchanged loaded object into a ghost, freeing memory.

        Objects added in this transaction stay as they are until a savepoint or the commit
        writes them: their state exists nowhere else.
        """
        self._cache.minimize()
        self._cache.drop_ghosts()

    def cache_gc(self) -> None:
        """Trim the cache to ``cache_size`` now, as a transaction boundary would.

        For reading through more objects than fit in memory within one transaction.  Like
        any eviction it drops unsaved in-place changes of objects not yet marked changed
        (a plain list appended to before ``_p_changed = True``), so call it between units
        of work, not in the middle of one.
        """
        self._cache.shrink()

    # ZODB's names.
    cacheMinimize = cache_minimize
    cacheGC = cache_gc

    def minimize_for_db(self) -> None:
        """``DB.cache_minimize()``: minimize now if this thread may, else at the next boundary.

        Turning objects into ghosts under a thread that is using them would race with it, so
        a connection opened by another thread minimizes in its own ``afterCompletion``.
        Called with the database lock held, so a pooled connection cannot be opened meanwhile.
        """
        if self._opened and self._opener != _get_ident():
            self._minimize_later = True
            return
        try:
            self._enter("minimize the cache")
        except ConnectionStateError:
            self._minimize_later = True  # handed to another thread, which is inside it now
            return
        try:
            self.cache_minimize()
        finally:
            self._leave()

    @property
    def cache_size(self) -> int:
        """Target number of loaded objects kept between transactions."""
        return self._cache.target_size

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        self._cache.target_size = value

    # -- the jar interface (called by Persistent) ------------------------------------------

    @_exclusive
    def readCurrent(self, obj: Persistent) -> None:
        """Make this transaction's commit fail with ReadConflictError if another transaction
        commits a change to ``obj`` before it (ZODB's ``readCurrent``).

        For an object that was read to decide what to write elsewhere: two transactions that
        each read one object and write the other can then not both commit (no write skew).
        The check is made by the storage under its commit lock, so it never deadlocks; a
        storage without ``check_current`` gets the object's state stored again unchanged
        (the store's conflict check does the same job at the cost of a revision).
        """
        if obj._p_jar is not self or obj._p_oid is None:
            raise ValueError(f"readCurrent() needs an object of this connection, not {obj!r:.80}")
        if obj._p_serial == z64:
            obj._p_activate()
        if obj._p_serial == z64:
            return  # added in this transaction: nothing committed to compare with
        if self._joined is None:
            self._join()
        self._read_current.setdefault(obj._p_oid, obj._p_serial)

    @_exclusive
    def register(self, obj: Persistent) -> None:
        """Note that ``obj`` changed in the current transaction."""
        if self._unpickling:
            _refuse_while_unpickling(obj, "change")
        if isinstance(obj, Broken):
            obj._p_changed = True  # raises BrokenModified, naming oid and class
        if not self._opened:
            what = f"{class_name(obj.__class__)} oid {oid_repr(obj._p_oid)}"
            raise ConnectionStateError(f"cannot change {what}: {self._closed_because}")
        if self._before is not None:
            what = f"{class_name(obj.__class__)} oid {oid_repr(obj._p_oid)}"
            raise ReadOnlyError(f"cannot change {what}: {self._historical_why()}")
        if self._joined is None:
            try:
                self._join()
            except TransactionError as exc:  # no transaction, or one that is over
                what = f"{class_name(obj.__class__)} oid {oid_repr(obj._p_oid)}"
                raise type(exc)(f"cannot change {what}: {exc}") from None
        self._registered.append(obj)

    def setstate(self, obj: Persistent) -> None:
        """Load the state of the ghost ``obj``."""
        oid: Oid = _get_slot(obj, "_p_oid")  # not through the ghost's attribute hook
        if not self._opened:
            raise ConnectionStateError(
                f"cannot load {class_name(obj.__class__)} oid {oid_repr(oid)}: {self._closed_because}"
            )
        if self._unpickling:
            _refuse_while_unpickling(obj, "load")
        # hot path: every ghost touched.  _enter/_leave and _load are inlined here.
        me = _get_ident()
        if self._user == me:
            self._depth += 1
        else:
            self._enter("load", obj)
        try:
            spilled = None if self._spill is None else self._spill.load(oid)
            if spilled is None:
                try:
                    record, serial = self._storage.load(oid)
                except POSKeyError as exc:
                    raise POSKeyError(
                        oid, f"cannot load {class_name(obj.__class__)}: it is referred to but has no record"
                    ) from exc
                if serial > self._snapshot:
                    record, serial = self._load_before(obj, oid)
            else:
                record, serial = spilled
            self._restore(obj, oid, record, serial, self._reader.header(oid, record))
        finally:
            self._depth -= 1
            if not self._depth:
                self._user = None
                self._use_lock.release()

    def _load_before(self, obj: Persistent, oid: Oid) -> tuple[bytes, Tid]:
        """The revision this connection's view shows of an object changed since."""
        try:
            return self._storage.load(oid, self._read_before)
        except POSKeyError as exc:
            raise POSKeyError(
                oid,
                f"cannot load {class_name(obj.__class__)}: this connection's view (before tid"
                f" {oid_repr(self._read_before)}) is older than every revision the storage keeps of"
                " it -- a pack removed them; begin a new transaction to see the current state",
            ) from exc

    def _restore(self, obj: Persistent, oid: Oid, record: bytes, serial: Tid, header: RecordHeader) -> None:
        self._unpickling += 1
        try:
            state = self._reader.state(oid, record, header)
        finally:
            self._unpickling -= 1
        try:
            restore_state(obj, state, serial, len(record))
        except Exception as exc:
            raise _state_misfit(obj, oid, exc) from exc
        if self._reader.finder.named_persistent:
            self._adopt_inline(obj, state)
        self._cache.touch(oid, obj)

    def _adopt_inline(self, container: Persistent, state: Any) -> None:
        """Give the persistent objects ``container``'s record held inline a jar of their own.

        A record holds a persistent object inline when its class became persistent after the
        record was written.  Such an object becomes its own record at its next change (or
        at the container's next commit): its jar adds it and marks the container changed.
        """
        jar = _InlineJar(self, container)
        for inline in _inline_persistent(state):
            _set(inline, "_p_jar", jar)

    def _load(self, oid: Oid) -> tuple[bytes, Tid]:
        spill = self._spill
        if spill is not None:
            spilled = spill.load(oid)
            if spilled is not None:
                return spilled
        record, tid = self._storage.load(oid)
        if tid > self._snapshot:
            record, tid = self._storage.load(oid, self._read_before)
        return record, tid

    # -- transactions -----------------------------------------------------------------------

    def _join(self) -> None:
        if self._joined is None:
            transaction = self.transaction_manager.get()
            transaction.join(self)
            self._joined = transaction

    def sortKey(self) -> str:
        """Orders data managers in two-phase commit."""
        return f"amberdb:{self._storage.name}:{id(self):016x}"

    @_exclusive
    def abort(self, transaction: Any) -> None:
        """Throw away this transaction's changes: changed objects become ghosts again."""
        self._revert()

    def tpc_begin(self, transaction: Any) -> None:
        """Check that this connection may commit; the storage is begun in ``commit``."""
        self._check_open("commit")
        if self._before is not None:
            raise ReadOnlyError(f"cannot commit: {self._historical_why()}")
        if self._storage.read_only:
            raise ReadOnlyError(f"cannot commit: {self._storage.name} is read-only")

    @_exclusive
    def commit(self, transaction: Any) -> None:
        """Serialize every new and changed object, then begin the storage and store them.

        Serializing first keeps application code out of the time the storage may hold its
        commit lock.  The records wait in memory, or past ``COMMIT_BUFFER_SIZE`` bytes in the
        spill file, as savepoints keep them.
        """
        buffered: list[tuple[Oid, Tid, bytes]] = []
        packed = self._storage.packed_tid
        if packed != self._packed_seen:
            self._packed_seen = packed
            self._pack_suspects = {oid for oid, _ in self._cache.live_objects()}
        spill = self._spill
        if spill is None:
            stored = self._stored  # what abort turns back into ghosts, whatever fails below
            size = 0

            def buffer(oid: Oid, base: Tid, record: bytes, obj: Persistent) -> None:
                nonlocal size, spill
                if spill is not None:
                    spill.store(oid, base, record)
                    return
                stored.append(obj)
                buffered.append((oid, base, record))
                size += len(record)
                if size > COMMIT_BUFFER_SIZE:
                    spill = self._spill = SpillFile()
                    for entry in buffered:
                        spill.store(*entry)
                    buffered.clear()

            self._write_changed(buffer)
        else:
            self._write_changed(_spill_sink(spill))
        self._storage.begin(_meta(transaction))
        for oid, base, record in buffered if spill is None else spill.entries():
            self._store(oid, base, record)
        if self._read_current:
            self._check_read_current({oid for oid, _, _ in buffered} if spill is None else set(spill.oids()))

    def _check_read_current(self, stored: set[Oid]) -> None:
        """Hand the storage every readCurrent object this commit does not write itself."""
        storage = self._storage
        check = getattr(storage, "check_current", None)
        for oid, serial in self._read_current.items():
            if oid in stored:
                continue  # its store is checked against the committed tid already
            if check is not None:
                check(oid, serial)
                continue
            record, _ = storage.load(oid, p64(u64(serial) + 1))
            try:
                storage.store(oid, serial, record)
            except ConflictError as conflict:
                raise ReadConflictError(oid=oid, serials=conflict.serials) from None

    def _store(self, oid: Oid, base: Tid, record: bytes) -> None:
        try:
            self._storage.store(oid, base, record)
        except ConflictError as conflict:
            self._store_resolved(conflict, oid, base, record)

    def _store_resolved(self, conflict: ConflictError, oid: Oid, base: Tid, record: bytes) -> None:
        """Store the merge of ``record`` with what another transaction committed meanwhile."""
        if oid in self._read_current and self._read_current[oid] == base:
            # Read as current and written only to check that (a storage without
            # check_current): another transaction changed it, so this one must not commit.
            stored_by_us = any(obj._p_oid == oid for obj in self._stored)
            if not stored_by_us and (self._spill is None or oid not in self._spill):
                raise ReadConflictError(oid=oid, serials=conflict.serials) from None
        name = decode_header(record).class_name
        cls = self._resolver.persistent_class(name)
        if getattr(cls, "_p_resolveConflict", None) is None or base == z64:
            raise conflict.with_class(name) from None
        storage = self._storage
        try:
            old_record, _ = storage.load(oid, p64(u64(base) + 1))
            saved_record, saved_tid = storage.load(oid)
        except POSKeyError:
            raise conflict.with_class(name) from None
        storage.store(oid, saved_tid, resolve(self._resolver, oid, old_record, saved_record, record))
        self._resolved.append(oid)

    def _write_changed(self, sink: Callable[[Oid, Tid, bytes, Persistent], None]) -> None:
        """Serialize every added and changed object (and objects they newly reach) into sink."""
        writer = self._writer
        added = self._added
        registered = self._registered
        while added or registered:
            if added:
                oid, obj = added.popitem()
            else:
                obj = registered.pop()
                if obj._p_jar is not self or obj._p_state != CHANGED:
                    continue
                oid = obj._p_oid  # type: ignore[assignment]
            try:
                record = writer.serialize(obj)
                if self._pack_suspects:
                    self._check_references(obj, record)
                sink(oid, obj._p_serial, record, obj)
            except BaseException:
                # Whatever failed (a bad state, new_oid on a storage that timed out, a
                # reference to another database's object), the object goes back: the abort
                # that follows must find it to turn it into a ghost, and a retry must write
                # it again -- left CHANGED but unregistered it would be silently dropped.
                if obj._p_serial == z64:
                    added[oid] = obj
                else:
                    registered.append(obj)
                raise
            mark_unchanged(obj)
            _set(obj, "_p_estimated_size", len(record))

    def _check_references(self, obj: Persistent, record: bytes) -> None:
        """Write again any object ``record`` refers to that a pack removed meanwhile.

        Only references to objects this connection held when it noticed the pack are
        checked (any other was loaded since, so it exists).  One that is gone is stored as
        new from the state in memory; a ghost has none, and the commit is refused.
        """
        suspects = self._pack_suspects
        for ref, _ in decode_header(record).refs:
            if ref not in suspects:
                continue
            suspects.discard(ref)
            try:
                self._storage.load(ref)
                continue
            except POSKeyError:
                pass
            held = self._cache.get(ref)
            if held is None or held._p_state == GHOST:
                raise POSKeyError(
                    ref,
                    f"cannot commit {class_name(obj.__class__)} oid {oid_repr(obj._p_oid)}: it refers"
                    " to this object, which a pack removed as unreachable and whose state this"
                    " connection no longer holds",
                )
            _set(held, "_p_serial", z64)  # stored as new: the storage has no revision of it
            self._added[ref] = held

    @_exclusive
    def tpc_vote(self, transaction: Any) -> None:
        """Make the transaction durable, resolving conflicts the storage reports at vote.

        No poll here: other transactions may still finish between this vote and our finish
        (group commit), so what changed is asked after ``finish`` (storage invariant 6).
        """
        storage = self._storage
        for revotes in range(MAX_REVOTES + 1):
            try:
                storage.vote()
                break
            except VoteConflictError as conflicts:
                if revotes == MAX_REVOTES:
                    # Others keep committing these objects between our votes: give up as any
                    # conflict does (retrying the transaction may pass), naming the class.
                    obj = self._cache.get(conflicts.oid) if conflicts.oid is not None else None
                    if obj is None:
                        raise
                    raise conflicts.with_class(class_name(obj.__class__)) from None
                self._resolve_at_vote(conflicts)

    def _resolve_at_vote(self, conflicts: VoteConflictError) -> None:
        """Store a merged record for every conflict a vote reported, or raise ConflictError."""
        spill = self._spill
        objects = {obj._p_oid: obj for obj in self._stored} if spill is None else {}
        for oid, serials in conflicts.conflicts.items():
            if oid in self._read_current and oid not in objects and (spill is None or oid not in spill):
                raise ReadConflictError(oid=oid, serials=serials)  # stored only to check it
            spilled = None if spill is None else spill.load(oid)
            if spilled is not None:
                record, base = spilled
            else:
                obj = objects.get(oid)
                if obj is None:
                    raise ConflictError(oid=oid, serials=serials)  # a store this commit did not make
                record, base = self._writer.serialize(obj), obj._p_serial
            self._store_resolved(ConflictError(oid=oid, serials=serials), oid, base, record)

    @_exclusive
    def tpc_finish(self, transaction: Any) -> None:
        """Publish the transaction: objects get their new serial, others see the change."""
        storage = self._storage
        tid = storage.finish()
        # Durable from here: nothing below may turn a commit that happened into one reported
        # as failed.  finish returned only once every lower tid had finished or aborted
        # (storage invariant 6), so a poll now names everything others committed between our
        # snapshot and our tid (and perhaps later ones: ghosting those too is only early).
        # A poll that fails (a network storage) is "cannot tell": forget every cached object.
        try:
            changed = storage.poll_invalidations(self._snapshot)[1]
        except Exception:
            changed = None
        if changed is not None:
            # Our own objects carry this transaction's state: only a later transaction can
            # have changed them since, and the poll at the next boundary reports that.
            own = {obj._p_oid for obj in self._stored}
            if self._spill is not None:
                own.update(self._spill.oids())
            changed = [oid for oid in changed if oid not in own]
        spill = self._spill
        for obj in self._stored:
            if obj._p_jar is self:
                _set(obj, "_p_serial", tid)
                self._cache.touch(obj._p_oid, obj)
        if spill is not None:
            for oid, obj in self._cache.live_objects():
                if oid in spill:
                    _set(obj, "_p_serial", tid)
            spill.close()
            self._spill = None
        for oid in self._resolved:
            merged = self._cache.get(oid)
            if merged is not None:
                ghostify(merged)
        # What others committed before this transaction is invalidated now, as the snapshot
        # moves to it, not at the next boundary: the poll there may fail (after a durable
        # commit that is only logged), and the next transaction would then read these
        # objects stale from the cache beside others loaded at the new snapshot.
        self._move_snapshot(tid, changed)
        self._end_transaction()

    def tpc_abort(self, transaction: Any) -> None:
        """Forget a commit that failed part-way: nothing of it is written."""
        self._storage.abort()
        self._revert()

    def _revert(self) -> None:
        for obj in self._stored:
            self._discard(obj)
        for obj in self._added.values():
            self._discard(obj)
        for obj in self._registered:
            self._discard(obj)
        spill = self._spill
        if spill is not None:
            self._discard_spilled(spill.oids())
            spill.close()
            self._spill = None
        self._end_transaction()

    def _discard(self, obj: Persistent) -> None:
        """Undo this transaction's changes to ``obj``: new objects become unsaved again."""
        if obj._p_jar is not self:
            return
        if obj._p_serial == z64:
            self._unsave(obj)
        elif obj._p_state != GHOST:
            ghostify(obj)

    def _unsave(self, obj: Persistent) -> None:
        oid: Oid = obj._p_oid  # type: ignore[assignment]
        if self._cache.get(oid) is obj:
            self._cache.remove(oid)
        _set(obj, "_p_jar", None)
        _set(obj, "_p_oid", None)
        _set(obj, "_p_serial", z64)
        mark_unchanged(obj)

    def _discard_spilled(self, oids: Iterable[Oid]) -> None:
        """Discard spilled changes of live objects; new ones keep their state, unsaved."""
        spill = self._spill
        assert spill is not None
        victims = [obj for obj in map(self._cache.get, oids) if obj is not None]
        victims.extend(self._load_spilled_ghosts(victims, spill.__contains__))
        for obj in victims:
            self._discard(obj)

    def _load_spilled_ghosts(
        self, objects: list[Persistent], leaving: Callable[[Oid], bool]
    ) -> list[Persistent]:
        """Load the ghosts of new objects about to leave the transaction; return the new ghosts met.

        A new object that became a ghost has its only state in the spill; before the spill
        forgets it (abort, rollback) it is loaded, so the object leaves the transaction
        holding its latest state.  Loading makes ghosts of the objects it refers to; those
        that are new and ``leaving`` too are loaded in turn (a worklist, not a rescan).
        """
        spill = self._spill
        assert spill is not None
        work = [obj for obj in objects if obj._p_serial == z64 and obj._p_state == GHOST]
        met: list[Persistent] = []
        while work:
            obj = work.pop()
            if obj._p_state != GHOST or obj._p_jar is not self:
                continue
            oid: Oid = obj._p_oid  # type: ignore[assignment]
            spilled = spill.load(oid) if leaving(oid) else None
            if spilled is None:
                continue  # its state stays where it is (the spill, or the storage)
            record, serial = spilled
            header = self._reader.header(oid, record)
            self._restore(obj, oid, record, serial, header)
            for ref_oid, _ in header.refs:
                ref = self._cache.get(ref_oid)
                if ref is not None and ref._p_serial == z64 and ref._p_state == GHOST and leaving(ref_oid):
                    met.append(ref)
                    work.append(ref)
        return met

    def _end_transaction(self) -> None:
        self._joined = None
        self._registered = []
        self._added = {}
        self._stored = []
        self._resolved = []
        self._read_current = {}

    # -- savepoints -------------------------------------------------------------------------

    @_exclusive
    def savepoint(self) -> _ConnectionSavepoint:
        """Spill the changes made so far to a temporary file; return a way back to here."""
        self._check_open("take a savepoint")
        if self._spill is None:
            self._spill = SpillFile()
        self._write_changed(_spill_sink(self._spill))
        self._cache.shrink()
        return _ConnectionSavepoint(self, self._spill.position)

    @_exclusive
    def _rollback(self, position: int) -> None:
        """Put every object back as it was at the savepoint that ended at spill ``position``.

        Changed objects become ghosts and load their savepoint state (from the spill, or the
        storage).  That includes new objects the savepoint wrote: they keep their oid and stay
        in the transaction.  New objects added after the savepoint leave it (unsaved again,
        holding their latest state).
        """
        spill = self._spill
        if spill is None:
            raise ConnectionStateError("savepoint rollback after the transaction ended")
        later = set(spill.oids_since(position))
        victims = [*self._added.values(), *self._registered]
        victims.extend(obj for obj in map(self._cache.get, later) if obj is not None)
        victims.extend(self._load_spilled_ghosts(victims, later.__contains__))
        spill.rollback(position)
        self._added = {}
        self._registered = []
        for obj in victims:
            if obj._p_jar is not self or obj._p_state == GHOST:
                continue
            if obj._p_serial == z64 and obj._p_oid not in spill:
                self._unsave(obj)  # added after the savepoint
            else:
                ghostify(obj)

    # -- synchronisation (called by the transaction manager) --------------------------------

    def newTransaction(self, transaction: Any, sync: bool = True) -> None:
        """A new transaction began: move to the newest committed state (with ``sync``, as
        ZODB, first letting a storage that can catch up with other committers: a server
        round trip for a ClientStorage)."""
        if self._joined is None and self._opened:
            self._start_snapshot(sync=sync)

    def beforeCompletion(self, transaction: Any) -> None:
        """Nothing to do before commit or abort."""

    def afterCompletion(self, transaction: Any) -> None:
        """The transaction ended: move to the newest state and trim the cache."""
        if self._joined is None and self._opened:
            self._start_snapshot()
            if self._minimize_later:
                self._minimize_later = False
                self.cache_minimize()
            else:
                self._cache.shrink()

    def sync(self) -> None:
        """Abort the current transaction and move to the newest committed state."""
        self._check_open("sync")
        self.transaction_manager.abort()
        self._start_snapshot(sync=True)

    def _start_snapshot(self, sync: bool = False) -> None:
        """Move to the storage's newest state, invalidating what changed since the last one.

        ``sync``: at an explicit start (``begin()``, opening, ``sync()``), ask a storage
        that can to catch up first -- not after every commit or abort, where ZODB does not
        either: the next explicit ``begin()`` does.
        """
        if self._before is not None:
            return  # a historical connection stays where it was opened
        if sync and self._storage_sync is not None:
            self._storage_sync()
        since = self._snapshot
        if since == z64 and not len(self._cache):
            # A new connection has nothing to invalidate: ask only what is newest, instead of
            # the changes of the storage's whole history.
            since = self._storage.last_tid()
        newest, changed = self._storage.poll_invalidations(since)
        if not (newest == self._snapshot and changed is not None and not changed):
            self._move_snapshot(newest, changed)
        if self._broken_oids:
            self._repair_broken()

    def _repair_broken(self) -> None:
        """Turn cached broken objects whose class can be found now into ghosts of that class."""
        for oid in list(self._broken_oids):
            obj = self._cache.get(oid)
            if obj is None or not obj._p_broken:
                self._broken_oids.discard(oid)
                continue
            if obj._p_state == CHANGED:
                continue
            cls = self._resolver.persistent_class(broken_name(obj.__class__))
            if not cls._p_broken and replace_class(obj, cls):
                self._broken_oids.discard(oid)

    def _move_snapshot(self, tid: Tid, changed: Collection[Oid] | None) -> None:
        """Read as of ``tid`` from now on, turning what ``changed`` since into ghosts.

        ``changed`` None: the storage cannot say what changed, and nothing cached can be
        trusted.  One step, so no read ever sees the new snapshot beside a stale object.
        """
        self._snapshot = tid
        self._read_before = p64(u64(tid) + 1)
        cache = self._cache
        if changed is None or self._db._metadata_watch in changed:
            self._db._metadata_changed(tid)  # perhaps a class rename recorded by another process
        if changed is None:
            for _, live in cache.live_objects():
                if live._p_state != GHOST:
                    ghostify(live)
            return
        for oid in changed:
            obj = cache.get(oid)
            if obj is not None and obj._p_state != GHOST:
                ghostify(obj)


class _InlineJar:
    """The jar of a persistent object a record held inline (see Connection._adopt_inline)."""

    __slots__ = ("connection", "container")

    def __init__(self, connection: Connection, container: Persistent) -> None:
        self.connection = connection
        self.container = container

    def register(self, obj: Persistent) -> None:
        """Its first change: it becomes a record of its own, and its container refers to it."""
        container = self.container
        if container._p_state == GHOST or not any(
            found is obj for found in _inline_persistent(container.__getstate__())
        ):
            # The container was reloaded since (evicted, invalidated): its state holds another
            # copy now, and a change to this one would be stored where nothing refers to it.
            raise ConnectionStateError(
                f"cannot change this {class_name(obj.__class__)}: it was loaded inside "
                f"{class_name(container.__class__)} oid {oid_repr(container._p_oid)}, which was reloaded "
                "since; get it from that object again"
            )
        self.connection.add(obj)  # written with this transaction, like any added object
        mark_changed(container)

    def setstate(self, obj: Persistent) -> None:
        """Never a ghost: it has no record yet."""
        raise ConnectionStateError(f"{class_name(obj.__class__)} held inline has no record to load")


def _inline_persistent(state: Any) -> list[Persistent]:
    """The persistent objects held inline in ``state`` (no jar yet, or an _InlineJar)."""
    found: list[Persistent] = []
    seen: set[int] = set()
    pending = [state]
    while pending:
        value = pending.pop()
        if id(value) in seen or isinstance(value, (str, bytes, int, float, type)) or value is None:
            continue
        seen.add(id(value))
        if isinstance(value, Persistent):
            jar = _get_slot(value, "_p_jar")
            if jar is not None and type(jar) is not _InlineJar:
                continue  # a reference: an object of its own
            found.append(value)
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            pending.extend(value)
        else:
            attributes = getattr(value, "__dict__", None)
            if isinstance(attributes, dict):
                pending.append(attributes)
    return found


def _state_misfit(obj: Persistent, oid: Oid, error: Exception) -> RecordDecodeError:
    """The error for a decoded state its class cannot take (``restore_state`` left a ghost)."""
    cls = obj.__class__
    kind = StateVersionError if isinstance(error, StateVersionError) else RecordDecodeError
    return kind(
        f"record of oid {oid_repr(oid)} ({cls.__module__}.{cls.__qualname__}) does not fit its class: "
        f"{type(error).__name__}: {error}; the object stays a ghost"
    )


def _refuse_while_unpickling(obj: Persistent, what: str) -> None:
    """Raise: a record being unpickled touched another object (only a tampered one does)."""
    raise RecordDecodeError(
        f"it tried to {what} {class_name(obj.__class__)} oid {oid_repr(_get_slot(obj, '_p_oid'))}:"
        " loading a record never loads or changes another object"
    )


def _spill_sink(spill: SpillFile) -> Callable[[Oid, Tid, bytes, Persistent], None]:
    def sink(oid: Oid, base: Tid, record: bytes, obj: Persistent) -> None:
        spill.store(oid, base, record)

    return sink


_NO_META = TransactionMeta()


def _meta(transaction: Any) -> TransactionMeta:
    user = getattr(transaction, "user", "")
    description = getattr(transaction, "description", "")
    extension = getattr(transaction, "extension", None)
    if not (user or description or extension):
        return _NO_META
    extension = dict(extension or {})
    try:
        encoded = json.dumps(extension, sort_keys=True).encode("utf-8") if extension else b""
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"transaction extension metadata must be JSON data: {exc}") from None
    return TransactionMeta(user=str(user or ""), description=str(description or ""), extension=encoded)
