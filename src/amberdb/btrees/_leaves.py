"""Buckets and sets: the leaves of the trees, usable on their own as small sorted containers.

A leaf keeps its keys in a sorted list or array (``_keys``, see :mod:`._kinds`), a bucket
its values in a parallel one (``_values``), and both a reference to the next leaf of their
tree (``_next``, None for the last one and for standalone leaves).  Standalone leaves have
no size bound; inside a tree the tree splits them.

Record state (what ``__getstate__`` gives and ``_p_resolveConflict`` receives)::

    Bucket: (keys, values, next)        Set: (keys, next)

where keys and values are packed by their kind (``bytes`` for numbers, a list for objects,
see :mod:`amberdb.btrees._kinds`).  An instance ``__dict__`` (attributes of a subclass) is
appended as a last element when not empty.
"""

from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, MutableMapping, MutableSet
from typing import Any, ClassVar

from amberdb.btrees import _conflict
from amberdb.btrees._kinds import NONE_KEY, Kind, key_out
from amberdb.btrees._seq import ITEMS, KEYS, VALUES, empty_range, iterate, keys_changed, walks
from amberdb.persistent import Persistent, mark_changed

__all__ = [
    "BucketBase",
    "FamilyMember",
    "LeafBase",
    "MappingIteration",
    "SetBase",
    "extra_state",
    "set_extra_state",
]

_MISSING: Any = object()


def extra_state(obj: Any) -> dict[str, Any] | None:
    """The instance attributes of a subclass (not ``_p_``/``_v_``) or None."""
    try:
        attributes = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return None
    extra = {k: v for k, v in attributes.items() if not k.startswith(("_p_", "_v_"))}
    return extra or None


def set_extra_state(obj: Any, extra: dict[str, Any] | None) -> None:
    """Restore what :func:`extra_state` gave."""
    try:
        attributes = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        if extra:
            raise TypeError(
                f"{obj.__class__.__name__} has no __dict__ for attributes {sorted(extra)}"
            ) from None
        return
    attributes.clear()
    if extra:
        attributes.update(extra)


class FamilyMember(Persistent):
    """What the four container kinds of a family share: the family's kinds and classes."""

    __slots__ = ()

    _kkind: ClassVar[Kind]
    _vkind: ClassVar[Kind | None]  # None for sets
    _family: ClassVar[Any]  # the family namespace (BTree, Bucket, TreeSet, Set, ...)
    _is_map: ClassVar[bool] = False
    _is_tree: ClassVar[bool] = False

    def _check_key(self, key: Any) -> Any:
        return self._kkind.check(key, "key", self.__class__.__name__)

    def _check_value(self, value: Any) -> Any:
        vkind = self._vkind
        return value if vkind is None else vkind.check(value, "value", self.__class__.__name__)

    def _bound(self, key: Any) -> Any:
        return None if key is None else self._check_key(key)


class LeafBase(FamilyMember):
    """Shared by Bucket and Set: sorted keys and the link to the next leaf."""

    __slots__ = ("_keys", "_next")

    _keys: Any  # a list, or an array for numeric kinds
    _next: Any

    def _position(self, lo: Any, lo_incl: bool) -> tuple[Any, int]:
        if lo is None:  # no lower bound; excluding it leaves out the smallest key
            return self, (0 if lo_incl else 1)
        keys = self._keys
        return self, (bisect_left(keys, lo) if lo_incl else bisect_right(keys, lo))

    def _iter(self, what: int, min: Any, max: Any, excludemin: bool, excludemax: bool) -> Iterator[Any]:
        lo, hi = self._bound(min), self._bound(max)
        if empty_range(lo, not excludemin, hi, not excludemax):
            return iter(())
        return iterate(self, what, lo, not excludemin, hi, not excludemax, single=True)

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __iter__(self) -> Iterator[Any]:
        return iterate(self, KEYS, None, True, None, True, single=True)

    def _find(self, key: Any) -> int:
        """The index of ``key`` in ``_keys``, or -1."""
        keys = self._keys
        if key is None:
            key = NONE_KEY
        try:
            i = bisect_left(keys, key)
        except TypeError:  # a key not comparable with the keys
            return -1
        # By identity too, for keys whose __eq__ is broken (as BTrees does)
        return i if i != len(keys) and (keys[i] == key or keys[i] is key) else -1

    def __contains__(self, key: Any) -> bool:
        return self._find(key) >= 0

    def has_key(self, key: Any) -> bool:
        """True when ``key`` is present."""
        return key in self

    def keys(
        self, min: Any = None, max: Any = None, excludemin: bool = False, excludemax: bool = False
    ) -> list[Any]:
        """The keys in [min, max] (bounds optional, excluded on request), as a list."""
        return list(self._iter(KEYS, min, max, excludemin, excludemax))

    def iterkeys(
        self, min: Any = None, max: Any = None, excludemin: bool = False, excludemax: bool = False
    ) -> Iterator[Any]:
        """An iterator over the keys in [min, max]."""
        return self._iter(KEYS, min, max, excludemin, excludemax)

    def minKey(self, key: Any = None) -> Any:
        """The smallest key (at least ``key`` when given); ValueError when there is none."""
        keys = self._keys
        if not keys:
            raise ValueError("empty bucket")
        if key is None:
            return key_out(keys[0])
        i = bisect_left(keys, self._check_key(key))
        if i == len(keys):
            raise ValueError("no key satisfies the conditions")
        return key_out(keys[i])

    def maxKey(self, key: Any = None) -> Any:
        """The largest key (at most ``key`` when given); ValueError when there is none."""
        keys = self._keys
        if not keys:
            raise ValueError("empty bucket")
        if key is None:
            return key_out(keys[-1])
        i = bisect_right(keys, self._check_key(key))
        if i == 0:
            raise ValueError("no key satisfies the conditions")
        return key_out(keys[i - 1])

    def _changed(self) -> None:
        """Mark this leaf changed; called *before* changing it, so a refusal changes nothing."""
        if self._p_jar is not None:
            mark_changed(self)

    def _keys_changing(self) -> None:
        """Mark this leaf changed and stop its walks: called before a key is added or removed."""
        if self._p_jar is not None:
            mark_changed(self)
        if walks:
            keys_changed(self)

    def _split(self, at: int) -> LeafBase:
        """Move the keys from index ``at`` on into a new leaf linked after this one."""
        raise NotImplementedError

    def _state_next(self) -> Any:
        return self._next


class MappingIteration:
    """``itervalues`` and ``iteritems``, shared by buckets and trees (which define ``_iter``)."""

    __slots__ = ()

    def _iter(self, what: int, min: Any, max: Any, excludemin: bool, excludemax: bool) -> Iterator[Any]:
        raise NotImplementedError

    def itervalues(
        self, min: Any = None, max: Any = None, excludemin: bool = False, excludemax: bool = False
    ) -> Iterator[Any]:
        """An iterator over the values of the keys in [min, max]."""
        return self._iter(VALUES, min, max, excludemin, excludemax)

    def iteritems(
        self, min: Any = None, max: Any = None, excludemin: bool = False, excludemax: bool = False
    ) -> Iterator[tuple[Any, Any]]:
        """An iterator over the (key, value) pairs of the keys in [min, max]."""
        return self._iter(ITEMS, min, max, excludemin, excludemax)


class BucketBase(LeafBase, MappingIteration):
    """A mapping bucket (``<P>Bucket``): a small sorted mapping stored as one record."""

    __slots__ = ("_values",)
    _is_map = True
    _values: Any
    _vkind: ClassVar[Kind]

    def __init__(self, items: Any = None) -> None:
        self._keys = self._kkind.empty()
        self._values = self._vkind.empty()
        self._next = None
        if items is not None:
            self.update(items)

    # -- state and conflicts --------------------------------------------------------------

    def __getstate__(self) -> Any:
        state: tuple[Any, ...] = (
            self._kkind.pack_keys(self._keys),
            self._vkind.pack(self._values),
            self._next,
        )
        extra = extra_state(self)
        return state if extra is None else (*state, extra)

    def __setstate__(self, state: Any) -> None:
        self._keys = self._kkind.unpack_keys(state[0])
        self._values = self._vkind.unpack(state[1])
        self._next = state[2]
        if len(self._keys) != len(self._values):
            raise ValueError(
                f"{self.__class__.__name__} state has {len(self._keys)} keys but {len(self._values)} values"
            )
        set_extra_state(self, state[3] if len(state) > 3 else None)

    def _p_resolveConflict(self, oldState: Any, savedState: Any, newState: Any) -> Any:
        """Merge two concurrent changes of this bucket (see :mod:`amberdb.btrees._conflict`)."""
        return _conflict.resolve_bucket(self._kkind, self._vkind, oldState, savedState, newState)

    # -- mapping API ----------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        i = self._find(key)
        if i < 0:
            raise KeyError(key)
        return self._values[i]

    def get(self, key: Any, default: Any = None) -> Any:
        """The value for ``key``, or ``default``."""
        i = self._find(key)
        return default if i < 0 else self._values[i]

    def _set(self, key: Any, value: Any, replace: bool) -> int:
        key = self._check_key(key)
        value = self._check_value(value)
        keys = self._keys
        i = bisect_left(keys, key)
        if i != len(keys) and (keys[i] == key or keys[i] is key):
            old = self._values[i]
            if replace and old is not value and not (self._vkind.numeric and old == value):
                self._changed()
                self._values[i] = value
            return 0
        self._keys_changing()
        keys.insert(i, key)
        self._values.insert(i, value)
        return 1

    def __setitem__(self, key: Any, value: Any) -> None:
        self._set(key, value, True)

    def insert(self, key: Any, value: Any) -> int:
        """Add ``key`` with ``value`` unless present: 1 if added, 0 if it was there."""
        return self._set(key, value, False)

    def __delitem__(self, key: Any) -> None:
        i = self._find(key)
        if i < 0:
            raise KeyError(key)
        self._keys_changing()
        del self._keys[i]
        del self._values[i]

    def setdefault(self, key: Any, default: Any) -> Any:
        """``self[key]``, first setting it to ``default`` when missing."""
        i = self._find(key)
        if i >= 0:
            return self._values[i]
        self._set(key, default, False)
        return self[key]

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value (or ``default``; KeyError without one)."""
        i = self._find(key)
        if i < 0:
            if default is _MISSING:
                raise KeyError(key)
            return default
        value = self._values[i]
        self._keys_changing()
        del self._keys[i]
        del self._values[i]
        return value

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the item with the smallest key; KeyError when empty."""
        if not self._keys:
            raise KeyError("popitem(): empty bucket")
        self._keys_changing()
        return (key_out(self._keys.pop(0)), self._values.pop(0))

    def update(self, items: Any = (), /, **kwargs: Any) -> None:
        """Add the items of a mapping or of an iterable of pairs."""
        for key, value in _pairs(items):
            self._set(key, value, True)
        for key, value in kwargs.items():
            self._set(key, value, True)

    def clear(self) -> None:
        """Remove every item."""
        if self._keys:
            self._keys_changing()
            self._keys = self._kkind.empty()
            self._values = self._vkind.empty()

    def values(
        self, min: Any = None, max: Any = None, excludemin: bool = False, excludemax: bool = False
    ) -> list[Any]:
        """The values of the keys in [min, max], as a list."""
        return list(self._iter(VALUES, min, max, excludemin, excludemax))

    def items(
        self, min: Any = None, max: Any = None, excludemin: bool = False, excludemax: bool = False
    ) -> list[tuple[Any, Any]]:
        """The (key, value) pairs of the keys in [min, max], as a list."""
        return list(self._iter(ITEMS, min, max, excludemin, excludemax))

    def _split(self, at: int) -> BucketBase:
        cls = self.__class__
        new: BucketBase = cls.__new__(cls)
        new._keys = self._keys[at:]
        new._values = self._values[at:]
        new._next = self._next
        self._changed()
        del self._keys[at:]
        del self._values[at:]
        self._next = new
        return new

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({list(zip(self._keys, self._values))!r})"


class SetBase(LeafBase):
    """A set bucket (``<P>Set``): a small sorted set stored as one record."""

    __slots__ = ()

    def __init__(self, items: Iterable[Any] | None = None) -> None:
        self._keys = self._kkind.empty()
        self._next = None
        if items is not None:
            self.update(items)

    def __getstate__(self) -> Any:
        state: tuple[Any, ...] = (self._kkind.pack_keys(self._keys), self._next)
        extra = extra_state(self)
        return state if extra is None else (*state, extra)

    def __setstate__(self, state: Any) -> None:
        self._keys = self._kkind.unpack_keys(state[0])
        self._next = state[1]
        set_extra_state(self, state[2] if len(state) > 2 else None)

    def _p_resolveConflict(self, oldState: Any, savedState: Any, newState: Any) -> Any:
        """Merge two concurrent changes of this set (see :mod:`amberdb.btrees._conflict`)."""
        return _conflict.resolve_bucket(self._kkind, None, oldState, savedState, newState)

    def __getitem__(self, index: int) -> Any:
        """The key at position ``index`` (negative counts from the end), as ZODB's Sets allow."""
        try:
            return key_out(self._keys[operator.index(index)])
        except IndexError:
            raise IndexError(index) from None

    def add(self, key: Any) -> int:
        """Add ``key``: 1 if added, 0 if it was there."""
        key = self._check_key(key)
        keys = self._keys
        i = bisect_left(keys, key)
        if i != len(keys) and (keys[i] == key or keys[i] is key):
            return 0
        self._keys_changing()
        keys.insert(i, key)
        return 1

    insert = add

    def remove(self, key: Any) -> None:
        """Remove ``key``; KeyError when missing."""
        i = self._find(key)
        if i < 0:
            raise KeyError(key)
        self._keys_changing()
        del self._keys[i]

    def discard(self, key: Any) -> None:
        """Remove ``key`` if present."""
        try:
            self.remove(key)
        except KeyError:
            pass

    def pop(self) -> Any:
        """Remove and return the smallest key; KeyError when empty."""
        if not self._keys:
            raise KeyError("pop from an empty set")
        self._keys_changing()
        return key_out(self._keys.pop(0))

    def update(self, items: Iterable[Any]) -> int:
        """Add every key of ``items``; return how many were added."""
        return sum(self.add(key) for key in items)

    def clear(self) -> None:
        """Remove every key."""
        if self._keys:
            self._keys_changing()
            self._keys = self._kkind.empty()

    def _split(self, at: int) -> SetBase:
        cls = self.__class__
        new: SetBase = cls.__new__(cls)
        new._keys = self._keys[at:]
        new._next = self._next
        self._changed()
        del self._keys[at:]
        self._next = new
        return new

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({list(self._keys)!r})"


# The ABCs ZODB's BTrees register with: code that checks isinstance(c, MutableMapping) works.
MutableMapping.register(BucketBase)
MutableSet.register(SetBase)


def _pairs(items: Any) -> Iterator[tuple[Any, Any]]:
    """The (key, value) pairs of a mapping (anything with ``items``) or of an iterable of pairs."""
    method = getattr(items, "iteritems", None) or getattr(items, "items", None)
    if method is not None:
        yield from method()
        return
    for pair in items:
        try:
            key, value = pair
        except (TypeError, ValueError):  # BTrees raises TypeError for anything but a pair
            raise TypeError(f"update needs (key, value) pairs, not {pair!r:.60}") from None
        yield key, value
