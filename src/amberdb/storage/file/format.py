"""The on-disk format of a FileStorage data file and its index file.

All integers are big-endian and unsigned.  Offsets are bytes from the start of the file.
Every checksum is CRC-32 (``zlib.crc32``).

Data file
=========

A file header, then transaction records back to back, oldest first.  The file only grows
at the end; the only bytes ever rewritten are those of the last transaction: its header
when a streamed transaction is voted, its status byte when it is finished or aborted after
its vote.  A pack writes
a whole new file (with a new file id) and renames it over the old one.

File header (``FILE_HEADER``, 32 bytes)::

    offset  size  meaning
         0     8  magic b"AMBERFS\\x03" (the last byte is the format version)
         8     8  file id: random bytes chosen at creation, mixed into every checksum so a
                  transaction or record copied from another file never passes
        16     8  pack time: the tid of the newest pack that wrote this file (zero: never
                  packed; undo refuses transactions at or before it)
        24     4  reserved, zero
        28     4  CRC-32 of bytes 0..28 (pack time and reserved bytes included)

A packed file is written under a temporary name and renamed over the data file only once
complete and synced, so a file whose pack time is not zero is never a partial header (see
:func:`is_partial_file_header`: a crash while creating a file leaves zeros there).

Transaction record = header, user, description, extension, data records, trailer.

Transaction header (``TXN_HEADER``, 32 bytes)::

    offset  size  meaning
         0     8  tid
         8     8  length of the whole transaction record, header through trailer
        16     1  status: b"c" finished, b"v" voted (durable, not yet published),
                  b"a" aborted after its vote (kept in place, read by nobody)
        17     1  flags: 0x01 = a durable mark follows the extension (version 3 writes
                  it on every transaction but a pack's); other bits are invalid
        18     2  length of user (UTF-8)
        20     4  length of description (UTF-8)
        24     4  length of extension
        28     4  number of data records

A header of 32 zero bytes means "in progress": a big transaction streamed out before its
vote carries it.  No other header value is ever read as anything but a transaction to be
verified.

Durable mark (``DURABLE_MARK``, 8 bytes, when flag 0x01 is set), between the extension and
the first data record: an offset below which the file was known synced (fdatasync ended)
when the transaction was appended.  Recovery uses it to tell a power loss during a group's
sync (damage, then only transactions appended before it was durable: cut) from corruption
(see FileStorage's invariant I3).  ``TxnHeader.meta_len`` counts it; ``info_len`` does not.

Versions: 3 added the flags byte, the durable mark and the status ``a``.  Version 2 files
(no flags, no ``a``) are read as they are; a writable open upgrades one by rewriting its
file header (magic and CRC, one 32-byte write, synced) before it writes anything else, so
an older AmberDB refuses the file rather than misread it.  The index file is unchanged
(its magic keeps version 2).

Data record header (``DATA_HEADER``, 32 bytes), followed by the record bytes::

    offset  size  meaning
         0     8  oid (below 2**63: the in-memory index and the index file are signed)
         8     8  tid (the same as the transaction's)
        16     8  back pointer: offset of this oid's previous revision's data record, 0 if none
        24     4  length of the record bytes
        28     4  record checksum, see :func:`record_checksum`

Transaction trailer (``TXN_TRAILER``, 16 bytes)::

    offset  size  meaning
         0     8  length of the whole transaction record (the same as in the header)
         8     4  transaction checksum, see :func:`txn_checksum`
        12     4  magic b"AmbT" (lets a scan find transaction ends inside damaged regions)

The transaction checksum covers, in this order: the file id, the bytes between header and
trailer, then the header *without its status byte* (bytes 0..16 and 17..32).  The header
comes last so a transaction written in pieces can be checksummed as it streams out and its
header patched at the end; the status byte is left out so ``finish`` can turn ``v`` into
``c`` with a one-byte write and no second sync.

The record checksum covers the file id, bytes 0..28 of the data record header, then the
record bytes.  Loads verify it on every read; the transaction checksum proves that a whole
transaction was written.

A transaction is *valid* when its status is ``c``, ``v`` or ``a``, its flags are known,
header and trailer agree on the length, the trailer magic and checksum match, its tid is
above the previous one's, and its data records exactly fill the space between metadata
and trailer.  If an oid appears more than once in a transaction, the last record counts
(``store`` twice).  A valid ``a`` transaction belongs to no state of the database:
scans, the iterator, verify and pack skip it; only its tid still counts for the order of tids.

Index file (``path + ".index"``)
================================

Written on clean close, so the next open need not scan the whole data file.

Index header (``INDEX_HEADER``, 48 bytes), followed by ``OffsetIndex.to_bytes()``::

    offset  size  meaning
         0     8  magic b"AMBERIX\\x02"
         8     8  file id of the data file it describes
        16     8  position: offset just past the last transaction the index covers
        24     8  tid of that transaction (z64 when the position is the file header's end)
        32     8  next oid to hand out
        40     4  reserved, zero
        44     4  CRC-32 over bytes 0..44 of this header, then the OffsetIndex bytes
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "DATA_HEADER",
    "DATA_HEADER_CHECKED",
    "DATA_HEADER_FIELDS",
    "DATA_HEADER_INTS",
    "DURABLE_MARK",
    "FILE_HEADER",
    "FILE_MAGIC",
    "FILE_MAGIC_PREFIX",
    "FLAG_DURABLE_MARK",
    "FORMAT_VERSION",
    "INDEX_HEADER",
    "INDEX_MAGIC",
    "KNOWN_FLAGS",
    "MAX_OID",
    "MIN_TXN_LENGTH",
    "PACKED_TID_OFFSET",
    "READABLE_VERSIONS",
    "STATUS_ABORTED",
    "STATUS_COMMITTED",
    "STATUS_OFFSET",
    "STATUS_VOTED",
    "TRAILER_MAGIC",
    "TXN_HEADER",
    "TXN_TRAILER",
    "ZERO_TXN_HEADER",
    "IndexHeader",
    "TxnHeader",
    "decode_index_header",
    "decode_txn_header",
    "encode_file_header",
    "encode_index_header",
    "encode_txn_header",
    "file_header_crc_ok",
    "file_header_packed_tid",
    "file_version",
    "is_partial_file_header",
    "magic_damaged",
    "record_checksum",
    "txn_checksum",
    "unpack_index_header",
]

FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
"""Versions this AmberDB opens; a writable open upgrades a version-2 file (see the module docstring)."""
FILE_MAGIC_PREFIX = b"AMBERFS"
FILE_MAGIC = FILE_MAGIC_PREFIX + bytes([FORMAT_VERSION])
# The index file did not change with version 3: its magic keeps version 2.
INDEX_MAGIC = b"AMBERIX\x02"
TRAILER_MAGIC = b"AmbT"

FILE_HEADER = struct.Struct(">8s8s8s4xI")
TXN_HEADER = struct.Struct(">8sQcBHIII")
DATA_HEADER = struct.Struct(">8s8sQII")
DATA_HEADER_INTS = struct.Struct(">qQQII")
"""The same bytes as DATA_HEADER with oid (signed: above MAX_OID it is negative) and tid as integers."""
TXN_TRAILER = struct.Struct(">QI4s")
INDEX_HEADER = struct.Struct(">8s8sQ8sQ4xI")

DATA_HEADER_FIELDS = struct.Struct(">8s8sQI")
"""The first 28 bytes of DATA_HEADER (oid, tid, back pointer, length): what the record
checksum covers before the record bytes."""
FILE_HEADER_CHECKED = FILE_HEADER.size - 4
"""Bytes of the file header its CRC covers."""
PACKED_TID_OFFSET = 16
"""Where the file header keeps the pack time (8 bytes, zero when never packed)."""
DATA_HEADER_CHECKED = DATA_HEADER_FIELDS.size
INDEX_HEADER_CHECKED = INDEX_HEADER.size - 4

STATUS_OFFSET = 16
FLAG_DURABLE_MARK = 0x01
"""Transaction header flag: a durable mark follows the extension (format version 3)."""
KNOWN_FLAGS = FLAG_DURABLE_MARK
DURABLE_MARK = struct.Struct(">Q")
STATUS_COMMITTED = b"c"
STATUS_VOTED = b"v"
STATUS_ABORTED = b"a"
"""A transaction aborted after its vote while later ones were already appended behind it
(group commit): it stays in place, valid, so the file stays a chain of whole transactions,
and every reader skips it."""
ZERO_TXN_HEADER = bytes(TXN_HEADER.size)

MIN_TXN_LENGTH = TXN_HEADER.size + TXN_TRAILER.size
MAX_USER = 0xFFFF
MAX_U32 = 0xFFFFFFFF
MAX_OID = (1 << 63) - 1
"""The largest oid a FileStorage can keep: its offset index stores oids as signed 64-bit."""


class TxnHeader(NamedTuple):
    """A decoded transaction header."""

    tid: bytes
    length: int
    status: bytes
    flags: int
    user_len: int
    desc_len: int
    ext_len: int
    records: int

    @property
    def info_len(self) -> int:
        """Bytes of user + description + extension."""
        return self.user_len + self.desc_len + self.ext_len

    @property
    def meta_len(self) -> int:
        """Bytes between the header and the first data record: user, description, extension
        and the durable mark if there is one."""
        info = self.user_len + self.desc_len + self.ext_len
        return info + DURABLE_MARK.size if self.flags & FLAG_DURABLE_MARK else info


class IndexHeader(NamedTuple):
    """A decoded index-file header."""

    magic: bytes
    file_id: bytes
    position: int
    last_tid: bytes
    next_oid: int
    crc: int


def encode_file_header(file_id: bytes, packed_tid: bytes = bytes(8), version: int = FORMAT_VERSION) -> bytes:
    """The 32-byte header of a new data file, its CRC included; ``packed_tid`` is the pack
    time of a file a pack writes (zero: never packed).  ``version`` is for tests that make
    files of an older version."""
    if len(file_id) != 8 or len(packed_tid) != 8:
        raise ValueError("file id and pack time are 8 bytes each")
    magic = FILE_MAGIC_PREFIX + bytes([version])
    head = FILE_HEADER.pack(magic, file_id, packed_tid, 0)[:FILE_HEADER_CHECKED]
    return FILE_HEADER.pack(magic, file_id, packed_tid, zlib.crc32(head))


def file_header_packed_tid(header: bytes) -> bytes | None:
    """The pack time a full file header records, or None when the file was never packed."""
    tid: bytes = FILE_HEADER.unpack(header)[2]
    return None if tid == bytes(8) else tid


def file_header_crc_ok(header: bytes) -> bool:
    """True when a full file header's CRC matches its other 28 bytes."""
    stored: int = FILE_HEADER.unpack(header)[3]
    return zlib.crc32(header[:FILE_HEADER_CHECKED]) == stored


def magic_damaged(header: bytes) -> bool:
    """True when a full file header fails only in its magic: the CRC matches with the magic
    of a version we read.

    Then the file is an AmberDB file whose first bytes changed, not a foreign file.
    """
    for version in READABLE_VERSIONS:
        magic = FILE_MAGIC_PREFIX + bytes([version])
        if header[:8] != magic and file_header_crc_ok(magic + header[8:]):
            return True
    return False


def file_version(header: bytes) -> int:
    """The format version a full file header names (its last magic byte)."""
    return header[7]


def is_partial_file_header(data: bytes) -> bool:
    """True when ``data`` (shorter than a header) could be the start of a header we write.

    That is what a crash while creating the file leaves: the magic (or a prefix of it), any
    file id, zeros where the reserved bytes go.  The CRC bytes are never complete.
    """
    if len(data) >= FILE_HEADER.size:
        return False
    reserved = data[16:FILE_HEADER_CHECKED]
    return data[:8] == FILE_MAGIC[: len(data[:8])] and reserved == bytes(len(reserved))


def encode_txn_header(
    tid: bytes,
    length: int,
    status: bytes,
    user_len: int,
    desc_len: int,
    ext_len: int,
    count: int,
    flags: int = 0,
) -> bytes:
    """Pack a transaction header (``flags``: FLAG_DURABLE_MARK when the body carries one)."""
    return TXN_HEADER.pack(tid, length, status, flags, user_len, desc_len, ext_len, count)


def decode_txn_header(data: bytes | bytearray | memoryview, offset: int = 0) -> TxnHeader:
    """Unpack a transaction header at ``offset`` of ``data``."""
    return TxnHeader(*TXN_HEADER.unpack_from(data, offset))


def txn_checksum(
    file_id_crc: int, body_crc_or_body: int | bytes | bytearray | memoryview, header: bytes | memoryview
) -> int:
    """The transaction checksum from ``crc32(file_id)``, the body (or its running CRC) and header.

    A running CRC of the body must have been started from ``file_id_crc``.  The header's
    status byte is left out (see the module docstring).
    """
    if isinstance(body_crc_or_body, int):
        body_crc = body_crc_or_body
    else:
        body_crc = zlib.crc32(body_crc_or_body, file_id_crc)
    view = memoryview(header)
    return zlib.crc32(view[STATUS_OFFSET + 1 : TXN_HEADER.size], zlib.crc32(view[:STATUS_OFFSET], body_crc))


def record_checksum(file_id_crc: int, header: bytes | memoryview, record: bytes | memoryview) -> int:
    """The checksum of a data record: file id, the first 28 header bytes, the record bytes."""
    return zlib.crc32(record, zlib.crc32(memoryview(header)[:DATA_HEADER_CHECKED], file_id_crc))


def encode_index_header(
    file_id: bytes,
    position: int,
    last_tid: bytes,
    next_oid: int,
    payload: bytes | memoryview | Sequence[bytes | memoryview],
) -> bytes:
    """Pack an index-file header whose CRC covers the rest of itself and ``payload`` (its
    bytes, or the pieces it is written in, in order)."""
    head = INDEX_HEADER.pack(INDEX_MAGIC, file_id, position, last_tid, next_oid, 0)[:INDEX_HEADER_CHECKED]
    crc = zlib.crc32(head)
    for piece in [payload] if isinstance(payload, (bytes, memoryview)) else payload:
        crc = zlib.crc32(piece, crc)
    return INDEX_HEADER.pack(INDEX_MAGIC, file_id, position, last_tid, next_oid, crc)


def decode_index_header(data: bytes | memoryview, payload: bytes | memoryview) -> IndexHeader:
    """Unpack an index-file header; ValueError when its magic, version or CRC is wrong."""
    header, crc = unpack_index_header(data)
    if zlib.crc32(payload, crc) != header.crc:
        raise ValueError("index file checksum mismatch")
    return header


def unpack_index_header(data: bytes | memoryview) -> tuple[IndexHeader, int]:
    """Unpack an index-file header, and the CRC-32 of its checked bytes to continue over the
    entries (its ``crc`` is their final value); ValueError when its magic or version is wrong.
    """
    if len(data) < INDEX_HEADER.size:
        raise ValueError("index file too short")
    header = IndexHeader(*INDEX_HEADER.unpack_from(data, 0))
    if header.magic != INDEX_MAGIC:
        raise ValueError(f"index file has the wrong magic or version {bytes(header.magic)!r}")
    return header, zlib.crc32(data[:INDEX_HEADER_CHECKED])
