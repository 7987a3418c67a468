"""FileStorage: an append-only file of transaction records, with an in-memory index.

The layout is described in :mod:`amberdb.storage.file.format`.  What keeps the file safe
across crashes is this list of invariants; the crash tests name the one they check.

I1  Append only.  Bytes before ``_end`` (just past the last finished transaction) are never
    written while the storage is open; every write lands at or after ``_end``.  Readers only
    follow offsets below ``_end``, so they never see bytes the committer is writing.

I2  Validity is all-or-nothing.  A transaction belongs to the database iff it is *valid*
    (status ``c``, header and trailer agree, checksum over file id + body + header matches)
    and every transaction before it is valid.  A small transaction is written by one pwrite
    and one fdatasync; a large one is streamed out with a zero (invalid) header that is
    patched, together with the trailer, only in ``vote``.  Until the checksum matches, the
    bytes are a *torn tail* that opening ignores and a writable open truncates.

I3  Damage can only be at the end.  With ``fsync=True`` at most one transaction is unsynced
    at any moment (the one being voted; ``begin`` cannot start the next until it is
    finished or aborted), so a crash can damage only the last transaction in the file.  A
    damaged transaction followed by a valid one is therefore corruption, never a crash:
    opening raises FileFormatError naming the offset instead of truncating committed data.

I4  Vote is durable.  ``vote`` returns after fdatasync of the whole transaction, so the
    transaction survives a crash from then on (base invariant 3).  A crash before the data
    reaches the disk leaves a torn tail (I2): nothing of it is visible.

I5  Abort after vote cannot resurrect.  The voted transaction is valid on disk, so ``abort``
    first overwrites its status byte with ``a`` and fdatasyncs -- from then on it is invalid
    whatever happens -- and only then truncates the file back to ``_end``.  A crash before
    the status byte is durable means abort had not returned: the transaction is as voted.
    Abort before vote only truncates: streamed bytes carry an invalid header (I2).

I6  The index file describes a prefix.  It records the position and tid of the transaction
    it ends at, plus the file id, and is written only at a clean close; opening uses it only
    if that transaction is still there (header and trailer agree, same tid, same file id),
    then scans forward from it for later transactions.  As the
    file only grows past positions the index could name (I1), a stale index is still right
    for its prefix; a missing, corrupt or mismatched one is ignored and the file rescanned.

I7  One writer.  A writable open holds ``flock(LOCK_EX)`` on ``path + ".lock"`` from before
    the first write until close; the kernel drops it when the process dies.

I8  Tids grow.  Tids are assigned in ``begin`` from :func:`~amberdb.utils.next_tid` of the
    last finished tid under the commit lock, and a scan rejects a transaction whose tid is
    not above its predecessor's.

``finish`` publishes a voted transaction by updating the in-memory index: from the (oid,
offset) pairs ``store`` kept or, past ``_PENDING_LIMIT`` records, by reading the records'
headers back from the file.  If that read fails, the storage is marked broken: the durable
transaction stays in the file (it is not aborted), nothing more is written (I1 would be at
risk, since ``_end`` was not advanced) and no index file is saved (I6), so the next open
scans and finds it.

With ``fsync=False`` vote does not sync (I4 is relaxed): a crash may lose the most recent
commits, and since the kernel may then write a later transaction before an earlier one, an
open after such a crash can report a damaged transaction followed by a valid one (I3); the
transactions before the reported offset are intact, and truncating the file there recovers
them.  Abort after vote still syncs its status byte (I5 holds in both modes), and ``close``
syncs the file before writing the index.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
import zlib
from array import array
from collections.abc import Iterator
from types import TracebackType

from amberdb.exceptions import (
    ConflictError,
    FileFormatError,
    POSKeyError,
    ReadOnlyError,
    StorageError,
    StorageLockedError,
    StorageTransactionError,
)
from amberdb.storage.base import TransactionMeta, TransactionRecord
from amberdb.storage.file.format import (
    DATA_HEADER,
    FILE_HEADER,
    FILE_MAGIC,
    INDEX_HEADER,
    MAX_U32,
    MAX_USER,
    STATUS_ABORTED,
    STATUS_COMMITTED,
    STATUS_OFFSET,
    TRAILER_MAGIC,
    TXN_HEADER,
    TXN_TRAILER,
    decode_index_header,
    encode_file_header,
    encode_index_header,
    encode_txn_header,
)
from amberdb.storage.file.recovery import (
    index_transaction,
    pread_exact,
    read_transaction,
    scan,
    txn_is_valid,
)
from amberdb.storage.offsets import OffsetIndex
from amberdb.utils import Oid, Tid, next_tid, oid_repr, p64, z64

__all__ = ["FileStorage"]

FLUSH_SIZE = 1 << 20
"""A transaction buffer larger than this is written out before vote (I2)."""

_H = TXN_HEADER.size
_T = TXN_TRAILER.size
_D = DATA_HEADER.size
_PAGE = mmap.PAGESIZE
# Loads drop the map's pages from the resident set after reading about this much.
_RELEASE_AFTER = 8 << 20
# Records a transaction's (oid, offset) pairs are kept for in memory; beyond, finish() reads
# them back from the file.
_PENDING_LIMIT = 1 << 16
_MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)
_IDLE, _OPEN, _VOTED, _DIRTY = "idle", "open", "voted", "dirty"


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStorage:
    """The default embedded storage: one append-only data file (see the module invariants)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        create: bool = True,
        fsync: bool = True,
    ) -> None:
        self._path = os.fspath(path)
        self._read_only = read_only
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
        # _lock guards the index/_end/_last_tid publication and every pread of a load, so a
        # load never sees half a transaction and close never closes the fd under a read.
        # (A plain lock held across the pread is cheaper than counting readers.)
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._oid_lock = threading.Lock()
        self._state = _IDLE
        self._owner: int | None = None
        self._reset_txn()
        try:
            self._open(create)
        except BaseException:
            self._release_files()
            self._closed = True
            raise

    # -- opening ----------------------------------------------------------------------------

    def _open(self, create: bool) -> None:
        path = self._path
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = -1
        if size < 0 and (self._read_only or not create):
            why = "read_only" if self._read_only else "create=False"
            raise StorageError(f"{path}: no such file (not created because {why})")
        if size > 0:
            # Check the magic before touching anything: a foreign file stays as it is.
            with open(path, "rb") as f:
                self._check_header(f.read(FILE_HEADER.size), size)
        if self._read_only:
            self._fd = os.open(path, os.O_RDONLY)
        else:
            self._acquire_lock()
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        size = os.fstat(self._fd).st_size
        header = pread_exact(self._fd, FILE_HEADER.size, 0)
        if self._check_header(header, size):
            if self._read_only:
                return  # an empty (or half-created) file reads as an empty storage
            # New file, or a crash during creation left a prefix of our header.
            self._file_id = os.urandom(8)
            _pwrite_all(self._fd, encode_file_header(self._file_id), 0)
            os.fsync(self._fd)
            _fsync_dir(path)
            size = FILE_HEADER.size
        else:
            self._file_id = FILE_HEADER.unpack(header)[1]
        self._file_id_crc = zlib.crc32(self._file_id)
        self._load(size)

    def _check_header(self, header: bytes, size: int) -> bool:
        """True when the file is empty or a partial header of ours; FileFormatError if foreign."""
        if size >= FILE_HEADER.size and header[:8] == FILE_MAGIC:
            return False
        if size < FILE_HEADER.size and header[:8] == FILE_MAGIC[: len(header[:8])]:
            return True
        raise FileFormatError(f"{self._path} is not an AmberDB file storage (bad magic {header[:8]!r})")

    def _acquire_lock(self) -> None:
        lock_path = self._path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StorageLockedError(
                f"{self._path} is already open for writing by another process{who}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._lock_fd = fd

    def _load(self, size: int) -> None:
        start, prev_tid = FILE_HEADER.size, z64
        loaded = self._read_index_file(size)
        if loaded is not None:
            self._index, start, prev_tid, self._next_oid = loaded
        else:
            self._index = OffsetIndex()
        result = scan(self._fd, self._path, self._file_id_crc, start, size, prev_tid, self._index)
        if result.torn and not self._read_only:
            os.ftruncate(self._fd, result.end)
            os.fsync(self._fd)
        self._end = result.end
        self._last_tid = result.last_tid
        self._next_oid = max(self._next_oid, self._index.max_oid() + 1, 1)

    def _read_index_file(self, size: int) -> tuple[OffsetIndex, int, Tid, int] | None:
        try:
            with open(self._path + ".index", "rb") as f:
                data = f.read()
        except OSError:
            return None
        try:
            view = memoryview(data)
            h = decode_index_header(data[: INDEX_HEADER.size], view[INDEX_HEADER.size :])
            if h.file_id != self._file_id or not FILE_HEADER.size <= h.position <= size:
                return None
            if h.position == FILE_HEADER.size:
                if h.last_tid != z64:
                    return None
            else:
                trailer = pread_exact(self._fd, _T, h.position - _T)
                length = TXN_TRAILER.unpack(trailer)[0]
                txn_pos = h.position - length
                if not FILE_HEADER.size <= txn_pos < h.position:
                    return None
                # Verified in full when the index was saved (at a clean close); a header and
                # trailer that agree and the same tid show it is still that transaction.
                found = txn_is_valid(self._fd, self._file_id_crc, txn_pos, size, z64, check_body=False)
                if found is None or found.tid != h.last_tid:
                    return None
            index = OffsetIndex.from_bytes(view[INDEX_HEADER.size :])
        except (ValueError, OSError):
            return None
        return index, h.position, h.last_tid, h.next_oid

    def _write_index_file(self) -> None:
        payload = self._index.to_bytes()
        header = encode_index_header(self._file_id, self._end, self._last_tid, self._next_oid, payload)
        tmp = self._path + ".index.tmp"
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path + ".index")

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

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self._read_only else "writable")
        return f"<FileStorage {self._path!r} {state}>"

    def __enter__(self) -> FileStorage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
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
        """Return ``(record, tid)`` of the newest revision (strictly before ``before``)."""
        with self._lock:
            if self._closed:
                self._check_open()
            offset = self._index.get(int.from_bytes(oid, "big"))
            if offset < 0:
                raise POSKeyError(oid)
            view = self._map
            while True:
                start = offset + _D
                if view is None or start > self._mapped:
                    view = self._remap(oid, offset, start)
                roid, rtid, back, rlen = DATA_HEADER.unpack_from(view, offset)
                if roid != oid:
                    raise FileFormatError(
                        f"{self._path}: looking for oid {oid_repr(oid)} at offset {offset}"
                        f" found a record of oid {oid_repr(roid)}"
                    )
                if before is None or rtid < before:
                    stop = start + rlen
                    if stop > self._mapped:
                        view = self._remap(oid, offset, stop)
                    self._touched += rlen + _PAGE
                    if self._touched > _RELEASE_AFTER:
                        self._release_pages()
                    return view[start:stop], rtid
                if back == 0:
                    raise POSKeyError(oid, f"no revision before tid {oid_repr(before)}")
                offset = back

    def _release_pages(self) -> None:
        """Let the pages loads have read leave this process's resident set (under ``_lock``).

        Pages of a file mapping count in the process's RSS for as long as the map lives, so
        a scan of a large database would look like it holds the whole file in memory.
        Dropping them is cheap: the data stays in the OS page cache, and the next load of
        a dropped page costs a minor fault.
        """
        self._touched = 0
        if self._map is not None and _MADV_DONTNEED is not None:
            try:
                self._map.madvise(_MADV_DONTNEED)
            except OSError:  # pragma: no cover - an advice the platform refuses is only advice
                pass

    def _remap(self, oid: Oid, offset: int, needed: int) -> mmap.mmap:
        """Map the file again, now that it has grown past the old mapping (under ``_lock``).

        Loads read through a read-only memory map: no system call per load.  Only offsets
        below ``_end`` are ever read (I1), so pages the committer is writing or truncating
        beyond it are never touched.
        """
        size = os.fstat(self._fd).st_size
        if needed > size:
            raise FileFormatError(f"{self._path}: data record of oid {oid_repr(oid)} at {offset} is cut")
        old = self._map
        self._map = mmap.mmap(self._fd, size, access=mmap.ACCESS_READ)
        self._mapped = size
        if old is not None:
            old.close()
        return self._map

    def last_tid(self) -> Tid:
        """The tid of the newest finished transaction (z64 when empty)."""
        self._check_open()
        return self._last_tid

    def __len__(self) -> int:
        """The number of oids with at least one revision."""
        return len(self._index)

    def iterator(self, start: Tid | None = None, stop: Tid | None = None) -> Iterator[TransactionRecord]:
        """Yield finished transactions with ``start <= tid <= stop``, oldest first."""
        self._check_open()
        end = self._end  # a snapshot: transactions finished later are not listed
        pos = FILE_HEADER.size
        while pos < end:
            self._check_open()
            head = pread_exact(self._fd, _H, pos)
            tid, length = TXN_HEADER.unpack(head)[:2]
            if stop is not None and tid > stop:
                return
            if start is None or tid >= start:
                yield read_transaction(self._fd, self._path, pos)[1]
            pos += length

    # -- writing ----------------------------------------------------------------------------

    def new_oid(self) -> Oid:
        """A fresh oid: never z64, never handed out or stored before in this file."""
        self._check_writable()
        with self._oid_lock:
            oid = self._next_oid
            self._next_oid = oid + 1
        return p64(oid)

    def _reset_txn(self) -> None:
        self._tid = z64
        self._txn_pos = 0
        self._buf = bytearray()
        self._written = 0
        self._body_crc = 0
        self._count = 0
        self._meta_lens = (0, 0, 0)
        self._pending_oids: array[int] = array("q")
        self._pending_offsets: array[int] = array("q")

    def begin(self, meta: TransactionMeta) -> None:
        """Start a commit, waiting for any other commit to end."""
        self._check_writable()
        user = meta.user.encode("utf-8")
        desc = meta.description.encode("utf-8")
        ext = bytes(meta.extension)
        if len(user) > MAX_USER or len(desc) > MAX_U32 or len(ext) > MAX_U32:
            raise StorageError("transaction user (64 KiB) or description/extension (4 GiB) too long")
        if self._state != _IDLE and self._owner == threading.get_ident():
            raise StorageTransactionError("begin() called twice without finish() or abort()")
        self._commit_lock.acquire()
        if self._closing or self._closed or self._broken is not None:
            self._commit_lock.release()
            self._check_writable()
        # The transaction fields were reset by __init__ or the previous _end_txn.
        self._state = _OPEN
        self._owner = threading.get_ident()
        self._tid = next_tid(self._last_tid)
        self._txn_pos = self._end
        self._body_crc = self._file_id_crc
        self._meta_lens = (len(user), len(desc), len(ext))
        # The zero header is a placeholder: status 0 is invalid, so streamed bytes stay
        # invisible until vote writes the real one (I2).
        self._buf = bytearray(_H)
        self._buf += user
        self._buf += desc
        self._buf += ext

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        """Add a revision of ``oid``; ConflictError if ``base_tid`` is not its newest tid."""
        if self._state != _OPEN:
            raise StorageTransactionError(f"store() needs an open transaction, state is {self._state}")
        if len(oid) != 8 or len(base_tid) != 8:
            raise ValueError("oid and base_tid must be 8 bytes")
        if len(record) > MAX_U32:
            raise StorageError(f"record of oid {oid_repr(oid)} is larger than 4 GiB")
        oid_int = int.from_bytes(oid, "big")
        # Only the committer (us) changes the index, so no lock is needed to read it here.
        current = self._index.get(oid_int)
        if current < 0:
            committed = z64
        elif current + _D <= self._mapped and self._map is not None:
            committed = self._map[current + 8 : current + 16]  # no system call
        else:
            committed = pread_exact(self._fd, _D, current)[8:16]
        if committed != base_tid:
            raise ConflictError(oid=oid, serials=(committed, base_tid))
        buf = self._buf
        offset = self._txn_pos + self._written + len(buf)
        buf += DATA_HEADER.pack(oid, self._tid, max(current, 0), len(record))
        if len(record) >= FLUSH_SIZE:
            self._flush()
            self._write_out(record)
        else:
            buf += record
            if len(buf) >= FLUSH_SIZE:
                self._flush()
        if self._count < _PENDING_LIMIT:
            self._pending_oids.append(oid_int)
            self._pending_offsets.append(offset)
        elif self._pending_oids:
            # A big transaction: finish() reads the records' headers back from the file
            # instead of holding 16 bytes per record until then.
            self._pending_oids = array("q")
            self._pending_offsets = array("q")
        self._count += 1
        if oid_int >= self._next_oid:
            # An oid chosen by the caller: new_oid must not hand it out meanwhile (invariant 5).
            with self._oid_lock:
                self._next_oid = max(self._next_oid, oid_int + 1)

    def _flush(self) -> None:
        if self._buf:
            self._write_out(self._buf)
            self._buf = bytearray()

    def _write_out(self, data: bytes | bytearray) -> None:
        """Append ``data`` to the streamed part of the transaction, keeping the body CRC."""
        try:
            _pwrite_all(self._fd, data, self._txn_pos + self._written)
        except BaseException:
            self._state = _DIRTY
            raise
        body = memoryview(data)[_H:] if self._written == 0 else data
        self._body_crc = zlib.crc32(body, self._body_crc)
        self._written += len(data)

    def vote(self) -> None:
        """Write the transaction and fdatasync it (unless ``fsync=False``): it is durable now."""
        if self._state != _OPEN:
            raise StorageTransactionError(f"vote() needs an open transaction, state is {self._state}")
        if self._count > MAX_U32:
            raise StorageError("too many records in one transaction")
        buf = self._buf
        length = self._written + len(buf) + _T
        header = encode_txn_header(self._tid, length, STATUS_COMMITTED, *self._meta_lens, self._count)
        self._state = _DIRTY  # until the bytes are safely written
        if self._written == 0:
            body_crc = zlib.crc32(memoryview(buf)[_H:], self._body_crc)
            buf[:_H] = header
            buf += TXN_TRAILER.pack(length, zlib.crc32(header, body_crc), TRAILER_MAGIC)
            _pwrite_all(self._fd, buf, self._txn_pos)
        else:
            body_crc = zlib.crc32(buf, self._body_crc)
            buf += TXN_TRAILER.pack(length, zlib.crc32(header, body_crc), TRAILER_MAGIC)
            _pwrite_all(self._fd, buf, self._txn_pos + self._written)
            _pwrite_all(self._fd, header, self._txn_pos)
        if self._fsync:
            os.fdatasync(self._fd)
        self._buf = bytearray()
        self._written = length
        self._state = _VOTED

    def finish(self) -> Tid:
        """Publish the voted transaction atomically and return its tid."""
        if self._state != _VOTED:
            raise StorageTransactionError(f"finish() needs a voted transaction, state is {self._state}")
        tid = self._tid
        index = self._index
        with self._lock:
            if self._count > len(self._pending_oids):
                try:
                    index_transaction(self._fd, self._path, self._txn_pos, index)
                except BaseException as exc:
                    # Durable but only partly indexed: writing more would build on a wrong
                    # index, and aborting would destroy synced data.  End the transaction as
                    # it is; reopening rebuilds the index from the file, this transaction
                    # included (close() saves no index for a broken storage).
                    self._broken = exc
                    self._end_txn()
                    raise
            else:
                for oid, offset in zip(self._pending_oids, self._pending_offsets):
                    index[oid] = offset
            self._end = self._txn_pos + self._written
            self._last_tid = tid
        self._end_txn()
        return tid

    def abort(self) -> None:
        """Forget the open or voted transaction (I5); a no-op when none is open."""
        state = self._state
        if state == _IDLE:
            return
        try:
            if state in (_VOTED, _DIRTY):
                # The transaction may be valid on disk: invalidate it durably first (I5).
                _pwrite_all(self._fd, STATUS_ABORTED, self._txn_pos + STATUS_OFFSET)
                os.fdatasync(self._fd)
            if state in (_VOTED, _DIRTY) or self._written:
                os.ftruncate(self._fd, self._txn_pos)
        except BaseException as exc:
            self._broken = exc
            raise
        finally:
            self._end_txn()

    def _end_txn(self) -> None:
        self._reset_txn()
        self._state = _IDLE
        self._owner = None
        self._commit_lock.release()

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Abort an open transaction, save the index, release the file and lock.  Idempotent."""
        if self._closed or self._closing:
            return
        self._closing = True
        try:
            self.abort()
        finally:
            with self._lock:
                try:
                    if not self._read_only and self._broken is None and self._fd >= 0:
                        os.fsync(self._fd)  # the index must not describe bytes not yet on disk
                        self._write_index_file()
                finally:
                    self._release_files()
                    self._closed = True

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
            os.close(self._lock_fd)
            self._lock_fd = -1
