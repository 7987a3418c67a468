"""The storage interface: what every AmberDB storage does, promises and raises.

A storage keeps *records* (opaque ``bytes`` produced by :mod:`amberdb.record`) under *oids*,
with one revision per committed transaction.  It never sees a Python object, never unpickles,
and never resolves conflicts: that happens above it, in the connection.  This keeps tools that
work on storages (copy, verify, pack) free of application code.

Commit protocol (one committer at a time appends, from the moment a storage takes its commit
lock -- in :meth:`Storage.begin` or as late as :meth:`Storage.vote` -- until the vote has
written the transaction; a storage may hold it until ``finish`` or ``abort``)::

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
6. ``finish`` returns only after every transaction with a lower tid has finished or been
   aborted, so a ``poll_invalidations`` made after ``finish`` reports everything committed up
   to this transaction (it may report later ones too).  Other transactions may finish between
   a ``vote`` that returned and its ``finish`` (a storage with group commit lets the next
   committer append while this one waits for its sync), so a poll made then proves nothing.
7. ``poll_invalidations(since)`` returns ``(newest, oids)`` as one atomic observation:
   ``newest`` is the tid of the newest transaction ``load`` sees from then on, and ``oids``
   holds every oid that a transaction with ``since < tid <= newest`` changed (it may leave
   out oids those transactions created: nobody can have them cached).  ``oids`` is None when
   the storage can no longer tell -- ``since`` is older than the history it keeps, or is
   not a tid it knows -- and the caller must then forget every object it has cached.
   Several databases or processes on one storage's data each poll for themselves: this,
   not any in-process signal, is how a connection learns what other committers changed.
8. History.  Every finished transaction is kept, with its metadata, until a ``pack``
   removes what no snapshot at or after the pack time can see: ``iterator``, ``undo_log``,
   ``history`` and ``load(before=...)`` all read that one history and agree with each
   other.  ``pack(pack_tid)`` keeps every revision newer than ``pack_tid``, and of older
   revisions exactly the newest one of each object still reachable -- from the root
   (``z64``) through the references in record headers (:func:`amberdb.record.references`),
   or from any revision newer than ``pack_tid`` -- and forgets everything else (a
   transaction left without records goes too, except the newest, which keeps ``last_tid``).
   Commits
   made while it packs survive it.  A pack interrupted at any moment (crash, signal,
   KeyboardInterrupt) leaves the storage as before it or as after it.  Transactions at or
   before the newest pack time cannot be undone (``undo`` raises UndoError saying so) and
   ``undo_log`` leaves them out.
9. Restores.  ``begin(meta, tid=tid)`` starts a transaction that commits with exactly that
   tid, which must be above ``last_tid()`` (else StorageTransactionError, from ``begin`` or
   at the latest from ``vote``); its stores
   are not checked for conflicts (``base_tid`` is ignored).  It is how
   ``copy_transactions_from`` copies history, with tids and metadata, between storages.  A
   copy goes only into a storage that is empty or holds an earlier copy of the same
   history (its newest tid is one of the source's), and a copy of a packed history keeps the
   source's ``packed_tid``.

Optional capabilities:

* ``prefetch(oids)``: a hint, answered without waiting, that these records will be loaded
  soon.  ``Connection.prefetch`` (and BTree range scans) call it when it is there.
* ``check_current(oid, serial)``: between ``begin`` and ``vote``, make the transaction fail
  with :class:`~amberdb.exceptions.ReadConflictError` (from this call or at the latest from
  ``vote``; not resolvable, so the caller aborts) unless ``serial`` is still the tid of
  ``oid``'s newest committed revision when the transaction commits -- checked under the
  commit lock, with the stores' own checks.  ``Connection.readCurrent`` calls it; without
  it the connection stores the object's record again unchanged, which checks the same.
* ``sync()``: catch up with other committers, so that the ``poll_invalidations`` that
  follows reports every transaction finished anywhere before the call (a round trip).  A
  connection calls it before polling at an explicit transaction start (``begin()``,
  ``db.open()``, ``conn.sync()``), not after each commit or abort -- as ZODB does.  Without
  it a storage's poll alone must tell what finished before it (invariant 7).
* ``current_records(after=None, limit=1000)``: up to ``limit`` (at least 1, else
  ValueError) triples ``(oid, tid, record)``, one per object that exists now, in strictly
  increasing oid order and all above ``after`` (every oid when None): ``tid`` and
  ``record`` are those of the object's newest committed revision, as ``load(oid)`` answers
  at the same moment (finished transactions only, invariant 1; objects a pack removed are
  absent).  An empty list means nothing is left; a caller pages on with ``after`` = the last
  oid it got, so a walk of every object can stop and resume anywhere, and commits made
  meanwhile show up in later pages or not (each page is one consistent look, the walk as a
  whole is not).  A call costs memory for ``limit`` records plus what the storage keeps
  anyway, and time about ``limit`` lookups of its oid order, never a pass over all objects
  or their history.  Tools that visit every object (schema evolution, class renames) page
  through it with :func:`amberdb.storage.history.iter_current_records`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from amberdb.utils import Oid, Tid, time_from_tid

__all__ = [
    "DataRecord",
    "IterableStorage",
    "PackProgress",
    "Revision",
    "Storage",
    "TransactionInfo",
    "TransactionMeta",
    "TransactionRecord",
    "UndoResolver",
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


class _ZODBKeys:
    """Also readable as the dicts ZODB's storages return: ``entry["tid"]`` (and ``"id"``,
    ``"serial"``), ``"time"`` (POSIX seconds), ``"user_name"``, ``"description"``, and
    ``"size"`` for a revision."""

    tid: Tid
    meta: TransactionMeta

    def keys(self) -> list[str]:
        """The keys ``[]`` answers."""
        keys = ["id", "tid", "serial", "time", "user_name", "description"]
        return [*keys, "size"] if hasattr(self, "size") else keys

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str) -> Any:
        if key in ("id", "tid", "serial"):
            return self.tid
        if key == "time":
            return time_from_tid(self.tid)
        if key == "user_name":
            return self.meta.user
        if key == "description":
            return self.meta.description
        if key == "size" and hasattr(self, "size"):
            return self.size
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]``, or ``default`` for another key."""
        try:
            return self[key]
        except KeyError:
            return default


@dataclass(frozen=True)
class TransactionInfo(_ZODBKeys):
    """A committed transaction without its records, as :meth:`Storage.undo_log` lists it."""

    tid: Tid
    meta: TransactionMeta


@dataclass(frozen=True)
class Revision(_ZODBKeys):
    """One revision of an object, as :meth:`Storage.history` lists it: ``size`` is the
    length of its record in bytes."""

    tid: Tid
    meta: TransactionMeta
    size: int


UndoResolver = Callable[[Oid, bytes, bytes, bytes], bytes]
"""``resolve(oid, undone, committed, restored) -> record`` for an undo whose object changed
again after the undone transaction: ``undone`` is the record that transaction wrote (the
common ancestor), ``committed`` the newest one, ``restored`` the one from before it.  Returns
the merged record, or raises ConflictError to refuse.  Supplied by the object layer (it
unpickles); a storage only passes bytes through it."""

PackProgress = Callable[[int, int], None]
"""``progress(done, total)``: how far a pack is, in units the storage chooses (bytes read,
say); ``done`` grows to ``total``."""


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

    def begin(self, meta: TransactionMeta, tid: Tid | None = None) -> None:
        """Start a commit; a storage that locks early waits here for the previous committer.

        Raises StorageTransactionError at once, without waiting, when the calling thread's
        own transaction is still open (it would otherwise wait for itself).  With ``tid``
        the transaction is a *restore* (invariant 9).
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

    # -- history (invariants 8 and 9) -------------------------------------------------------

    def iterator(self, start: Tid | None = None, stop: Tid | None = None) -> Iterator[TransactionRecord]:
        """Yield committed transactions with ``start <= tid <= stop``, oldest first, each
        with its metadata and records.

        A snapshot: transactions finished after the first item are not listed.
        """
        ...

    def undo_log(self, first: int = 0, last: int = -20) -> list[TransactionInfo]:
        """The undoable transactions, newest first, from the ``first``-th to before the
        ``last``-th (a negative ``last`` counts ``-last`` from ``first``), ZODB's convention."""
        ...

    def history(self, oid: Oid, size: int = 1) -> list[Revision]:
        """Up to ``size`` revisions of ``oid``, newest first; POSKeyError when it has none."""
        ...

    def undo(self, tid: Tid, meta: TransactionMeta, resolve: UndoResolver | None = None) -> Tid:
        """Commit a new transaction restoring each object ``tid`` changed to its state
        before ``tid``, and return the new tid.

        Objects that ``tid`` created are left alone (once the objects that referred to them
        are restored nothing does; pack collects them).  When a later transaction changed an
        object again (to other bytes than ``tid`` wrote), ``resolve`` merges (see
        :data:`UndoResolver`); without one, or when it refuses, nothing is committed and
        UndoError names every such oid.  UndoError too for
        a tid that is not a transaction here, or one at or before the last pack time.
        Raises StorageTransactionError when the calling thread's transaction is open.
        """
        ...

    def pack(
        self, pack_tid: Tid | float, referencesf: object = None, *, progress: PackProgress | None = None
    ) -> None:
        """Remove what no snapshot at or after ``pack_tid`` can see, and garbage (invariant 8).

        Readers and committers go on while it runs; a ``pack_tid`` above ``last_tid()``
        packs at ``last_tid()``.  ``pack_tid`` may also be a POSIX time, and
        ``referencesf`` is accepted for ZODB's ``pack(t, referencesf)`` and not used:
        references come from record headers.
        """
        ...

    def copy_transactions_from(self, other: Storage) -> int:
        """Copy every transaction of ``other`` newer than this storage's ``last_tid()``, with
        its tid, metadata and records (invariant 9), oldest first; return how many.

        Run again after ``other`` committed more, it copies only the new ones.
        """
        ...

    def get_size(self) -> int:
        """About how many bytes the storage occupies (records and metadata of every revision)."""
        ...

    @property
    def packed_tid(self) -> Tid | None:
        """The newest pack time (None when never packed): transactions up to it cannot be
        undone.  A copy of a packed storage starts with the source's (invariant 9)."""
        ...


IterableStorage = Storage
"""Every storage lists its transactions now (invariant 8); kept for code that named it."""
