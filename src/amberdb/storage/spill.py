"""The spill file: where a transaction's savepoints put changed records, out of memory.

A connection that takes a savepoint (or a subtransaction commit) writes the records of its
changed objects here, so the objects themselves can be turned back into ghosts and freed.
A huge transaction therefore holds only the spill's index in memory.  The file is an
anonymous temporary file: it vanishes when closed or when the process dies.

Entry layout (integers big-endian):

======  ====  =========================================================================
offset  size  meaning
======  ====  =========================================================================
0       8     oid
8       8     base tid: the committed revision the change started from (z64: new)
16      8     offset of the entry it replaced for the same oid, or all ones for none
24      4     record length n
28      4     CRC-32 of the record
32      4     CRC-32 of bytes 0..32 of this entry
36      n     record
======  ====  =========================================================================

Rolling back to a position walks the entries written after it, newest first, and puts
back the entry each one replaced; no per-savepoint copy of the index is kept.  The walk
checks each entry header's CRC; reading an entry (``load``, ``entries``) checks both, so a
damaged spill file raises CorruptedDataError instead of committing other data.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Iterator

from amberdb.exceptions import CorruptedDataError, StorageForkedError
from amberdb.storage.forks import GENERATION
from amberdb.storage.offsets import OffsetIndex
from amberdb.utils import Oid, Tid, oid_repr, p64

__all__ = ["SpillFile", "StoreBuffer"]

_FIELDS = struct.Struct(">8s8sqII")  # the fields the header CRC covers
_ENTRY = struct.Struct(">8s8sqIII")
_pack_fields = _FIELDS.pack
_pack_u32 = struct.Struct(">I").pack
_crc32 = zlib.crc32
_NAME = "the spill file of this transaction (savepoint data in a temporary file)"
_NONE = -1
_FLUSH_AT = 1 << 20
_READ_CHUNK = 256 << 10  # entries() reads this much at a time: a few of them are alive at once


class SpillFile:
    """Records of one transaction's savepoints, by oid, in a temporary file."""

    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - lives as long as the spill
        self._fd = self._file.fileno()
        # oid (as int) -> offset of its newest entry; 8 bytes per oid where oids are dense
        self._index = OffsetIndex(floating=True)
        self._flushed = 0  # bytes already in the file
        self._unwritten = bytearray()  # bytes after _flushed, not yet written
        # A child of os.fork() shares the file with its parent: one writing into it would
        # change what the other commits (amberdb.storage.forks).
        self._generation = GENERATION.value
        self._pid = os.getpid()

    def _check_process(self) -> None:
        if self._generation != GENERATION.value:
            raise StorageForkedError(
                f"{_NAME} belongs to a transaction of process {self._pid}, which forked this one:"
                " a child must not use the transactions it inherited; open the database again in it"
            )

    @property
    def position(self) -> int:
        """The end of the spill: what a savepoint remembers to roll back to."""
        return self._flushed + len(self._unwritten)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, oid: object) -> bool:
        return isinstance(oid, bytes) and int.from_bytes(oid, "big") in self._index

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        """Add ``record`` as the newest spilled state of ``oid``."""
        if self._generation != GENERATION.value:
            self._check_process()
        unwritten = self._unwritten
        offset = self._flushed + len(unwritten)
        key = int.from_bytes(oid, "big")
        fields = _pack_fields(oid, base_tid, self._index.get(key, _NONE), len(record), _crc32(record))
        unwritten += fields
        unwritten += _pack_u32(_crc32(fields))
        unwritten += record
        self._index[key] = offset
        if len(unwritten) >= _FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        if self._unwritten:
            os.pwrite(self._fd, self._unwritten, self._flushed)
            self._flushed += len(self._unwritten)
            self._unwritten = bytearray()

    def _read(self, offset: int, size: int) -> bytes:
        if offset >= self._flushed:
            start = offset - self._flushed
            return bytes(self._unwritten[start : start + size])
        self._flush()
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise _damaged(offset, f"short read, {len(data)} of {size} bytes")
        return data

    def _header(self, offset: int, data: bytes | memoryview, at: int = 0) -> tuple[Oid, Tid, int, int, int]:
        """The fields of the entry header at ``data[at:]`` (the entry at ``offset``), CRC checked."""
        oid, base, previous, length, record_crc, header_crc = _ENTRY.unpack_from(data, at)
        if zlib.crc32(memoryview(data)[at : at + _FIELDS.size]) != header_crc:
            raise _damaged(offset, "entry header checksum mismatch")
        if not -1 <= previous < offset:
            raise _damaged(offset, f"entry points back at {previous}")
        return oid, base, previous, length, record_crc

    def _entry(self, offset: int) -> tuple[Oid, Tid, int, bytes]:
        oid, base, previous, length, record_crc = self._header(offset, self._read(offset, _ENTRY.size))
        record = self._read(offset + _ENTRY.size, length)
        if zlib.crc32(record) != record_crc:
            raise _damaged(offset, f"record checksum mismatch (oid {oid_repr(oid)})")
        return oid, base, previous, record

    def load(self, oid: Oid) -> tuple[bytes, Tid] | None:
        """``(record, base tid)`` of the newest spilled state of ``oid``, or None."""
        if self._generation != GENERATION.value:
            self._check_process()
        offset = self._index.get(int.from_bytes(oid, "big"))
        if offset == _NONE:
            return None
        found, base, _, record = self._entry(offset)
        if found != oid:
            raise _damaged(offset, f"the entry for oid {oid_repr(oid)} holds oid {oid_repr(found)}")
        return record, base

    def entries(self) -> Iterator[tuple[Oid, Tid, bytes]]:
        """The newest ``(oid, base tid, record)`` of every spilled oid, in file order.

        Reads the file front to back in large chunks: no per-entry seeks, no sorted copy of
        the index.  Yields exactly one entry for every spilled oid, or raises.
        """
        self._check_process()
        self._flush()
        index = self._index
        fd = self._fd
        buffer = b""
        start = 0  # file offset of buffer[0]; the buffer never keeps bytes before the entry in hand
        offset = 0
        end = self._flushed
        unpack = _ENTRY.unpack_from
        crc32 = zlib.crc32
        fields_size = _FIELDS.size
        yielded = 0
        while offset < end:
            at = offset - start
            if at + _ENTRY.size > len(buffer):
                buffer = buffer[at:] + os.pread(fd, _READ_CHUNK, start + len(buffer))
                start, at = offset, 0
                if _ENTRY.size > len(buffer):
                    raise _damaged(offset, "the file ends inside an entry header")
            # hot path (a big commit reads every entry): the header checks of _header, inlined
            oid, base, previous, length, record_crc, header_crc = unpack(buffer, at)
            if crc32(buffer[at : at + fields_size]) != header_crc or not -1 <= previous < offset:
                self._header(offset, buffer, at)  # raises, naming what failed
            body = at + _ENTRY.size
            stop = body + length
            if stop > len(buffer):
                buffer = buffer[at:]
                start, body, stop = offset, body - at, stop - at
                while stop > len(buffer):
                    more = os.pread(fd, max(_READ_CHUNK, stop - len(buffer)), start + len(buffer))
                    if not more:
                        raise _damaged(offset, "the file ends inside an entry")
                    buffer += more
            if index.get(int.from_bytes(oid, "big")) == offset:
                record = buffer[body:stop]
                if crc32(record) != record_crc:
                    raise _damaged(offset, f"record checksum mismatch (oid {oid_repr(oid)})")
                yielded += 1
                yield oid, base, record
            offset += _ENTRY.size + length
        if yielded != len(index):
            # An entry the index points at holds another oid: one change would go missing.
            raise _damaged(offset, f"{len(index) - yielded} spilled states are not where the index says")

    def oids(self) -> list[Oid]:
        """Every spilled oid."""
        return [p64(key) for key in self._index.keys()]  # noqa: SIM118 - OffsetIndex is not iterable

    def oids_since(self, position: int) -> list[Oid]:
        """The oids with entries written at or after ``position``."""
        return [oid for oid, _ in self._walk(position)]

    def _walk(self, position: int) -> list[tuple[Oid, int]]:
        self._check_process()
        found = []
        offset = position
        end = self.position
        while offset < end:
            oid, _, previous, length, _ = self._header(offset, self._read(offset, _ENTRY.size))
            found.append((oid, previous))
            offset += _ENTRY.size + length
        return found

    def rollback(self, position: int) -> list[Oid]:
        """Forget every entry written at or after ``position``; return their oids."""
        if not 0 <= position <= self.position:
            raise ValueError(f"spill position {position} is outside 0..{self.position}")
        walked = self._walk(position)
        for oid, previous in reversed(walked):
            key = int.from_bytes(oid, "big")
            if previous == _NONE:
                if key in self._index:
                    del self._index[key]
            else:
                self._index[key] = previous
        self._flush()
        os.ftruncate(self._fd, position)
        self._flushed = position
        return [oid for oid, _ in walked]

    def close(self) -> None:
        """Delete the file (in a forked child: only this process's descriptor)."""
        self._file.close()


def _damaged(offset: int, problem: str) -> CorruptedDataError:
    return CorruptedDataError(
        f"{_NAME} is damaged at offset {offset}: {problem}; the transaction cannot be committed: abort it",
        path=_NAME,
        offset=offset,
        problem=problem,
    )


class StoreBuffer:
    """The stores of one transaction waiting for its vote (oid -> base tid and record, the last
    store of an oid winning): in memory, and once they hold more than ``spill_at`` bytes of
    records, in a :class:`SpillFile`, so a big transaction waits in bounded memory.

    Used where a storage receives stores before it may take its lock: the server (a client's
    commit) and the SQL storages (until the vote).
    """

    def __init__(self, spill_at: int = 16 << 20) -> None:
        self._spill_at = spill_at
        self._records: dict[Oid, tuple[Tid, bytes]] = {}
        self._size = 0
        self._spill: SpillFile | None = None

    @property
    def spilled(self) -> bool:
        """True once the stores went to the spill file."""
        return self._spill is not None

    def __len__(self) -> int:
        return len(self._spill) if self._spill is not None else len(self._records)

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        """Keep ``record`` as ``oid``'s store (replacing an earlier one)."""
        if self._spill is not None:
            self._spill.store(oid, base_tid, record)
            return
        old = self._records.get(oid)
        if old is not None:
            self._size -= len(old[1])
        self._records[oid] = (base_tid, record)
        self._size += len(record)
        if self._size > self._spill_at:
            self._spill = SpillFile()
            for key, (base, data) in self._records.items():
                self._spill.store(key, base, data)
            self._records = {}

    def oids(self) -> list[Oid]:
        """The stored oids."""
        return self._spill.oids() if self._spill is not None else list(self._records)

    def bases(self) -> Iterator[tuple[Oid, Tid]]:
        """``(oid, base tid)`` of every store (without reading records from memory)."""
        if self._spill is None:
            for oid, (base, _) in self._records.items():
                yield oid, base
        else:
            for oid, base, _ in self._spill.entries():
                yield oid, base

    def entries(self) -> Iterator[tuple[Oid, Tid, bytes]]:
        """``(oid, base tid, record)`` of every store."""
        if self._spill is None:
            for oid, (base, record) in self._records.items():
                yield oid, base, record
        else:
            yield from self._spill.entries()

    def close(self) -> None:
        """Forget the stores and remove the spill file."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self._records = {}
