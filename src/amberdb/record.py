"""The record codec: the bytes a storage keeps for one object revision.

A record names the object's class and lists the other persistent objects it refers to in a
small header *before* the pickled state, so that tools (pack, garbage collection, verify,
export) can walk the object graph and see every class name without unpickling anything.

Record layout (integers big-endian):

======  ==========  ==================================================================
offset  size        meaning
======  ==========  ==================================================================
0       1           format version, ``RECORD_VERSION`` (2; version 1 is read too)
1       2           length C of the object's class name
3       C           class name, UTF-8, ``"module:qualname"``
3+C     2           number K of distinct class names used by references
...     K x (2+n)   each: 2-byte length n, then the UTF-8 class name
...     4           number R of references
...     R x 10      each: 8-byte oid, then 2-byte index into the K class names
...     rest        the state: a pickle (protocol 5) in which the reference at index
                    i of the table is written as the call ``ref(i)``
======  ==========  ==================================================================

In version 2 the function ``ref`` is entry 0 of the pickle's memo: the writer starts its
pickler with that entry, so a reference is ``BINGET 0``, the index, a call -- and a reader
must put the function at memo index 0 before running the state, numbering the state's own
memo entries from 1.  (Version 1 named it as the global ``amberdb.record.ref``; naming it
once per record cost bytes, and the "r" in those names sent every record with references
through the slower safety checks of :mod:`amberdb.unpickler`.)

References are calls rather than pickle's persistent ids because the pickler asks about
persistent ids for every value it writes, strings and numbers included, while the hook that
writes a call runs only for objects that are not plain values: a state of plain values is
pickled without calling back into Python at all.  Readers also accept states whose
persistent ids are the indexes 0..R-1 (what the first records used).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from amberdb.exceptions import RecordDecodeError
from amberdb.utils import Oid

__all__ = [
    "RECORD_VERSION",
    "REFERENCE_IN_MEMO",
    "RecordHeader",
    "decode_header",
    "encode_record",
    "ref",
    "references",
]

RECORD_VERSION = 2
REFERENCE_IN_MEMO = 2
"""The first record version whose state finds ``ref`` at memo index 0 (see the docstring)."""
_READABLE_VERSIONS = (1, 2)


def ref(index: int) -> int:
    """Stands for the reference at ``index`` in a pickled state; readers map it to the object.

    Only its name matters: the writer names it, and a reader's ``find_class`` replaces it
    with a lookup in the record's reference table, so this body never runs on a load.
    """
    return index


REFERENCE_GLOBAL = (ref.__module__, ref.__qualname__)

_VERSION_AND_NAME_LEN = struct.Struct(">BH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_REF = struct.Struct(">8sH")
_NO_CLASSES = struct.Struct(">HI")

MAX_NAME_BYTES = 0xFFFF
MAX_REF_CLASSES = 0xFFFF


class RecordHeader(NamedTuple):
    """What a record says before its state: its class and its references."""

    class_name: str
    refs: list[tuple[Oid, str]]
    state_offset: int
    version: int = RECORD_VERSION

    @property
    def reference_in_memo(self) -> bool:
        """Whether the state expects ``ref`` at memo index 0 (version 2 on)."""
        return self.version >= REFERENCE_IN_MEMO


def encode_record(
    class_name: str, refs: list[tuple[Oid, str]], state: bytes, *, reference_in_memo: bool = False
) -> bytes:
    """Build a record from the class name, ``(oid, class name)`` references and a pickle.

    ``reference_in_memo``: the pickle was written with ``ref`` at memo index 0 (what
    :class:`amberdb.serialize.ObjectWriter` does), making a version 2 record; otherwise it is
    an ordinary pickle naming ``ref`` as a global, and the record is version 1.
    """
    name = class_name.encode("utf-8")
    if len(name) > MAX_NAME_BYTES:
        raise ValueError(f"class name too long for a record: {class_name[:80]!r}...")
    version = REFERENCE_IN_MEMO if reference_in_memo else 1
    parts = [_VERSION_AND_NAME_LEN.pack(version, len(name)), name]
    class_index: dict[str, int] = {}
    ref_entries = []
    for oid, ref_class in refs:
        index = class_index.get(ref_class)
        if index is None:
            index = class_index[ref_class] = len(class_index)
        ref_entries.append(_REF.pack(oid, index))
    if len(class_index) > MAX_REF_CLASSES:
        raise ValueError("a record may refer to at most 65535 distinct classes")
    parts.append(_U16.pack(len(class_index)))
    for ref_class in class_index:
        encoded = ref_class.encode("utf-8")
        parts.append(_U16.pack(len(encoded)))
        parts.append(encoded)
    parts.append(_U32.pack(len(ref_entries)))
    parts.extend(ref_entries)
    parts.append(state)
    return b"".join(parts)


def decode_header(record: bytes) -> RecordHeader:
    """Read a record's class name and references without touching the state."""
    try:
        version, name_len = _VERSION_AND_NAME_LEN.unpack_from(record, 0)
        if version not in _READABLE_VERSIONS:
            raise RecordDecodeError(f"unknown record format version {version}")
        pos = 3 + name_len
        class_name = record[3:pos].decode("utf-8")
        n_classes, n_refs = _NO_CLASSES.unpack_from(record, pos)
        if n_classes == 0:  # fast path: a record without references
            if n_refs:
                raise RecordDecodeError("references without class names")
            return _new_header(RecordHeader, (class_name, [], pos + 6, version))
        pos += 2
        classes = []
        for _ in range(n_classes):
            (length,) = _U16.unpack_from(record, pos)
            pos += 2
            classes.append(record[pos : pos + length].decode("utf-8"))
            pos += length
        (n_refs,) = _U32.unpack_from(record, pos)
        pos += 4
        refs = [(oid, classes[index]) for oid, index in _REF.iter_unpack(record[pos : pos + 10 * n_refs])]
        pos += 10 * n_refs
    except (struct.error, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise RecordDecodeError(f"damaged record header: {exc}") from None
    if pos > len(record):
        raise RecordDecodeError("damaged record header: references run past the end of the record")
    return _new_header(RecordHeader, (class_name, refs, pos, version))


# hot path: tuple.__new__ skips the Python-level __new__ a NamedTuple has.
_new_header = tuple.__new__


def references(record: bytes) -> list[Oid]:
    """The oids a record refers to, in the order its state uses them."""
    return [oid for oid, _ in decode_header(record).refs]
