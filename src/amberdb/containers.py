"""PersistentList and PersistentMapping: a list and a dict that notice their own changes.

Each is stored as one record holding all its items, so they suit small to medium
collections; for large ones use the BTrees.  Every mutating method marks the container
changed, so code never needs to set ``_p_changed`` for them.

Each mutating method marks the container *before* changing it: when the connection refuses
the change (closed, or no transaction on an explicit manager) the container is left as it
was.  The common failures (``remove`` of a missing item, ``pop`` of an empty list, ``del`` of
a missing key) are checked before marking, so they neither mark the container nor join the
transaction; rarer ones (an unhashable key, a sort whose comparisons fail part-way) leave it
marked changed, and it is stored again with whatever it holds.
"""

from __future__ import annotations

from collections import UserDict, UserList
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from amberdb.persistent import Persistent, mark_changed

__all__ = ["PersistentList", "PersistentMapping"]

_T = TypeVar("_T")
_K = TypeVar("_K")
_V = TypeVar("_V")


class PersistentList(UserList[_T], Persistent):
    """A list stored as one record; changing it marks it changed."""

    def __iter__(self) -> Iterator[_T]:
        # UserList leaves iteration to Sequence.__iter__, one Python-level __getitem__ per item.
        return iter(self.data)

    def __reversed__(self) -> Iterator[_T]:
        return reversed(self.data)

    def __setitem__(self, index: Any, item: Any) -> None:
        if type(index) is int:
            _check_index(self.data, index, "list assignment index out of range")
        mark_changed(self)
        self.data[index] = item

    def __delitem__(self, index: Any) -> None:
        if type(index) is int:
            _check_index(self.data, index, "list assignment index out of range")
        mark_changed(self)
        del self.data[index]

    def __iadd__(self, other: Iterable[_T]) -> PersistentList[_T]:
        items = other.data if isinstance(other, UserList) else list(other)
        mark_changed(self)
        self.data += items
        return self

    def __imul__(self, n: int) -> PersistentList[_T]:
        mark_changed(self)
        self.data *= n
        return self

    def append(self, item: _T) -> None:
        """Add ``item`` at the end."""
        mark_changed(self)
        self.data.append(item)

    def insert(self, i: int, item: _T) -> None:
        """Insert ``item`` before index ``i``."""
        mark_changed(self)
        self.data.insert(i, item)

    def pop(self, i: int = -1) -> _T:
        """Remove and return the item at ``i`` (default last)."""
        data = self.data
        if not data:
            raise IndexError("pop from empty list")
        if type(i) is int:
            _check_index(data, i, "pop index out of range")
        mark_changed(self)
        return data.pop(i)

    def remove(self, item: _T) -> None:
        """Remove the first occurrence of ``item``."""
        data = self.data
        try:
            index = data.index(item)
        except ValueError:
            raise ValueError(f"{self.__class__.__name__}.remove(x): x not in list") from None
        mark_changed(self)
        del data[index]

    def clear(self) -> None:
        """Remove every item."""
        mark_changed(self)
        self.data.clear()

    def reverse(self) -> None:
        """Reverse in place."""
        mark_changed(self)
        self.data.reverse()

    def sort(self, /, *args: Any, **kwds: Any) -> None:
        """Sort in place, as ``list.sort``."""
        mark_changed(self)
        self.data.sort(*args, **kwds)

    def extend(self, other: Iterable[_T]) -> None:
        """Append every item of ``other``."""
        mark_changed(self)
        self.data.extend(other.data if isinstance(other, UserList) else other)

    def __getstate__(self) -> Any:
        """The state is ``{"data": [...]}`` plus any attributes a subclass adds."""
        return Persistent.__getstate__(self)

    def __setstate__(self, state: Any) -> None:
        """Restore from ``__getstate__``'s form."""
        Persistent.__setstate__(self, state)


class PersistentMapping(UserDict[_K, _V], Persistent):
    """A dict stored as one record; changing it marks it changed."""

    def __setitem__(self, key: _K, value: _V) -> None:
        mark_changed(self)
        self.data[key] = value

    def __delitem__(self, key: _K) -> None:
        if key not in self.data:
            raise KeyError(key)
        mark_changed(self)
        del self.data[key]

    def clear(self) -> None:
        """Remove every item."""
        mark_changed(self)
        self.data.clear()

    def update(self, other: Any = (), /, **kwds: _V) -> None:
        """Add the items of ``other`` (a mapping or pairs) and of ``kwds``."""
        mark_changed(self)
        self.data.update(other, **kwds)

    def setdefault(self, key: _K, default: _V | None = None) -> _V | None:  # type: ignore[override]
        """Return ``self[key]``, first setting it to ``default`` when missing."""
        if key in self.data:
            return self.data[key]
        self[key] = default  # type: ignore[assignment]
        return default

    def pop(self, key: _K, *default: Any) -> Any:
        """Remove ``key`` and return its value (or ``default`` when given and missing)."""
        if key in self.data:
            mark_changed(self)
            return self.data.pop(key)
        if default:
            return default[0]
        raise KeyError(key)

    def popitem(self) -> tuple[_K, _V]:
        """Remove and return the most recently added item."""
        if not self.data:
            raise KeyError("popitem(): dictionary is empty")
        mark_changed(self)
        return self.data.popitem()

    def __ior__(self, other: Any) -> PersistentMapping[_K, _V]:  # type: ignore[override,misc]
        self.update(other)
        return self

    def copy(self) -> PersistentMapping[_K, _V]:
        """A new, unsaved mapping with the same items."""
        return type(self)(self.data)

    def has_key(self, key: _K) -> bool:
        """``key in self``, under the name older code uses."""
        return key in self.data

    def __getstate__(self) -> Any:
        """The state is ``{"data": {...}}`` plus any attributes a subclass adds."""
        return Persistent.__getstate__(self)

    def __setstate__(self, state: Any) -> None:
        """Restore from ``__getstate__``'s form."""
        Persistent.__setstate__(self, state)


def _check_index(items: list[Any], index: int, message: str) -> None:
    """Raise the IndexError ``list`` would, before anything is marked changed."""
    if not -len(items) <= index < len(items):
        raise IndexError(message)
