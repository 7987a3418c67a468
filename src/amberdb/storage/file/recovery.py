"""Scanning FileStorage data files and judging their end (see :mod:`.format` for the layout).

Scanning reads the file in big chunks and parses headers with ``struct.unpack_from``, so the
cost per object is a few hundred nanoseconds of Python instead of a system call.

How the bytes after the last valid transaction are judged (the recovery rules)
==============================================================================

Truncation is the one irreversible thing the storage does, so only a tail that is *proven*
torn may be cut.  Where a scan stops (nothing valid from there on), the bytes are:

``torn``
    fewer than a transaction header remain; or the header is 32 zero bytes (a streamed
    transaction not yet voted, or a file grown before its data landed); or its length runs past the
    end of the file and the file does not end with a trailer whose length points back
    exactly at this header (a write cut short); or damage followed only by valid
    transactions whose durable marks say the damaged offset was not known durable when they
    were appended and none of which is marked ``c`` (a power loss during a group's sync:
    nothing from there on was acknowledged).  A writable open truncates them.
``damaged``
    anything else: a complete transaction that fails a check (status, lengths, trailer,
    checksum, tid order, record layout), or any other damage with a valid transaction
    after it (one whose mark is above the damage, one with no mark, one marked ``c``).
    Nothing is cut: opening raises :class:`~amberdb.exceptions.CorruptedDataError`.

A valid transaction whose status is ``v`` and that is the last valid one is a *voted tail*:
durable, but perhaps still being decided by a live writer.  :func:`scan` reports it without
indexing it; the storage decides (see its invariants).  A reader that may share the file
with a live writer scans with ``stop_at_voted``: the first ``v`` transaction is then the voted
tail whatever follows (with group commit several voted transactions can await their
``finish`` at once).  A valid ``a`` transaction (aborted after its vote) is skipped: it is
never indexed and never counts as committed, but its tid still orders the next one.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

from amberdb.exceptions import CorruptedDataError
from amberdb.storage.base import DataRecord, TransactionMeta, TransactionRecord
from amberdb.storage.file.format import (
    DATA_HEADER,
    DATA_HEADER_CHECKED,
    DATA_HEADER_INTS,
    DURABLE_MARK,
    FILE_HEADER,
    FLAG_DURABLE_MARK,
    KNOWN_FLAGS,
    MAX_OID,
    MIN_TXN_LENGTH,
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
)
from amberdb.storage.offsets import OffsetIndex
from amberdb.utils import oid_repr, z64

__all__ = [
    "FIRST_RECORD",
    "RECOVERY_HINT",
    "Damage",
    "ScanResult",
    "corruption",
    "describe_txn_problem",
    "find_valid_txn",
    "index_transaction",
    "judge_stop",
    "pread_exact",
    "pwrite_all",
    "read_transaction",
    "scan",
]

CHUNK = 8 << 20
_H = TXN_HEADER.size
_T = TXN_TRAILER.size
_D = DATA_HEADER.size
FIRST_RECORD = FILE_HEADER.size + TXN_HEADER.size
"""The lowest offset a data record can have: a back pointer below it is damage."""

RECOVERY_HINT = (
    "Nothing was changed. To recover: open it with FileStorage(path, read_only=True, salvage=True)"
    " to read every transaction before the damage, run amberdb.storage.file.verify(path) to list"
    " every problem, or restore the file from a backup."
)


@dataclass(frozen=True)
class Damage:
    """The first place a data file fails a check, and which check failed."""

    offset: int
    problem: str
    followed: bool = False
    """A valid transaction comes after it: damage in the middle, never a write in progress."""

    def __str__(self) -> str:
        return f"offset {self.offset}: {self.problem}"


def corruption(path: str, offset: int, problem: str, oid: bytes | None = None) -> CorruptedDataError:
    """The error for damage at ``offset`` of ``path``, saying how to recover."""
    where = f"offset {offset}" if oid is None else f"offset {offset} (oid {oid_repr(oid)})"
    return CorruptedDataError(
        f"{path} is damaged at {where}: {problem}. {RECOVERY_HINT}",
        path=path,
        offset=offset,
        oid=oid,
        problem=problem,
    )


@dataclass
class ScanResult:
    """What a scan found.

    ``end`` is just past the last transaction certainly committed (all indexed); a valid
    ``voted_tail`` may start there (not indexed).  ``stop`` is where valid transactions end,
    and ``tail`` judges the bytes from there: ``clean`` (none), ``torn`` or ``damaged``.
    """

    end: int
    last_tid: bytes
    transactions: int
    stop: int
    tail: str
    damage: Damage | None = None
    voted_tail: TxnHeader | None = None
    voted: list[int] = field(default_factory=list)
    """Offsets of committed transactions still marked ``v`` (a lost ``finish`` flip)."""
    torn_reason: str = ""
    stop_tid: bytes = z64
    """The tid of the last valid transaction before ``stop``, aborted ones included: the
    tid the next appended transaction must exceed."""


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Read exactly ``size`` bytes at ``offset``; shorter only at end of file."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    # pread may return short reads (signals, huge sizes); finish the job.
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _stream_crc(fd: int, start: int, end: int, crc: int) -> int | None:
    """CRC-32 of ``[start, end)`` continuing from ``crc``; None if the file ends early."""
    while start < end:
        piece = pread_exact(fd, min(CHUNK, end - start), start)
        if not piece:
            return None
        crc = zlib.crc32(piece, crc)
        start += len(piece)
    return crc


def _header_problem(h: TxnHeader, pos: int, file_size: int, prev_tid: bytes) -> str | None:
    if h.status not in (STATUS_COMMITTED, STATUS_VOTED, STATUS_ABORTED):
        return f"transaction status byte is {h.status!r}, not b'c', b'v' or b'a'"
    if h.flags & ~KNOWN_FLAGS:
        return f"transaction flags byte is {h.flags:#04x}, not one this AmberDB writes"
    if h.length < MIN_TXN_LENGTH + h.meta_len + h.records * _D:
        return f"transaction length {h.length} is too small for its metadata and {h.records} data records"
    if pos + h.length > file_size:
        return f"transaction length {h.length} runs past the end of the file ({file_size} bytes)"
    if h.tid <= prev_tid:
        return f"transaction tid {oid_repr(h.tid)} is not above the previous tid {oid_repr(prev_tid)}"
    return None


def describe_txn_problem(
    fd: int, file_id_crc: int, pos: int, file_size: int, prev_tid: bytes, check_body: bool = True
) -> tuple[TxnHeader | None, str | None]:
    """``(header, None)`` when the transaction at ``pos`` is valid, else ``(header, problem)``.

    ``check_body=False`` checks only that header and trailer agree, without reading the body
    for its checksum: for a transaction already verified (the one a saved index ends at).
    """
    head = pread_exact(fd, _H, pos)
    if len(head) < _H:
        return None, f"only {len(head)} bytes of a transaction header before the end of the file"
    h = decode_txn_header(head)
    problem = _header_problem(h, pos, file_size, prev_tid)
    if problem is not None:
        return h, problem
    end = pos + h.length - _T
    trailer = pread_exact(fd, _T, end)
    if len(trailer) < _T:
        return h, "the file ends inside the transaction trailer"
    length, crc, magic = TXN_TRAILER.unpack(trailer)
    if magic != TRAILER_MAGIC:
        return h, f"transaction trailer magic is {magic!r}, not {TRAILER_MAGIC!r}"
    if length != h.length:
        return h, f"transaction header says length {h.length}, its trailer says {length}"
    if not check_body:
        return h, None
    body_crc = _stream_crc(fd, pos + _H, end, file_id_crc)
    if body_crc is None:
        return h, "the file ends inside the transaction"
    if zlib.crc32(head[STATUS_OFFSET + 1 :], zlib.crc32(head[:STATUS_OFFSET], body_crc)) != crc:
        return h, "transaction checksum mismatch"
    return h, None


def find_valid_txn(fd: int, file_id_crc: int, start: int, file_size: int, prev_tid: bytes) -> int | None:
    """The offset of some valid transaction beginning at or after ``start``, or None.

    Used after a damaged transaction to tell a torn tail (nothing valid follows) from
    corruption in the middle of the file.  Finds candidates through the trailer magic, so a
    damaged length field cannot hide what follows.
    """
    overlap = len(TRAILER_MAGIC) - 1
    chunk_start = start
    seen = -1
    while chunk_start < file_size:
        chunk = pread_exact(fd, min(CHUNK, file_size - chunk_start), chunk_start)
        if not chunk:
            return None
        hit = chunk.find(TRAILER_MAGIC)
        while hit >= 0:
            magic_at = chunk_start + hit
            if magic_at > seen:
                seen = magic_at
                txn_end = magic_at + len(TRAILER_MAGIC)
                trailer = pread_exact(fd, _T, txn_end - _T)
                if len(trailer) == _T:
                    length: int = TXN_TRAILER.unpack(trailer)[0]
                    candidate = txn_end - length
                    if (
                        length >= MIN_TXN_LENGTH
                        and candidate >= start
                        and describe_txn_problem(fd, file_id_crc, candidate, file_size, prev_tid)[1] is None
                    ):
                        return candidate
            hit = chunk.find(TRAILER_MAGIC, hit + 1)
        if chunk_start + len(chunk) >= file_size:
            break
        chunk_start += len(chunk) - overlap
    return None


def judge_stop(
    fd: int, file_id_crc: int, pos: int, file_size: int, prev_tid: bytes
) -> tuple[str, str, Damage | None]:
    """Judge the bytes from ``pos`` (where valid transactions end) to ``file_size``.

    Returns ``(tail, reason, damage)`` with ``tail`` one of ``clean``, ``torn``, ``damaged``
    (see the module docstring for the rules).
    """
    if pos >= file_size:
        return "clean", "", None
    remaining = file_size - pos
    head = pread_exact(fd, _H, pos)
    damage: Damage | None = None
    reason = ""
    if remaining < _H or len(head) < _H:
        reason = f"{remaining} bytes at the end, fewer than a transaction header"
    elif head == ZERO_TXN_HEADER:
        reason = "a zero transaction header (a transaction still in progress)"
    else:
        h = decode_txn_header(head)
        if pos + h.length > file_size:
            last = pread_exact(fd, _T, file_size - _T) if file_size - _T >= pos else b""
            if len(last) == _T:
                t_length, _, t_magic = TXN_TRAILER.unpack(last)
                if t_magic == TRAILER_MAGIC and file_size - t_length == pos:
                    damage = Damage(
                        pos,
                        f"transaction header says length {h.length}, but the file ends with its"
                        f" trailer, which says {t_length}",
                    )
            if damage is None:
                reason = f"a transaction of {h.length} bytes cut short by the end of the file"
        else:
            problem = describe_txn_problem(fd, file_id_crc, pos, file_size, prev_tid)[1]
            damage = Damage(pos, problem or "transaction is valid but was not accepted in order")
    follower = find_valid_txn(fd, file_id_crc, pos + 1, file_size, prev_tid)
    if follower is not None:
        what = damage.problem if damage is not None else reason
        durable_at = _durable_before(fd, file_id_crc, pos, follower, file_size, prev_tid)
        if durable_at is None:
            return "torn", f"{what}, then only transactions appended before it was durable", None
        problem = f"{what}, followed by a valid transaction at offset {follower}"
        if durable_at != follower:
            problem += f" (and one at offset {durable_at} appended after it was durable)"
        return "damaged", "", Damage(pos, problem, followed=True)
    if damage is not None:
        return "damaged", "", damage
    return "torn", reason, None


def _durable_before(
    fd: int, file_id_crc: int, pos: int, follower: int, file_size: int, prev_tid: bytes
) -> int | None:
    """The first valid transaction after ``pos`` (``follower`` the first) that proves ``pos``
    was durable before it was appended; None when none does (see the module docstring).

    Proof: its durable mark is above ``pos`` (a sync covering ``pos`` had ended when it was
    appended), or it has none (written by a pack, by format version 2, or without fsync),
    or its status is ``c`` (its finish ran, so its vote returned after a sync covering it,
    and ``pos`` lies before it).
    """
    candidate: int | None = follower
    while candidate is not None:
        h = decode_txn_header(pread_exact(fd, _H, candidate))
        if not h.flags & FLAG_DURABLE_MARK or h.status == STATUS_COMMITTED:
            return candidate
        mark_at = candidate + _H + h.info_len
        durable: int = DURABLE_MARK.unpack(pread_exact(fd, DURABLE_MARK.size, mark_at))[0]
        if durable > pos:
            return candidate
        candidate = find_valid_txn(fd, file_id_crc, candidate + 1, file_size, prev_tid)
    return None


def scan(
    fd: int,
    name: str,
    file_id_crc: int,
    start: int,
    file_size: int,
    prev_tid: bytes = z64,
    index: OffsetIndex | None = None,
    stop_at_voted: bool = False,
) -> ScanResult:
    """Verify transactions from ``start`` to ``file_size``, filling ``index`` if given.

    ``index`` receives ``oid -> offset of its newest data record`` for every committed
    transaction.  A last valid transaction with status ``v`` is reported as the voted tail
    and not indexed; with ``stop_at_voted`` so is the first one, and the scan ends there
    (``tail`` is then ``clean``: what follows is a live writer's business).  Transactions
    with status ``a`` are verified and skipped.  What follows the valid transactions is
    judged by :func:`judge_stop`.
    Raises CorruptedDataError only for a transaction whose checksum matches but whose data
    records do not fit (a file written by something else, or a bug): ``index`` is then
    partly filled and must be thrown away.
    """
    pos = start
    base = start
    buf = b""
    view = memoryview(buf)
    count = 0
    last_tid = prev_tid
    kept_end, kept_tid = start, prev_tid
    voted: list[int] = []
    pending: TxnHeader | None = None  # a valid `v` transaction at kept_end, not yet indexed
    unpack_txn = TXN_HEADER.unpack_from
    unpack_trailer = TXN_TRAILER.unpack_from
    crc32 = zlib.crc32
    min_length = MIN_TXN_LENGTH
    committed, voted_status, aborted = STATUS_COMMITTED, STATUS_VOTED, STATUS_ABORTED
    after_status = STATUS_OFFSET + 1
    mark_size = DURABLE_MARK.size  # FLAG_DURABLE_MARK is the only flag
    stopped_at_voted = False
    while pos < file_size:
        rel = pos - base
        if rel + _H > len(buf):
            buf = pread_exact(fd, CHUNK, pos)
            view = memoryview(buf)
            base, rel = pos, 0
            if len(buf) < _H:
                break
        tid, length, status, flags, ulen, dlen, elen, n = unpack_txn(buf, rel)
        meta_len = ulen + dlen + elen + (mark_size if flags else 0)
        # _header_problem, inlined: this loop runs once per transaction.
        if (
            (status != committed and status != voted_status and status != aborted)
            or flags & ~KNOWN_FLAGS
            or length < min_length + meta_len + n * _D
            or pos + length > file_size
            or tid <= last_tid
        ):
            break
        if rel + length > len(buf) and length <= CHUNK:
            buf = pread_exact(fd, CHUNK, pos)
            view = memoryview(buf)
            base, rel = pos, 0
        if rel + length <= len(buf):
            body_end = rel + length - _T
            t_len, t_crc, t_magic = unpack_trailer(buf, body_end)
            if (
                t_len != length
                or t_magic != TRAILER_MAGIC
                or crc32(
                    view[rel + after_status : rel + _H],
                    crc32(view[rel : rel + STATUS_OFFSET], crc32(view[rel + _H : body_end], file_id_crc)),
                )
                != t_crc
            ):
                break
        elif describe_txn_problem(fd, file_id_crc, pos, file_size, last_tid)[1] is not None:
            break
        if pending is not None:
            # A valid transaction follows the voted one: that one was finished (its flip
            # to `c` was lost), so it is committed.
            if index is not None:
                index_transaction(fd, name, kept_end, index)
            voted.append(kept_end)
            kept_end += pending.length
            kept_tid = pending.tid
            count += 1
            pending = None
        if status == voted_status:
            pending = TxnHeader(tid, length, status, flags, ulen, dlen, elen, n)
            if stop_at_voted:
                last_tid = tid
                pos += length
                stopped_at_voted = True
                break
        elif status == aborted:
            pass  # in no state of the database; only its tid orders the next one
        else:
            if index is not None:
                refilled = _index_records(fd, name, pos, tid, meta_len, n, length, index, buf, base, CHUNK)
                if refilled is not None:
                    buf, base = refilled
                    view = memoryview(buf)
            kept_end = pos + length
            kept_tid = tid
            count += 1
        last_tid = tid
        pos += length
    if stopped_at_voted:
        tail, reason, damage = "clean", "", None
    else:
        tail, reason, damage = judge_stop(fd, file_id_crc, pos, file_size, last_tid)
    return ScanResult(
        end=kept_end,
        last_tid=kept_tid,
        transactions=count,
        stop=pos,
        tail=tail,
        damage=damage,
        voted_tail=pending,
        voted=voted,
        torn_reason=reason,
        stop_tid=last_tid,
    )


def _index_records(
    fd: int,
    name: str,
    pos: int,
    tid: bytes,
    meta_len: int,
    count: int,
    length: int,
    index: OffsetIndex,
    buf: bytes,
    base: int,
    chunk: int,
) -> tuple[bytes, int] | None:
    """Point ``index`` at the ``count`` data records of the transaction at ``pos``.

    ``buf`` holds the file from offset ``base`` on (possibly nothing useful); more is read
    ``chunk`` bytes at a time.  Returns the last buffer read and its offset, or None when
    ``buf`` sufficed.
    """
    unpack_data = DATA_HEADER_INTS.unpack_from
    tid_int = int.from_bytes(tid, "big")
    p = pos + _H + meta_len
    data_end = pos + length - _T
    refilled = None
    # Errors are named by the transaction's offset: salvage keeps what comes before it.
    try:
        for _ in range(count):
            r = p - base
            if r + _D > len(buf):
                buf = pread_exact(fd, chunk, p)
                base, r = p, 0
                refilled = buf, base
                if len(buf) < _D:
                    raise corruption(name, pos, "the file ends inside the transaction")
            if p + _D > data_end:
                raise corruption(name, pos, "data records overrun their transaction")
            # hot path (once per record of the file when there is no index): the oid is read
            # signed, so one above MAX_OID comes out negative and the index refuses it.
            oid, rtid, back, rlen, _ = unpack_data(buf, r)
            if rtid != tid_int or back >= pos:
                raise corruption(name, pos, f"its data record at offset {p} does not belong in it")
            index[oid] = p
            p += _D + rlen
    except ValueError:
        raise corruption(name, pos, f"its data record at offset {p} has an oid above {MAX_OID}") from None
    if p != data_end:
        raise corruption(name, pos, "data records do not fill their transaction")
    return refilled


def index_transaction(fd: int, name: str, pos: int, index: OffsetIndex, chunk: int = 1 << 20) -> TxnHeader:
    """Point ``index`` at every data record of the complete transaction at ``pos``; its header.

    For a transaction verified already (just written and synced, or scanned): its checksum
    is not read again, only its headers, ``chunk`` bytes at a time.
    """
    head = pread_exact(fd, _H, pos)
    if len(head) < _H:
        raise corruption(name, pos, "the file ends inside a transaction header")
    h = decode_txn_header(head)
    _index_records(fd, name, pos, h.tid, h.meta_len, h.records, h.length, index, b"", pos, chunk)
    return h


def read_transaction(
    fd: int, name: str, file_id_crc: int, pos: int, end: int, prev_tid: bytes
) -> tuple[TxnHeader, TransactionRecord]:
    """Read the transaction at ``pos`` in full, verifying everything on the way.

    ``end`` bounds the transaction (the storage's published end); ``prev_tid`` is the tid of
    the transaction before it.  Header, trailer, transaction checksum, the layout of the data
    records and every record checksum are checked; any failure raises CorruptedDataError,
    so damaged metadata never comes out as data.
    """
    head = pread_exact(fd, _H, pos)
    if len(head) < _H:
        raise corruption(name, pos, "the file ends inside a transaction header")
    h = decode_txn_header(head)
    problem = _header_problem(h, pos, end, prev_tid)
    if problem is not None:
        raise corruption(name, pos, problem)
    data = pread_exact(fd, h.length - _H, pos + _H)
    if len(data) != h.length - _H:
        raise corruption(name, pos, "the file ends inside the transaction")
    view = memoryview(data)
    body_len = len(data) - _T
    length, crc, magic = TXN_TRAILER.unpack_from(data, body_len)
    if magic != TRAILER_MAGIC or length != h.length:
        raise corruption(name, pos, "transaction header and trailer disagree")
    body_crc = zlib.crc32(view[:body_len], file_id_crc)
    if zlib.crc32(head[STATUS_OFFSET + 1 :], zlib.crc32(head[:STATUS_OFFSET], body_crc)) != crc:
        raise corruption(name, pos, "transaction checksum mismatch")
    try:
        user = bytes(view[: h.user_len]).decode("utf-8")
        desc_end = h.user_len + h.desc_len
        description = bytes(view[h.user_len : desc_end]).decode("utf-8")
    except UnicodeDecodeError:
        raise corruption(name, pos, "transaction user or description is not UTF-8") from None
    extension = bytes(view[desc_end : h.info_len])
    # A dict keeps the last record of an oid stored twice (see the format's module docstring).
    records: dict[bytes, DataRecord] = {}
    p = h.meta_len
    for _ in range(h.records):
        offset = pos + _H + p
        if p + _D > body_len:
            raise corruption(name, pos, "data records overrun their transaction")
        oid, rtid, back, rlen, rcrc = DATA_HEADER.unpack_from(data, p)
        start = p + _D
        stop = start + rlen
        if stop > body_len:
            raise corruption(name, offset, "data record runs past its transaction", oid)
        if rtid != h.tid or back >= pos or 0 < back < FIRST_RECORD:
            raise corruption(name, offset, "data record does not belong in its transaction", oid)
        if zlib.crc32(view[start:stop], zlib.crc32(view[p : p + DATA_HEADER_CHECKED], file_id_crc)) != rcrc:
            raise corruption(name, offset, "data record checksum mismatch", oid)
        records[oid] = DataRecord(oid, rtid, bytes(view[start:stop]))
        p = stop
    if p != body_len:
        raise corruption(name, pos, "data records do not fill their transaction")
    view.release()
    meta = TransactionMeta(user=user, description=description, extension=extension)
    return h, TransactionRecord(h.tid, meta, list(records.values()))
