"""The per-connection object cache: one Python object per oid, and a bound on loaded ones.

Two structures:

* a map from oid to a *weak* reference, so that while anything in the program holds an
  object, loading the same oid again gives the same object, and an object nothing refers
  to is freed;
* an LRU list of *strong* references to loaded (non-ghost) objects.  At transaction
  boundaries :meth:`ObjectCache.shrink` turns the least recently used unchanged objects
  beyond ``target_size`` back into ghosts and drops its strong reference, so a program can
  walk a database far larger than its memory.  Only objects whose state can be loaded back
  are evicted: never a changed object, never a new one whose state is only in memory.

Recency is the time an object was last loaded, added, stored or fetched with
``Connection.get``; plain attribute reads are not tracked, because tracking them would put a
hook on every read (see :mod:`amberdb.persistent`).  An evicted object that is still in use
simply loads again on its next access.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator

from amberdb.persistent import CHANGED, GHOST, Persistent, ghostify
from amberdb.utils import Oid, z64

__all__ = ["ObjectCache"]


class _KeyedRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference that remembers its oid (weakref.KeyedRef runs a Python __init__)."""

    __slots__ = ("key",)
    key: Oid


class ObjectCache:
    """Objects of one connection by oid, with a least-recently-used bound on loaded ones."""

    def __init__(self, target_size: int, in_spill: Callable[[Oid], bool] = lambda oid: False) -> None:
        if target_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {target_size}")
        self.target_size = target_size
        self._in_spill = in_spill
        self._refs: dict[Oid, _KeyedRef] = {}
        self._lru: OrderedDict[Oid, Persistent] = OrderedDict()
        refs = self._refs

        def forget(ref: _KeyedRef, refs: dict[Oid, _KeyedRef] = refs) -> None:
            if refs.get(ref.key) is ref:
                del refs[ref.key]

        self._forget = forget

    def get(self, oid: Oid) -> Persistent | None:
        """The live object for ``oid``, or None."""
        ref = self._refs.get(oid)
        return None if ref is None else ref()

    def add(self, oid: Oid, obj: Persistent) -> None:
        """Remember ``obj`` as the object for ``oid`` (replacing any earlier one)."""
        ref = _KeyedRef(obj, self._forget)
        ref.key = oid
        self._refs[oid] = ref
        if obj._p_state != GHOST:
            self._lru[oid] = obj

    def touch(self, oid: Oid, obj: Persistent) -> None:
        """Note that ``obj`` (loaded) was just used: it becomes the most recent."""
        lru = self._lru
        try:
            lru.move_to_end(oid)
        except KeyError:
            lru[oid] = obj  # new entries go to the end already
        else:
            lru[oid] = obj

    def remove(self, oid: Oid) -> None:
        """Forget ``oid`` entirely (used when an added object goes back to unsaved)."""
        self._refs.pop(oid, None)
        self._lru.pop(oid, None)

    def shrink(self) -> int:
        """Ghostify least recently used evictable objects beyond the target; return how many.

        Evictable: unchanged, and with a state that can be loaded back, from the storage (a
        saved object) or from the spill (a new object a savepoint wrote).  An added object
        whose only state is in memory is kept, as is every changed object.
        """
        lru = self._lru
        excess = len(lru) - self.target_size
        evicted = 0
        kept: list[tuple[Oid, Persistent]] = []
        in_spill = self._in_spill
        while excess > 0 and lru:
            oid, obj = lru.popitem(last=False)
            excess -= 1
            state = obj._p_state
            if state == CHANGED or (obj._p_serial == z64 and state != GHOST and not in_spill(oid)):
                kept.append((oid, obj))
                continue
            if state != GHOST and obj._p_jar is not None:
                ghostify(obj)
                evicted += 1
        for oid, obj in kept:
            lru[oid] = obj
        return evicted

    def minimize(self) -> None:
        """Ghostify every evictable object (see :meth:`shrink`)."""
        target = self.target_size
        self.target_size = 0
        try:
            self.shrink()
        finally:
            self.target_size = target

    def release(self, oid: Oid) -> None:
        """Stop holding ``oid``'s object strongly if it is a ghost (it lives on while used)."""
        obj = self._lru.get(oid)
        if obj is not None and obj._p_state == GHOST:
            del self._lru[oid]

    def drop_ghosts(self) -> None:
        """Release the strong references the LRU list holds to objects now ghosts.

        A full scan: ``shrink`` drops ghosts it meets on its own, so only ``minimize``
        callers need this.
        """
        for oid in [oid for oid, obj in self._lru.items() if obj._p_state == GHOST]:
            del self._lru[oid]

    def live_objects(self) -> Iterator[tuple[Oid, Persistent]]:
        """Every object still alive, ghost or not (a snapshot, safe to mutate the cache)."""
        for oid, ref in list(self._refs.items()):
            obj = ref()
            if obj is not None:
                yield oid, obj

    @property
    def loaded_count(self) -> int:
        """How many objects the LRU list holds (loaded or changed)."""
        return len(self._lru)

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, oid: object) -> bool:
        return self.get(oid) is not None  # type: ignore[arg-type]
