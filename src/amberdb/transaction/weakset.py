"""A small set of weakly held objects, cheaper to iterate than ``weakref.WeakSet``.

Synchronizers are walked several times per commit; ``WeakSet`` iteration runs a Python-level
guard for every pass.  Here a pass is one list comprehension over stored references.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["WeakRegistry"]

_T = TypeVar("_T")


class WeakRegistry(Generic[_T]):
    """Objects held weakly, by identity; iteration gives a snapshot of the live ones."""

    __slots__ = ("__weakref__", "_refs")

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[_T]] = {}

    def add(self, obj: _T) -> None:
        """Hold ``obj`` weakly until it is discarded or collected."""
        key = id(obj)
        registry = weakref.ref(self)

        def forget(_: weakref.ref[_T], key: int = key) -> None:
            owner = registry()
            if owner is not None:
                owner._refs.pop(key, None)

        self._refs[key] = weakref.ref(obj, forget)

    def discard(self, obj: _T) -> None:
        """Stop holding ``obj`` (no error if it is not held)."""
        ref = self._refs.get(id(obj))
        if ref is not None and ref() is obj:
            del self._refs[id(obj)]

    def clear(self) -> None:
        """Hold nothing."""
        self._refs.clear()

    def live(self) -> list[_T]:
        """The objects still alive, as a list that later changes do not affect."""
        # list(): a connection closed from another thread unregisters while this runs.
        return [obj for obj in (ref() for ref in list(self._refs.values())) if obj is not None]

    def __iter__(self) -> Iterator[_T]:
        return iter(self.live())

    def __len__(self) -> int:
        return len(self.live())
