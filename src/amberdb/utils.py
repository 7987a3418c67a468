"""Small conversions shared by every layer: oids and tids as 8-byte big-endian values.

An *oid* names an object for its whole life; a *tid* names a committed transaction and is
also the serial (revision) of each object it wrote.  Both are 8-byte ``bytes`` that sort in
the same order as the integers they encode.

A tid encodes its commit time: the high 32 bits are whole seconds since the Unix epoch, the
low 32 bits the fraction of a second.  Tids only grow: :func:`next_tid` never returns a value
at or below the previous one, even if the clock steps back.
"""

from __future__ import annotations

import struct
import time

__all__ = ["Oid", "Tid", "next_tid", "oid_repr", "p64", "tid_from_time", "time_from_tid", "u64", "z64"]

Oid = bytes
Tid = bytes

z64 = b"\0" * 8
"""The zero oid / tid: the root object's oid, and the serial of an object never committed."""

_U64 = struct.Struct(">Q")
_TID_SCALE = 1 << 32


def p64(value: int) -> bytes:
    """Pack an unsigned 64-bit integer into 8 big-endian bytes."""
    try:
        return _U64.pack(value)
    except struct.error:
        raise ValueError(f"p64 needs an integer in 0..2**64-1, got {value!r}") from None


def u64(value: bytes) -> int:
    """Unpack 8 big-endian bytes into an integer."""
    if len(value) != 8:
        raise ValueError(f"u64 needs exactly 8 bytes, got {len(value)}: {value!r}")
    return int.from_bytes(value, "big")


def oid_repr(oid: bytes | None) -> str:
    """Show an oid or tid the way error messages and reprs do: ``0x1f``."""
    if oid is None:
        return "None"
    if isinstance(oid, bytes) and len(oid) == 8:
        return hex(int.from_bytes(oid, "big"))
    return repr(oid)


def tid_from_time(seconds: float) -> Tid:
    """The tid for a moment given as seconds since the Unix epoch."""
    return p64(int(seconds * _TID_SCALE))


def time_from_tid(tid: Tid) -> float:
    """Seconds since the Unix epoch at which the transaction ``tid`` committed."""
    return u64(tid) / _TID_SCALE


_MAX_TID = (1 << 64) - 1


def next_tid(previous: Tid) -> Tid:
    """A tid for a transaction committing now, strictly greater than ``previous``."""
    now = int(time.time() * _TID_SCALE)
    last = int.from_bytes(previous, "big")
    if last >= _MAX_TID:
        from amberdb.exceptions import StorageError

        raise StorageError(f"no tid left after {oid_repr(previous)}: the storage has used up its tids")
    return p64(now if now > last else last + 1)
