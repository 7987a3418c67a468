"""Key and value kinds: what a family's letter (``O``, ``I``, ``U``, ``L``, ``Q``, ``F``) accepts.

A :class:`Kind` checks and converts one key or value, says whether its values are numbers,
and makes the containers leaves and nodes keep them in: integer and float kinds use an
``array`` (4 or 8 bytes an item, contiguous, so a binary search touches a few cache lines
instead of one scattered int object per probe), the object kind a list.  Records hold an
array as its little-endian bytes (compact, and the pickler sees one object instead of
hundreds); a list as a list.

Checking rules (those of ZODB's BTrees):

* ``I`` signed 32-bit, ``U`` unsigned 32-bit, ``L`` signed 64-bit, ``Q`` unsigned 64-bit
  integers.  Anything that
  is not an ``int`` (``bool`` and other subclasses count, and are stored as plain ``int``)
  is a ``TypeError``; an integer out of range is a :class:`BTreesOverflowError`, which is
  both an ``OverflowError`` and the ``TypeError`` BTrees raises.
* ``F`` floats: ``int`` and ``float`` are accepted and stored as ``float`` (a Python float,
  so 64-bit: BTrees stores 32-bit C floats).
* ``O`` objects: any value; a key's class must define an ordering of its own: objects that
  only have ``object``'s identity comparison are refused, since their order would change
  from one process to the next.  ``None`` is a key, as in ZODB's BTrees, sorting before
  every other key: inside the containers it is :data:`NONE_KEY`, which compares that way,
  and it is ``None`` again wherever a key comes out (iteration, ``minKey``, records).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from typing import Any

__all__ = ["FLOAT", "KINDS", "NONE_KEY", "BTreesOverflowError", "Kind", "key_out"]

_BIG_ENDIAN = sys.byteorder == "big"


class BTreesOverflowError(OverflowError, TypeError):
    """An integer key or value outside the range of its family (also a TypeError, as in BTrees)."""


_OBJECT_LT: Any = vars(object)["__lt__"]


class _NoneKey:
    """What a ``None`` key is inside object-keyed containers: below every other key."""

    __slots__ = ()

    def __lt__(self, other: object) -> bool:
        return other is not self

    def __le__(self, other: object) -> bool:
        return True

    def __gt__(self, other: object) -> bool:
        return False

    def __ge__(self, other: object) -> bool:
        return other is self

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return hash(None)

    def __repr__(self) -> str:
        return "None"

    def __reduce__(self) -> Any:
        raise TypeError("NONE_KEY is stored as None; it never leaves its container")


NONE_KEY: Any = _NoneKey()


def key_out(key: Any) -> Any:
    """A key as users see it: None for NONE_KEY."""
    return None if key is NONE_KEY else key


class _Never:
    """A type no key or value has: makes the inlined fast checks fall through to ``check``."""


class Kind:
    """How one family letter checks, converts and packs its keys or values."""

    letter: str
    description: str
    integer: bool = False
    numeric: bool = False
    typecode: str | None = None
    fast_type: type = _Never
    lo: Any = 0
    hi: Any = 0

    def check(self, obj: Any, role: str, owner: str) -> Any:
        """``obj`` converted for storage; ``role`` is "key" or "value", ``owner`` the class name."""
        raise NotImplementedError

    def empty(self) -> Any:
        """A new empty container for keys or values of this kind (an array or a list)."""
        typecode = self.typecode
        return [] if typecode is None else array(typecode)

    def make(self, items: Iterable[Any]) -> Any:
        """A new container holding ``items`` (already checked)."""
        typecode = self.typecode
        return list(items) if typecode is None else array(typecode, items)

    def pack(self, items: Any) -> Any:
        """A copy of the container (or list) ``items`` for a record."""
        typecode = self.typecode
        if typecode is None:
            return list(items)
        packed = items if type(items) is array and items.typecode == typecode else array(typecode, items)
        if _BIG_ENDIAN:
            packed = array(typecode, packed)
            packed.byteswap()
        return packed.tobytes()

    def pack_keys(self, keys: Any) -> Any:
        """``pack`` for a container of keys (object keys turn NONE_KEY back into None)."""
        return self.pack(keys)

    def unpack_keys(self, data: Any) -> Any:
        """``unpack`` for what ``pack_keys`` gave."""
        return self.unpack(data)

    def unpack(self, data: Any) -> Any:
        """A new container holding what ``pack`` was given."""
        typecode = self.typecode
        if typecode is None or not isinstance(data, (bytes, bytearray)):
            return self.make(data)
        unpacked = array(typecode)
        unpacked.frombytes(data)
        if _BIG_ENDIAN:
            unpacked.byteswap()
        return unpacked

    def __repr__(self) -> str:
        return f"<Kind {self.letter}: {self.description}>"


class _IntKind(Kind):
    integer = True
    numeric = True
    fast_type = int

    def __init__(self, letter: str, bits: int, signed: bool, typecode: str) -> None:
        self.letter = letter
        self.lo = -(2 ** (bits - 1)) if signed else 0
        self.hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.typecode = typecode
        self.description = f"{bits}-bit {'signed' if signed else 'unsigned'} integer"
        if array(typecode).itemsize * 8 != bits:  # pragma: no cover - exotic C ints
            self.typecode = "q" if signed else "Q"

    def check(self, obj: Any, role: str, owner: str) -> Any:
        if not isinstance(obj, int):
            raise TypeError(
                f"{owner} {role} must be an integer ({self.description}), "
                f"not {type(obj).__name__}: {obj!r:.60}"
            )
        obj = int(obj)
        if not self.lo <= obj <= self.hi:
            raise BTreesOverflowError(
                f"{owner} {role} {obj} is out of range for a {self.description} [{self.lo}, {self.hi}]"
            )
        return obj


class _FloatKind(Kind):
    letter = "F"
    description = "float"
    numeric = True
    typecode = "d"
    fast_type = float
    lo = -float("inf")
    hi = float("inf")

    def check(self, obj: Any, role: str, owner: str) -> Any:
        if isinstance(obj, (int, float)):
            return float(obj)
        raise TypeError(f"{owner} {role} must be a float or an int, not {type(obj).__name__}: {obj!r:.60}")


class _ObjectKind(Kind):
    letter = "O"
    description = "object with a total order"

    def __init__(self) -> None:
        self._ordered: set[type] = {str, int, float, bytes, tuple}

    def check(self, obj: Any, role: str, owner: str) -> Any:
        if role != "key":
            return obj
        cls = type(obj)
        if cls in self._ordered:
            return obj
        if obj is None or obj is NONE_KEY:
            return NONE_KEY
        if getattr(cls, "__lt__", None) is _OBJECT_LT:
            raise TypeError(
                f"{owner} key of class {cls.__qualname__} has only the default identity comparison, "
                f"so its order is not stable: keys need a total order (define __lt__ and __eq__, "
                f"or use ints, strings or tuples)"
            )
        self._ordered.add(cls)
        return obj

    # The smallest key is the only place NONE_KEY can be, so only the first item is looked at.
    def pack_keys(self, keys: Any) -> Any:
        packed = list(keys)
        if packed and packed[0] is NONE_KEY:
            packed[0] = None
        return packed

    def unpack_keys(self, data: Any) -> Any:
        keys = list(data)
        if keys and keys[0] is None:
            keys[0] = NONE_KEY
        return keys


INT32 = _IntKind("I", 32, True, "i")
UINT32 = _IntKind("U", 32, False, "I")
INT64 = _IntKind("L", 64, True, "q")
UINT64 = _IntKind("Q", 64, False, "Q")
FLOAT = _FloatKind()
OBJECT = _ObjectKind()

KINDS: dict[str, Kind] = {"I": INT32, "U": UINT32, "L": INT64, "Q": UINT64, "F": FLOAT, "O": OBJECT}
