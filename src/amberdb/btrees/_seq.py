"""Walking the bucket chain: range iteration in chunks, and lazy range sequences.

Iteration hands out one chunk per bucket (a slice of its key list, of its value list, or a
``zip`` of both), chained by ``itertools.chain.from_iterable``, so the per-item work runs
in C.  A chunk is a copy taken when the iteration reaches its bucket.

Changing the keys during a walk raises RuntimeError, as a dict does, instead of letting the
walk skip or repeat keys, or run for ever (``for k in t.keys(): t[k + 10000] = 1`` inserts
ahead of the walk without end).  While walks of a container (a tree, or a standalone bucket
or set) are in progress, ``_walks`` holds a *version* for it: every insert or delete of a key
through that container bumps it (:func:`keys_changed`), and a walk that finds it different
from what it was when the walk began raises once the consumer has used up the current chunk,
so at the latest one bucket later.  No walk in progress (the usual case) costs a mutation one
truth test of ``_walks``.  The bucket's length is checked too, for changes made to a tree's
buckets directly.

The upper bound is checked once per bucket: a bucket whose last key is in range is taken
whole, otherwise one ``bisect`` finds where the range ends and the walk stops there.  So a
range search reads the buckets on one root-to-leaf path and then only the buckets in range.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from itertools import chain
from typing import Any

from amberdb.btrees._kinds import NONE_KEY

__all__ = ["ITEMS", "KEYS", "VALUES", "RangeView", "chunks", "count", "keys_changed", "walks"]

KEYS = 0
VALUES = 1
ITEMS = 2


# id(container) -> [walks in progress, version].  A walk's generator holds the container, so
# the id cannot be reused while the entry exists.  No lock: a container's walks run in the one
# thread that uses its connection (two threads walking one unsaved tree at once can at worst
# lose the check, never crash).
_walks: dict[int, list[int]] = {}
walks = _walks
"""The registry itself, for the mutation hot paths: ``if walks: keys_changed(self)``."""


def keys_changed(container: Any) -> None:
    """Note that a key was added to or removed from ``container``: its walks must stop."""
    entry = _walks.get(id(container))
    if entry is not None:
        entry[1] += 1


def _changed_error(container: Any) -> RuntimeError:
    return RuntimeError(
        f"{container.__class__.__name__} changed during iteration (a key was added or removed); "
        "iterate over a copy, such as list(tree.keys()), to change it in the loop"
    )


def chunks(
    start: Any,
    what: int,
    lo: Any,
    lo_incl: bool,
    hi: Any,
    hi_incl: bool,
    skip: int = 0,
    limit: int = -1,
    single: bool = False,
) -> Iterator[Any]:
    """Yield per-bucket chunks of the range [lo, hi] from ``start.position(lo, lo_incl)``.

    A missing bound (None) means no bound; excluding it (``lo_incl`` or ``hi_incl`` false)
    leaves out the smallest or largest key, as ZODB's BTrees do.

    ``start`` is a tree or a bucket (anything with ``_position``).  ``skip`` items are passed
    over first (whole buckets at a time where possible), then at most ``limit`` items are
    produced (-1: no limit).  ``single`` stops after the first bucket (standalone buckets).
    The start position is found when the walk begins, not when this is called.
    """
    key = id(start)
    entry = _walks.get(key)
    if entry is None:
        entry = _walks[key] = [1, 0]
    else:
        entry[0] += 1
    version = entry[1]
    try:
        bucket, i = start._position(lo, lo_incl)
        buckets = _prefetching_from(start, bucket, hi, single)
        if buckets is not None:
            bucket = next(buckets, None)
        while bucket is not None:
            keys = bucket._keys
            n = len(keys)
            last = single
            if not n:
                if last:
                    return
                bucket = bucket._next
                i = 0
                continue
            if hi is None:
                stop = n
                if not hi_incl and (last or bucket._next is None):
                    stop -= 1  # excludemax without a max: the largest key is left out
            elif keys[-1] <= hi if hi_incl else keys[-1] < hi:
                stop = n
            else:
                stop = bisect_right(keys, hi) if hi_incl else bisect_left(keys, hi)
                last = True
            if skip:
                available = stop - i
                if available <= skip:
                    skip -= max(available, 0)
                    i = stop
                else:
                    i += skip
                    skip = 0
            if limit >= 0 and stop - i >= limit:
                stop = i + limit
                last = True
            if i < stop:
                if limit > 0:
                    limit -= stop - i
                if what == VALUES:
                    yield bucket._values[i:stop]
                else:
                    part = keys[i:stop]
                    if part[0] is NONE_KEY:  # only ever the first key of the first bucket
                        part[0] = None
                    yield part if what == KEYS else zip(part, bucket._values[i:stop])
                if entry[1] != version or len(bucket._keys) != n:
                    raise _changed_error(start)
            if last:
                return
            bucket = bucket._next if buckets is None else next(buckets, None)
            i = 0
    finally:
        entry[0] -= 1
        if entry[0] <= 0 and _walks.get(key) is entry:
            del _walks[key]


def count(start: Any, lo: Any, lo_incl: bool, hi: Any, hi_incl: bool, single: bool = False) -> int:
    """How many keys the range [lo, hi] from ``start`` holds (reads each bucket in range)."""
    bucket, i = start._position(lo, lo_incl)
    buckets = _prefetching_from(start, bucket, hi, single)
    if buckets is not None:
        bucket = next(buckets, None)
    total = 0
    while bucket is not None:
        keys = bucket._keys
        n = len(keys)
        if n:
            if hi is None or (keys[-1] <= hi if hi_incl else keys[-1] < hi):
                if hi is None and not hi_incl and (single or bucket._next is None):
                    n -= 1  # excludemax without a max: the largest key is left out
                if n > i:
                    total += n - i
            else:
                stop = bisect_right(keys, hi) if hi_incl else bisect_left(keys, hi)
                return total + max(int(stop) - int(i), 0)
        if single:
            break
        bucket = bucket._next if buckets is None else next(buckets, None)
        i = 0
    return total


def iterate(
    start: Any, what: int, lo: Any, lo_incl: bool, hi: Any, hi_incl: bool, single: bool = False
) -> Iterator[Any]:
    """An iterator over the keys, values or items of the range."""
    return chain.from_iterable(chunks(start, what, lo, lo_incl, hi, hi_incl, single=single))


def empty_range(lo: Any, lo_incl: bool, hi: Any, hi_incl: bool) -> bool:
    """True when the bounds themselves leave nothing (min above max)."""
    if lo is None or hi is None:
        return False
    return bool(lo > hi or (lo == hi and not (lo_incl and hi_incl)))


def _prefetching_from(start: Any, bucket: Any, hi: Any, single: bool) -> Iterator[Any] | None:
    """Over a network, the buckets of a tree's walk with fetching ahead (else None: follow
    ``_next``)."""
    if single or not start._is_tree or start._p_jar is None or not start._p_jar.prefetches:
        return None
    return prefetching(start, bucket, hi)


def prefetching(tree: Any, bucket: Any, hi: Any) -> Iterator[Any]:
    """The buckets from ``bucket`` on, as ``_next`` links them, asking the tree to prefetch
    ahead of the walk: a window of buckets at the start, then, each time half of it was
    read, the next window, twice as large (up to the tree's limit)."""
    window = 16
    countdown = 0
    while bucket is not None:
        if countdown <= 0:
            keys = bucket._keys
            tree._prefetch(keys[0] if keys else None, hi, window)
            countdown = window // 2
            window = min(window * 2, tree._prefetch_limit)
        countdown -= 1
        yield bucket
        bucket = bucket._next


class RangeView:
    """The keys, values or items of a tree between two bounds: a lazy sequence.

    Supports ``len`` (which reads every bucket in range), iteration, indexing (negative too)
    and slicing (giving another view).  Like a dict view it reflects the tree as it is when
    used; adding or removing keys while iterating over the view raises RuntimeError.
    """

    __slots__ = ("_hi", "_hi_incl", "_limit", "_lo", "_lo_incl", "_skip", "_tree", "_what")

    def __init__(
        self,
        tree: Any,
        what: int,
        lo: Any,
        lo_incl: bool,
        hi: Any,
        hi_incl: bool,
        skip: int = 0,
        limit: int = -1,
    ) -> None:
        self._tree = tree
        self._what = what
        self._lo = lo
        self._lo_incl = lo_incl
        self._hi = hi
        self._hi_incl = hi_incl
        self._skip = skip
        self._limit = limit

    def __iter__(self) -> Iterator[Any]:
        if empty_range(self._lo, self._lo_incl, self._hi, self._hi_incl):
            return iter(())
        return chain.from_iterable(
            chunks(
                self._tree,
                self._what,
                self._lo,
                self._lo_incl,
                self._hi,
                self._hi_incl,
                self._skip,
                self._limit,
            )
        )

    def __len__(self) -> int:
        if empty_range(self._lo, self._lo_incl, self._hi, self._hi_incl):
            return 0
        n = max(count(self._tree, self._lo, self._lo_incl, self._hi, self._hi_incl) - self._skip, 0)
        return n if self._limit < 0 else min(n, self._limit)

    def __bool__(self) -> bool:
        for _ in self._sub(0, 1):
            return True
        return False

    def _sub(self, skip: int, limit: int) -> RangeView:
        """The view of ``limit`` items after the first ``skip`` of this one."""
        if self._limit >= 0:
            limit = max(min(limit, self._limit - skip), 0)
        return RangeView(
            self._tree,
            self._what,
            self._lo,
            self._lo_incl,
            self._hi,
            self._hi_incl,
            self._skip + skip,
            limit,
        )

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.start, index.stop, index.step
            if step not in (None, 1):
                return list(self)[index]
            if (start is not None and start < 0) or stop is None or stop < 0:
                start, stop, _ = index.indices(len(self))
            start = start or 0
            return self._sub(start, max(stop - start, 0))
        index = index.__index__()
        if index < 0:
            index += len(self)
            if index < 0:
                raise IndexError(index - len(self))
        for item in self._sub(index, 1):
            return item
        raise IndexError(index)

    def __reversed__(self) -> Iterator[Any]:
        return iter(list(self)[::-1])

    def __repr__(self) -> str:
        what = ("keys", "values", "items")[self._what]
        return f"<{self._tree.__class__.__name__} {what} view>"
