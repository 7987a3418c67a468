"""Test helpers that find things inside a FileStorage data file (see format.py's tables)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from amberdb.storage.file import format as fmt


@dataclass(frozen=True)
class RecordAt:
    """Where a data record lies and what its header says."""

    offset: int
    oid: bytes
    tid: bytes
    back: int
    length: int
    txn: int

    @property
    def record_start(self) -> int:
        return self.offset + fmt.DATA_HEADER.size


def transactions(data: bytes) -> list[tuple[int, fmt.TxnHeader]]:
    """(offset, header) of every transaction of an undamaged file, oldest first."""
    found = []
    pos = fmt.FILE_HEADER.size
    while pos < len(data):
        h = fmt.decode_txn_header(data, pos)
        found.append((pos, h))
        pos += h.length
    assert pos == len(data)
    return found


def records(data: bytes) -> list[RecordAt]:
    """Every data record of an undamaged file, in file order."""
    found = []
    for pos, h in transactions(data):
        p = pos + fmt.TXN_HEADER.size + h.meta_len
        for _ in range(h.records):
            oid, tid, back, length, _ = fmt.DATA_HEADER.unpack_from(data, p)
            found.append(RecordAt(p, oid, tid, back, length, pos))
            p += fmt.DATA_HEADER.size + length
    return found


def rewrite_record_header(data: bytearray, at: RecordAt, *, back: int, oid: bytes | None = None) -> None:
    """Change a record's back pointer (or oid) *and* its checksum: damage no checksum can see."""
    file_id = bytes(data[8:16])
    oid = at.oid if oid is None else oid
    header = fmt.DATA_HEADER.pack(oid, at.tid, back, at.length, 0)
    record = bytes(data[at.record_start : at.record_start + at.length])
    crc = fmt.record_checksum(zlib.crc32(file_id), header, record)
    data[at.offset : at.record_start] = fmt.DATA_HEADER.pack(oid, at.tid, back, at.length, crc)


def reseal_transaction(data: bytearray, pos: int) -> None:
    """Recompute the checksum of the transaction at ``pos`` after its bytes were changed."""
    file_id = bytes(data[8:16])
    h = fmt.decode_txn_header(data, pos)
    body_end = pos + h.length - fmt.TXN_TRAILER.size
    header = bytes(data[pos : pos + fmt.TXN_HEADER.size])
    body = bytes(data[pos + fmt.TXN_HEADER.size : body_end])
    crc = fmt.txn_checksum(zlib.crc32(file_id), body, header)
    data[body_end : body_end + fmt.TXN_TRAILER.size] = fmt.TXN_TRAILER.pack(h.length, crc, fmt.TRAILER_MAGIC)
