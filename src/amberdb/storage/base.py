"""The storage interface: what every AmberDB storage does, promises and raises.

A storage keeps *records* (opaque ``bytes`` produced by :mod:`amberdb.record`) under *oids*,
with one revision per committed transaction.  It never sees a Python object, never unpickles,
and never resolves conflicts: that happens above it, in the connection.  This keeps tools that
work on storages (copy, verify, pack) free of application code.

Commit protocol (one committer at a time, from the moment a storage takes its commit lock --
in :meth:`Storage.begin` or as late as :meth:`Storage.vote` -- until ``finish`` or ``abort``)::

                 begin(meta)           store(...)*          vote()            finish()
      idle ──────────────────▶ open ─────────────▶ open ─────────▶ voted ─────────▶ idle
                                 │         ▲         │               │
                                 │         └─────────┤ VoteConflictError: still open;
                                 │                   │ store resolved records, vote again
                                 └──── abort() ──────┴──── abort() ──┴──▶ idle

The object layer serializes every record before it calls ``begin``: a storage may take its
lock there (embedded storages do) or only in ``vote`` (a remote storage, to keep its lock
for one round trip), and nothing it waits on under that lock runs application code.

Invariants every implementation keeps (:mod:`amberdb.testing` checks them against any
storage):

1. ``load`` only ever returns data of *finished* transactions; a transaction becomes visible
   to ``load`` and ``last_tid`` atomically in ``finish`` (for a storage that follows another
   process's commits, in the ``poll_invalidations`` that first reports it).
2. A store whose ``base_tid`` is not the tid of the object's newest committed revision
   (``z64`` for an object never committed) is a *conflict*.  The storage reports it either
   from ``store`` (:class:`~amberdb.exceptions.ConflictError` carrying ``oid`` and
   ``serials=(committed tid, base_tid)``) or, at the latest, from ``vote``
   (:class:`~amberdb.exceptions.VoteConflictError` naming every conflicting oid with the
   same pair).  Either way the transaction stays open, so the caller may store a resolved
   record (with the committed tid as ``base_tid``) and vote again, or ``abort()``.  A vote
   never succeeds while a conflict is outstanding.  A second store of the same oid in one
   transaction is checked against the committed tid too.
3. After ``vote`` returns, the transaction survives a crash (unless the storage was opened
   with durability relaxed, where its documentation says so).  A transaction is visible
   after a crash only if it was completely written; an aborted one never is, and one cut
   short by a crash before ``vote`` returned may be either complete or absent, never partial.
4. Tids handed out by ``finish`` increase strictly.
5. ``new_oid`` never returns an oid that this storage instance returned before, nor one that
   has a record.  Oid ``z64`` is the root and is never handed out by ``new_oid``.
6. Between a ``vote`` that returned and the ``finish`` or ``abort`` that follows, no other
   transaction finishes: a ``poll_invalidations`` made then reports everything committed
   before this transaction, and nothing after it.
7. ``poll_invalidations(since)`` returns ``(newest, oids)`` as one atomic observation:
   ``newest`` is the tid of the newest transaction ``load`` sees from then on, and ``oids``
   holds every oid that a transaction with ``since < tid <= newest`` changed (it may leave
   out oids those transactions created: nobody can have them cached).  ``oids`` is None when
   the storage can no longer tell -- ``since`` is older than the history it keeps, or is
   not a tid it knows -- and the caller must then forget every object it has cached.
   Several databases or processes on one storage's data each poll for themselves: this,
   not any in-process signal, is how a connection learns what other committers changed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from amberdb.utils import Oid, Tid

__all__ = [
    "DataRecord",
    "IterableStorage",
    "Storage",
    "TransactionMeta",
    "TransactionRecord",
]


@dataclass(frozen=True)
class TransactionMeta:
    """What a storage keeps about a transaction besides its records.

    ``extension`` is already-encoded bytes (the database layer writes JSON there); the
    storage keeps it verbatim.
    """

    user: str = ""
    description: str = ""
    extension: bytes = b""


@dataclass(frozen=True)
class DataRecord:
    """One object revision inside a committed transaction."""

    oid: Oid
    tid: Tid
    record: bytes


@dataclass(frozen=True)
class TransactionRecord:
    """A committed transaction as :meth:`IterableStorage.iterator` yields it."""

    tid: Tid
    meta: TransactionMeta
    records: list[DataRecord] = field(default_factory=list)


@runtime_checkable
class Storage(Protocol):
    """The interface between the object layer and the bytes on disk (or wherever)."""

    @property
    def read_only(self) -> bool:
        """True when every write (``new_oid``, ``begin``) raises ReadOnlyError."""
        ...

    @property
    def name(self) -> str:
        """A short human-readable name: a file path, a URL, ``memory``."""
        ...

    def load(self, oid: Oid, before: Tid | None = None) -> tuple[bytes, Tid]:
        """Return ``(record, tid)`` of the newest revision of ``oid``.

        With ``before``, the newest revision whose tid is strictly lower than ``before``
        (snapshot reads for MVCC).  Raises POSKeyError when there is no such revision.
        """
        ...

    def last_tid(self) -> Tid:
        """The tid of the newest finished transaction (``z64`` for an empty storage)."""
        ...

    def poll_invalidations(self, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
        """``(newest tid, oids changed after since)``, or None for the oids (invariant 7).

        Called by every connection at every transaction boundary: cheap when nothing changed.
        """
        ...

    def new_oid(self) -> Oid:
        """A fresh oid for an object about to be stored (see invariant 5)."""
        ...

    def begin(self, meta: TransactionMeta) -> None:
        """Start a commit; a storage that locks early waits here for the previous committer.

        Raises StorageTransactionError at once, without waiting, when the calling thread's
        own transaction is still open (it would otherwise wait for itself).
        """
        ...

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        """Add a revision of ``oid`` to the open transaction (see invariant 2).

        Storing the same oid twice in one transaction keeps the last record.
        """
        ...

    def vote(self) -> None:
        """Make the open transaction durable (invariant 3); after this only finish/abort.

        May raise VoteConflictError instead (invariant 2): the transaction is still open.
        """
        ...

    def finish(self) -> Tid:
        """Publish the voted transaction and return its tid (invariants 1 and 4)."""
        ...

    def abort(self) -> None:
        """Forget the open or voted transaction; a no-op when none is open."""
        ...

    def close(self) -> None:
        """Release files, locks and connections; aborts an open transaction.  Idempotent."""
        ...

    def __len__(self) -> int:
        """The number of objects (oids with at least one revision)."""
        ...


@runtime_checkable
class IterableStorage(Storage, Protocol):
    """A storage that can list its committed transactions, oldest first."""

    def iterator(self, start: Tid | None = None, stop: Tid | None = None) -> Iterator[TransactionRecord]:
        """Yield committed transactions with ``start <= tid <= stop``, oldest first."""
        ...
