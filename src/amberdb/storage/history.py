"""Operations written once over the storage interface: undo, copy, the undo log, walks.

Every storage offers ``undo``, ``copy_transactions_from`` and ``undo_log``
(:mod:`amberdb.storage.base`, invariants 8 and 9).  The functions here implement them with
nothing but the interface's other calls, so a storage gets them right by delegating, and
only a storage that can do better (a server doing the work next to the data, SQL doing it in
one statement) writes its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from amberdb.exceptions import (
    ConflictError,
    POSKeyError,
    ReadOnlyError,
    StorageError,
    StorageTransactionError,
    UndoError,
    VoteConflictError,
)
from amberdb.storage.base import Storage, TransactionInfo, TransactionMeta, TransactionRecord, UndoResolver
from amberdb.utils import Oid, Tid, next_tid, oid_repr, tid_from_time, z64

__all__ = [
    "copy_transactions",
    "find_transaction",
    "iter_current_records",
    "log_slice",
    "newer_than",
    "newest_first_slice",
    "pack_time",
    "start_copy",
    "transaction_tid",
    "undo_transaction",
]

_UNDO_ATTEMPTS = 5
"""Rounds an undo makes when another committer changed its objects between its look and
its vote (storages that find conflicts only at vote)."""


def iter_current_records(
    storage: Storage, after: Oid | None = None, batch: int = 1000
) -> Iterator[tuple[Oid, Tid, bytes]]:
    """Every object's current ``(oid, tid, record)`` above ``after``, in oid order, read a
    page of ``batch`` at a time through the storage's ``current_records`` (storage/base.py).

    Memory stays at one page however big the database; to resume after a crash, pass the
    last oid handled as ``after``.  StorageError when the storage cannot list its records,
    or answers out of order (which would otherwise loop or skip objects).
    """
    if type(batch) is not int or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r:.40}")
    current_records = getattr(storage, "current_records", None)
    if current_records is None:
        raise StorageError(
            f"storage {storage.name} cannot list its current records (no current_records); walk"
            " the objects from the root instead, or copy the database into a storage that can"
            " (memory, file, SQLite, PostgreSQL, or a server of protocol version 2 or later)"
        )
    while True:
        page: list[tuple[Oid, Tid, bytes]] = current_records(after, batch)
        if not page:
            return
        if len(page) > batch:
            raise StorageError(f"storage {storage.name} listed {len(page)} records when asked for {batch}")
        for oid, tid, record in page:
            if after is not None and oid <= after:
                raise StorageError(
                    f"storage {storage.name} listed oid {oid_repr(oid)} after {oid_repr(after)}:"
                    " its current_records is not in increasing oid order"
                )
            yield oid, tid, record
            after = oid


def pack_time(pack_tid: Tid | float) -> Tid:
    """The tid a ``pack`` argument names: a tid, or a POSIX time (ZODB's ``pack(t, ...)``)."""
    if isinstance(pack_tid, bytes) and len(pack_tid) == 8:
        return pack_tid
    if isinstance(pack_tid, (int, float)) and not isinstance(pack_tid, bool) and pack_tid >= 0:
        return tid_from_time(pack_tid)
    raise TypeError(f"pack() takes an 8-byte tid or a POSIX time, not {pack_tid!r:.80}")


def transaction_tid(last: Tid, requested: Tid | None, name: str) -> Tid:
    """The tid of a transaction beginning after ``last`` in storage ``name``: the next one,
    or for a restore (invariant 9) ``requested``, which must be above ``last``."""
    if requested is None:
        return next_tid(last)
    if requested <= last:
        raise StorageTransactionError(
            f"cannot restore transaction {oid_repr(requested)} into {name}: it is not above the"
            f" newest one there, {oid_repr(last)}"
        )
    return requested


def log_slice(first: int, last: int) -> tuple[int, int]:
    """``(first, stop)`` for ZODB's ``undoLog(first, last)`` convention (negative ``last``
    counts from ``first``); ValueError for a negative ``first``."""
    if first < 0:
        raise ValueError(f"first must be >= 0, got {first}")
    stop = first - last if last < 0 else last
    return first, max(first, stop)


def newest_first_slice(
    transactions: Iterable[TransactionInfo], first: int, last: int
) -> list[TransactionInfo]:
    """The ``undo_log(first, last)`` entries of ``transactions`` (already newest first)."""
    start, stop = log_slice(first, last)
    result = []
    for i, info in enumerate(transactions):
        if i >= stop:
            break
        if i >= start:
            result.append(info)
    return result


def find_transaction(storage: Storage, tid: Tid) -> TransactionRecord:
    """The committed transaction ``tid`` with its records; UndoError when there is none."""
    for txn in storage.iterator(tid, tid):
        if txn.tid == tid:
            return txn
        break
    raise UndoError(f"no transaction {oid_repr(tid)} in {storage.name}: nothing to undo")


def undo_transaction(
    storage: Storage,
    tid: Tid,
    meta: TransactionMeta,
    resolve: UndoResolver | None,
    packed_tid: Tid | None,
) -> Tid:
    """:meth:`Storage.undo` through the storage's own begin/store/vote/finish.

    ``packed_tid``: the newest pack time (None when never packed); older transactions
    cannot be undone because the states before them may be gone.
    """
    if not isinstance(tid, bytes) or len(tid) != 8:
        raise TypeError(f"undo() takes a transaction id (8 bytes, from undo_log), not {tid!r:.80}")
    if packed_tid is not None and tid <= packed_tid:
        raise UndoError(
            f"transaction {oid_repr(tid)} is at or before the last pack time {oid_repr(packed_tid)}:"
            " the states before it were packed away, so it cannot be undone"
        )
    txn = find_transaction(storage, tid)
    for attempt in range(_UNDO_ATTEMPTS):
        try:
            return _undo_once(storage, txn, meta, resolve)
        except VoteConflictError:
            if attempt == _UNDO_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _undo_once(
    storage: Storage, txn: TransactionRecord, meta: TransactionMeta, resolve: UndoResolver | None
) -> Tid:
    tid = txn.tid
    storage.begin(meta)
    try:
        refused: dict[Oid, str] = {}
        for rec in txn.records:
            try:
                restored, _ = storage.load(rec.oid, before=tid)
            except POSKeyError:
                continue  # created by the undone transaction: left alone (see Storage.undo)
            current, current_tid = storage.load(rec.oid)
            if current_tid == tid or current == rec.record:
                # Unchanged since, or changed back to exactly what the undone transaction
                # wrote (a later transaction undone, say): nothing stands in the way.
                storage.store(rec.oid, current_tid, restored)
                continue
            if resolve is None:
                refused[rec.oid] = f"changed again by transaction {oid_repr(current_tid)}"
                continue
            try:
                merged = resolve(rec.oid, rec.record, current, restored)
            except ConflictError as exc:
                refused[rec.oid] = str(exc)
                continue
            storage.store(rec.oid, current_tid, merged)
        if refused:
            shown = "; ".join(f"oid {oid_repr(oid)}: {why}" for oid, why in list(refused.items())[:10])
            more = "" if len(refused) <= 10 else f" (and {len(refused) - 10} more)"
            raise UndoError(
                f"cannot undo transaction {oid_repr(tid)}: later transactions changed its objects"
                f" and the changes do not merge -- {shown}{more}",
                oids=tuple(refused),
            )
        storage.vote()
        return storage.finish()
    except BaseException:
        storage.abort()
        raise


def copy_transactions(destination: Storage, source: Storage, mark_packed: Callable[[Tid], None]) -> int:
    """:meth:`Storage.copy_transactions_from` through the destination's restores.

    ``mark_packed(tid)`` records a pack time in the (still empty) destination: a copy of a
    packed history must refuse to undo what the source refuses, since the states before
    those transactions are not in it either.
    """
    newest = start_copy(destination, source, mark_packed)
    copied = 0
    for txn in newer_than(source, newest):
        destination.begin(txn.meta, tid=txn.tid)
        try:
            for rec in txn.records:
                destination.store(rec.oid, rec.tid, rec.record)
            destination.vote()
            got = destination.finish()
        except BaseException:
            destination.abort()
            raise
        if got != txn.tid:
            raise StorageTransactionError(
                f"{destination.name} committed the copy of transaction {oid_repr(txn.tid)} as"
                f" {oid_repr(got)}: its begin(meta, tid=...) does not restore tids"
            )
        copied += 1
    return copied


def start_copy(destination: Storage, source: Storage, mark_packed: Callable[[Tid], None]) -> Tid:
    """Check that ``source`` may be copied into ``destination`` (see :func:`copy_transactions`),
    record the source's pack time if needed, and return the destination's newest tid: the
    copy goes on with the source's transactions after it (:func:`newer_than`)."""
    if destination.read_only:
        raise ReadOnlyError(f"cannot copy into {destination.name}: it is read-only")
    newest = destination.last_tid()
    if newest != z64 and not any(txn.tid == newest for txn in source.iterator(newest, newest)):
        raise StorageError(
            f"cannot copy {source.name} into {destination.name}: the destination's newest transaction"
            f" {oid_repr(newest)} is not one of the source's, so their histories diverge (copy into an"
            " empty storage, or into an earlier copy of the same one)"
        )
    packed = source.packed_tid
    if packed is not None and newest < packed and (destination.packed_tid or z64) < packed:
        if newest != z64:
            raise StorageError(
                f"cannot copy {source.name} into {destination.name}: the source was packed at"
                f" {oid_repr(packed)}, after the destination's newest transaction {oid_repr(newest)};"
                " copy it into an empty storage"
            )
        mark_packed(packed)
    return newest


def newer_than(source: Storage, newest: Tid) -> Iterator[TransactionRecord]:
    """``source``'s transactions after ``newest``, oldest first."""
    for txn in source.iterator(newest):
        if txn.tid > newest:
            yield txn
