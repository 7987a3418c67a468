"""MemoryStorage: the reference storage, keeping every revision in memory.

It is the executable specification of :mod:`amberdb.storage.base`: small enough to read in
one go, with the full history per oid so snapshot reads (``load(oid, before=...)``) work.
Nothing survives the process; durability (invariant 3) holds trivially.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Collection, Iterator

from amberdb.exceptions import (
    ConflictError,
    POSKeyError,
    ReadConflictError,
    StorageError,
    StorageTransactionError,
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
from amberdb.storage.history import (
    copy_transactions,
    newest_first_slice,
    pack_time,
    transaction_tid,
    undo_transaction,
)
from amberdb.utils import Oid, Tid, oid_repr, p64, u64, z64

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
        # Every oid with a revision, sorted, for current_records: kept in step with _tids at
        # finish and pack.  New oids nearly always sort last (new_oid counts up), so keeping
        # it costs an append per created object; an insort only for oids stored out of order.
        self._order: list[Oid] = []
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
        self._restoring = False
        # The newest pack time (None: never packed); undo refuses transactions up to it.
        self._packed_tid: Tid | None = None
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

    @property
    def packed_tid(self) -> Tid | None:
        """The newest pack time (None when never packed): older transactions cannot be undone."""
        return self._packed_tid

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
            if since > newest or (self._packed_tid is not None and since < self._packed_tid):
                # A pack dropped whole transactions before its time: changes then are unknown.
                return newest, None
            oids: set[Oid] = set()
            first = bisect.bisect_right(self._transactions, since, key=_tid_of)
            for changed in self._changed[first:]:
                oids.update(changed)
            return newest, oids

    def current_records(self, after: Oid | None = None, limit: int = 1000) -> list[tuple[Oid, Tid, bytes]]:
        """Up to ``limit`` current records of the oids above ``after``, in oid order: a bisect
        of the sorted oid list, then ``limit`` dict lookups (storage/base.py)."""
        if type(limit) is not int or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r:.40}")
        with self._lock:
            self._check_open()
            order = self._order
            start = 0 if after is None else bisect.bisect_right(order, after)
            tids, records = self._tids, self._records
            return [(oid, tids[oid][-1], records[oid][-1]) for oid in order[start : start + limit]]

    def __len__(self) -> int:
        """The number of oids with at least one revision."""
        return len(self._tids)

    def get_size(self) -> int:
        """The bytes of every record revision held (a full count: meant for an occasional look)."""
        with self._lock:
            self._check_open()
            return sum(len(record) for records in self._records.values() for record in records)

    size = get_size

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

    def undo_log(self, first: int = 0, last: int = -20) -> list[TransactionInfo]:
        """Undoable transactions, newest first (ZODB's ``first``/``last`` convention)."""
        self._check_open()
        with self._lock:
            transactions = list(self._transactions)
        packed = self._packed_tid
        infos = (
            TransactionInfo(txn.tid, txn.meta)
            for txn in reversed(transactions)
            if packed is None or txn.tid > packed
        )
        return newest_first_slice(infos, first, last)

    def history(self, oid: Oid, size: int = 1) -> list[Revision]:
        """Up to ``size`` revisions of ``oid``, newest first."""
        with self._lock:
            self._check_open()
            tids = self._tids.get(oid)
            if not tids:
                raise POSKeyError(oid)
            picked = list(zip(reversed(tids), reversed(self._records[oid])))[: max(size, 0)]
            result = []
            for tid, record in picked:
                i = bisect.bisect_left(self._transactions, tid, key=_tid_of)
                result.append(Revision(tid, self._transactions[i].meta, len(record)))
        return result

    def undo(self, tid: Tid, meta: TransactionMeta, resolve: UndoResolver | None = None) -> Tid:
        """Commit a transaction restoring the states from before ``tid`` (see Storage.undo)."""
        self._check_open()
        return undo_transaction(self, tid, meta, resolve, self._packed_tid)

    def copy_transactions_from(self, other: Storage) -> int:
        """Copy ``other``'s transactions newer than ours, tids and metadata kept."""
        self._check_open()
        return copy_transactions(self, other, self._mark_packed)

    def _mark_packed(self, tid: Tid) -> None:
        self._packed_tid = tid if self._packed_tid is None else max(tid, self._packed_tid)

    def pack(
        self, pack_tid: Tid | float, referencesf: object = None, *, progress: PackProgress | None = None
    ) -> None:
        """Forget revisions no snapshot at or after ``pack_tid`` sees, and garbage.

        Holds the commit lock throughout (it is all in memory, so that is short).
        """
        self._check_open()
        pack_tid = pack_time(pack_tid)  # also a POSIX time, as ZODB's pack(t, referencesf)
        if self._state != _IDLE and self._owner == threading.get_ident():
            raise StorageTransactionError("pack() while this thread's transaction is open: end it first")
        with self._commit_lock, self._lock:
            pack_tid = min(pack_tid, self._last_tid)
            self._pack_locked(pack_tid, progress)

    def _pack_locked(self, pack_tid: Tid, progress: PackProgress | None) -> None:
        total = len(self._tids)
        # For each oid: the index of its newest revision at or before pack_tid (-1: none).
        cut = {oid: bisect.bisect_right(tids, pack_tid) - 1 for oid, tids in self._tids.items()}
        live: set[Oid] = set()
        stack: list[Oid] = [z64]
        for oid, tids in self._tids.items():
            if cut[oid] < len(tids) - 1:
                stack.append(oid)  # it has revisions after the pack time: all kept
        while stack:
            oid = stack.pop()
            if oid in live or oid not in self._tids:
                continue
            live.add(oid)
            if progress is not None:
                progress(len(live), total)
            for record in self._records[oid][max(cut[oid], 0) :]:
                stack.extend(ref for ref in references(record) if ref not in live)
        for oid in list(self._tids):
            keep_from = max(cut[oid], 0)
            if oid not in live:
                del self._tids[oid], self._records[oid]
            elif keep_from:
                del self._tids[oid][:keep_from], self._records[oid][:keep_from]
        kept = []
        for txn in self._transactions:
            if txn.tid > pack_tid:
                kept.append(txn)
                continue
            records = [
                rec for rec in txn.records if rec.oid in self._tids and self._tids[rec.oid][0] == txn.tid
            ]
            if records or txn is self._transactions[-1]:
                # The newest transaction stays, emptied if need be, as FileStorage's does: a
                # file names its last tid only through it.
                kept.append(TransactionRecord(txn.tid, txn.meta, records))
        self._order = [oid for oid in self._order if oid in self._tids]
        changed = dict(zip((txn.tid for txn in self._transactions), self._changed))
        self._transactions = kept
        self._changed = [changed[txn.tid] for txn in kept]
        self._packed_tid = pack_tid if self._packed_tid is None else max(pack_tid, self._packed_tid)
        if progress is not None:
            progress(total, total)

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

    def begin(self, meta: TransactionMeta, tid: Tid | None = None) -> None:
        """Start a commit, waiting for any other commit to end; with ``tid``, a restore."""
        self._check_open()
        if tid is not None and (not isinstance(tid, bytes) or len(tid) != 8):
            raise TypeError(f"tid must be 8 bytes, got {tid!r:.80}")
        if self._state != _IDLE and self._owner == threading.get_ident():
            raise StorageTransactionError("begin() called twice without finish() or abort()")
        self._commit_lock.acquire()
        if self._closed:
            self._commit_lock.release()
            raise StorageError("storage memory is closed")
        try:
            new_tid = transaction_tid(self._last_tid, tid, self.name)
        except BaseException:
            self._commit_lock.release()
            raise
        self._state = _OPEN
        self._owner = threading.get_ident()
        self._meta = meta
        self._tid = new_tid
        self._restoring = tid is not None
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
        if committed != base_tid and not self._restoring:
            raise ConflictError(oid=oid, serials=(committed, base_tid))
        self._txn_records[oid] = bytes(record)
        self._bump_oid(oid)

    def check_current(self, oid: Oid, serial: Tid) -> None:
        """ReadConflictError unless ``serial`` is ``oid``'s committed tid (the commit lock is
        held from begin, so it stays so until finish)."""
        if self._state != _OPEN:
            raise StorageTransactionError(
                f"check_current() needs an open transaction, state is {self._state}"
            )
        with self._lock:
            tids = self._tids.get(oid)
            committed = tids[-1] if tids else z64
        if committed != serial:
            raise ReadConflictError(oid=oid, serials=(committed, serial))

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
            self._add_to_order(sorted(oid for oid in self._txn_records if oid not in self._tids))
            for oid, rec in self._txn_records.items():
                self._tids.setdefault(oid, []).append(tid)
                self._records.setdefault(oid, []).append(rec)
            self._transactions.append(TransactionRecord(tid, self._meta, records))
            self._last_tid = tid
        self._end()
        return tid

    def _add_to_order(self, created: list[Oid]) -> None:
        """Put the (sorted) oids a finishing transaction creates into ``_order`` (under ``_lock``)."""
        order = self._order
        if not order or not created or created[0] > order[-1]:
            order.extend(created)
            return
        for oid in created:
            bisect.insort(order, oid)

    def abort(self) -> None:
        """Forget the open or voted transaction; a no-op when none is open."""
        if self._state != _IDLE:
            self._end()

    def _end(self) -> None:
        self._state = _IDLE
        self._owner = None
        self._txn_records = {}
        self._restoring = False
        self._commit_lock.release()

    def close(self) -> None:
        """Abort any open transaction and refuse further use.  Idempotent."""
        if self._closed:
            return
        self.abort()
        with self._lock:
            self._closed = True
