"""MemoryStorage: the reference storage, keeping every revision in memory.

It is the executable specification of :mod:`amberdb.storage.base`: small enough to read in
one go, with the full history per oid so snapshot reads (``load(oid, before=...)``) work.
Nothing survives the process; durability (invariant 3) holds trivially.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Collection, Iterator

from amberdb.exceptions import ConflictError, POSKeyError, StorageError, StorageTransactionError
from amberdb.storage.base import DataRecord, TransactionMeta, TransactionRecord
from amberdb.utils import Oid, Tid, next_tid, oid_repr, p64, u64, z64

__all__ = ["MemoryStorage"]

_IDLE, _OPEN, _VOTED = "idle", "open", "voted"


def _tid_of(txn: TransactionRecord) -> Tid:
    return txn.tid


class MemoryStorage:
    """An in-memory storage with full history; one committer at a time across threads."""

    def __init__(self) -> None:
        # oid -> parallel lists of tids (ascending) and records, for bisecting on ``before``.
        self._tids: dict[Oid, list[Tid]] = {}
        self._records: dict[Oid, list[bytes]] = {}
        self._transactions: list[TransactionRecord] = []
        self._last_tid = z64
        self._next_oid = 1
        self._closed = False
        # Readers take _lock briefly; it makes finish's publication atomic for them.
        self._lock = threading.Lock()
        # Held from begin to finish/abort: the one-committer-at-a-time rule.
        self._commit_lock = threading.Lock()
        self._oid_lock = threading.Lock()
        self._state = _IDLE
        self._owner: int | None = None
        self._tid = z64
        self._meta = TransactionMeta()
        self._txn_records: dict[Oid, bytes] = {}
        # For poll_invalidations: per finished transaction (as in _transactions), the oids it
        # changed that existed before it (new ones need no invalidation).
        self._changed: list[tuple[Oid, ...]] = []

    # -- properties -------------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        """Always False: a MemoryStorage is writable."""
        return False

    @property
    def name(self) -> str:
        """``"memory"``."""
        return "memory"

    def __repr__(self) -> str:
        return f"<MemoryStorage {len(self)} objects, last tid {oid_repr(self._last_tid)}>"

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("storage memory is closed")

    # -- reading ----------------------------------------------------------------------------

    def load(self, oid: Oid, before: Tid | None = None) -> tuple[bytes, Tid]:
        """Return ``(record, tid)`` of the newest revision (strictly before ``before``)."""
        with self._lock:
            self._check_open()
            tids = self._tids.get(oid)
            if not tids:
                raise POSKeyError(oid)
            if before is None:
                return self._records[oid][-1], tids[-1]
            i = bisect.bisect_left(tids, before)
            if i == 0:
                raise POSKeyError(oid, f"no revision before tid {oid_repr(before)}")
            return self._records[oid][i - 1], tids[i - 1]

    def last_tid(self) -> Tid:
        """The tid of the newest finished transaction."""
        self._check_open()
        return self._last_tid

    def poll_invalidations(self, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
        """The newest tid and the oids changed after ``since`` (full history: never None
        unless ``since`` is newer than anything committed here)."""
        with self._lock:
            self._check_open()
            newest = self._last_tid
            if since == newest:
                return newest, ()
            if since > newest:
                return newest, None
            oids: set[Oid] = set()
            first = bisect.bisect_right(self._transactions, since, key=_tid_of)
            for changed in self._changed[first:]:
                oids.update(changed)
            return newest, oids

    def __len__(self) -> int:
        """The number of oids with at least one revision."""
        return len(self._tids)

    def size(self) -> int:
        """The bytes of every record revision held (a full count: meant for an occasional look)."""
        with self._lock:
            self._check_open()
            return sum(len(record) for records in self._records.values() for record in records)

    def iterator(self, start: Tid | None = None, stop: Tid | None = None) -> Iterator[TransactionRecord]:
        """Yield finished transactions with ``start <= tid <= stop``, oldest first."""
        self._check_open()
        with self._lock:
            transactions = list(self._transactions)
        for txn in transactions:
            if start is not None and txn.tid < start:
                continue
            if stop is not None and txn.tid > stop:
                break
            yield txn

    # -- writing ----------------------------------------------------------------------------

    def new_oid(self) -> Oid:
        """A fresh oid, never ``z64`` and never one handed out or stored before."""
        self._check_open()
        with self._oid_lock:
            oid = self._next_oid
            if oid >= 1 << 64:
                raise StorageError("the storage has used up its oids")
            self._next_oid = oid + 1
        return p64(oid)

    def _bump_oid(self, oid: Oid) -> None:
        with self._oid_lock:
            self._next_oid = max(self._next_oid, u64(oid) + 1)

    def begin(self, meta: TransactionMeta) -> None:
        """Start a commit, waiting for any other commit to end."""
        self._check_open()
        if self._state != _IDLE and self._owner == threading.get_ident():
            raise StorageTransactionError("begin() called twice without finish() or abort()")
        self._commit_lock.acquire()
        if self._closed:
            self._commit_lock.release()
            raise StorageError("storage memory is closed")
        self._state = _OPEN
        self._owner = threading.get_ident()
        self._meta = meta
        self._tid = next_tid(self._last_tid)
        self._txn_records = {}

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        """Add a revision of ``oid`` to the open transaction; ConflictError per invariant 2."""
        if self._state != _OPEN:
            raise StorageTransactionError(f"store() needs an open transaction, state is {self._state}")
        if len(oid) != 8 or len(base_tid) != 8:
            raise ValueError("oid and base_tid must be 8 bytes")
        with self._lock:
            tids = self._tids.get(oid)
            committed = tids[-1] if tids else z64
        if committed != base_tid:
            raise ConflictError(oid=oid, serials=(committed, base_tid))
        self._txn_records[oid] = bytes(record)
        self._bump_oid(oid)

    def vote(self) -> None:
        """Nothing to make durable in memory; moves the transaction to the voted state."""
        if self._state != _OPEN:
            raise StorageTransactionError(f"vote() needs an open transaction, state is {self._state}")
        self._state = _VOTED

    def finish(self) -> Tid:
        """Publish the voted transaction atomically and return its tid."""
        if self._state != _VOTED:
            raise StorageTransactionError(f"finish() needs a voted transaction, state is {self._state}")
        tid = self._tid
        records = [DataRecord(oid, tid, rec) for oid, rec in self._txn_records.items()]
        with self._lock:
            self._changed.append(tuple(oid for oid in self._txn_records if oid in self._tids))
            for oid, rec in self._txn_records.items():
                self._tids.setdefault(oid, []).append(tid)
                self._records.setdefault(oid, []).append(rec)
            self._transactions.append(TransactionRecord(tid, self._meta, records))
            self._last_tid = tid
        self._end()
        return tid

    def abort(self) -> None:
        """Forget the open or voted transaction; a no-op when none is open."""
        if self._state != _IDLE:
            self._end()

    def _end(self) -> None:
        self._state = _IDLE
        self._owner = None
        self._txn_records = {}
        self._commit_lock.release()

    def close(self) -> None:
        """Abort any open transaction and refuse further use.  Idempotent."""
        if self._closed:
            return
        self.abort()
        with self._lock:
            self._closed = True
