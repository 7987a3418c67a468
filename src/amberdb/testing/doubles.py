"""Storage test doubles: StorageWrapper, the base, and VoteConflictStorage.

VoteConflictStorage finds conflicts only at vote, as a remote storage may.  A network or SQL
storage wants one round trip per commit, not one per object: it sends every record at
``vote`` and learns of conflicts then, and it takes the database-wide commit lock only for
that vote.  VoteConflictStorage gives any storage that behaviour, so the object layer's
resolve-and-vote-again path and late locking are tested without a server.  It is a real
storage (it passes :mod:`amberdb.testing`'s suite), safe for many threads: each thread has a
transaction of its own until its vote takes the wrapped storage's commit lock.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator

from amberdb.exceptions import POSKeyError, StorageError, StorageTransactionError, VoteConflictError
from amberdb.storage.base import (
    PackProgress,
    Revision,
    Storage,
    TransactionInfo,
    TransactionMeta,
    TransactionRecord,
    UndoResolver,
)
from amberdb.storage.history import copy_transactions, undo_transaction
from amberdb.utils import Oid, Tid, z64

__all__ = ["StorageWrapper", "VoteConflictStorage"]

_IDLE, _OPEN, _VOTED = "idle", "open", "voted"


class _Txn(threading.local):
    state = _IDLE
    meta = TransactionMeta()
    tid: Tid | None = None
    stores: dict[Oid, tuple[Tid, bytes]]


class StorageWrapper:
    """Passes every call of the storage protocol to ``inner``.

    The base of test doubles: subclass it and override only what the double changes (a call
    that fails on demand, conflicts found late), so the rest stays the wrapped storage's.
    """

    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    @property
    def inner(self) -> Storage:
        """The wrapped storage."""
        return self._inner

    @property
    def read_only(self) -> bool:
        """The wrapped storage's."""
        return self._inner.read_only

    @property
    def name(self) -> str:
        """The wrapped storage's."""
        return self._inner.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} over {self._inner!r}>"

    def load(self, oid: Oid, before: Tid | None = None) -> tuple[bytes, Tid]:
        """The wrapped storage's load."""
        return self._inner.load(oid, before)

    def last_tid(self) -> Tid:
        """The wrapped storage's newest tid."""
        return self._inner.last_tid()

    def poll_invalidations(self, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
        """The wrapped storage's poll."""
        return self._inner.poll_invalidations(since)

    def new_oid(self) -> Oid:
        """A fresh oid from the wrapped storage."""
        return self._inner.new_oid()

    def begin(self, meta: TransactionMeta, tid: Tid | None = None) -> None:
        """The wrapped storage's begin."""
        self._inner.begin(meta, tid)

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        """The wrapped storage's store."""
        self._inner.store(oid, base_tid, record)

    def vote(self) -> None:
        """The wrapped storage's vote."""
        self._inner.vote()

    def finish(self) -> Tid:
        """The wrapped storage's finish."""
        return self._inner.finish()

    def abort(self) -> None:
        """The wrapped storage's abort."""
        self._inner.abort()

    def close(self) -> None:
        """Close the wrapped storage."""
        self._inner.close()

    def __len__(self) -> int:
        return len(self._inner)

    def iterator(self, start: Tid | None = None, stop: Tid | None = None) -> Iterator[TransactionRecord]:
        """The wrapped storage's transactions."""
        return self._inner.iterator(start, stop)

    def undo_log(self, first: int = 0, last: int = -20) -> list[TransactionInfo]:
        """The wrapped storage's undo log."""
        return self._inner.undo_log(first, last)

    def history(self, oid: Oid, size: int = 1) -> list[Revision]:
        """The wrapped storage's history of ``oid``."""
        return self._inner.history(oid, size)

    def undo(self, tid: Tid, meta: TransactionMeta, resolve: UndoResolver | None = None) -> Tid:
        """An undo through this wrapper's own begin/store/vote/finish (so a double's changed
        calls take part), refusing what the wrapped storage's undo log leaves out (packed)."""
        return undo_transaction(self, tid, meta, resolve, self._inner.packed_tid)

    def pack(
        self, pack_tid: Tid | float, referencesf: object = None, *, progress: PackProgress | None = None
    ) -> None:
        """The wrapped storage's pack."""
        self._inner.pack(pack_tid, referencesf, progress=progress)

    def copy_transactions_from(self, other: Storage) -> int:
        """Copies through this wrapper's own calls (restores)."""
        return copy_transactions(self, other, self._mark_packed)

    def _mark_packed(self, tid: Tid) -> None:
        mark = getattr(self._inner, "_mark_packed", None)
        if mark is None:
            raise StorageError(f"{self._inner!r} cannot record the pack time of a packed source")
        mark(tid)

    @property
    def packed_tid(self) -> Tid | None:
        """The wrapped storage's."""
        return self._inner.packed_tid

    def get_size(self) -> int:
        """The wrapped storage's size."""
        return self._inner.get_size()


class VoteConflictStorage(StorageWrapper):
    """Wraps ``inner``: ``store`` only buffers, ``vote`` locks, checks every base tid, writes.

    A vote that finds conflicts releases the lock and raises VoteConflictError naming every
    conflicting oid; the transaction stays open for resolved records and another vote.
    """

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self._txn = _Txn()

    @property
    def name(self) -> str:
        """``vote-conflicts:`` and the wrapped storage's name."""
        return f"vote-conflicts:{self._inner.name}"

    def _expect(self, method: str, state: str) -> _Txn:
        txn = self._txn
        if txn.state != state:
            if state == _IDLE:
                raise StorageTransactionError(
                    f"{method}() while a transaction is {txn.state}: finish or abort it"
                )
            wanted = "an open" if state == _OPEN else "a voted"
            raise StorageTransactionError(f"{method}() needs {wanted} transaction, state is {txn.state}")
        return txn

    def begin(self, meta: TransactionMeta, tid: Tid | None = None) -> None:
        """Start this thread's transaction; nothing is locked yet (a restore's ``tid`` is
        checked at vote)."""
        if self._inner.read_only:
            self._inner.begin(meta)  # raises the wrapped storage's ReadOnlyError
        txn = self._expect("begin", _IDLE)
        self.last_tid()  # a closed storage refuses here, as begin() of any storage does
        txn.state, txn.meta, txn.stores, txn.tid = _OPEN, meta, {}, tid

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        """Buffer a revision; its base tid is checked at vote."""
        txn = self._expect("store", _OPEN)
        if (
            not isinstance(oid, bytes)
            or len(oid) != 8
            or not isinstance(base_tid, bytes)
            or len(base_tid) != 8
        ):
            raise ValueError("oid and base_tid must be 8 bytes")
        txn.stores[oid] = (base_tid, bytes(record))

    def vote(self) -> None:
        """Lock the wrapped storage, check every base tid, and write and vote there.

        Raises VoteConflictError (lock released, transaction still open) on conflicts.
        """
        txn = self._expect("vote", _OPEN)
        inner = self._inner
        inner.begin(txn.meta, txn.tid)
        try:
            conflicts: dict[Oid, tuple[Tid, Tid]] = {}
            for oid, (base, _) in txn.stores.items() if txn.tid is None else ():
                try:
                    committed = inner.load(oid)[1]
                except POSKeyError:
                    committed = z64
                if committed != base:
                    conflicts[oid] = (committed, base)
            if conflicts:
                raise VoteConflictError(conflicts)
            for oid, (base, record) in txn.stores.items():
                inner.store(oid, base, record)
            inner.vote()
        except BaseException:
            inner.abort()
            raise
        txn.state = _VOTED

    def finish(self) -> Tid:
        """Publish through the wrapped storage."""
        txn = self._expect("finish", _VOTED)
        try:
            return self._inner.finish()
        finally:
            self._reset(txn)

    def abort(self) -> None:
        """Forget this thread's transaction (and the wrapped storage's, once voted)."""
        txn = self._txn
        if txn.state == _VOTED:
            try:
                self._inner.abort()
            finally:
                self._reset(txn)
        elif txn.state == _OPEN:
            self._reset(txn)

    @staticmethod
    def _reset(txn: _Txn) -> None:
        txn.state, txn.stores = _IDLE, {}

    def close(self) -> None:
        """Abort this thread's transaction and close the wrapped storage."""
        self.abort()
        self._inner.close()
