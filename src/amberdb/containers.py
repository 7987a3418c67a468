"""PersistentList and PersistentMapping: a list and a dict that notice their own changes.

Each is stored as one record holding all its items, so they suit small to medium
collections; for large ones use the BTrees.  Every mutating method marks the container
changed, so code never needs to set ``_p_changed`` for them.
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
        self.data[index] = item
        mark_changed(self)

    def __delitem__(self, index: Any) -> None:
        del self.data[index]
        mark_changed(self)

    def __iadd__(self, other: Iterable[_T]) -> PersistentList[_T]:
        self.data += other.data if isinstance(other, UserList) else list(other)
        mark_changed(self)
        return self

    def __imul__(self, n: int) -> PersistentList[_T]:
        self.data *= n
        mark_changed(self)
        return self

    def append(self, item: _T) -> None:
        """Add ``item`` at the end."""
        self.data.append(item)
        mark_changed(self)

    def insert(self, i: int, item: _T) -> None:
        """Insert ``item`` before index ``i``."""
        self.data.insert(i, item)
        mark_changed(self)

    def pop(self, i: int = -1) -> _T:
        """Remove and return the item at ``i`` (default last)."""
        item = self.data.pop(i)
        mark_changed(self)
        return item

    def remove(self, item: _T) -> None:
        """Remove the first occurrence of ``item``."""
        self.data.remove(item)
        mark_changed(self)

    def clear(self) -> None:
        """Remove every item."""
        self.data.clear()
        mark_changed(self)

    def reverse(self) -> None:
        """Reverse in place."""
        self.data.reverse()
        mark_changed(self)

    def sort(self, /, *args: Any, **kwds: Any) -> None:
        """Sort in place, as ``list.sort``."""
        self.data.sort(*args, **kwds)
        mark_changed(self)

    def extend(self, other: Iterable[_T]) -> None:
        """Append every item of ``other``."""
        self.data.extend(other.data if isinstance(other, UserList) else other)
        mark_changed(self)

    def __getstate__(self) -> Any:
        """The state is ``{"data": [...]}`` plus any attributes a subclass adds."""
        return Persistent.__getstate__(self)

    def __setstate__(self, state: Any) -> None:
        """Restore from ``__getstate__``'s form."""
        Persistent.__setstate__(self, state)


class PersistentMapping(UserDict[_K, _V], Persistent):
    """A dict stored as one record; changing it marks it changed."""

    def __setitem__(self, key: _K, value: _V) -> None:
        self.data[key] = value
        mark_changed(self)

    def __delitem__(self, key: _K) -> None:
        del self.data[key]
        mark_changed(self)

    def clear(self) -> None:
        """Remove every item."""
        self.data.clear()
        mark_changed(self)

    def update(self, other: Any = (), /, **kwds: _V) -> None:
        """Add the items of ``other`` (a mapping or pairs) and of ``kwds``."""
        self.data.update(other, **kwds)
        mark_changed(self)

    def setdefault(self, key: _K, default: _V | None = None) -> _V | None:  # type: ignore[override]
        """Return ``self[key]``, first setting it to ``default`` when missing."""
        if key in self.data:
            return self.data[key]
        self[key] = default  # type: ignore[assignment]
        return default

    def pop(self, key: _K, *default: Any) -> Any:
        """Remove ``key`` and return its value (or ``default`` when given and missing)."""
        if key in self.data:
            value = self.data.pop(key)
            mark_changed(self)
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def popitem(self) -> tuple[_K, _V]:
        """Remove and return the most recently added item."""
        item = self.data.popitem()
        mark_changed(self)
        return item

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
