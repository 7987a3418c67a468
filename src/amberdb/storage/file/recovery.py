"""Scanning and verifying FileStorage data files (see :mod:`.format` for the layout).

Scanning reads the file in big chunks and parses headers with ``struct.unpack_from``, so the
cost per object is a few hundred nanoseconds of Python instead of a system call.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

from amberdb.exceptions import FileFormatError
from amberdb.storage.base import DataRecord, TransactionMeta, TransactionRecord
from amberdb.storage.file.format import (
    DATA_HEADER,
    DATA_HEADER_INTS,
    MIN_TXN_LENGTH,
    STATUS_COMMITTED,
    TRAILER_MAGIC,
    TXN_HEADER,
    TXN_TRAILER,
    TxnHeader,
    decode_txn_header,
)
from amberdb.storage.offsets import OffsetIndex
from amberdb.utils import oid_repr, z64

__all__ = [
    "ScanResult",
    "find_valid_txn",
    "index_transaction",
    "pread_exact",
    "read_transaction",
    "scan",
    "txn_is_valid",
]

CHUNK = 8 << 20
_H = TXN_HEADER.size
_T = TXN_TRAILER.size
_D = DATA_HEADER.size


@dataclass
class ScanResult:
    """What a scan found: ``end`` is just past the last valid transaction."""

    end: int
    last_tid: bytes
    transactions: int
    torn: bool
    """True when bytes after ``end`` hold an incomplete or damaged last transaction."""


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


def _header_plausible(h: TxnHeader, pos: int, file_size: int, prev_tid: bytes) -> bool:
    return (
        h.status == STATUS_COMMITTED
        and h.length >= MIN_TXN_LENGTH + h.meta_len + h.records * _D
        and pos + h.length <= file_size
        and h.tid > prev_tid
    )


def _stream_crc(fd: int, start: int, end: int, crc: int) -> int | None:
    """CRC-32 of ``[start, end)`` continuing from ``crc``; None if the file ends early."""
    while start < end:
        piece = pread_exact(fd, min(CHUNK, end - start), start)
        if not piece:
            return None
        crc = zlib.crc32(piece, crc)
        start += len(piece)
    return crc


def txn_is_valid(
    fd: int, file_id_crc: int, pos: int, file_size: int, prev_tid: bytes, check_body: bool = True
) -> TxnHeader | None:
    """The header of the transaction at ``pos`` if it is complete and valid, else None.

    ``check_body=False`` checks only that header and trailer agree, without reading the body
    for its checksum: for a transaction already verified (the one a saved index ends at).
    """
    head = pread_exact(fd, _H, pos)
    if len(head) < _H:
        return None
    h = decode_txn_header(head)
    if not _header_plausible(h, pos, file_size, prev_tid):
        return None
    end = pos + h.length - _T
    trailer = pread_exact(fd, _T, end)
    if len(trailer) < _T:
        return None
    length, crc, magic = TXN_TRAILER.unpack(trailer)
    if length != h.length or magic != TRAILER_MAGIC:
        return None
    if not check_body:
        return h
    body_crc = _stream_crc(fd, pos + _H, end, file_id_crc)
    if body_crc is None or zlib.crc32(head, body_crc) != crc:
        return None
    return h


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
                        and txn_is_valid(fd, file_id_crc, candidate, file_size, prev_tid)
                    ):
                        return candidate
            hit = chunk.find(TRAILER_MAGIC, hit + 1)
        if chunk_start + len(chunk) >= file_size:
            break
        chunk_start += len(chunk) - overlap
    return None


def scan(
    fd: int,
    name: str,
    file_id_crc: int,
    start: int,
    file_size: int,
    prev_tid: bytes = z64,
    index: OffsetIndex | None = None,
) -> ScanResult:
    """Verify transactions from ``start`` to the end of the file, filling ``index`` if given.

    A damaged last transaction is reported as ``torn``; a damaged transaction with a valid
    one after it raises FileFormatError naming its offset (committed data must never be
    dropped silently).  ``index`` receives ``oid -> offset of its newest data record``.
    """
    pos = start
    base = start
    buf = b""
    view = memoryview(buf)
    count = 0
    last_tid = prev_tid
    unpack_txn = TXN_HEADER.unpack_from
    unpack_trailer = TXN_TRAILER.unpack_from
    crc32 = zlib.crc32
    min_length = MIN_TXN_LENGTH
    while pos < file_size:
        rel = pos - base
        if rel + _H > len(buf):
            buf = pread_exact(fd, CHUNK, pos)
            view = memoryview(buf)
            base, rel = pos, 0
            if len(buf) < _H:
                break
        tid, length, status, ulen, dlen, elen, n = unpack_txn(buf, rel)
        meta_len = ulen + dlen + elen
        # _header_plausible, inlined: this loop runs once per transaction.
        if (
            status != STATUS_COMMITTED
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
                or crc32(view[rel : rel + _H], crc32(view[rel + _H : body_end], file_id_crc)) != t_crc
            ):
                break
        elif txn_is_valid(fd, file_id_crc, pos, file_size, last_tid) is None:
            break
        if index is not None:
            refilled = _index_records(fd, name, pos, tid, meta_len, n, length, index, buf, base, CHUNK)
            if refilled is not None:
                buf, base = refilled
                view = memoryview(buf)
        last_tid = tid
        pos += length
        count += 1
    torn = pos < file_size
    if torn:
        follower = find_valid_txn(fd, file_id_crc, pos + 1, file_size, last_tid)
        if follower is not None:
            raise FileFormatError(
                f"{name}: damaged transaction at offset {pos}, followed by a valid one at offset {follower}"
            )
    return ScanResult(end=pos, last_tid=last_tid, transactions=count, torn=torn)


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
    for _ in range(count):
        r = p - base
        if r + _D > len(buf):
            buf = pread_exact(fd, chunk, p)
            base, r = p, 0
            refilled = buf, base
        if p + _D > data_end:
            raise FileFormatError(f"{name}: data records overrun transaction at offset {pos}")
        oid, rtid, back, rlen = unpack_data(buf, r)
        if rtid != tid_int or back >= pos:
            raise FileFormatError(
                f"{name}: inconsistent data record at offset {p} (oid {oid_repr(oid.to_bytes(8, 'big'))})"
            )
        index[oid] = p
        p += _D + rlen
    if p != data_end:
        raise FileFormatError(f"{name}: data records do not fill transaction at offset {pos}")
    return refilled


def index_transaction(fd: int, name: str, pos: int, index: OffsetIndex, chunk: int = 1 << 20) -> None:
    """Point ``index`` at every data record of the complete transaction at ``pos``.

    For a transaction this process has just written and synced: its checksum is not read
    again, only its headers, ``chunk`` bytes at a time.
    """
    head = pread_exact(fd, _H, pos)
    if len(head) < _H:
        raise FileFormatError(f"{name}: no transaction header at offset {pos}")
    h = decode_txn_header(head)
    _index_records(fd, name, pos, h.tid, h.meta_len, h.records, h.length, index, b"", pos, chunk)


def read_transaction(fd: int, name: str, pos: int) -> tuple[TxnHeader, TransactionRecord]:
    """Read the (already verified) transaction at ``pos`` in full."""
    head = pread_exact(fd, _H, pos)
    if len(head) < _H:
        raise FileFormatError(f"{name}: truncated transaction at offset {pos}")
    h = decode_txn_header(head)
    data = pread_exact(fd, h.length - _H - _T, pos + _H)
    if len(data) != h.length - _H - _T:
        raise FileFormatError(f"{name}: truncated transaction at offset {pos}")
    view = memoryview(data)
    user = bytes(view[: h.user_len]).decode("utf-8", "replace")
    desc_end = h.user_len + h.desc_len
    description = bytes(view[h.user_len : desc_end]).decode("utf-8", "replace")
    extension = bytes(view[desc_end : h.meta_len])
    # A dict keeps the last record of an oid stored twice (see the format's module docstring).
    records: dict[bytes, DataRecord] = {}
    p = h.meta_len
    for _ in range(h.records):
        oid, rtid, _back, rlen = DATA_HEADER.unpack_from(data, p)
        p += _D
        records[oid] = DataRecord(oid, rtid, bytes(view[p : p + rlen]))
        p += rlen
    view.release()
    meta = TransactionMeta(user=user, description=description, extension=extension)
    return h, TransactionRecord(h.tid, meta, list(records.values()))
