"""The on-disk format of a FileStorage data file and its index file.

All integers are big-endian and unsigned.  Offsets are bytes from the start of the file.

Data file
=========

A file header, then transaction records back to back, oldest first.  The file only grows
at the end; the only bytes ever rewritten are those of an unfinished last transaction.

File header (``FILE_HEADER``, 32 bytes)::

    offset  size  meaning
         0     8  magic b"AMBERFS\\x01" (the last byte is the format version)
         8     8  file id: random bytes chosen at creation, mixed into every checksum so a
                  transaction copied from another file (say, inside a record) never passes
        16    16  reserved, zero

Transaction record = header, user, description, extension, data records, trailer.

Transaction header (``TXN_HEADER``, 32 bytes)::

    offset  size  meaning
         0     8  tid
         8     8  length of the whole transaction record, header through trailer
        16     1  status: b"c" committed, b"p" still being written, b"a" aborted after vote
        17     1  reserved, zero
        18     2  length of user (UTF-8)
        20     4  length of description (UTF-8)
        24     4  length of extension
        28     4  number of data records

Data record header (``DATA_HEADER``, 28 bytes), followed by the record bytes::

    offset  size  meaning
         0     8  oid
         8     8  tid (the same as the transaction's)
        16     8  back pointer: offset of this oid's previous revision's data record, 0 if none
        24     4  length of the record bytes

Transaction trailer (``TXN_TRAILER``, 16 bytes)::

    offset  size  meaning
         0     8  length of the whole transaction record (the same as in the header)
         8     4  checksum, see :func:`txn_checksum`
        12     4  magic b"AmbT" (lets a scan find transaction ends inside damaged regions)

The checksum is CRC-32 (``zlib.crc32``) over, in this order: the file id, the bytes between
header and trailer, then the 32 header bytes.  The header comes last so a transaction
written in pieces can be checksummed as it streams out and its header patched at the end.

A transaction is *valid* when its header and trailer agree on the length, the status is
``c``, the trailer magic and checksum match, and its tid is above the previous one's.  If an
oid appears more than once in a transaction, the last record counts (``store`` twice).

Index file (``path + ".index"``)
================================

Written on clean close, so the next open need not scan the whole data file.

Index header (``INDEX_HEADER``, 48 bytes), followed by ``OffsetIndex.to_bytes()``::

    offset  size  meaning
         0     8  magic b"AMBERIX\\x01"
         8     8  file id of the data file it describes
        16     8  position: offset just past the last transaction the index covers
        24     8  tid of that transaction (z64 when the position is the file header's end)
        32     8  next oid to hand out
        40     4  CRC-32 over bytes 0..40 of this header, then the OffsetIndex bytes
        44     4  reserved, zero
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

__all__ = [
    "DATA_HEADER",
    "DATA_HEADER_INTS",
    "FILE_HEADER",
    "FILE_MAGIC",
    "INDEX_HEADER",
    "INDEX_MAGIC",
    "MIN_TXN_LENGTH",
    "STATUS_ABORTED",
    "STATUS_COMMITTED",
    "STATUS_OFFSET",
    "STATUS_PENDING",
    "TRAILER_MAGIC",
    "TXN_HEADER",
    "TXN_TRAILER",
    "IndexHeader",
    "TxnHeader",
    "decode_index_header",
    "decode_txn_header",
    "encode_file_header",
    "encode_index_header",
    "encode_txn_header",
    "txn_checksum",
]

FILE_MAGIC = b"AMBERFS\x01"
INDEX_MAGIC = b"AMBERIX\x01"
TRAILER_MAGIC = b"AmbT"

FILE_HEADER = struct.Struct(">8s8s16x")
TXN_HEADER = struct.Struct(">8sQcxHIII")
DATA_HEADER = struct.Struct(">8s8sQI")
DATA_HEADER_INTS = struct.Struct(">QQQI")
"""The same bytes as DATA_HEADER with oid and tid read as integers (for scanning)."""
TXN_TRAILER = struct.Struct(">QI4s")
INDEX_HEADER = struct.Struct(">8s8sQ8sQI4x")

STATUS_OFFSET = 16
STATUS_COMMITTED = b"c"
STATUS_PENDING = b"p"
STATUS_ABORTED = b"a"

MIN_TXN_LENGTH = TXN_HEADER.size + TXN_TRAILER.size
MAX_USER = 0xFFFF
MAX_U32 = 0xFFFFFFFF


class TxnHeader(NamedTuple):
    """A decoded transaction header."""

    tid: bytes
    length: int
    status: bytes
    user_len: int
    desc_len: int
    ext_len: int
    records: int

    @property
    def meta_len(self) -> int:
        """Bytes of user + description + extension."""
        return self.user_len + self.desc_len + self.ext_len


class IndexHeader(NamedTuple):
    """A decoded index-file header."""

    magic: bytes
    file_id: bytes
    position: int
    last_tid: bytes
    next_oid: int
    crc: int


def encode_file_header(file_id: bytes) -> bytes:
    """The 32-byte header of a new data file."""
    return FILE_HEADER.pack(FILE_MAGIC, file_id)


def encode_txn_header(
    tid: bytes, length: int, status: bytes, user_len: int, desc_len: int, ext_len: int, count: int
) -> bytes:
    """Pack a transaction header."""
    return TXN_HEADER.pack(tid, length, status, user_len, desc_len, ext_len, count)


def decode_txn_header(data: bytes | bytearray | memoryview, offset: int = 0) -> TxnHeader:
    """Unpack a transaction header at ``offset`` of ``data``."""
    return TxnHeader(*TXN_HEADER.unpack_from(data, offset))


def txn_checksum(file_id_crc: int, body_crc_or_body: int | bytes | memoryview, header: bytes) -> int:
    """The transaction checksum from ``crc32(file_id)``, the body (or its running CRC) and header.

    A running CRC of the body must have been started from ``file_id_crc``.
    """
    if isinstance(body_crc_or_body, int):
        body_crc = body_crc_or_body
    else:
        body_crc = zlib.crc32(body_crc_or_body, file_id_crc)
    return zlib.crc32(header, body_crc)


def encode_index_header(
    file_id: bytes, position: int, last_tid: bytes, next_oid: int, payload: bytes
) -> bytes:
    """Pack an index-file header whose CRC covers itself and ``payload``."""
    head = INDEX_HEADER.pack(INDEX_MAGIC, file_id, position, last_tid, next_oid, 0)[:40]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return INDEX_HEADER.pack(INDEX_MAGIC, file_id, position, last_tid, next_oid, crc)


def decode_index_header(data: bytes, payload: bytes | memoryview) -> IndexHeader:
    """Unpack an index-file header; ValueError when its magic or CRC is wrong."""
    if len(data) < INDEX_HEADER.size:
        raise ValueError("index file too short")
    header = IndexHeader(*INDEX_HEADER.unpack_from(data, 0))
    if header.magic != INDEX_MAGIC:
        raise ValueError("index file has the wrong magic")
    if zlib.crc32(payload, zlib.crc32(data[:40])) != header.crc:
        raise ValueError("index file checksum mismatch")
    return header
