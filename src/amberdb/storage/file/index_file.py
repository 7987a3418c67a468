"""The index file beside a data file (``path + ".index"``): saved at a clean close, trusted at open.

It holds the in-memory offset index as it was when the storage closed, plus the position
and tid of the transaction it ends at (layout in :mod:`.format`), so an open need not scan
the whole data file.  It is derived data: one that fails its own checks is ignored and the
file scanned.  But a valid index of this very data file is evidence: everything before its
position was synced before it was written, so a data file that contradicts it was damaged
or replaced by an older copy, and that is an error, never a reason to cut (storage.py, I6).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from amberdb.exceptions import CorruptedDataError
from amberdb.storage.file.format import (
    FILE_HEADER,
    INDEX_HEADER,
    TRAILER_MAGIC,
    TXN_HEADER,
    TXN_TRAILER,
    IndexHeader,
    encode_index_header,
    unpack_index_header,
)
from amberdb.storage.file.recovery import RECOVERY_HINT, describe_txn_problem, pread_exact
from amberdb.storage.offsets import OffsetIndex
from amberdb.utils import oid_repr, z64

__all__ = [
    "SavedIndex",
    "index_beside_a_cut_file",
    "load_index_file",
    "own_index_file",
    "read_index_file",
    "write_index_file",
]

_H = TXN_HEADER.size
_T = TXN_TRAILER.size


class SavedIndex(NamedTuple):
    """An index file's contents: where it ends, and the offsets of every oid up to there."""

    position: int
    last_tid: bytes
    next_oid: int
    offsets: OffsetIndex


def load_index_file(index_path: str) -> tuple[IndexHeader, OffsetIndex]:
    """Header and entries of the index file ``index_path``, read with one copy of the entries.

    OSError when it cannot be read, ValueError when it fails its own checks.
    """
    fd = os.open(index_path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        head = os.read(fd, INDEX_HEADER.size)
        header, crc = unpack_index_header(head)
        offsets = OffsetIndex.read_from(fd, size - INDEX_HEADER.size, crc, header.crc)
    finally:
        os.close(fd)
    return header, offsets


def index_beside_a_cut_file(path: str, size: int) -> str | None:
    """Why a data file shorter than its header (``size`` bytes) must not start afresh, or None.

    Such a file is what a crash during creation leaves, never with an index beside it: the
    index is written at a clean close, long after.  An intact index there means the data
    file was cut or replaced after it had held a database.
    """
    index_path = path + ".index"
    try:
        h, _ = load_index_file(index_path)
    except (OSError, ValueError):
        return None
    return (
        f"the file is {size} bytes, shorter than its header, yet its index file {index_path}"
        f" (intact) describes a database of transactions up to offset {h.position}: the data"
        " file was cut or replaced"
    )


def read_index_file(path: str, fd: int, file_id: bytes, file_id_crc: int, size: int) -> SavedIndex | None:
    """The saved index of the data file ``path`` (open as ``fd``, ``size`` bytes), or None to scan.

    None when there is none, when it fails its own checks, or when it belongs to another
    file.  Raises CorruptedDataError when it is valid for this file and the file contradicts it.
    """
    # An index that is missing, unreadable, fails its own check or belongs to another file is
    # derived data: scan and rebuild it.
    saved, _ = own_index_file(path, file_id)
    if saved is None:
        return None
    problem = _contradiction(fd, file_id_crc, saved.position, saved.last_tid, size)
    if problem is not None:
        raise CorruptedDataError(
            f"{path} disagrees with its index file {path}.index: the index (intact, written for"
            f" this data file) says the data file holds transactions up to offset {saved.position},"
            f" the last with tid {oid_repr(saved.last_tid)}, but {problem}. Either the data file is"
            " damaged, or it was replaced by an older copy (say, a backup) while its newer index"
            f" stayed: deleting the index file is right only in that second case. {RECOVERY_HINT}",
            path=path,
            offset=saved.position,
            problem=problem,
        )
    return saved


def own_index_file(path: str, file_id: bytes) -> tuple[SavedIndex | None, str | None]:
    """The index file of the data file ``path`` if it passes its own checks and was written
    for this file (``file_id``); else None and why not (no reason when there is no index file).
    """
    index_path = path + ".index"
    try:
        h, index = load_index_file(index_path)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"index file {index_path} cannot be read ({exc}): an open scans the data file"
    except ValueError as exc:
        return None, f"index file {index_path} is invalid ({exc}): an open ignores it and scans"
    if h.file_id != file_id:
        return None, f"index file {index_path} belongs to another data file: an open ignores it"
    return SavedIndex(h.position, h.last_tid, h.next_oid, index), None


def _contradiction(fd: int, file_id_crc: int, position: int, last_tid: bytes, size: int) -> str | None:
    """What about the data file contradicts an index ending at ``position``, or None."""
    if position < FILE_HEADER.size or position > size:
        return f"the data file is {size} bytes long"
    if position == FILE_HEADER.size:
        return None if last_tid == z64 else "the index names a tid without any transaction"
    length, _, magic = TXN_TRAILER.unpack(pread_exact(fd, _T, position - _T))
    if magic != TRAILER_MAGIC or not _H + _T <= length <= position - FILE_HEADER.size:
        return "no transaction trailer ends at that offset"
    # Verified in full before the index was saved: header and trailer that agree and the
    # same tid show it is still that transaction (no need to read its body again).
    txn_pos = position - length
    h, problem = describe_txn_problem(fd, file_id_crc, txn_pos, size, z64, check_body=False)
    if problem is not None:
        return f"the transaction at offset {txn_pos} that should end there is damaged: {problem}"
    assert h is not None
    if h.tid != last_tid:
        return f"the transaction at offset {txn_pos} ending there has tid {oid_repr(h.tid)}"
    return None


def write_index_file(
    path: str, file_id: bytes, position: int, last_tid: bytes, next_oid: int, index: OffsetIndex
) -> None:
    """Save ``index`` for the data file ``path``, atomically (a temporary file renamed over).

    The caller syncs the data file first: the index must never describe bytes not on disk.
    """
    # In pieces, not one bytes object: the array is written from where it lies, so saving a
    # million-oid index does not hold two more copies of it meanwhile.
    pieces = index.to_pieces()
    header = encode_index_header(file_id, position, last_tid, next_oid, pieces)
    tmp = path + ".index.tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        for piece in pieces:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path + ".index")
