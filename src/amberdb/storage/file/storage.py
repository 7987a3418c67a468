"""FileStorage: an append-only file of transaction records, with an in-memory index.

The layout is described in :mod:`amberdb.storage.file.format`, the rules for judging the
end of a file in :mod:`amberdb.storage.file.recovery`.  What keeps the file safe across
crashes, damage and other processes is this list of invariants; the tests name the one
they check.

I1  Append only.  Bytes before ``_end`` (just past the last finished transaction) are never
    written while the storage is open; every write lands at or after ``_end`` -- the
    appending committer's past ``_append_end``, and the status byte of a transaction
    appended but not yet finished or aborted (``c`` or ``a``, one byte each).  Readers only
    follow offsets below ``_end``, so they never see bytes the committer is writing.  A pack
    does not rewrite the file either: it writes a new one and renames it over (I13).

I2  Validity is all-or-nothing.  A transaction belongs to the database iff it is *valid*
    (status ``c`` or ``v``, known flags, header and trailer agree, checksum over file id + body + header
    matches, records fill it) and every transaction before it is valid (one with status
    ``a``, valid in every other way, is skipped, I5).  A small transaction
    is written by one pwrite and one fdatasync; a large one is streamed out behind a header
    of 32 zero bytes ("in progress") that is patched, together with the trailer, in ``vote``.

I3  Group commit; only a proven torn or unacknowledged tail is ever cut.  ``begin`` takes
    the commit lock (a FIFO hand-off, so no committer starves) and assigns the tid; the
    transaction is buffered (or streamed) past ``_append_end``; ``vote`` writes it there
    whole with status ``v``, moves ``_append_end`` past it, lists it as *appended* and
    releases the lock, so the next committer appends while this one waits for durability.
    The first waiter that finds no sync running leads: it fdatasyncs with no lock held, and
    every transaction appended before its sync began is durable when it ends; those
    appended meanwhile wait for the next leader (batching by arrival, no timer).  Each
    waiter sleeps on a lock of its own and is woken only by its event: the sync that covers
    it (which also wakes the oldest uncovered waiter, to lead the next), its turn to finish,
    the transaction it stores over leaving the flight.  ``vote`` returns only once its bytes
    are durable.  Conflict checks count appended transactions: storing an oid one of them wrote
    waits (under the commit lock) until it is finished or aborted, then checks against the
    committed revision, which the caller can load to resolve a conflict.  Tids are assigned
    under the commit lock, so they increase in file order; a restore (``begin`` with a tid)
    first waits until nothing is appended.  A transaction of more than ``_PENDING_LIMIT``
    records, whose oids are not kept, holds the lock until its finish or abort.  A failed
    sync fails every transaction not yet durable (the leader's vote re-raises the error, the
    others raise StorageError naming it), marks the storage broken, and the first abort of
    one of them truncates the file to the last synced end under the commit lock and syncs
    that (best effort: if that fails too, they may come back at a reopen, complete, as after
    a crash before their vote returned).  With ``fsync=True`` a process crash (SIGKILL)
    keeps the page cache, so the file holds whole transactions followed at most by a torn
    last one (partial header, zero header, or one cut short by the end of the file), which a
    writable open truncates.  A power loss during a group's sync may persist a later
    transaction of the group but not an earlier one.  So every transaction (format version
    3) carries a *durable mark*: an offset below which the file was known synced when it was
    appended (read at vote; at begin for one streamed out before its vote; its own start
    with ``fsync=False``, where nothing is known).  Damage at X followed by valid
    transactions that all have marks at or below X and none of which says ``c`` is the
    unacknowledged tail of such a group: no vote from X on could return before a sync
    covering X, which never ended; it is judged torn and cut like one.  A later transaction
    whose mark is above X (X was durable before it was appended), that has no mark (older
    format, or a pack), or that says ``c`` (its finish ran, after a sync covering X) proves
    the damage came later: corruption.  What this cannot tell apart: the last group's bytes
    damaged after its sync ended, when nothing was appended after it and none of its finish
    flips reached the disk.  A writable open syncs the file first, so its marks start true.
    Anything else that fails a check -- a complete transaction with a bad checksum, a
    damaged file header, other damage followed by a valid transaction -- is corruption:
    every open raises CorruptedDataError naming the file, the offset, what failed and how
    to recover, and changes nothing.

I4  Vote is durable, finish is one byte, in tid order.  ``vote`` returns after the sync that
    covers its transaction (I3), so it survives a crash from then on (base invariant 3).
    ``finish`` first waits until every appended transaction with a lower tid is finished or
    aborted (base invariant 6), then turns ``v`` into ``c`` with a one-byte pwrite and no
    sync (the checksum leaves the status byte out) and publishes index, ``_end`` and
    ``_last_tid`` under ``_lock``: after a crash any number of transactions may still say ``v``.  A valid
    ``v`` transaction is committed as soon as no writer that could abort it is alive; a
    writable open marks it ``c`` and syncs.

I5  Abort after vote cannot resurrect.  When the transaction is still the last appended, no sync
    is running and the commit lock is free, ``abort`` truncates the file back to its start
    and syncs the file (size included) before it returns; otherwise later transactions
    follow it and it is marked ``a`` in place (one byte) and synced: a valid ``a``
    transaction is skipped by loads, scans, followers, the iterator, the undo log, verify
    and pack, and only its tid still orders the next one.  From then on the transaction is
    gone whatever happens, and the transactions after it stay valid.  A crash before that
    sync means abort had not returned: the transaction is as voted, either gone or
    committed.  Truncation changes only the file size, which the file system updates as a
    whole: unlike rewriting the 32-byte header in place, a crash cannot leave half of it
    changed.  Abort before vote only truncates.

I6  The index file describes a prefix.  It is written only at a clean close, after the data
    file was synced, and records the file id plus the position and tid of the transaction
    it ends at.  One whose own magic, version or CRC is wrong, or that names another file,
    is ignored and the file scanned.  A valid one for this file must agree with the data
    file (long enough, the transaction ending at its position present with its tid);
    otherwise the data file was damaged or replaced by an older copy, and every open raises
    CorruptedDataError naming both files.  Past its position the file is scanned.

I7  One writer.  A writable open holds ``flock(LOCK_EX)`` on ``path + ".lock"`` from before
    the first write until close; the kernel drops it when the process dies.

I8  Tids grow.  Tids are assigned in ``begin`` under the commit lock from
    :func:`~amberdb.utils.next_tid` of the last *appended* tid (aborted ones included), so
    they follow file order, and a scan rejects a transaction whose tid is not above its
    predecessor's.

I9  Readers never see what a live writer may take back.  A read-only opener scans up to the
    first ``v`` transaction (with group commit several may await their finish, any of them
    still abortable).  One that finds a ``v`` transaction (or damage) after the valid
    transactions asks whether a writer is
    alive (a shared lock on the lock file).  If none is, it judges the end again while its
    shared lock keeps writers out, and a valid ``v`` transaction is committed.  If one is,
    the writer's committed end, which it publishes in the lock file at every finish and the
    reader read before scanning, decides: damage below it is damage (the writer never
    writes there), anything past it may still be aborted, rewritten or written, and the
    reader leaves it out.  A reader never reads at or past its own ``_end``, and a writer
    never truncates below a reader's ``_end``: a writer cuts only its own open or voted
    transaction (abort, from where it began) or a torn tail past every valid transaction
    (an open, I3), while a reader's ``_end`` -- a follower's too, however far it has
    followed (I12) -- only ever lies at the end of a transaction no writer takes back: one
    marked ``c``, which its writer does in ``finish``, past the last point it could abort,
    or a ``v`` one taken while no writer was alive, which the next writer commits (I4).
    So the writer's truncation never removes a page a reader reads (no SIGBUS).  A writer
    also checks at ``begin`` that the file still ends where it left it: a second writer let
    in by a deleted lock file stops it rather than have their transactions overwrite each
    other.

I10 Loads verify.  Every load checks the record checksum, that the record is the oid asked
    for, that it lies below ``_end``, and, walking back pointers, that offsets and tids
    strictly decrease.  A failure is CorruptedDataError: never other data, never a loop.

I11 No sharing across fork.  A storage remembers the process generation it was opened in
    (:mod:`amberdb.storage.forks`); in a child every operation raises StorageForkedError,
    and ``close`` only drops the child's copies of the descriptors.

I12 Followers.  A read-only storage that is not salvaged follows the file's writer, in
    ``poll_invalidations`` and nowhere else.  While the file still ends at ``_end``, one
    fstat is the whole cost.  When it grew, the new bytes are scanned and their end judged
    by the code an open uses (I3, I4, I9): what a live writer may still abort, rewrite or be
    writing is left out, damage below its published end raises CorruptedDataError, and a
    voted tail that no writer can abort any more is taken.  While a live writer streams a
    transaction behind its zero header (I2) and has published no end past ``_end``, the poll
    stops at that header instead of reading the growing stream at every transaction
    boundary; and a torn tail a dead writer left is scanned once, not again at every poll
    while the file stays as it was (the next writer cuts it before writing).  What a poll
    takes is scanned into an index of its own and merged into the storage's under the lock
    loads hold, together with ``_end`` and ``_last_tid``: loads and ``last_tid`` move there
    only, by whole transactions, never half of one.  Each transaction taken reports as
    changed the oids it wrote that existed before it.  A file found shorter than ``_end``
    raises CorruptedDataError naming it, and the map never grows past the file's end (a
    truncation by another program between two looks can still kill a load with SIGBUS, as
    for any reader: see ``_release_pages``).  The index file plays no part, and a salvaged
    storage stays the snapshot it opened.  A pack (I13) renames a new file over the path:
    the follower's descriptor still reads the old inode, which no writer changes any more.
    So every poll also stats the path (one more system call), and when it names another
    inode the follower opens that file as a read-only open would (scan included) and swaps
    descriptor, map, index and end under the lock loads hold; that poll reports None for
    the changed oids (every snapshot forgets its cache), and a replacement older than what
    was followed (a backup copied over) raises StorageError.  Checked by
    ``tests/storage/test_follower.py`` and ``tests/storage/test_pack.py``.

I13 Pack.  ``pack(pack_tid)`` keeps every revision newer than ``pack_tid`` and, of the
    others, only the newest revision of each object reachable from the root or from a newer
    revision (base invariant 8), dropping older transactions left with no records -- but
    never the newest one, which stays (emptied if nothing of it is kept) so the file still
    names the last tid (I8) at the next open.  It writes the result into ``path + ".pack"`` with a new
    file id (so every checksum is recomputed, and the old index file names another file,
    I6), syncs it and renames it over the data file: before the rename the data file is
    untouched, after it the new one is complete and synced, so a crash anywhere leaves the
    database as before the pack or as after it.  The temporary name is never opened as the
    data file; a writable open deletes one a dead pack left.  The long phases hold no lock:
    they read the file below the end published when the attempt began through a descriptor
    of their own (those bytes never change, I1) and write only the temporary file, so loads
    and commits go on.  Commits made meanwhile are copied after it (first without locks,
    then the last megabyte or so under the commit lock, which is held from there through
    the rename and the swap of descriptor, map and index under ``_lock``: no commit lands
    in the old inode).  A commit made meanwhile may write or refer to an object the pack
    found unreachable (a snapshot older than the pack still held it): that attempt is
    dropped before the rename and the pack done again with those commits among the roots,
    at most ``_PACK_ATTEMPTS`` times before StorageError.  Memory stays bounded by the
    number of oids (the new file's offset index, a bit per oid, the mark stack; see
    :mod:`.pack`), never by the file's size.  An error or KeyboardInterrupt before the
    rename deletes the temporary file and leaves the storage as it was; one after the
    rename but before the storage reads the new file marks it broken, since a commit into
    the unlinked old inode would be lost.  The pack time goes into the file header
    (:attr:`packed_tid`; the newest pack time wins), so undo can refuse what a pack
    removed.  Readers holding the old inode (followers, I12) keep reading it safely: the
    old file is not truncated, only unlinked.  Checked by ``tests/storage/test_pack.py``.

``finish`` publishes a voted transaction by updating the in-memory index: from the (oid,
offset) pairs ``store`` kept or, past ``_PENDING_LIMIT`` records, by reading the records'
headers back from the file.  If that read fails, or the one-byte ``c`` write does, the
storage is marked broken: the durable transaction stays in the file (it is not aborted),
nothing more is written and no index file is saved (I6), so the next open scans and finds
it.  A failed fdatasync marks the storage broken too: the kernel may have dropped the
pages it could not write, so retrying would only pretend.

With ``fsync=False`` vote does not sync (I4 is relaxed): a crash may lose the most recent
commits, and since the kernel may then write a later transaction before an earlier one, an
open after such a crash can report damage followed by a valid transaction; the
transactions before the reported offset are intact (``salvage=True`` reads them).  Abort
after vote still syncs its truncation (I5 holds in both modes), and ``close`` syncs the
file before writing the index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import stat
import struct
import threading
import typing
import zlib
from array import array
from collections import deque
from collections.abc import Collection, Iterator
from types import TracebackType

from amberdb.exceptions import (
    ConflictError,
    CorruptedDataError,
    FileFormatError,
    POSKeyError,
    ReadOnlyError,
    StorageError,
    StorageForkedError,
    StorageTransactionError,
)
from amberdb.fsutil import fsync_directory
from amberdb.storage.base import (
    PackProgress,
    Revision,
    Storage,
    TransactionInfo,
    TransactionMeta,
    TransactionRecord,
    UndoResolver,
)
from amberdb.storage.file.format import (
    DATA_HEADER,
    DATA_HEADER_CHECKED,
    DATA_HEADER_FIELDS,
    DURABLE_MARK,
    FILE_HEADER,
    FILE_MAGIC_PREFIX,
    FLAG_DURABLE_MARK,
    FORMAT_VERSION,
    MAX_OID,
    MAX_U32,
    MAX_USER,
    READABLE_VERSIONS,
    STATUS_ABORTED,
    STATUS_COMMITTED,
    STATUS_OFFSET,
    STATUS_VOTED,
    TRAILER_MAGIC,
    TXN_HEADER,
    TXN_TRAILER,
    ZERO_TXN_HEADER,
    TxnHeader,
    decode_txn_header,
    encode_file_header,
    encode_txn_header,
    file_header_crc_ok,
    file_header_packed_tid,
    file_version,
    is_partial_file_header,
    magic_damaged,
    txn_checksum,
)
from amberdb.storage.file.index_file import index_beside_a_cut_file, read_index_file, write_index_file
from amberdb.storage.file.locking import acquire_writer_lock, publish_end, published_end, writers_kept_out
from amberdb.storage.file.pack import Packer, Progress, responsive_switching
from amberdb.storage.file.recovery import (
    FIRST_RECORD,
    Damage,
    ScanResult,
    corruption,
    describe_txn_problem,
    index_transaction,
    pread_exact,
    pwrite_all,
    read_transaction,
    scan,
)
from amberdb.storage.forks import GENERATION, close_in_children, forget_in_children
from amberdb.storage.history import (
    copy_transactions,
    newest_first_slice,
    pack_time,
    transaction_tid,
    undo_transaction,
)
from amberdb.storage.offsets import OffsetIndex
from amberdb.utils import Oid, Tid, oid_repr, p64, z64

__all__ = ["FileStorage"]

FLUSH_SIZE = 1 << 20
"""A transaction buffer larger than this is written out before vote (I2)."""

_H = TXN_HEADER.size
_T = TXN_TRAILER.size
_D = DATA_HEADER.size
_CHECKED = DATA_HEADER_CHECKED
_unpack_data_header = DATA_HEADER.unpack_from
_pack_checked = DATA_HEADER_FIELDS.pack
_pack_u32 = struct.Struct(">I").pack
_pack_mark = DURABLE_MARK.pack
_MARK = DURABLE_MARK.size
_crc32 = zlib.crc32
_PAGE = mmap.PAGESIZE
# Loads drop the map's pages from the resident set after reading about this much.
_RELEASE_AFTER = 8 << 20
# Records a transaction's (oid, offset) pairs are kept for in memory; beyond, finish() reads
# them back from the file.
_PENDING_LIMIT = 1 << 16
# poll_invalidations remembers the changed oids of recent transactions up to about this many
# oids in all (8 bytes each); a connection whose snapshot is older drops its whole cache.
_POLL_WINDOW = 1 << 20
# What remembering one transaction costs besides its oids (its tid, array, tuple and deque
# slot: about 200 bytes), counted in oids: without it a window of small transactions held
# some 25 times the memory it is sized for.
_ENTRY_COST = 25
_MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)
_W = typing.TypeVar("_W", bound="_Waiter")
_IDLE, _OPEN, _APPENDED, _VOTED, _DIRTY = "idle", "open", "appended", "voted", "dirty"
_CLOSED_GENERATION = -1
_PACK_SUFFIX = ".pack"
# A pack is done again at most this often when commits made while it ran re-link garbage.
_PACK_ATTEMPTS = 4
# Commits made while packing are copied without the commit lock while more than this many
# bytes of them are left (at most _CATCH_UP_ROUNDS times); the rest under it.
_SWITCH_TAIL = 1 << 20
_CATCH_UP_ROUNDS = 8


def _pack_point(name: str) -> None:
    """Called at the named steps of a pack; tests replace it to crash or interfere there."""


def _create_fresh(path: str) -> int:
    """Create ``path`` anew for writing: whatever was there (a crashed pack's leftover, or a
    symlink someone planted) is removed, never written through."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise StorageError(f"{path} is a directory: move it away; a pack writes its new file there")
        os.unlink(path)
    except FileNotFoundError:
        pass
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    return os.open(path, flags, 0o666)


class _FifoLock:
    """A lock handed to its waiters in arrival order.

    ``threading.Lock`` lets a releasing thread take it straight back, so with many committers
    some wait for seconds while others commit again and again; here ``release`` passes the
    lock to the longest waiter, which owns it from that moment.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock, waiting behind earlier callers; without ``blocking``, only if free."""
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            if not blocking:
                return False
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        try:
            turn.acquire()  # released by the release() that hands us the lock
        except BaseException:
            with self._mutex:
                if turn in self._waiters:
                    self._waiters.remove(turn)
                    raise
            # Handed over just as we were interrupted: pass it on rather than lose it.
            self.release()
            raise
        return True

    def release(self) -> None:
        """Hand the lock to the longest waiter, or leave it free."""
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False

    def locked(self) -> bool:
        """True while someone holds the lock."""
        return self._held

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Waiter:
    """A thread that may wait for one group-commit event at a time (see FileStorage._sleep)."""

    __slots__ = ("gate", "sleeping")

    def __init__(self) -> None:
        # Held by the owner, released once by whoever wakes it.  Made on the first wait:
        # most transactions never wait.
        self.gate: threading.Lock | None = None
        self.sleeping = False  # listed in some wait list, its owner blocked on gate


class _Txn(_Waiter):
    """One transaction from ``begin`` to ``finish`` or ``abort``, owned by the thread that
    began it (several may be appended and awaiting their sync or finish at once)."""

    __slots__ = (
        "appended_after_tid",
        "body_crc",
        "buf",
        "changed",
        "count",
        "end",
        "failure",
        "holds_lock",
        "in_flight",
        "meta_lens",
        "offsets",
        "oids",
        "pos",
        "restoring",
        "settle_waiters",
        "state",
        "sync_failed",
        "tid",
        "written",
    )

    def __init__(self, tid: Tid, pos: int, body_crc: int, restoring: bool) -> None:
        super().__init__()
        self.tid = tid
        self.pos = pos  # where its header goes
        self.end = -1  # just past its trailer, once appended
        self.state = _OPEN
        self.holds_lock = True  # the commit lock, from begin until the append (or finish)
        self.in_flight = False  # appended, not yet finished or aborted
        self.restoring = restoring
        self.buf = bytearray()
        self.written = 0
        self.body_crc = body_crc
        self.count = 0
        self.meta_lens = (0, 0, 0)
        self.oids: array[int] = array("q")
        self.offsets: array[int] = array("q")
        # Oids stored that existed before (what other snapshots must invalidate); None when
        # there are more than the poll window holds.
        self.changed: array[int] | None = array("q")
        self.failure: BaseException | None = None
        self.sync_failed: BaseException | None = None
        self.appended_after_tid = z64  # the tid appended before it: the order an abort restores
        self.settle_waiters: list[_Waiter] = []  # stores waiting for this one to finish or abort


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """What a history reader works from (see ``FileStorage._snapshot``)."""

    fd: int
    end: int
    crc: int
    newest: Tid
    packed: Tid | None
    offset: int


class FileStorage:
    """The default embedded storage: one append-only data file (see the module invariants).

    ``read_only=True`` opens without the writer lock and never changes a file; such a
    storage follows another process's commits at each :meth:`poll_invalidations` (I12).
    With ``salvage=True`` (read-only only) a damaged file opens too, as the snapshot of the
    verified transactions before its first damage, described by :attr:`damage`: a way to
    copy data out.  ``fsync=False`` trades durability of the last commits for speed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        create: bool = True,
        fsync: bool = True,
        salvage: bool = False,
    ) -> None:
        if salvage and not read_only:
            raise ValueError("salvage=True needs read_only=True: salvaging is for copying data out")
        self._path = os.fspath(path)
        self._read_only = read_only
        self._salvage = salvage
        # A salvaged storage is a snapshot of what precedes damage: there is nothing to follow.
        self._follows = read_only and not salvage
        self._damage: Damage | None = None
        self._fsync = fsync
        self._fd = -1
        self._lock_fd = -1
        self._map: mmap.mmap | None = None
        self._mapped = 0  # bytes of the file the map covers
        self._touched = 0  # about how many bytes of the map loads have read since it was released
        self._closed = False
        self._closing = False
        self._broken: BaseException | None = None
        self._index = OffsetIndex()
        self._end = FILE_HEADER.size
        self._last_tid = z64
        self._next_oid = 1
        self._file_id = b""
        self._file_id_crc = 0
        self._version = FORMAT_VERSION  # of the file's header
        # The process generation this storage belongs to (I11); _CLOSED_GENERATION once closed.
        self._generation = GENERATION.value
        self._pid = os.getpid()
        # _lock guards the index/_end/_last_tid publication and every read of a load, so a
        # load never sees half a transaction and close never closes the fd under a read.
        # (A plain lock held across the read is cheaper than counting readers.)
        self._lock = threading.Lock()
        # Held from begin until the transaction is appended (I3), handed over in FIFO order.
        self._commit_lock = _FifoLock()
        self._oid_lock = threading.Lock()
        # One follower scan at a time, and never a close under it (taken before _lock).
        self._follow_lock = threading.Lock()
        # Each thread's transaction, from begin to finish or abort.
        self._txns: dict[int, _Txn] = {}
        # Threads whose begin waits until nothing is appended (an undo in progress).
        self._draining_threads: set[int] = set()
        # Group commit (I3), under _group: the transactions appended and not yet finished or
        # aborted, in tid (= file) order; the newest of them per oid they wrote; where the next
        # one goes and the tid it must exceed; how far the file is synced; whether a leader is
        # syncing and, once one failed, why.
        # Nobody waits on _group itself: each waiter sleeps on its own transaction's gate and is
        # woken by the one event it waits for (a sync that covers it, its turn to finish, the
        # transaction it stores over leaving the flight), never by every change (see _sleep).
        self._group = threading.Lock()
        self._sync_waiters: list[_Txn] = []  # votes waiting for a sync (one of them to lead it)
        self._drain_waiters: list[_Waiter] = []  # begins waiting until nothing is appended
        self._appended: deque[_Txn] = deque()
        self._in_flight: dict[int, _Txn] = {}
        self._append_end = FILE_HEADER.size
        self._append_tid = z64
        self._synced_end = FILE_HEADER.size
        self._syncing = False
        self._lowest_cut = 0  # the lowest end an abort cut the file to while a sync ran
        self._sync_failure: BaseException | None = None
        self._failed_group_cut = False
        # poll_invalidations: (tid, changed oids or None if too many) of the transactions
        # finished since the open, newest last; changes after _poll_floor are all known.
        self._recent: deque[tuple[Tid, array[int] | None]] = deque()
        self._recent_oids = 0
        self._poll_floor = z64
        # (size, mtime, ctime) of the file when a follower's poll last found only a torn tail
        # past _end: while the file still looks so, nobody wrote, and it is not scanned again.
        self._torn_stamp: tuple[int, int, int] | None = None
        # The newest pack time recorded in the file header (None: never packed).
        self._packed_tid: Tid | None = None
        # One pack at a time (I13); never held by anything else.
        self._pack_lock = threading.Lock()
        try:
            self._open(create)
        except BaseException:
            self._release_files()
            self._closed = True
            self._generation = _CLOSED_GENERATION
            raise

    # -- opening ----------------------------------------------------------------------------

    def _open(self, create: bool) -> None:
        path = self._path
        try:
            info = os.stat(path)
        except FileNotFoundError:
            size = -1
        else:
            size = info.st_size
            if not stat.S_ISREG(info.st_mode):
                # A directory, device or pipe: refused before a lock file is made beside it.
                raise StorageError(f"{path} is not a regular file: a FileStorage needs one")
        if size < 0 and (self._read_only or not create):
            why = "read_only" if self._read_only else "create=False"
            raise StorageError(f"{path}: no such file (not created because {why})")
        if size < 0 and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            # Said here: the first thing to fail would be the writer's lock file, by its name.
            directory = os.path.dirname(os.path.abspath(path))
            raise StorageError(f"{path}: its directory {directory} does not exist")
        if size > 0:
            # Check the header before touching anything: a foreign or damaged file stays as
            # it is, and no lock file appears beside it.
            with open(path, "rb") as f:
                self._check_file_header(f.read(FILE_HEADER.size), size)
        if self._read_only:
            self._fd = os.open(path, os.O_RDONLY)
        else:
            self._lock_fd = acquire_writer_lock(path)
            close_in_children(self._lock_fd)
            # A pack that died left its temporary file: never the data file (I13), just litter.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + _PACK_SUFFIX)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        size = os.fstat(self._fd).st_size
        if not self._take_file_header(size):
            if self._read_only:
                return  # an empty (or half-created) file reads as an empty storage
            # New file, or a crash during creation left a prefix of our header.
            self._file_id = os.urandom(8)
            self._file_id_crc = zlib.crc32(self._file_id)
            pwrite_all(self._fd, encode_file_header(self._file_id), 0)
            os.fsync(self._fd)
            fsync_directory(os.path.dirname(os.path.abspath(path)))
            size = FILE_HEADER.size
        self._load(size)
        if not self._read_only:
            if self._version != FORMAT_VERSION:
                self._upgrade()
            if self._fsync:
                # What the open found is on disk from here on: the durable mark of the first
                # transactions (I3) may say so.
                os.fsync(self._fd)
            self._publish_end()

    def _upgrade(self) -> None:
        """Make an older file (format version 2) version 3 before writing into it.

        Its transactions stay as they are: version 3 reads them (they have no durable mark,
        which counts as "all before was durable").  Only the file header changes, in one
        32-byte write of the first sector, synced before anything of version 3 is appended:
        an older AmberDB then refuses the file instead of misreading its new transactions.
        """
        header = encode_file_header(self._file_id, self._packed_tid or z64)
        pwrite_all(self._fd, header, 0)
        os.fsync(self._fd)
        self._version = FORMAT_VERSION

    def _take_file_header(self, size: int) -> bool:
        """Check the file header and take its file id; False when the file has none yet.

        None yet: the file is empty, or its creation (a crash, or a writer still at it) left
        only a prefix of the header.
        """
        header = pread_exact(self._fd, FILE_HEADER.size, 0)
        if self._check_file_header(header, size):
            return False
        self._file_id = FILE_HEADER.unpack(header)[1]
        self._file_id_crc = zlib.crc32(self._file_id)
        self._packed_tid = file_header_packed_tid(header)
        self._version = file_version(header)
        return True

    def _check_file_header(self, header: bytes, size: int) -> bool:
        """True when the file is empty or a crash cut its creation short; else check it.

        Raises FileFormatError for a foreign file or another format version, and
        CorruptedDataError for a header that fails its CRC (unless salvaging).
        """
        path = self._path
        if size < FILE_HEADER.size:
            if is_partial_file_header(header[:size]):
                problem = index_beside_a_cut_file(path, size)
                if problem is not None:
                    raise corruption(path, 0, problem)
                return True
            raise FileFormatError(f"{path} is not an AmberDB file storage (bad magic {header[:8]!r})")
        magic = header[:8]
        if magic_damaged(header):
            problem = f"its magic is damaged ({magic!r}; the rest of the file header checks out)"
            if not self._salvage:
                raise corruption(path, 0, problem)
            self._damage = Damage(0, problem)
            return False
        if magic[:7] != FILE_MAGIC_PREFIX:
            raise FileFormatError(f"{path} is not an AmberDB file storage (bad magic {magic!r})")
        crc_ok = file_header_crc_ok(header)
        if magic[7] not in READABLE_VERSIONS and (crc_ok or magic[7] == 1):
            readable = " and ".join(str(v) for v in READABLE_VERSIONS)
            raise FileFormatError(
                f"{path} is an AmberDB file storage of format version {magic[7]}, which this AmberDB"
                f" does not read (it reads versions {readable}); copy the data with the"
                " AmberDB version that wrote the file"
            )
        if not crc_ok:
            problem = "file header checksum mismatch (its magic, file id or reserved bytes changed)"
            if not self._salvage:
                raise corruption(path, 0, problem)
            # Salvage trusts the stored file id: if it is what changed, no transaction verifies.
            self._damage = Damage(0, problem)
        return False

    def _load(self, size: int) -> None:
        start, prev_tid = FILE_HEADER.size, z64
        index = OffsetIndex()
        # Salvage scans everything: an index is trusted, not verified, for its prefix.
        saved = None
        if not self._salvage:
            saved = read_index_file(self._path, self._fd, self._file_id, self._file_id_crc, size)
        if saved is not None:
            start, prev_tid, self._next_oid, index = saved
        # Read before the scan: below it nothing changed while the scan read (I9).
        committed = published_end(self._path) if self._read_only else None
        result, scanned = self._scan_committed(index, start, size, prev_tid, committed)
        assert scanned is not None  # an index in, an index out (salvage's may be a new one)
        index = scanned
        if not self._read_only:
            self._repair_tail(result)
        self._index = index
        self._end = result.end
        self._last_tid = result.last_tid
        self._poll_floor = result.last_tid
        # Transactions aborted after their vote may follow the last committed one.
        self._append_end = self._synced_end = max(result.stop, result.end)
        self._append_tid = max(result.stop_tid, result.last_tid)
        self._next_oid = max(self._next_oid, index.max_oid() + 1, 1)

    def _scan_committed(
        self, index: OffsetIndex | None, start: int, size: int, prev_tid: bytes, committed: int | None
    ) -> tuple[ScanResult, OffsetIndex | None]:
        """Scan ``[start, size)`` into ``index`` and decide what of it is committed (I3, I4, I9).

        ``committed`` is the end a live writer published before the scan began (read-only
        storages only).  The result's ``end`` and ``last_tid`` take in a voted tail that
        nobody can abort any more (indexed, and listed in ``voted``); damage raises
        CorruptedDataError unless salvaging, which records it in :attr:`damage`.  With
        ``index`` None the scan only verifies and judges (a follower indexes what it takes
        per transaction, in ``_changes_in``).
        """
        # A live writer may have several voted transactions awaiting their finish (group
        # commit): a reader stops at the first, as if it were the voted tail (I9).
        result, index = self._scan(index, start, size, prev_tid, stop_at_voted=self._read_only)
        if self._read_only and (result.tail == "damaged" or result.voted_tail is not None):
            result, index = self._judge_end_as_reader(result, index, committed)
        if result.tail == "damaged":
            assert result.damage is not None
            if not self._salvage:
                raise corruption(self._path, result.damage.offset, result.damage.problem)
            if self._damage is None:
                self._damage = result.damage
        voted_tail = result.voted_tail
        if voted_tail is None:
            return result, index
        # Nobody can abort it any more (we are the writer, or no writer is alive): it is
        # committed (I4).
        if index is not None:
            index_transaction(self._fd, self._path, result.end, index)
        return dataclasses.replace(
            result,
            end=result.end + voted_tail.length,
            last_tid=voted_tail.tid,
            transactions=result.transactions + 1,
            voted=[*result.voted, result.end],
            voted_tail=None,
        ), index

    def _scan(
        self, index: OffsetIndex | None, start: int, size: int, prev_tid: bytes, stop_at_voted: bool = False
    ) -> tuple[ScanResult, OffsetIndex | None]:
        """:func:`scan` into ``index``; when salvaging, also past a transaction that makes no sense."""
        fd, crc = self._fd, self._file_id_crc
        try:
            return scan(fd, self._path, crc, start, size, prev_tid, index, stop_at_voted), index
        except CorruptedDataError as exc:
            if not self._salvage or exc.offset is None:
                raise
            # Its checksum matches but its records are impossible: keep what comes before
            # it.  The scan filled part of the index, so start again (salvage reads no index
            # file: from the file header).
            index = OffsetIndex()
            result = scan(self._fd, self._path, self._file_id_crc, FILE_HEADER.size, exc.offset, z64, index)
            return dataclasses.replace(result, tail="damaged", damage=Damage(exc.offset, exc.problem)), index

    def _judge_end_as_reader(
        self, result: ScanResult, index: OffsetIndex | None, committed: int | None
    ) -> tuple[ScanResult, OffsetIndex | None]:
        """Decide a voted tail or damage after the valid transactions for a read-only open (I9).

        ``committed`` is the end a live writer had published before the scan began.
        """
        with writers_kept_out(self._path) as no_writer:
            if no_writer:
                # No writer can start while we look: the end is stable now.  Scan it again
                # (the file may have grown since the first look).
                return self._scan(index, result.end, os.fstat(self._fd).st_size, result.last_tid)
        # Below the end the live writer had published the file did not change while we read
        # it: damage there is damage.  Past it the writer may still abort its voted
        # transaction, or be writing (even rewriting, after an abort) what looks damaged:
        # leave that out of this snapshot.
        if result.damage is not None and committed is not None and result.damage.offset < committed:
            return result, index
        return dataclasses.replace(result, tail="clean", damage=None, voted_tail=None), index

    def _repair_tail(self, result: ScanResult) -> None:
        """Truncate a proven torn tail (I3) and mark committed ``v`` transactions ``c`` (I4)."""
        changed = False
        if result.tail == "torn":
            os.ftruncate(self._fd, result.stop)
            changed = True
        for pos in result.voted:
            pwrite_all(self._fd, STATUS_COMMITTED, pos + STATUS_OFFSET)
            changed = True
        if changed:
            os.fsync(self._fd)

    # -- properties -------------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        """True when opened with ``read_only=True``."""
        return self._read_only

    @property
    def name(self) -> str:
        """The data file's path."""
        return self._path

    @property
    def path(self) -> str:
        """The data file's path."""
        return self._path

    @property
    def packed_tid(self) -> Tid | None:
        """The newest pack time (None when never packed): older transactions cannot be undone."""
        return self._packed_tid

    @property
    def damage(self) -> Damage | None:
        """Where a ``salvage=True`` open found the file damaged (None: intact, or not salvaged).

        The storage then holds the verified transactions before that offset.
        """
        return self._damage

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self._read_only else "writable")
        if self._damage is not None:
            state += f", salvaged before damage at {self._damage}"
        return f"<FileStorage {self._path!r} {state}>"

    def __enter__(self) -> FileStorage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._generation != GENERATION.value and not self._closed:
            raise StorageForkedError(
                f"storage {self._path} was opened in process {self._pid} before fork(); this is"
                f" process {os.getpid()}: open it again here (a storage cannot be shared across a fork)"
            )
        if self._closed or self._closing:
            raise StorageError(f"storage {self._path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnlyError(f"storage {self._path} is read-only")
        if self._broken is not None:
            raise StorageError(f"storage {self._path} failed an I/O operation; reopen it: {self._broken}")

    # -- reading ----------------------------------------------------------------------------

    def load(self, oid: Oid, before: Tid | None = None) -> tuple[bytes, Tid]:
        """Return ``(record, tid)`` of the newest revision (strictly before ``before``).

        Verifies what it reads (I10): damage raises CorruptedDataError.
        """
        if self._generation != GENERATION.value:
            self._check_open()  # before the lock: a forked child may have inherited it held
        with self._lock:
            if self._closed:
                self._check_open()
            offset = self._index.get(int.from_bytes(oid, "big"))
            if offset < 0:
                raise POSKeyError(oid)
            # hot path: every check below is a compare or two; the CRC is one C call per part.
            # They are _verified_record's, written out here: the call cost loads about 7%.
            end = self._end
            view = self._map
            if view is None or self._mapped < end:
                view = self._remap()  # maps [0, end): every offset checked below end is in it
            newer = b""  # tid of the revision the back pointer came from
            while True:
                start = offset + _D
                if offset < FIRST_RECORD or start > end:
                    raise self._bad_record(oid, offset, f"offset outside {FIRST_RECORD}..{end - _D}")
                roid, rtid, back, rlen, rcrc = _unpack_data_header(view, offset)
                stop = start + rlen
                if stop > end:
                    raise self._bad_record(oid, offset, f"length {rlen} runs past the committed end {end}")
                record = view[start:stop]
                if _crc32(record, _crc32(view[offset : offset + _CHECKED], self._file_id_crc)) != rcrc:
                    raise self._bad_record(oid, offset, "data record checksum mismatch")
                if roid != oid:
                    raise self._bad_record(oid, offset, f"found a record of oid {oid_repr(roid)} instead")
                if newer and rtid >= newer:
                    raise self._bad_record(oid, offset, "revision tids do not decrease along back pointers")
                if before is None or rtid < before:
                    self._touched += rlen + _PAGE
                    if self._touched > _RELEASE_AFTER:
                        self._release_pages()
                    return record, rtid
                if back == 0:
                    raise POSKeyError(oid, f"no revision before tid {oid_repr(before)}")
                if back >= offset:
                    raise self._bad_record(oid, offset, f"back pointer {back} does not point backwards")
                offset = back
                newer = rtid

    def _verified_record(self, view: mmap.mmap, end: int, oid: Oid, offset: int) -> tuple[bytes, Tid, int]:
        """``(record, tid, back pointer)`` of the data record of ``oid`` at ``offset``, checked
        as I10 says (under ``_lock``, with ``view`` mapping at least ``[0, end)``).  ``load``
        makes the same checks inline: change both together."""
        start = offset + _D
        if offset < FIRST_RECORD or start > end:
            raise self._bad_record(oid, offset, f"offset outside {FIRST_RECORD}..{end - _D}")
        roid, rtid, back, rlen, rcrc = _unpack_data_header(view, offset)
        stop = start + rlen
        if stop > end:
            raise self._bad_record(oid, offset, f"length {rlen} runs past the committed end {end}")
        record = view[start:stop]
        if _crc32(record, _crc32(view[offset : offset + _CHECKED], self._file_id_crc)) != rcrc:
            raise self._bad_record(oid, offset, "data record checksum mismatch")
        if roid != oid:
            raise self._bad_record(oid, offset, f"found a record of oid {oid_repr(roid)} instead")
        return record, rtid, back

    def current_records(self, after: Oid | None = None, limit: int = 1000) -> list[tuple[Oid, Tid, bytes]]:
        """Up to ``limit`` current records of the oids above ``after``, in oid order
        (storage/base.py): an ordered walk of the in-memory index from ``after`` on, then one
        verified read (I10) per oid, all under the lock loads hold.

        One consistent look: what a single ``last_tid()`` names (for a follower, what its
        last poll took in, I12).  Costs ``limit`` index slots and reads, not a pass over the
        index or the file; the pages read leave the resident set as loads' do.
        """
        if type(limit) is not int or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r:.40}")
        low = -1 if after is None else int.from_bytes(after, "big")
        if self._generation != GENERATION.value:
            self._check_open()  # before the lock: a forked child may have inherited it held
        with self._lock:
            self._check_open()
            pairs = self._index.items_after(low, limit)
            if not pairs:
                return []
            end = self._end
            view = self._map
            if view is None or self._mapped < end:
                view = self._remap()
            found: list[tuple[Oid, Tid, bytes]] = []
            for number, offset in pairs:
                oid = p64(number)
                record, tid, _ = self._verified_record(view, end, oid, offset)
                found.append((oid, tid, record))
                self._touched += len(record) + _PAGE
                if self._touched > _RELEASE_AFTER:
                    self._release_pages()
            return found

    def _bad_record(self, oid: Oid, offset: int, problem: str) -> CorruptedDataError:
        return corruption(self._path, offset, problem, oid)

    def _release_pages(self) -> None:
        """Let the pages loads have read leave this process's resident set (under ``_lock``).

        Pages of a file mapping count in the process's RSS for as long as the map lives, so
        a scan of a large database would look like it holds the whole file in memory.
        Dropping them is cheap: the data stays in the OS page cache, and the next load of
        a dropped page costs a minor fault.  This is also where loads notice, every few
        megabytes, a file that something outside AmberDB truncated below ``_end``; between
        two looks such a truncation still kills the process with SIGBUS on the next read of a
        vanished page, which Python cannot catch.
        """
        self._touched = 0
        size = os.fstat(self._fd).st_size
        if size < self._end:
            raise self._shrunk(size)
        if self._map is not None and _MADV_DONTNEED is not None:
            try:
                self._map.madvise(_MADV_DONTNEED)
            except OSError:  # pragma: no cover - an advice the platform refuses is only advice
                pass

    def _shrunk(self, size: int) -> CorruptedDataError:
        return corruption(
            self._path,
            size,
            f"the file is {size} bytes, shorter than its committed end {self._end}: something"
            " outside this storage truncated it",
        )

    def _remap(self) -> mmap.mmap:
        """Map the file up to ``_end`` again, now that loads need more than the old map (under ``_lock``).

        Loads read through a read-only memory map: no system call per load.  The map never
        reaches past ``_end`` (I1, I9): bytes a committer is writing, and a tail a writer
        truncates, are never mapped, so a truncation elsewhere can neither make this fail
        nor leave pages here that vanished from the file.
        """
        end = self._end
        try:
            new = mmap.mmap(self._fd, end, access=mmap.ACCESS_READ)
        except ValueError:  # the file is shorter than its committed end
            raise self._shrunk(os.fstat(self._fd).st_size) from None
        old = self._map
        self._map = new
        self._mapped = end
        if old is not None:
            old.close()
        return new

    def last_tid(self) -> Tid:
        """The tid of the newest finished transaction (z64 when empty).

        A read-only storage answers the newest one it has followed so far (I12): what its
        open or its latest :meth:`poll_invalidations` took in, not what a writer in another
        process may have finished since.
        """
        self._check_open()
        return self._last_tid

    def poll_invalidations(self, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
        """The newest tid and the oids changed after ``since`` (base invariant 7).

        A read-only storage first takes in what a writer in another process finished since
        its last look (I12).  None for the oids when ``since`` is older than the transactions
        this instance has seen finish (before its open, or out of its window of recent
        changes).
        """
        self._check_open()
        replaced = self._follows and self._follow()
        with self._lock:
            newest = self._last_tid
            if replaced:
                return newest, None  # a pack replaced the file: what changed is not listed
            if since == newest:
                return newest, ()
            if since > newest or since < self._poll_floor:
                return newest, None
            changed: set[int] = set()
            for tid, oids in reversed(self._recent):
                if tid <= since:
                    break
                if oids is None:
                    return newest, None
                changed.update(oids)
        return newest, {p64(oid) for oid in changed}

    def _follow(self) -> bool:
        """Take in the transactions the file's writer finished since the last look (I12).

        True when a pack had replaced the file and the storage now reads the new one.
        """
        with self._follow_lock:
            if self._closed or self._closing:
                self._check_open()
            start = self._end
            info = os.fstat(self._fd)
            if self._replaced(info):
                self._follow_replacement()
                return True
            size = info.st_size
            if size == start:
                return False  # hot path: every transaction boundary of every connection ends here
            stamp = (size, info.st_mtime_ns, info.st_ctime_ns)
            if stamp == self._torn_stamp:
                # A dead writer's torn tail (a stream cut short can be gigabytes), unchanged
                # since the last poll judged it: the next writer cuts it before writing.
                return False
            if not self._file_id and not self._take_file_header(size):
                return False  # opened while the writer was creating the file, and still is
            if size < start:
                raise self._shrunk(size)
            # Read before the scan, as an open does: below it nothing changes meanwhile (I9).
            committed = published_end(self._path)
            if self._being_streamed(start, committed):
                return False
            result, _ = self._scan_committed(None, start, size, self._last_tid, committed)
            if result.end == start:
                if result.tail == "torn" and result.stop == start:
                    self._torn_stamp = stamp
                return False
            changes, fresh = self._changes_in(start, result.end)
            with self._lock:
                index = self._index
                for oid, offset in fresh.items():
                    index[oid] = offset
                self._end = result.end
                self._last_tid = result.last_tid
                for tid, oids in changes:
                    self._remember_changes(tid, oids)
            return False

    def _replaced(self, info: os.stat_result) -> bool:
        """True when the path names another file than the one this follower reads (a pack
        renamed a new one over it, I13); ``info`` is the fstat of our descriptor."""
        if not self._file_id:
            return False  # still empty when opened: nothing to lose by waiting for a writer
        try:
            now = os.stat(self._path)
        except FileNotFoundError:
            return False  # between a delete and a new file: keep reading what we have
        return (now.st_ino, now.st_dev) != (info.st_ino, info.st_dev)

    def _follow_replacement(self) -> None:
        """Read the file that replaced ours from the start, as an open would, then take its
        descriptor, map, index and end in one step under ``_lock`` (under ``_follow_lock``)."""
        fresh = FileStorage(self._path, read_only=True)
        try:
            if fresh._last_tid < self._last_tid:
                raise StorageError(
                    f"{self._path} was replaced by a file whose newest transaction"
                    f" ({oid_repr(fresh._last_tid)}) is older than one this storage read"
                    f" ({oid_repr(self._last_tid)}): not a pack of it (a backup copied over?);"
                    " close it and open the file again"
                )
            with self._lock:
                old = self._fd, self._map, self._mapped
                self._fd, self._map, self._mapped = fresh._fd, fresh._map, fresh._mapped
                fresh._fd, fresh._map, fresh._mapped = old
                self._touched = 0
                self._index = fresh._index
                self._end = fresh._end
                self._last_tid = fresh._last_tid
                self._file_id, self._file_id_crc = fresh._file_id, fresh._file_id_crc
                self._packed_tid = fresh._packed_tid
                self._next_oid = max(self._next_oid, fresh._next_oid)
                self._torn_stamp = None
                # What changed before is no longer listed: every snapshot forgets its cache.
                self._recent.clear()
                self._recent_oids = 0
                self._poll_floor = fresh._last_tid
        finally:
            fresh.close()  # the old descriptor and map, now

    def _being_streamed(self, pos: int, committed: int | None) -> bool:
        """True when a live writer is streaming out a transaction at ``pos`` (I12).

        A scan that meets its zero header searches everything behind it for a valid
        transaction, which would read the whole growing stream at every poll.  With a
        writer alive and nothing published past ``pos``, the judgment of I9 leaves out
        whatever that search finds, so it can be skipped.
        """
        if committed is not None and committed > pos:
            return False  # a zero header below what the writer published is damage: scan
        if pread_exact(self._fd, _H, pos) != ZERO_TXN_HEADER:
            return False
        with writers_kept_out(self._path) as no_writer:
            return not no_writer

    def _changes_in(self, start: int, end: int) -> tuple[list[tuple[Tid, array[int] | None]], OffsetIndex]:
        """Each transaction in ``[start, end)`` (verified already), oldest first, with the oids
        it changed; and the index of all their records, newest revision per oid.

        Changed: written, and present before it (in the index, or created by an earlier
        transaction of the range); None when more than the poll window holds.  Reads
        ``_index`` without ``_lock``: only the follower, under ``_follow_lock``, changes it.
        """
        known = self._index
        fresh = OffsetIndex(floating=True)
        created: set[int] = set()
        changes: list[tuple[Tid, array[int] | None]] = []
        pos = start
        while pos < end:
            head = decode_txn_header(pread_exact(self._fd, _H, pos))
            if head.status == STATUS_ABORTED:
                pos += head.length  # verified by the scan; in no state of the database
                continue
            written = OffsetIndex(floating=True)
            header = index_transaction(self._fd, self._path, pos, written)
            changed = array("q")
            for oid, offset in written.items():
                fresh[oid] = offset
                if oid in known or oid in created:
                    changed.append(oid)
                else:
                    created.add(oid)
            changes.append((header.tid, changed if len(changed) <= _POLL_WINDOW else None))
            pos += header.length
        return changes, fresh

    def _remember_changes(self, tid: Tid, oids: array[int] | None) -> None:
        """Keep ``oids`` for poll_invalidations, forgetting the oldest beyond the window (under ``_lock``)."""
        recent = self._recent
        recent.append((tid, oids))
        self._recent_oids += _ENTRY_COST if oids is None else len(oids) + _ENTRY_COST
        while self._recent_oids > _POLL_WINDOW and len(recent) > 1:
            old_tid, old = recent.popleft()
            self._recent_oids -= _ENTRY_COST if old is None else len(old) + _ENTRY_COST
            self._poll_floor = old_tid

    def get_size(self) -> int:
        """The length in bytes of the data file's committed part (what this storage reads)."""
        self._check_open()
        return self._end

    size = get_size

    def __len__(self) -> int:
        """The number of oids with at least one revision."""
        if self._generation != GENERATION.value and not self._closed:
            self._check_open()
        return len(self._index)

    @contextlib.contextmanager
    def _snapshot(self, oid: Oid | None = None) -> Iterator[_Snapshot]:
        """One consistent look at the file for a reader of history: its own descriptor (a
        pack swaps the storage's, I13), the committed end, and ``oid``'s offset in the index
        of that same file."""
        self._check_open()
        with self._lock:
            self._check_open()
            offset = -1 if oid is None else self._index.get(int.from_bytes(oid, "big"))
            snap = _Snapshot(
                os.dup(self._fd), self._end, self._file_id_crc, self._last_tid, self._packed_tid, offset
            )
        try:
            yield snap
        finally:
            os.close(snap.fd)

    def iterator(self, start: Tid | None = None, stop: Tid | None = None) -> Iterator[TransactionRecord]:
        """Yield finished transactions with ``start <= tid <= stop``, oldest first.

        Every transaction yielded is verified (checksums, layout, tid order): damage raises
        CorruptedDataError, never yields garbage.  The transactions before ``start`` are
        skipped by their headers and trailers, read from whichever end of the file is nearer.
        """
        self._check_open()
        with self._snapshot() as snap:
            pos, prev = FILE_HEADER.size, z64
            if start is not None:
                pos, prev = self._locate(snap, start)
            while pos < snap.end:
                self._check_open()
                h, txn = read_transaction(snap.fd, self._path, snap.crc, pos, snap.end, prev)
                if stop is not None and h.tid > stop:
                    return
                if h.status != STATUS_ABORTED:
                    yield txn
                prev = h.tid
                pos += h.length

    def _locate(self, snap: _Snapshot, tid: Tid) -> tuple[int, Tid]:
        """The position of the first transaction with a tid of at least ``tid`` (``end`` when
        none), and the tid of the one before it (z64 when none)."""
        end, newest = snap.end, snap.newest
        if end <= FILE_HEADER.size:
            return end, z64
        first_start = FILE_HEADER.size
        first = self._txn_header_at(snap, first_start)
        if tid <= first.tid:
            return first_start, z64
        if tid > newest:
            return end, newest
        # Tids are clock readings: how far ``tid`` lies between the first and the newest says
        # about where its transaction is.
        span = int.from_bytes(newest, "big") - int.from_bytes(first.tid, "big")
        ahead = int.from_bytes(tid, "big") - int.from_bytes(first.tid, "big")
        if ahead * 2 < span:
            pos, prev, prev_pos = first_start, z64, -1
            while pos < end:
                h = self._txn_header_at(snap, pos)
                if h.tid <= prev:
                    raise corruption(self._path, pos, "transaction tids do not increase")
                if h.tid >= tid:
                    break
                prev, prev_pos = h.tid, pos
                pos += h.length
        else:
            pos, prev, prev_pos = first_start, z64, -1
            for start, h in self._newest_first(snap):
                if h.tid < tid:
                    pos, prev, prev_pos = start + h.length, h.tid, start
                    break
        if prev_pos >= 0:
            # The skipped headers were not verified: a damaged tid could have made the walk
            # step over the very transaction asked for.  The one it stopped after must verify.
            _, problem = describe_txn_problem(snap.fd, snap.crc, prev_pos, end, z64)
            if problem is not None:
                raise corruption(self._path, prev_pos, problem)
        return pos, prev

    def _txn_header_at(self, snap: _Snapshot, pos: int) -> TxnHeader:
        """The header of the transaction at ``pos``, checked against its trailer (not its
        checksum: what is yielded is verified in full later)."""
        h, problem = describe_txn_problem(snap.fd, snap.crc, pos, snap.end, z64, check_body=False)
        if problem is not None:
            raise corruption(self._path, pos, problem)
        assert h is not None
        return h

    def _newest_first(self, snap: _Snapshot) -> Iterator[tuple[int, TxnHeader]]:
        """``(position, header)`` of each transaction before ``end``, newest first, walking
        back through the trailers; header and trailer must agree and tids decrease."""
        pos = snap.end
        newer: bytes | None = None
        while pos > FILE_HEADER.size:
            if pos - _T < FILE_HEADER.size + _H:
                raise corruption(self._path, pos, "a transaction trailer overlaps the file header")
            length, _, magic = TXN_TRAILER.unpack(pread_exact(snap.fd, _T, pos - _T))
            if magic != TRAILER_MAGIC or length < _H + _T or length > pos - FILE_HEADER.size:
                problem = f"no transaction trailer (magic {magic!r}, length {length})"
                raise corruption(self._path, pos - _T, problem)
            start = pos - length
            h = decode_txn_header(pread_exact(snap.fd, _H, start))
            if h.length != length:
                problem = f"transaction header says length {h.length}, its trailer {length}"
                raise corruption(self._path, start, problem)
            if newer is not None and h.tid >= newer:
                raise corruption(self._path, start, "transaction tids do not increase")
            yield start, h
            newer = h.tid
            pos = start

    def _verified_meta(self, snap: _Snapshot, pos: int) -> TransactionMeta:
        """The metadata of the transaction at ``pos``, after verifying its checksum."""
        h, problem = describe_txn_problem(snap.fd, snap.crc, pos, snap.end, z64)
        if problem is not None:
            raise corruption(self._path, pos, problem)
        assert h is not None
        meta = pread_exact(snap.fd, h.info_len, pos + _H)
        try:
            user = meta[: h.user_len].decode("utf-8")
            description = meta[h.user_len : h.user_len + h.desc_len].decode("utf-8")
        except UnicodeDecodeError:
            raise corruption(self._path, pos, "transaction user or description is not UTF-8") from None
        return TransactionMeta(user, description, meta[h.user_len + h.desc_len : h.info_len])

    def undo_log(self, first: int = 0, last: int = -20) -> list[TransactionInfo]:
        """Undoable transactions, newest first (ZODB's ``first``/``last`` convention).

        Walks back from the end of the file: cost grows with how far back the log reaches,
        not with the size of the file.  Each listed transaction is verified.
        """
        with self._snapshot() as snap:

            def infos() -> Iterator[TransactionInfo]:
                for pos, h in self._newest_first(snap):
                    if snap.packed is not None and h.tid <= snap.packed:
                        return
                    if h.status == STATUS_ABORTED:
                        continue
                    yield TransactionInfo(h.tid, self._verified_meta(snap, pos))

            return newest_first_slice(infos(), first, last)

    def history(self, oid: Oid, size: int = 1) -> list[Revision]:
        """Up to ``size`` revisions of ``oid``, newest first, each record verified (I10)."""
        if not isinstance(oid, bytes) or len(oid) != 8:
            raise TypeError(f"oid must be 8 bytes, got {oid!r:.80}")
        with self._snapshot(oid) as snap:
            return self._history(snap, oid, size)

    def _history(self, snap: _Snapshot, oid: Oid, size: int) -> list[Revision]:
        offset, end, fd = snap.offset, snap.end, snap.fd
        if offset < 0:
            raise POSKeyError(oid)
        revisions: list[Revision] = []
        newer = b""
        while len(revisions) < size:
            header = pread_exact(fd, _D, offset)
            if offset < FIRST_RECORD or len(header) < _D or offset + _D > end:
                raise self._bad_record(oid, offset, f"offset outside {FIRST_RECORD}..{end - _D}")
            roid, rtid, back, rlen, rcrc = _unpack_data_header(header)
            record = pread_exact(fd, rlen, offset + _D)
            if offset + _D + rlen > end or len(record) != rlen:
                raise self._bad_record(oid, offset, f"length {rlen} runs past the committed end {end}")
            if _crc32(record, _crc32(header[:_CHECKED], snap.crc)) != rcrc:
                raise self._bad_record(oid, offset, "data record checksum mismatch")
            if roid != oid:
                raise self._bad_record(oid, offset, f"found a record of oid {oid_repr(roid)} instead")
            if newer and rtid >= newer:
                raise self._bad_record(oid, offset, "revision tids do not decrease along back pointers")
            txn_pos = self._transaction_of(snap, oid, offset + _D + rlen, rtid)
            revisions.append(Revision(rtid, self._verified_meta(snap, txn_pos), rlen))
            if back == 0:
                break
            if back >= offset:
                raise self._bad_record(oid, offset, f"back pointer {back} does not point backwards")
            offset, newer = back, rtid
        return revisions

    def _transaction_of(self, snap: _Snapshot, oid: Oid, pos: int, tid: Tid) -> int:
        """The position of the transaction ``tid`` whose data record of ``oid`` ends at ``pos``.

        Data records do not point to their transaction: walk forward over the records after
        this one to the trailer, recognised by its magic and a header at ``trailer end -
        length`` carrying the same tid and length.
        """
        fd, end = snap.fd, snap.end
        while pos + _T <= end:
            chunk = pread_exact(fd, _D, pos)
            if chunk[12:16] == TRAILER_MAGIC:
                length = int.from_bytes(chunk[:8], "big")
                start = pos + _T - length
                if FILE_HEADER.size <= start < pos:
                    h = decode_txn_header(pread_exact(fd, _H, start))
                    if h.tid == tid and h.length == length:
                        return start
            if len(chunk) < _D:
                break
            _, rtid, _, rlen, _ = _unpack_data_header(chunk)
            if rtid != tid or pos + _D + rlen + _T > end:
                break  # not a record of this transaction, or one running past the end: damage
            pos += _D + rlen
        raise self._bad_record(
            oid, pos, f"cannot find the end of transaction {oid_repr(tid)}: no trailer or record of it here"
        )

    def undo(self, tid: Tid, meta: TransactionMeta, resolve: UndoResolver | None = None) -> Tid:
        """Commit a transaction restoring the states from before ``tid`` (see Storage.undo)."""
        self._check_writable()
        # Undo loads the newest revisions after its begin and stores on them: its begin waits
        # until nothing is appended, so those loads see every transaction before it.
        me = threading.get_ident()
        self._draining_threads.add(me)
        try:
            return undo_transaction(self, tid, meta, resolve, self._packed_tid)
        finally:
            self._draining_threads.discard(me)

    def copy_transactions_from(self, other: Storage) -> int:
        """Copy ``other``'s transactions newer than ours, tids and metadata kept (restores)."""
        self._check_writable()
        return copy_transactions(self, other, self._mark_packed)

    def _mark_packed(self, tid: Tid) -> None:
        """Record a copied history's pack time in the file header of a file without transactions.

        The only rewrite of a file header after its creation; with no transaction in the
        file there is nothing a torn write could cost.
        """
        self._commit_lock.acquire()
        try:
            self._check_writable()
            if self._append_end != FILE_HEADER.size:
                raise StorageError(
                    f"{self._path} already holds transactions: a packed history is copied only into"
                    " an empty file storage"
                )
            pwrite_all(self._fd, encode_file_header(self._file_id, tid), 0)
            os.fsync(self._fd)
            self._packed_tid = tid
        finally:
            self._commit_lock.release()

    # -- writing ----------------------------------------------------------------------------

    def new_oid(self) -> Oid:
        """A fresh oid: never z64, never handed out or stored before in this file."""
        self._check_writable()
        with self._oid_lock:
            oid = self._next_oid
            if oid > MAX_OID:
                raise StorageError(f"{self._path} has used up its oids (the largest is {MAX_OID:#x})")
            self._next_oid = oid + 1
        return p64(oid)

    def _txn_or_none(self) -> _Txn | None:
        """The calling thread's transaction (begin, store, vote and finish of one transaction
        come from the thread that began it)."""
        return self._txns.get(threading.get_ident())

    def begin(self, meta: TransactionMeta, tid: Tid | None = None) -> None:
        """Start a commit, waiting (first come, first served) until the previous committer
        has appended its transaction; with ``tid``, a restore (base invariant 9)."""
        self._check_writable()
        if tid is not None and (not isinstance(tid, bytes) or len(tid) != 8):
            raise TypeError(f"tid must be 8 bytes, got {tid!r:.80}")
        user = meta.user.encode("utf-8")
        desc = meta.description.encode("utf-8")
        ext = bytes(meta.extension)
        if len(user) > MAX_USER or len(desc) > MAX_U32 or len(ext) > MAX_U32:
            raise StorageError("transaction user (64 KiB) or description/extension (4 GiB) too long")
        if self._txn_or_none() is not None:
            raise StorageTransactionError("begin() called twice without finish() or abort()")
        self._commit_lock.acquire()
        try:
            self._check_writable()
            if tid is not None or threading.get_ident() in self._draining_threads:
                # A restore is checked for no conflicts and may write an oid an appended
                # transaction wrote too: its back pointers must not lead into one that may
                # still be aborted.  An undo loads after its begin what it stores on.  Both
                # start once none is in flight.
                self._wait_for_no_appended()
            size = os.fstat(self._fd).st_size
            if size != self._append_end:
                # Only this writer appends (I7), and it leaves the file ending at its last
                # append: another process wrote (its lock file deleted and a second writer
                # let in), or cut it.
                self._broken = StorageError(
                    f"the file is {size} bytes, not the {self._append_end} this writer left"
                )
                raise StorageError(
                    f"{self._path} changed under its writer: it is {size} bytes, but this storage left"
                    f" it at {self._append_end}. Another process wrote to it (was {self._path}.lock"
                    " deleted?) or cut it; nothing more is written. Close every storage on it, then"
                    " check it with amberdb.storage.file.verify()"
                )
            # Assigned under the commit lock, which is held until the append: tids follow
            # the order of the file (I8) whatever order the transactions finish in.
            new_tid = transaction_tid(self._append_tid, tid, self.name)
        except BaseException:
            self._commit_lock.release()
            raise
        txn = _Txn(new_tid, self._append_end, self._file_id_crc, tid is not None)
        txn.meta_lens = (len(user), len(desc), len(ext))
        # The zero header is the "in progress" placeholder: streamed bytes stay invisible
        # until vote writes the real one (I2).
        txn.buf = bytearray(_H)
        txn.buf += user
        txn.buf += desc
        txn.buf += ext
        # The durable mark (I3): what is known durable now; vote puts a later value in when
        # the transaction was not streamed out meanwhile.
        txn.buf += _pack_mark(self._durable_mark(txn))
        self._txns[threading.get_ident()] = txn

    def _durable_mark(self, txn: _Txn) -> int:
        """The durable mark of ``txn`` (I3): an offset below which the file is known synced
        (a lower bound: read without ``_group``).  Without fsync nothing is known, so the
        transaction's own start: a recovery then treats everything before it as durable and
        refuses damage there, as it did before marks."""
        return self._synced_end if self._fsync else txn.pos

    def _txn_in(self, method: str, state: str) -> _Txn:
        """The calling thread's transaction, which must be in ``state``; else raise."""
        if self._generation != GENERATION.value:
            self._check_open()
        txn = self._txns.get(threading.get_ident())
        if txn is not None and txn.state == state:
            return txn
        if txn is not None and txn.state == _DIRTY and txn.failure is not None:
            raise StorageTransactionError(
                f"{method}() after a failed write in this transaction ({txn.failure!r}): abort it"
            )
        current = _IDLE if txn is None else txn.state
        wanted = "an open" if state == _OPEN else "a voted"
        raise StorageTransactionError(f"{method}() needs {wanted} transaction, state is {current}")

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        """Add a revision of ``oid``; ConflictError if ``base_tid`` is not its newest tid.

        Storing an oid that a transaction appended but not yet finished wrote waits until
        that one is finished or aborted, then checks (I3).  Arguments are checked before
        anything is buffered, so a refused store leaves the transaction as it was.  A failure
        after buffering began (an I/O error while writing out) makes the transaction
        unusable: vote raises, abort cleans up.
        """
        # hot path (once per object of a big commit): the checks are compares, not calls.
        txn = self._txns.get(threading.get_ident())
        if txn is None or txn.state is not _OPEN or self._generation != GENERATION.value:
            txn = self._txn_in("store", _OPEN)
        if not isinstance(oid, bytes) or len(oid) != 8:
            raise ValueError(f"oid must be 8 bytes, got {oid!r}")
        if not isinstance(base_tid, bytes) or len(base_tid) != 8:
            raise ValueError(f"base_tid must be 8 bytes, got {base_tid!r}")
        oid_int = int.from_bytes(oid, "big")
        if oid_int > MAX_OID:
            raise ValueError(f"oid {oid_repr(oid)} is above 2**63-1, the largest oid a FileStorage keeps")
        if type(record) is not bytes:
            record = self._as_bytes(oid, record)
        size = len(record)
        if size > MAX_U32:
            raise StorageError(f"record of oid {oid_repr(oid)} is larger than 4 GiB")
        # In flight first: a finish indexes its transaction before it leaves the in-flight
        # map, so an oid missing here is already in the index if it was in flight.
        appended = self._in_flight.get(oid_int)
        if appended is not None and not txn.restoring:
            # Its outcome decides the conflict, and a conflict must name a revision the
            # caller can load to resolve it: wait (holding the commit lock) until it is
            # finished or aborted.  Its owner needs no commit lock for either.
            self._wait_until_settled(txn, appended)
        # Other finishes update the index and loads remap the file: read both under _lock.
        with self._lock:
            current = self._index.get(oid_int)
            if current < 0:
                committed = z64
                current = 0
            elif current + _D <= self._mapped and self._map is not None:
                committed = self._map[current + 8 : current + 16]  # no system call
            else:
                committed = pread_exact(self._fd, _D, current)[8:16]
        if committed != base_tid and not txn.restoring:
            raise ConflictError(oid=oid, serials=(committed, base_tid))
        if current:
            # Changed for other snapshots -- noted only once the store is accepted: a refused
            # one writes nothing, and polls must not report it (base invariant 7).
            changed = txn.changed
            if changed is not None:
                if len(changed) < _POLL_WINDOW:
                    changed.append(oid_int)
                else:
                    txn.changed = None
        buf = txn.buf
        offset = txn.pos + txn.written + len(buf)
        checked = _pack_checked(oid, txn.tid, current, size)
        try:
            buf += checked
            buf += _pack_u32(_crc32(record, _crc32(checked, self._file_id_crc)))
            if size >= FLUSH_SIZE:
                self._flush(txn)
                self._write_out(txn, record)
            else:
                buf += record
                if len(buf) >= FLUSH_SIZE:
                    self._flush(txn)
        except BaseException as exc:
            txn.state = _DIRTY
            txn.failure = exc
            raise
        if txn.count < _PENDING_LIMIT:
            txn.oids.append(oid_int)
            txn.offsets.append(offset)
        elif txn.oids:
            # A big transaction: finish() reads the records' headers back from the file
            # instead of holding 16 bytes per record until then (and, its oids unlisted for
            # the conflict checks of others, it keeps the commit lock until then).
            txn.oids = array("q")
            txn.offsets = array("q")
        txn.count += 1
        if oid_int >= self._next_oid:
            # An oid chosen by the caller: new_oid must not hand it out meanwhile (invariant 5).
            with self._oid_lock:
                self._next_oid = max(self._next_oid, oid_int + 1)

    @staticmethod
    def _as_bytes(oid: Oid, record: object) -> bytes:
        """A copy of a bytes-like ``record`` (the caller may change it later); TypeError if not one."""
        try:
            return bytes(memoryview(record))  # type: ignore[arg-type]
        except TypeError:
            kind = type(record).__name__
            raise TypeError(f"record of oid {oid_repr(oid)} must be bytes, got {kind}") from None

    def _flush(self, txn: _Txn) -> None:
        if txn.buf:
            self._write_out(txn, txn.buf)
            txn.buf = bytearray()

    def _write_out(self, txn: _Txn, data: bytes | bytearray) -> None:
        """Append ``data`` to the streamed part of the transaction, keeping the body CRC."""
        pwrite_all(self._fd, data, txn.pos + txn.written)
        body = memoryview(data)[_H:] if txn.written == 0 else data
        txn.body_crc = zlib.crc32(body, txn.body_crc)
        txn.written += len(data)

    def vote(self) -> None:
        """Append the transaction, let the next committer in, and return once the transaction
        is durable: synced by this thread or by whichever waiter synced first (I3)."""
        txn = self._txn_in("vote", _OPEN)
        if self._broken is not None or self._closing or self._closed:
            self._check_writable()
        if txn.count > MAX_U32:
            raise StorageError("too many records in one transaction")
        buf = txn.buf
        length = txn.written + len(buf) + _T
        header = encode_txn_header(
            txn.tid, length, STATUS_VOTED, *txn.meta_lens, txn.count, FLAG_DURABLE_MARK
        )
        txn.state = _DIRTY  # until the bytes are safely written
        try:
            if txn.written == 0:
                mark_at = _H + sum(txn.meta_lens)
                buf[mark_at : mark_at + _MARK] = _pack_mark(self._durable_mark(txn))
                body_crc = zlib.crc32(memoryview(buf)[_H:], txn.body_crc)
                buf[:_H] = header
                buf += TXN_TRAILER.pack(length, txn_checksum(0, body_crc, header), TRAILER_MAGIC)
                pwrite_all(self._fd, buf, txn.pos)
            else:
                body_crc = zlib.crc32(buf, txn.body_crc)
                buf += TXN_TRAILER.pack(length, txn_checksum(0, body_crc, header), TRAILER_MAGIC)
                pwrite_all(self._fd, buf, txn.pos + txn.written)
                pwrite_all(self._fd, header, txn.pos)
        except BaseException as exc:
            txn.failure = exc
            raise
        txn.buf = bytearray()
        txn.written = length
        txn.end = txn.pos + length
        with self._group:
            txn.appended_after_tid = self._append_tid
            self._append_end = txn.end
            self._append_tid = txn.tid
            self._appended.append(txn)
            txn.in_flight = True
            in_flight = self._in_flight
            for oid in txn.oids:
                in_flight[oid] = txn
        txn.state = _APPENDED
        if txn.count <= len(txn.oids):
            # The exclusive section ends with the append (the next committer's store checks
            # conflicts against the in-flight map); a big transaction, whose oids are not
            # listed, keeps it until finish or abort.
            txn.holds_lock = False
            self._commit_lock.release()
        self._await_durable(txn)
        txn.state = _VOTED

    def _await_durable(self, txn: _Txn) -> None:
        """Return once ``txn``'s bytes are synced (group commit, I3); raise if that failed.

        The first waiter that finds no sync running leads: it syncs everything appended so
        far with no lock held, and every transaction appended before its sync began is
        durable when it returns.  Those appended meanwhile wait for the next leader, which
        the finished sync wakes: one thread, not all of them.
        """
        if not self._fsync:
            return
        group = self._group
        with group:
            while self._synced_end < txn.end:
                failure = self._sync_failure
                if failure is not None:
                    txn.state = _DIRTY
                    txn.failure = txn.sync_failed = failure
                    raise StorageError(
                        f"storage {self._path}: the fdatasync that was to make this transaction"
                        f" durable failed ({failure!r}); it is not committed: abort it"
                    ) from failure
                if self._syncing:
                    self._sleep(txn, self._sync_waiters)
                    continue
                self._syncing = True
                target = self._append_end
                self._lowest_cut = target
                fd = self._fd
                group.release()
                error: BaseException | None = None
                try:
                    os.fdatasync(fd)
                except BaseException as exc:
                    error = exc
                finally:
                    group.acquire()
                    self._syncing = False
                if error is not None:
                    # The kernel may have dropped the pages it failed to write: never retry,
                    # and fail every transaction not yet durable (the leader re-raises the error
                    # itself, the others a StorageError naming it).
                    self._sync_failure = self._broken = error
                    self._wake_everyone()
                    txn.state = _DIRTY
                    txn.failure = txn.sync_failed = error
                    raise error
                # An abort that cut the file below target meanwhile leaves only the bytes
                # under the cut synced by this call.
                self._synced_end = synced = max(self._synced_end, min(target, self._lowest_cut))
                self._wake_synced(synced)

    def _wake_synced(self, synced: int) -> None:
        """Wake the sync waiters that are durable now, and the first of the others, to lead
        the next sync (under ``_group``, no sync running)."""
        waiters = self._sync_waiters
        if not waiters:
            return
        later: list[_Txn] = []
        for waiter in waiters:
            if waiter.end <= synced:
                self._wake(waiter)
            else:
                later.append(waiter)
        if later:
            # Appended while the sync ran: the oldest leads the next one; the rest go on
            # waiting for it (batching by arrival).
            self._wake(later.pop(0))
        waiters[:] = later  # in place: an interrupted sleeper removes itself from this list

    def _sleep(self, txn: _W, waiters: list[_W]) -> None:
        """Block the owner of ``txn``, listed in ``waiters``, until someone ``_wake``s it
        (called and returning under ``_group``; the caller checks its condition again).

        Waking exactly the thread an event concerns is what keeps many committers cheap: with
        one condition notified for all, every sync and every finish woke every waiting thread
        only for most of them to wait again, which grew with the square of the threads.
        """
        gate = txn.gate
        if gate is None:
            gate = txn.gate = threading.Lock()
            gate.acquire()
        txn.sleeping = True
        waiters.append(txn)
        group = self._group
        group.release()
        try:
            gate.acquire()  # released by _wake
        except BaseException:
            group.acquire()
            if txn.sleeping:
                txn.sleeping = False
                waiters.remove(txn)
            else:
                # Woken just as we were interrupted: the gate is open and a wake-up may have
                # carried a duty (leading the next sync): take the gate back, pass the duty on.
                gate.acquire()
                if not self._syncing and self._sync_waiters:
                    self._wake(self._sync_waiters.pop(0))
            raise
        group.acquire()

    @staticmethod
    def _wake(txn: _Waiter) -> None:
        """Let the owner of a sleeping ``txn`` run again; its waker has taken it off its list
        (under ``_group``)."""
        if txn.sleeping:
            txn.sleeping = False
            assert txn.gate is not None
            txn.gate.release()

    def _wake_everyone(self) -> None:
        """Wake every sleeping thread to look again: the storage broke (under ``_group``)."""
        lists: list[list[_Txn] | list[_Waiter]] = [self._sync_waiters, self._drain_waiters]
        lists += [appended.settle_waiters for appended in self._appended]
        for waiters in lists:
            for waiter in waiters:
                self._wake(waiter)
            waiters.clear()

    def finish(self) -> Tid:
        """Publish the voted transaction atomically and return its tid.

        Waits until every transaction with a lower tid is finished or aborted (base
        invariant 6): publication follows tid order.
        """
        txn = self._txn_in("finish", _VOTED)
        with self._group:
            while self._appended[0] is not txn:
                # Woken by the finish or abort that makes it the oldest appended.
                self._sleep(txn, [])
        tid = txn.tid
        index = self._index
        try:
            # One byte, not synced (I4): a crash leaves `v`, which is committed just the same.
            os.pwrite(self._fd, STATUS_COMMITTED, txn.pos + STATUS_OFFSET)
        except BaseException as exc:
            # Durable all the same; but stop writing, and let the next open judge the file.
            self._broken = exc
        failure: BaseException | None = None
        with self._lock:
            if txn.count > len(txn.oids):
                try:
                    index_transaction(self._fd, self._path, txn.pos, index)
                except BaseException as exc:
                    # Durable but only partly indexed: writing more would build on a wrong
                    # index, and aborting would destroy synced data.  End the transaction as
                    # it is; reopening rebuilds the index from the file, this transaction
                    # included (close() saves no index for a broken storage).
                    self._broken = failure = exc
            else:
                for oid, offset in zip(txn.oids, txn.offsets):
                    index[oid] = offset
            if failure is None:
                self._end = txn.end
                self._last_tid = tid
                self._remember_changes(tid, txn.changed)
        with self._group:
            self._leave_flight(txn)
            if failure is None:
                # Under the group lock: publications reach the lock file in tid order.
                self._publish_end()
        self._end_txn(txn)
        if failure is not None:
            raise failure
        return tid

    def _leave_flight(self, txn: _Txn) -> None:
        """Take an appended ``txn`` out of the in-flight list and map, and wake whoever waited
        for that (under ``_group``)."""
        appended = self._appended
        was_first = appended[0] is txn
        appended.remove(txn)
        txn.in_flight = False
        in_flight = self._in_flight
        for oid in txn.oids:
            if in_flight.get(oid) is txn:
                del in_flight[oid]
        for waiter in txn.settle_waiters:
            self._wake(waiter)
        txn.settle_waiters.clear()
        if not appended:
            for waiter in self._drain_waiters:
                self._wake(waiter)
            self._drain_waiters.clear()
        elif was_first:
            self._wake(appended[0])  # its finish, if it waits for its turn

    def _wait_until_settled(self, txn: _Waiter, other: _Txn) -> None:
        """Wait until the appended transaction ``other`` is finished or aborted; raise if the
        storage breaks meanwhile (the aborts after a failed sync need the commit lock)."""
        with self._group:
            while other.in_flight:
                if self._broken is not None:
                    self._check_writable()
                self._sleep(txn, other.settle_waiters)

    def _wait_for_no_appended(self) -> None:
        """Wait until every appended transaction is finished or aborted (under the commit
        lock, so no new one is appended meanwhile); raise if the storage breaks meanwhile
        (the aborts after a failed sync need the commit lock)."""
        waiter = _Waiter()
        with self._group:
            while self._appended:
                if self._broken is not None:
                    self._check_writable()
                self._sleep(waiter, self._drain_waiters)

    def _publish_end(self) -> None:
        """Tell read-only openers where this writer's committed end now is (I9)."""
        try:
            publish_end(self._lock_fd, self._end)
        except OSError:  # pragma: no cover - a hint for readers; without it they are only slower to judge
            pass

    def abort(self) -> None:
        """Forget the calling thread's open or voted transaction (I5); a no-op when none is open.

        After its vote, the transaction is cut off the file when it is still the last one
        appended and the commit lock is free, else marked aborted in place (status ``a``):
        either is synced before abort returns.
        """
        if self._generation != GENERATION.value:
            self._check_open()
        txn = self._txns.get(threading.get_ident())
        if txn is None:
            return
        try:
            if txn.end < 0:
                # Never appended: this thread still holds the commit lock, and only its own
                # streamed (or half-written) bytes lie past the append end.
                if (txn.state == _DIRTY or txn.written) and not self._closed:
                    os.ftruncate(self._fd, txn.pos)
                    if txn.state == _DIRTY:
                        # A failed vote may have left it valid on disk: make its removal durable.
                        os.fsync(self._fd)
            elif txn.sync_failed is not None:
                self._cut_failed_group(txn)
            else:
                self._abort_appended(txn)
        except BaseException as exc:
            self._broken = exc
            raise
        finally:
            if txn.end >= 0:
                with self._group:
                    if txn in self._appended:
                        self._leave_flight(txn)
            self._end_txn(txn)

    def _abort_appended(self, txn: _Txn) -> None:
        """Take back a transaction whose bytes were appended (and synced): cut them off the
        file if nothing follows them and nobody appends, else mark them aborted (I5)."""
        if self._closed:
            return  # the descriptor is gone; the next open judges the file
        took_lock = not txn.holds_lock and self._commit_lock.acquire(blocking=False)
        try:
            with self._group:
                last = (txn.holds_lock or took_lock) and self._append_end == txn.end and not self._syncing
                if last:
                    os.ftruncate(self._fd, txn.pos)
                    self._append_end = txn.pos
                    self._append_tid = txn.appended_after_tid
                    self._synced_end = min(self._synced_end, txn.pos)
                    self._lowest_cut = min(self._lowest_cut, txn.pos)
            if last:
                # The size change must be durable before abort returns (I5).
                os.fsync(self._fd)
                return
        finally:
            if took_lock:
                self._commit_lock.release()
        # Later transactions are appended behind it: it stays, marked aborted, so the file
        # remains a chain of whole transactions.  One byte cannot tear.
        pwrite_all(self._fd, STATUS_ABORTED, txn.pos + STATUS_OFFSET)
        os.fdatasync(self._fd)

    def _cut_failed_group(self, txn: _Txn) -> None:
        """After a failed sync, cut the transactions it failed off the file, once (best effort).

        Nothing is appended any more (the storage is broken) once the commit lock is free:
        the file is truncated to the last synced end and that is synced.  If this succeeds,
        no transaction whose vote failed can come back at a reopen; if it fails too, they
        may, as after a crash before their vote returned (base invariant 3).
        """
        if self._closed:
            return
        if not txn.holds_lock:
            self._commit_lock.acquire()
        try:
            with self._group:
                if self._failed_group_cut:
                    return
                self._failed_group_cut = True
                synced = self._synced_end
            os.ftruncate(self._fd, synced)
            os.fsync(self._fd)
        finally:
            if not txn.holds_lock:
                self._commit_lock.release()

    def _end_txn(self, txn: _Txn) -> None:
        self._txns.pop(threading.get_ident(), None)
        txn.state = _IDLE
        if txn.holds_lock:
            txn.holds_lock = False
            self._commit_lock.release()

    # -- packing ----------------------------------------------------------------------------

    def pack(
        self, pack_tid: Tid | float, referencesf: object = None, *, progress: PackProgress | None = None
    ) -> None:
        """Drop the revisions no snapshot at or after ``pack_tid`` sees, and garbage (I13).

        Keeps every revision newer than ``pack_tid`` and, of the older ones, the newest
        revision of each object still reachable from the root or from a newer revision.
        Loads and commits in other threads go on meanwhile; ``progress(done, total)`` hears
        how many bytes of how many are processed, about every megabyte.  A ``pack_tid``
        above ``last_tid()`` packs at ``last_tid()``.
        """
        self._check_writable()
        pack_tid = pack_time(pack_tid)  # also a POSIX time, as ZODB's pack(t, referencesf)
        if self._txn_or_none() is not None:
            raise StorageTransactionError("pack() while this thread's transaction is open: end it first")
        report = Progress(progress)
        with self._pack_lock, responsive_switching():
            why = ""
            for _ in range(_PACK_ATTEMPTS):
                self._check_writable()
                relinked = self._pack_once(pack_tid, report)
                if relinked is None:
                    report.finish()
                    return
                why = relinked
        raise StorageError(
            f"{self._path} was not packed: commits made while it packed kept re-linking objects the"
            f" pack found unreachable ({why}); {_PACK_ATTEMPTS} attempts were made. Nothing changed;"
            " pack again when fewer commits run"
        )

    def _pack_once(self, pack_tid: Tid, report: Progress) -> str | None:
        """One attempt; None when the file was replaced, else why the attempt was given up.

        Reads the file below the end published when it starts through a descriptor of its
        own and writes the temporary file, all without locks; only the switch-over holds
        the commit lock (and ``_lock`` for the rename and the swap of fd, map and index).
        """
        path = self._path
        tmp = path + _PACK_SUFFIX
        with self._lock:
            end, last = self._end, self._last_tid
            old_crc = self._file_id_crc
            old_index = self._index  # committers go on updating it; the swap replaces it
            old_fd = os.dup(self._fd)  # the inode being packed, whatever the swap does
        out_fd = -1
        replaced = False
        try:
            if last == z64:
                return None  # nothing was ever committed
            pack_tid = min(pack_tid, last)
            packed = pack_tid if self._packed_tid is None else max(pack_tid, self._packed_tid)
            new_id = os.urandom(8)
            out_fd = _create_fresh(tmp)
            pwrite_all(out_fd, encode_file_header(new_id, packed), 0)
            first = FILE_HEADER.size
            report.grow(2 * (end - first))
            packer = Packer(
                old_fd, path, old_crc, out_fd, first, zlib.crc32(new_id), pack_tid, report, old_index, end
            )
            packer.scan(first, end)
            _pack_point("scanned")
            packer.mark()
            _pack_point("marked")
            packer.copy(first, end)
            # Catch up with the commits made meanwhile, still without the commit lock.
            copied = end
            for _ in range(_CATCH_UP_ROUNDS):
                with self._lock:
                    target = self._end
                if target - copied <= _SWITCH_TAIL:
                    break
                if not packer.copy_tail(copied, target):
                    return packer.relinked
                copied = target
            packer.flush()
            _pack_point("written")
            # The bulk is synced here, so the sync under the commit lock covers only the tail.
            os.fdatasync(out_fd)
            _pack_point("copied")
            with self._commit_lock:
                self._check_writable()
                # Transactions appended but not finished would land in the old inode: let
                # them finish or abort first (none is appended while we hold the lock).
                self._wait_for_no_appended()
                if not packer.copy_tail(copied, self._end, quiet=True):
                    return packer.relinked
                new_end = packer.flush()
                os.fsync(out_fd)
                _pack_point("synced")
                with self._lock:
                    if self._closing or self._closed:
                        self._check_open()
                    # Before this the data file is untouched; after it, the new file is whole
                    # and synced.  A crash on either side leaves one or the other (I13).
                    os.replace(tmp, path)
                    replaced = True
                    try:
                        _pack_point("replaced")
                        self._switch_to(out_fd, new_id, packer.index, new_end, packed)
                    except BaseException as exc:
                        # The old inode is unlinked: a commit there would be lost.
                        self._broken = exc
                        raise
                out_fd = -1  # the storage's descriptor now
                try:
                    _pack_point("switched")
                    # The rename must be durable before a commit into the new file is.
                    fsync_directory(os.path.dirname(os.path.abspath(path)))
                except BaseException as exc:
                    self._broken = exc
                    raise
                # The old index names the old file id, so it is ignored already (I6).  A new one
                # now, not at close: it keeps the next oid, which an open that has to scan
                # instead takes from the largest oid left -- and the pack may have dropped
                # the largest, whose oid new_oid would then hand out again (invariant 5).
                try:
                    write_index_file(path, new_id, self._end, self._last_tid, self._next_oid, self._index)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(path + ".index")
                self._publish_end()
                _pack_point("done")
            return None
        finally:
            os.close(old_fd)
            if out_fd >= 0:
                os.close(out_fd)
            if not replaced:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _switch_to(self, fd: int, file_id: bytes, index: OffsetIndex, end: int, packed: Tid) -> None:
        """Make the packed file the storage's (under ``_lock`` and the commit lock)."""
        old_fd, old_map = self._fd, self._map
        self._fd = fd
        self._map = None
        self._mapped = 0
        self._touched = 0
        self._index = index
        self._end = end
        # Transactions aborted after the last finished one are not copied.
        self._append_end = self._synced_end = end
        self._file_id = file_id
        self._file_id_crc = zlib.crc32(file_id)
        self._packed_tid = packed
        # Snapshots older than the pack time lost revisions: they forget their caches, as
        # after any change this storage cannot list (base invariant 7).
        self._poll_floor = max(self._poll_floor, packed)
        if old_map is not None:
            old_map.close()
        os.close(old_fd)

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Abort an open transaction, save the index, release the file and lock.  Idempotent.

        In a process forked after the open, only drops this process's descriptors: the
        parent owns the file, its lock and any transaction in progress (I11).
        """
        if self._closed or self._closing:
            return
        if self._generation != GENERATION.value:
            self._closing = True
            self._lock_fd = -1  # closed by the fork hook already; the number may be reused
            self._release_files()
            self._closed = True
            return
        self._closing = True
        try:
            self.abort()
        finally:
            with self._follow_lock, self._lock:
                try:
                    if not self._read_only and self._broken is None and self._fd >= 0:
                        os.fsync(self._fd)  # the index must not describe bytes not yet on disk
                        write_index_file(
                            self._path, self._file_id, self._end, self._last_tid, self._next_oid, self._index
                        )
                finally:
                    self._release_files()
                    self._closed = True
                    self._generation = _CLOSED_GENERATION

    def _release_files(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
            self._mapped = 0
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            # Closing the descriptor drops the flock; the file stays (unlinking it would race
            # with another process that has just opened it and is about to lock it).
            forget_in_children(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = -1
