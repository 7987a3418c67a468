"""A compact map from oid (as an integer) to a file offset.

Oids are handed out sequentially from 0, so most maps are dense: an ``array('q')`` indexed by
oid (8 bytes per oid, ``-1`` meaning "absent") is an order of magnitude smaller and faster than
a dict.  Oids far beyond the dense range (stored by hand, or by another allocator) go to an
overflow dict so one stray huge oid cannot make the array enormous.

The array covers oids from ``_base`` on: 0 for a storage's index, and for a ``floating``
index (a transaction's spill file, whose oids are the newest of a database that may
already hold millions) the first oid stored in it.

Invariant: every oid lives in exactly one place -- oids in ``[_base, _base +
len(self._dense))`` in the array, all others in ``self._overflow``.
"""

from __future__ import annotations

import bisect
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Iterator

__all__ = ["OffsetIndex"]

_MISSING = -1
_SPREAD = 1 << 20
"""How far past the dense range an oid may lie and still grow the array instead of overflowing."""
_MIN_GROW = 1024

_MAGIC = b"AMBOFFS\x02"
_HEAD = struct.Struct("<8sQQQ")  # magic, dense length, overflow count, entry count
_PAIR = struct.Struct("<qq")


_BLOCK = 1 << 16


def _missing_block(n: int) -> array[int]:
    return array("q", [_MISSING]) * n


_BLOCK_SCAN = 4096
_EMPTY_BLOCK = _missing_block(_BLOCK_SCAN)


class OffsetIndex:
    """Map ``oid -> offset`` (both non-negative integers), dense where oids are dense."""

    __slots__ = ("_base", "_count", "_dense", "_floating", "_overflow", "_overflow_keys")

    def __init__(self, floating: bool = False) -> None:
        """An empty index; ``floating``: the array starts at the first oid stored, not at 0."""
        self._dense: array[int] = array("q")
        self._overflow: dict[int, int] = {}
        # The overflow's oids, sorted, for ordered walks (items_after); None until a walk
        # needs them after the overflow gained or lost an oid.
        self._overflow_keys: list[int] | None = []
        self._count = 0
        self._base = 0
        self._floating = floating

    def get(self, oid: int, default: int = _MISSING) -> int:
        """The offset stored for ``oid``, or ``default`` when there is none."""
        dense = self._dense
        i = oid - self._base
        if 0 <= i < len(dense):
            value = dense[i]
            return default if value == _MISSING else value
        return self._overflow.get(oid, default)

    def __getitem__(self, oid: int) -> int:
        """The offset stored for ``oid``; KeyError when there is none."""
        value = self.get(oid)
        if value == _MISSING:
            raise KeyError(oid)
        return value

    def __setitem__(self, oid: int, offset: int) -> None:
        """Store ``offset`` (>= 0) for ``oid`` (>= 0)."""
        if oid < 0 or offset < 0:
            raise ValueError(f"OffsetIndex needs oid >= 0 and offset >= 0, got {oid}, {offset}")
        dense = self._dense
        size = len(dense)
        if not size and self._floating:
            self._base = oid
        i = oid - self._base
        if not 0 <= i < size:
            if i < 0 or i >= size + _SPREAD:
                if oid not in self._overflow:
                    self._count += 1
                    self._overflow_keys = None
                self._overflow[oid] = offset
                return
            self._grow(i + 1)
        if dense[i] == _MISSING:
            self._count += 1
        dense[i] = offset

    def reserve(self, oids: int) -> None:
        """Make room for every oid below ``oids`` at once (not in a floating index), so that
        filling the index never regrows its array: a regrowth can briefly hold the old and
        the new array together, twice the memory."""
        if not self._floating and len(self._dense) < oids <= len(self._dense) + _SPREAD * 64:
            self._grow(oids, exact=True)

    def _grow(self, needed: int, exact: bool = False) -> None:
        size = len(self._dense)
        # Growing by a constant factor keeps sequential inserts amortised O(1); 1.25 rather
        # than 2 because a big commit grows the index while its other buffers are alive.
        new_size = needed if exact else max(needed, size + size // 4, _MIN_GROW)
        dense = self._dense
        missing = _missing_block(min(new_size - size, _BLOCK))
        while len(dense) < new_size:  # a block at a time: no temporary as big as the growth
            dense.extend(missing[: new_size - len(dense)])
        if self._overflow:
            # Keep the one-place invariant: pull overflow entries the array now covers.
            base = self._base
            for oid in [o for o in self._overflow if base <= o < base + new_size]:
                dense[oid - base] = self._overflow.pop(oid)
                self._overflow_keys = None

    def __delitem__(self, oid: int) -> None:
        """Remove ``oid``; KeyError when it is absent."""
        dense = self._dense
        i = oid - self._base
        if 0 <= i < len(dense) and dense[i] != _MISSING:
            dense[i] = _MISSING
        elif oid in self._overflow:
            del self._overflow[oid]
            self._overflow_keys = None
        else:
            raise KeyError(oid)
        self._count -= 1

    def __contains__(self, oid: object) -> bool:
        """True when ``oid`` has an offset."""
        return isinstance(oid, int) and self.get(oid) != _MISSING

    def __len__(self) -> int:
        """The number of oids present."""
        return self._count

    def __repr__(self) -> str:
        return f"<OffsetIndex {self._count} oids, max {self.max_oid()}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OffsetIndex):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self.items(), other.items()))

    __hash__ = None  # type: ignore[assignment]

    def items(self) -> Iterator[tuple[int, int]]:
        """Yield ``(oid, offset)`` pairs in increasing oid order."""
        dense, base = self._dense, self._base
        overflow = sorted(self._overflow)
        below = [oid for oid in overflow if oid < base]  # only in a floating index
        for oid in below:
            yield oid, self._overflow[oid]
        for start in range(0, len(dense), 4096):
            block = dense[start : start + 4096]
            if block.count(_MISSING) == len(block):
                continue  # skipping empty blocks in C keeps sparse arrays cheap
            for oid, offset in enumerate(block, base + start):
                if offset != _MISSING:
                    yield oid, offset
        for oid in overflow[len(below) :]:
            yield oid, self._overflow[oid]

    def items_after(self, oid: int, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` ``(oid, offset)`` pairs of the oids above ``oid`` (-1: from the
        first), in increasing oid order.

        Reads about ``limit`` slots of the array, skipping empty stretches 4096 slots per C
        comparison, and bisects the overflow's sorted oids (sorted again only after the
        overflow changed): a page of an ordered walk costs the page, not the index.
        """
        found: list[tuple[int, int]] = []
        if limit < 1:
            return found
        overflow = self._overflow
        keys = self._overflow_keys
        if keys is None:
            keys = self._overflow_keys = sorted(overflow)
        j = bisect.bisect_right(keys, oid)
        dense, base = self._dense, self._base
        # Overflow oids lie below the array (only in a floating index) or past it, never in it.
        while j < len(keys) and keys[j] < base and len(found) < limit:
            found.append((keys[j], overflow[keys[j]]))
            j += 1
        i = max(oid + 1 - base, 0)
        end = len(dense)
        while i < end and len(found) < limit:
            block = dense[i : i + _BLOCK_SCAN]
            if len(block) == _BLOCK_SCAN and block == _EMPTY_BLOCK:
                i += _BLOCK_SCAN
                continue
            for k, offset in enumerate(block, base + i):
                if offset != _MISSING:
                    found.append((k, offset))
                    if len(found) == limit:
                        break
            i += _BLOCK_SCAN
        while j < len(keys) and len(found) < limit:
            found.append((keys[j], overflow[keys[j]]))
            j += 1
        return found

    def keys(self) -> Iterator[int]:
        """Yield the oids present, in increasing order."""
        for oid, _ in self.items():
            yield oid

    def max_oid(self) -> int:
        """The largest oid present, or -1 when the index is empty."""
        top = max(self._overflow, default=-1)
        if top >= self._base:  # overflow entries at or above the base lie past the array
            return top
        used = self._used_length()
        return self._base + used - 1 if used else top  # else the largest oid, if any, lies below it

    def _used_length(self) -> int:
        """One past the last slot of the array that holds an offset (0 when none does)."""
        dense = self._dense
        end = len(dense)
        if end and dense[-1] != _MISSING:
            return end  # a loaded index: to_bytes saved it without its empty tail
        # Skip the empty tail growth leaves (a fifth of the array) a block at a time,
        # comparing arrays of the same type, which is a memcmp: no int objects per slot.
        while end > 0:
            start = max(0, end - _BLOCK_SCAN)
            empty = _EMPTY_BLOCK if end - start == _BLOCK_SCAN else _EMPTY_BLOCK[: end - start]
            if dense[start:end] != empty:
                for i in range(end - 1, start - 1, -1):
                    if dense[i] != _MISSING:
                        return i + 1
            end = start
        return 0

    def copy(self) -> OffsetIndex:
        """An independent copy."""
        clone = OffsetIndex(self._floating)
        clone._base = self._base
        clone._dense = array("q", self._dense)
        clone._overflow = dict(self._overflow)
        clone._overflow_keys = None
        clone._count = self._count
        return clone

    def clear(self) -> None:
        """Remove every entry."""
        self._dense = array("q")
        self._overflow = {}
        self._overflow_keys = []
        self._count = 0

    def to_bytes(self) -> bytes:
        """Serialise (little-endian, independent of the machine) for :meth:`from_bytes`, :meth:`read_from`."""
        return b"".join(self.to_pieces())

    def to_pieces(self) -> list[bytes | memoryview]:
        """:meth:`to_bytes` in pieces to write one after the other; the array's piece is a
        view of it, not a copy (valid until the index changes)."""
        if self._base:
            raise ValueError("only an index whose array starts at oid 0 can be saved")
        # Not the empty tail growth leaves: every open would read it, and max_oid of the
        # loaded index then finds the largest oid in the last slot.
        dense = memoryview(self._dense)[: self._used_length()]
        if sys.byteorder != "little":
            swapped = array("q", dense)
            swapped.byteswap()
            dense = memoryview(swapped)
        parts: list[bytes | memoryview] = [_HEAD.pack(_MAGIC, len(dense), len(self._overflow), self._count)]
        parts.append(dense.cast("B"))
        parts.append(b"".join(_PAIR.pack(oid, off) for oid, off in sorted(self._overflow.items())))
        return parts

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> OffsetIndex:
        """Rebuild an index from :meth:`to_bytes` output; ValueError when ``data`` is malformed."""
        view = memoryview(data)
        dense_len, _, count = _decode_head(view[: _HEAD.size], len(view))
        dense_end = _HEAD.size + 8 * dense_len
        dense = array("q")
        dense.frombytes(view[_HEAD.size : dense_end])
        return cls._assemble(dense, view[dense_end:], count)

    @classmethod
    def read_from(
        cls, fd: int, length: int, crc_start: int = 0, expected_crc: int | None = None
    ) -> OffsetIndex:
        """Read the ``length`` bytes :meth:`to_bytes` wrote from ``fd``'s current position.

        With ``expected_crc``, the CRC-32 of those bytes continued from ``crc_start`` must
        match it.  ValueError when they are fewer, malformed or fail that check.
        """
        head = _read_exactly(fd, _HEAD.size)
        dense_len, overflow_len, count = _decode_head(head, length)
        # Read straight into the array: for millions of oids, a bytes object in between
        # would cost as much again in copying and page faults as the array itself.
        dense = _missing_block(dense_len)
        _read_into(fd, memoryview(dense).cast("B"))
        tail = _read_exactly(fd, _PAIR.size * overflow_len)
        if expected_crc is not None:
            # Before the entries are judged: damage reads as what it is, a checksum mismatch.
            crc = zlib.crc32(tail, zlib.crc32(dense, zlib.crc32(head, crc_start)))
            if crc != expected_crc:
                raise ValueError("checksum mismatch")
        return cls._assemble(dense, tail, count)

    @classmethod
    def _assemble(cls, dense: array[int], tail: bytes | memoryview, count: int) -> OffsetIndex:
        """The index of a little-endian ``dense`` array and the overflow pairs in ``tail``."""
        if sys.byteorder != "little":
            dense.byteswap()
        # No scan of the entries here (it would cost more than the read): the index file
        # around this data carries a checksum, and loads check each record's oid.
        dense_len = len(dense)
        overflow: dict[int, int] = {}
        for oid, off in _PAIR.iter_unpack(tail):
            if oid < dense_len or off < 0 or oid in overflow:
                raise ValueError("OffsetIndex data holds a bad overflow entry")
            overflow[oid] = off
        if not len(overflow) <= count <= dense_len + len(overflow):
            raise ValueError("OffsetIndex data has an impossible entry count")
        index = cls()
        index._dense = dense
        index._overflow = overflow
        index._overflow_keys = None
        index._count = count
        return index


def _decode_head(head: bytes | memoryview, length: int) -> tuple[int, int, int]:
    """Dense length, overflow count and entry count of data ``length`` bytes long starting with ``head``."""
    if length < _HEAD.size or len(head) < _HEAD.size:
        raise ValueError("OffsetIndex data too short")
    magic, dense_len, overflow_len, count = _HEAD.unpack_from(head, 0)
    if magic != _MAGIC:
        raise ValueError("OffsetIndex data has the wrong magic")
    if length != _HEAD.size + 8 * dense_len + _PAIR.size * overflow_len:
        raise ValueError("OffsetIndex data has the wrong length")
    return dense_len, overflow_len, count


def _read_into(fd: int, buffer: memoryview) -> None:
    while buffer:
        got = os.readv(fd, [buffer])
        if not got:
            raise ValueError("OffsetIndex data too short")
        buffer = buffer[got:]


def _read_exactly(fd: int, size: int) -> bytes:
    buffer = bytearray(size)
    _read_into(fd, memoryview(buffer))
    return bytes(buffer)
