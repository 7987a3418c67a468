"""The work of :meth:`FileStorage.pack <amberdb.storage.file.storage.FileStorage.pack>`
that runs without any lock: reading the old file, deciding what lives, writing the new one.

The storage keeps the rules of when this may run and how its result replaces the data file
(invariant I13 in :mod:`.storage`).  A :class:`Packer` only ever reads the old file below
an end the storage published -- bytes there never change (I1) -- through a descriptor of
its own, so loads and commits in other threads go on while it works; and it only writes the
temporary file it was given.

Memory stays bounded by the number of oids, never by the size of the file or the number of
revisions: the new file's index (8 bytes per oid), a bit per oid for the live set, an
``array('q')`` as the mark stack, and buffers of half a megabyte for reading and writing.
Where an oid's newest revision at or before the pack time lies comes from the storage's own
index -- below the first transaction after the pack time it is that revision -- and, for
the oids written after the pack time, from their back pointers, remembered per such oid.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator

from amberdb.exceptions import CorruptedDataError
from amberdb.record import references
from amberdb.storage.file.format import (
    DATA_HEADER,
    DATA_HEADER_CHECKED,
    DATA_HEADER_FIELDS,
    MIN_TXN_LENGTH,
    STATUS_ABORTED,
    STATUS_COMMITTED,
    STATUS_VOTED,
    TRAILER_MAGIC,
    TXN_HEADER,
    TXN_TRAILER,
    ZERO_TXN_HEADER,
    TxnHeader,
    decode_txn_header,
    encode_txn_header,
    txn_checksum,
)
from amberdb.storage.file.recovery import corruption, pread_exact, pwrite_all
from amberdb.storage.offsets import OffsetIndex
from amberdb.utils import Tid, oid_repr

__all__ = ["PACK_CHUNK", "OidBits", "Packer", "Progress", "responsive_switching"]

PACK_CHUNK = 1 << 19
"""Bytes read or written at a time, and how often progress is reported."""

_H = TXN_HEADER.size
_T = TXN_TRAILER.size
_D = DATA_HEADER.size
_unpack_data = DATA_HEADER.unpack_from
_pack_checked = DATA_HEADER_FIELDS.pack
_pack_trailer = TXN_TRAILER.pack
_crc32 = zlib.crc32
# While a pack runs, a thread waiting for the GIL asks for it after this long (seconds);
# see responsive_switching.
_PACK_SWITCH_INTERVAL = 0.0002
_switching_lock = threading.Lock()
_switching_users = 0
_switching_saved = 0.0
# The mark phase reads a record's header and this much of it in one pread; longer records
# take a second read.
_MARK_READ = 4096


@contextlib.contextmanager
def responsive_switching() -> Iterator[None]:
    """Let other threads have the GIL within a fraction of a millisecond while a pack runs.

    A pack is pure Python between its reads, and a thread waiting for the GIL gets it only
    after the switch interval (5 ms by default) -- at every system call a commit makes, so a
    commit during a pack took some 15 ms instead of one.  A shorter interval costs nothing
    while nobody waits (the interpreter asks the running thread to drop the GIL only on
    behalf of a waiter), unlike yielding on a schedule: ``time.sleep(0)`` costs some 100 us
    each, and ``os.sched_yield`` gives the GIL back to the yielder before a waiter wakes.
    The interval is process-wide, so concurrent packs share one setting and the last one
    to finish restores what was there.
    """
    global _switching_users, _switching_saved
    with _switching_lock:
        if _switching_users == 0:
            _switching_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switching_saved, _PACK_SWITCH_INTERVAL))
        _switching_users += 1
    try:
        yield
    finally:
        with _switching_lock:
            _switching_users -= 1
            if _switching_users == 0:
                sys.setswitchinterval(_switching_saved)


class OidBits:
    """A set of oids: one bit each below ``limit``, a set above it (sparse huge oids)."""

    __slots__ = ("_bits", "_limit", "_overflow")

    def __init__(self, limit: int) -> None:
        self._limit = max(limit, 0)
        self._bits = bytearray((self._limit + 7) >> 3)
        self._overflow: set[int] = set()

    def add(self, oid: int) -> None:
        """Put ``oid`` in the set."""
        if 0 <= oid < self._limit:
            self._bits[oid >> 3] |= 1 << (oid & 7)
        else:
            self._overflow.add(oid)

    def __contains__(self, oid: int) -> bool:
        if 0 <= oid < self._limit:
            return bool(self._bits[oid >> 3] & (1 << (oid & 7)))
        return oid in self._overflow


class Progress:
    """Calls ``callback(done, total)`` with ``done`` only growing, about every PACK_CHUNK bytes."""

    def __init__(self, callback: Callable[[int, int], None] | None) -> None:
        self.callback = callback
        self.done = 0
        self.total = 0
        self._reported = -1

    def grow(self, amount: int) -> None:
        """More bytes to process (a second attempt, or a tail committed meanwhile)."""
        self.total += amount

    def advance(self, amount: int, *, quiet: bool = False) -> None:
        """``amount`` more bytes processed; the callback hears of it unless ``quiet``."""
        self.done = min(self.done + amount, self.total)
        if not quiet and self.callback is not None and self.done - self._reported >= PACK_CHUNK:
            self._reported = self.done
            self.callback(self.done, self.total)

    def finish(self) -> None:
        """Everything is processed: report ``done == total``."""
        self.done = self.total
        if self.callback is not None:
            self._reported = self.done
            self.callback(self.done, self.total)


class _Reader:
    """Reads the old file below ``stop`` through preads of about PACK_CHUNK bytes."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.stop = 0
        self._buf = b""
        self._view = memoryview(self._buf)
        self._base = 0

    def read(self, pos: int, size: int) -> memoryview:
        """``size`` bytes at ``pos`` (all below ``stop``); CorruptedDataError when the file is shorter."""
        rel = pos - self._base
        if rel >= 0 and rel + size <= len(self._buf):
            return self._view[rel : rel + size]
        if pos + size > self.stop:
            raise corruption(self.name, pos, f"{size} bytes here run past the committed end {self.stop}")
        want = max(size, min(PACK_CHUNK, self.stop - pos))
        data = pread_exact(self.fd, want, pos)
        if len(data) < size:
            raise corruption(self.name, pos, "the file ends before its committed end")
        if size >= PACK_CHUNK:
            return memoryview(data)  # a big record: not kept as the buffer
        self._buf = data
        self._view = memoryview(data)
        self._base = pos
        return self._view[:size]


class _Writer:
    """Appends to the new file through a buffer of about PACK_CHUNK bytes."""

    def __init__(self, fd: int, start: int) -> None:
        self.fd = fd
        self._buf = bytearray()
        self._base = start

    @property
    def pos(self) -> int:
        return self._base + len(self._buf)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= PACK_CHUNK:
            self.flush()
            pwrite_all(self.fd, data, self._base)
            self._base += len(data)
            return
        self._buf += data
        if len(self._buf) >= PACK_CHUNK:
            self.flush()

    def patch(self, offset: int, data: bytes) -> None:
        """Overwrite bytes written before (a transaction header: never split by a flush)."""
        rel = offset - self._base
        if rel >= 0:
            self._buf[rel : rel + len(data)] = data
        else:
            pwrite_all(self.fd, data, offset)

    def flush(self) -> None:
        if self._buf:
            pwrite_all(self.fd, self._buf, self._base)
            self._base += len(self._buf)
            self._buf = bytearray()


class Packer:
    """One attempt at packing the old file (``fd``) at ``pack_tid`` into the new one (``out_fd``).

    :meth:`scan` reads ``[first, end)`` once, verifying every transaction, and finds each
    oid's newest revision at or before ``pack_tid`` and the roots; :meth:`mark` walks the
    references from the roots; :meth:`copy` writes what is kept; :meth:`copy_tail` copies
    transactions committed after ``end`` and says whether they leave the decision standing.
    """

    def __init__(
        self,
        fd: int,
        name: str,
        file_id_crc: int,
        out_fd: int,
        out_start: int,
        new_file_id_crc: int,
        pack_tid: Tid,
        progress: Progress,
        old_index: OffsetIndex,
        end: int,
    ) -> None:
        self.name = name
        self.reader = _Reader(fd, name)
        self.file_id_crc = file_id_crc
        self.out = _Writer(out_fd, out_start)
        self.new_crc = new_file_id_crc
        self.pack_tid = pack_tid
        self.progress = progress
        # The storage's own index (oid -> newest revision, committers go on updating it) and
        # where the revisions after the pack time begin: below that offset, an oid's newest
        # revision is its newest at or before the pack time.  Past it, the answer is
        # remembered in ``moved`` (0: none) -- only for oids written after the pack time.
        # No index of its own for the old file: 8 bytes per oid less.
        self.old_index = old_index
        self.boundary = end
        self.moved = OffsetIndex(floating=True)
        self.live = OidBits(0)
        self.stack: array[int] = array("q")
        # The new file's index: oid -> offset of its newest revision there.
        self.index = OffsetIndex()
        self.last_tid = b"\0" * 8
        self.last_pos = -1  # where the newest transaction scanned begins
        self.kept_records = 0
        self.relinked: str | None = None
        """Why the last :meth:`copy_tail` refused (a tail record refers to a dropped oid)."""

    # -- reading and verifying --------------------------------------------------------------

    def _verified_header(self, pos: int, stop: int) -> TxnHeader:
        """The header of the transaction at ``pos``, after checking all of it (I10's spirit:
        damage stops the pack; it is never copied into a file with fresh checksums)."""
        reader = self.reader
        head = bytes(reader.read(pos, _H))
        h = decode_txn_header(head)
        problem = None
        if h.status not in (STATUS_COMMITTED, STATUS_VOTED, STATUS_ABORTED):
            problem = f"transaction status is {h.status!r}"
        elif h.length < MIN_TXN_LENGTH + h.meta_len + h.records * _D or pos + h.length > stop:
            problem = f"transaction length {h.length} is impossible here"
        elif h.tid <= self.last_tid:
            problem = "transaction tids do not increase"
        if problem is not None:
            raise corruption(self.name, pos, problem)
        body_end = pos + h.length - _T
        length, crc, magic = TXN_TRAILER.unpack(reader.read(body_end, _T))
        if length != h.length or magic != TRAILER_MAGIC:
            raise corruption(self.name, pos, "transaction header and trailer disagree")
        body_crc = self.file_id_crc
        p = pos + _H
        while p < body_end:
            piece = min(PACK_CHUNK, body_end - p)
            body_crc = _crc32(reader.read(p, piece), body_crc)
            p += piece
        if txn_checksum(0, body_crc, head) != crc:
            raise corruption(self.name, pos, "transaction checksum mismatch")
        self.last_tid = h.tid
        return h

    def _check_record(
        self, pos: int, at: int, rtid: bytes, back: int, rlen: int, data_end: int, tid: bytes
    ) -> None:
        if rtid != tid or back >= pos or at + _D + rlen > data_end:
            raise corruption(self.name, pos, f"its data record at offset {at} does not belong in it")

    def _record_refs(self, at: int, oid: bytes, record: bytes) -> list[bytes]:
        try:
            return references(record)
        except Exception as exc:
            # Unknown references: collecting anything could drop a reachable object.
            raise CorruptedDataError(
                f"{self.name}: cannot read the references of oid {oid_repr(oid)} at offset {at}"
                f" ({exc}); nothing was packed",
                path=self.name,
                offset=at,
                oid=oid,
                problem=str(exc),
            ) from exc

    def newest_at_pack(self, oid: int) -> int:
        """The offset of ``oid``'s newest revision at or before the pack time (-1: none)."""
        at = self.old_index.get(oid)
        if at < self.boundary:
            return at  # -1 too: no revision at all
        moved = self.moved.get(oid)
        if moved < 0:
            # Written after the pack time (maybe while packing): back to the first revision
            # before the boundary, through back pointers the scan or the commit verified.
            while at >= self.boundary:
                header = pread_exact(self.reader.fd, _D, at)
                if len(header) < _D:
                    raise corruption(self.name, at, "the file ends inside a data record")
                roid, _tid, back, _len, _crc = _unpack_data(header)
                if int.from_bytes(roid, "big") != oid or back >= at:
                    raise corruption(self.name, at, f"no revision of oid {oid:#x} here")
                at = back
                if back == 0:
                    break
            moved = self.moved[oid] = max(at, 0)
        return moved if moved > 0 else -1

    def _push(self, oid: int) -> None:
        """Mark ``oid`` live and queue its newest pre-pack revision, if it has one."""
        if oid in self.live or self.newest_at_pack(oid) < 0:
            return
        self.live.add(oid)
        self.stack.append(oid)

    def scan(self, first: int, end: int) -> None:
        """Verify ``[first, end)``, index the newest revisions at or before the pack time and
        mark the roots: z64, every oid written after the pack time and what those revisions
        refer to."""
        reader = self.reader
        reader.stop = end
        moved = self.moved
        pack_tid = self.pack_tid
        progress = self.progress
        marking = False
        pos = first
        while pos < end:
            h = self._verified_header(pos, end)
            if h.status == STATUS_ABORTED:
                # Aborted after its vote: nothing of it is in any state, nothing is copied.
                progress.advance(h.length)
                pos += h.length
                continue
            prepack = h.tid <= pack_tid
            if not prepack and not marking:
                self.boundary = pos
                self._start_marking()
                marking = True
            p = pos + _H + h.meta_len
            data_end = pos + h.length - _T
            for _ in range(h.records):
                oid, rtid, back, rlen, _crc = _unpack_data(reader.read(p, _D))
                self._check_record(pos, p, rtid, back, rlen, data_end, h.tid)
                oid_int = int.from_bytes(oid, "big")
                if not prepack:
                    if oid_int not in moved:
                        # Its first revision after the pack time points back at its newest
                        # one at or before it (0: created after it).
                        moved[oid_int] = back
                    # Post-pack revisions are all kept: they and what they refer to are roots.
                    self._push(oid_int)
                    for ref in self._record_refs(p, oid, bytes(reader.read(p + _D, rlen))):
                        self._push(int.from_bytes(ref, "big"))
                p += _D + rlen
            if p != data_end:
                raise corruption(self.name, pos, "data records do not fill their transaction")
            progress.advance(h.length)
            self.last_pos = pos
            pos += h.length
        if not marking:
            self._start_marking()

    def _start_marking(self) -> None:
        """Size the live set and the new index by the storage's oids, and mark the root."""
        old_index = self.old_index
        top = old_index.max_oid() + 1
        self.index.reserve(top)
        # One bit per oid up to the largest, unless a few huge oids would make that wasteful.
        self.live = OidBits(min(top, 8 * len(old_index) + (1 << 23)))
        self._push(0)

    def mark(self) -> None:
        """Follow references from the roots through the newest pre-pack revisions."""
        fd = self.reader.fd
        newest_at_pack = self.newest_at_pack
        stack = self.stack
        crc0 = self.file_id_crc
        while stack:
            oid_int = stack.pop()
            at = newest_at_pack(oid_int)
            data = pread_exact(fd, _D + _MARK_READ, at)
            if len(data) < _D:
                raise corruption(self.name, at, "the file ends inside a data record")
            oid, _tid, _back, rlen, rcrc = _unpack_data(data)
            if len(data) < _D + rlen:
                data = pread_exact(fd, _D + rlen, at)
            record = data[_D : _D + rlen]
            if len(record) != rlen or int.from_bytes(oid, "big") != oid_int:
                raise corruption(self.name, at, f"no record of oid {oid_int:#x} here")
            if _crc32(record, _crc32(memoryview(data)[:DATA_HEADER_CHECKED], crc0)) != rcrc:
                raise corruption(self.name, at, "data record checksum mismatch", oid)
            for ref in self._record_refs(at, oid, record):
                self._push(int.from_bytes(ref, "big"))

    # -- writing ----------------------------------------------------------------------------

    def copy(self, first: int, end: int) -> None:
        """Write the kept part of the transactions in ``[first, end)`` (verified by :meth:`scan`)."""
        self.reader.stop = end
        pos = first
        while pos < end:
            h = decode_txn_header(self.reader.read(pos, _H))
            if h.status == STATUS_ABORTED:
                self.progress.advance(h.length)
                pos += h.length
                continue
            # The newest transaction stays even when nothing of it is kept: the file must go
            # on saying what the last tid is, or tids would go back at the next open (I8).
            self._copy_transaction(pos, h, check=False, keep=pos == self.last_pos)
            self.progress.advance(h.length)
            pos += h.length

    def copy_tail(self, first: int, end: int, *, quiet: bool = False) -> bool:
        """Verify and copy the transactions committed in ``[first, end)`` while packing.

        False, with :attr:`relinked` saying why, when one of them writes or refers to an oid
        this pack dropped (a snapshot older than the pack re-linked garbage): the pack must
        be done again with them among the roots.
        """
        self.reader.stop = end
        self.progress.grow(end - first)
        pos = first
        while pos < end:
            h = self._verified_header(pos, end)
            if h.status != STATUS_ABORTED and not self._copy_transaction(pos, h, check=True):
                return False
            self.progress.advance(h.length, quiet=quiet)
            pos += h.length
        return True

    def flush(self) -> int:
        """Write out what is buffered; the new file's end."""
        self.out.flush()
        return self.out.pos

    def _dropped(self, oid_int: int) -> bool:
        return self.newest_at_pack(oid_int) >= 0 and oid_int not in self.live

    def _copy_transaction(self, pos: int, h: TxnHeader, *, check: bool, keep: bool = False) -> bool:
        """Copy the transaction at ``pos``: all of it after the pack time, only its kept
        records at or before (nothing at all when none is kept, unless ``keep``).  Back pointers are rebuilt
        from the new index as it was before this transaction, as ``store`` builds them."""
        reader = self.reader
        out = self.out
        prepack = h.tid <= self.pack_tid
        newest_at_pack, live, index = self.newest_at_pack, self.live, self.index
        new_crc = self.new_crc
        tid = h.tid
        # The durable mark (I3) is not copied: a packed file is synced whole before it is used.
        meta = bytes(reader.read(pos + _H, h.info_len)) if h.info_len else b""
        start = -1
        crc = new_crc
        oids: array[int] = array("q")
        offsets: array[int] = array("q")
        if keep or not prepack:
            start = out.pos
            out.write(ZERO_TXN_HEADER)
            out.write(meta)
            crc = _crc32(meta, crc)
        p = pos + _H + h.meta_len
        data_end = pos + h.length - _T
        for _ in range(h.records):
            oid, rtid, back, rlen, _rcrc = _unpack_data(reader.read(p, _D))
            if check:
                self._check_record(pos, p, rtid, back, rlen, data_end, tid)
            at = p
            p += _D + rlen
            oid_int = int.from_bytes(oid, "big")
            if prepack and (newest_at_pack(oid_int) != at or oid_int not in live):
                continue
            record = reader.read(at + _D, rlen)
            if check:
                if self._dropped(oid_int):
                    self.relinked = f"a transaction committed while packing writes oid {oid_repr(oid)}"
                    return False
                for ref in self._record_refs(at, oid, bytes(record)):
                    if self._dropped(int.from_bytes(ref, "big")):
                        self.relinked = (
                            f"oid {oid_repr(oid)}, written while packing, refers to oid {oid_repr(ref)}"
                        )
                        return False
            if start < 0:
                start = out.pos
                out.write(ZERO_TXN_HEADER)
                out.write(meta)
                crc = _crc32(meta, crc)
            prev = index.get(oid_int)
            checked = _pack_checked(oid, tid, prev if prev > 0 else 0, rlen)
            head = checked + _crc32(record, _crc32(checked, new_crc)).to_bytes(4, "big")
            oids.append(oid_int)
            offsets.append(out.pos)
            out.write(head)
            out.write(record)
            crc = _crc32(record, _crc32(head, crc))
        if check and p != data_end:
            raise corruption(self.name, pos, "data records do not fill their transaction")
        if start < 0:
            return True  # a pre-pack transaction left with no records: dropped
        length = out.pos - start + _T
        count = len(oids)
        header = encode_txn_header(tid, length, STATUS_COMMITTED, h.user_len, h.desc_len, h.ext_len, count)
        out.write(_pack_trailer(length, txn_checksum(0, crc, header), TRAILER_MAGIC))
        out.patch(start, header)
        for oid_int, offset in zip(oids, offsets):
            index[oid_int] = offset
        self.kept_records += count
        return True
