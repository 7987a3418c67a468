"""The B+tree: ``<P>BTree`` and ``<P>TreeSet``, one implementation for every family.

Shape.  A tree object is the root node; interior nodes are instances of the same class.  A
node keeps ``_children`` (nodes, or buckets when ``_leaf`` is true) and ``_keys``, the
separators: ``_keys[i]`` is the smallest key ``_children[i + 1]`` may hold, so the child for
``key`` is ``_children[bisect_right(_keys, key)]``.  Buckets are chained left to right by
their ``_next`` link for range scans.  An empty tree has no children.  Every node and
bucket is its own record, so a lookup loads one record per level and a commit writes only
the buckets (and, on splits, nodes) that changed.

Hot paths (lookup, insert, delete) descend with one ``bisect`` per level without recording
the path, then work on the bucket's lists; the rare structural changes (a bucket over its
size bound splits, an emptied bucket is unlinked) descend again recording the path.  The
key and value checks of the family are inlined into those methods, which are made per
family by :func:`hot_methods`.

Every change marks the bucket or node it changes *before* changing it: a connection that
refuses the change (closed, no transaction) raises while the tree is still as it was.  Once
one object of the tree was accepted, the transaction is joined and the others are too.

Deletes never rewrite separators; an emptied bucket is unlinked (and nodes left without
children removed, and a root with a single interior child collapsed), but buckets are not
merged with their neighbours.

Record state: ``(leaf, keys, children)`` with keys packed by the key kind, plus the
instance ``__dict__`` of a subclass when not empty.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, MutableMapping, MutableSet
from typing import TYPE_CHECKING, Any, ClassVar

from amberdb.btrees._kinds import NONE_KEY, Kind, key_out
from amberdb.btrees._leaves import (
    FamilyMember,
    LeafBase,
    MappingIteration,
    _pairs,
    extra_state,
    set_extra_state,
)
from amberdb.btrees._seq import (
    ITEMS,
    KEYS,
    VALUES,
    RangeView,
    empty_range,
    iterate,
    keys_changed,
    prefetching,
    walks,
)
from amberdb.persistent import GHOST, mark_changed

__all__ = ["BTreeBase", "TreeBase", "TreeSetBase", "hot_methods"]

_MISSING: Any = object()
PREFETCH_LIMIT = 1024
"""Most buckets one range scan asks a network storage for at a time, ahead of reading them
(it starts with a few and doubles up to this, as a file system reads ahead)."""


def _touch(obj: Any) -> None:
    if obj._p_jar is not None:
        mark_changed(obj)


class TreeBase(FamilyMember):
    """What BTree and TreeSet share: the node structure, splits, unlinking, ranges."""

    __slots__ = ("_children", "_keys", "_leaf")
    _is_tree = True
    _prefetch_limit: ClassVar[int] = PREFETCH_LIMIT

    _leaf: bool
    _keys: list[Any]  # a list even for numeric keys: bisect is faster on a list than an array
    _children: list[Any]
    _bucket_class: ClassVar[type[LeafBase]]
    max_leaf_size: ClassVar[int]
    max_internal_size: ClassVar[int]

    def __init__(self, items: Any = None) -> None:
        self._leaf = True
        self._keys = []
        self._children = []
        if items is not None:
            self.update(items)

    def update(self, items: Any) -> Any:
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------

    def __getstate__(self) -> Any:
        state: tuple[Any, ...] = (self._leaf, self._kkind.pack_keys(self._keys), list(self._children))
        extra = extra_state(self)
        return state if extra is None else (*state, extra)

    def __setstate__(self, state: Any) -> None:
        self._leaf = bool(state[0])
        self._keys = list(self._kkind.unpack_keys(state[1]))
        self._children = list(state[2])
        if self._children and len(self._keys) != len(self._children) - 1:
            raise ValueError(
                f"{self.__class__.__name__} state has {len(self._keys)} separators for "
                f"{len(self._children)} children"
            )
        set_extra_state(self, state[3] if len(state) > 3 else None)

    # -- navigation ----------------------------------------------------------------------

    def _first_bucket(self) -> Any:
        node = self
        if not node._children:
            return None
        while not node._leaf:
            node = node._children[0]
        return node._children[0]

    def _position(self, lo: Any, lo_incl: bool) -> tuple[Any, int]:
        """The bucket and index where the range starting at ``lo`` begins."""
        node = self
        if not node._children:
            return None, 0
        if lo is None:  # no lower bound; excluding it leaves out the smallest key
            while not node._leaf:
                node = node._children[0]
            return node._children[0], (0 if lo_incl else 1)
        while not node._leaf:
            node = node._children[bisect_right(node._keys, lo)]
        bucket = node._children[bisect_right(node._keys, lo)]
        keys = bucket._keys
        return bucket, (bisect_left(keys, lo) if lo_incl else bisect_right(keys, lo))

    def _prefetch(self, lo: Any, hi: Any, limit: int = PREFETCH_LIMIT) -> None:
        """Ask a connection that can (one over a network) to fetch the first ``limit``
        buckets of [lo, hi] -- and the nodes above them -- in one batch per tree level,
        instead of one round trip per record as the scan reaches them."""
        jar = self._p_jar
        if jar is None or not jar.prefetches:
            return
        level: list[Any] = [self]
        while level:
            below: list[Any] = []
            leaf = level[0]._leaf
            for node in level:  # each loads here from what the batch above brought
                keys = node._keys
                first = 0 if lo is None else bisect_right(keys, lo)
                last = len(node._children) if hi is None else bisect_right(keys, hi) + 1
                below.extend(node._children[first:last])
                if len(below) >= limit:
                    del below[limit:]
                    break
            ghosts = [child for child in below if child._p_state == GHOST]
            if ghosts:
                jar.prefetch(ghosts)
            if leaf:
                return
            level = below

    def _path(self, key: Any) -> list[tuple[Any, int]]:
        """The (node, child index) pairs from the root down to the bucket for ``key``."""
        path = []
        node = self
        while True:
            i = bisect_right(node._keys, key)
            path.append((node, i))
            if node._leaf:
                return path
            node = node._children[i]

    # -- structure changes ----------------------------------------------------------------

    def _new_node(self, leaf: bool, keys: Any, children: list[Any]) -> TreeBase:
        cls = self.__class__
        node: TreeBase = cls.__new__(cls)
        node._leaf = leaf
        node._keys = keys
        node._children = children
        return node

    def _grow(self, key: Any) -> None:
        """Split the bucket for ``key`` (over its bound) and every node that overflows."""
        path = self._path(key)
        node, i = path[-1]
        bucket = node._children[i]
        keys = bucket._keys
        # Appending at the right end of the tree (ascending keys) leaves full buckets and
        # nodes behind instead of half-full ones.
        appending = keys[-1] == key and all(i == len(node._children) - 1 for node, i in path)
        at = len(keys) - 1 if appending else len(keys) // 2
        # Each node is marked before it changes (see the module docstring).
        _touch(node)
        new = bucket._split(at)
        node._keys.insert(i, new._keys[0])
        node._children.insert(i + 1, new)
        limit = self.max_internal_size
        for depth in range(len(path) - 1, -1, -1):
            node, i = path[depth]
            children = node._children
            size = len(children)
            if size <= limit:
                return
            at = size - 1 if appending else size // 2
            keys = node._keys
            separator = keys[at - 1]
            if depth == 0:  # the root keeps its identity: its halves move into two new nodes
                left = self._new_node(node._leaf, keys[: at - 1], children[:at])
                right = self._new_node(node._leaf, keys[at:], children[at:])
                self._leaf = False
                self._keys = [separator]
                self._children = [left, right]
                return
            parent, pi = path[depth - 1]
            _touch(parent)
            right = self._new_node(node._leaf, keys[at:], children[at:])
            del keys[at - 1 :]
            del children[at:]
            parent._keys.insert(pi, separator)
            parent._children.insert(pi + 1, right)

    def _unlink(self, key: Any) -> None:
        """Remove the (empty) bucket for ``key`` from the chain and from its nodes."""
        path = self._path(key)
        node, i = path[-1]
        bucket = node._children[i]
        for depth in range(len(path) - 1, -1, -1):  # relink the previous bucket, if any
            ancestor, index = path[depth]
            if index:
                previous = ancestor._children[index - 1]
                if not ancestor._leaf:
                    while not previous._leaf:
                        previous = previous._children[-1]
                    previous = previous._children[-1]
                previous._next = bucket._next
                break
        for depth in range(len(path) - 1, -1, -1):
            node, i = path[depth]
            _touch(node)
            del node._children[i]
            if node._keys:
                del node._keys[i - 1 if i else 0]
            if node._children:
                break
        if not self._children:
            self._leaf = True
        while not self._leaf and len(self._children) == 1:
            child = self._children[0]
            self._leaf = child._leaf
            self._keys = child._keys[:]
            self._children = list(child._children)

    def clear(self) -> None:
        """Remove everything."""
        if self._children:
            _touch(self)
            if walks:
                keys_changed(self)
            self._leaf = True
            self._keys = []
            self._children = []

    # -- whole-tree queries ---------------------------------------------------------------

    def _buckets(self) -> Iterator[Any]:
        bucket = self._first_bucket()
        if self._p_jar is not None and self._p_jar.prefetches:
            yield from prefetching(self, bucket, None)
            return
        while bucket is not None:
            yield bucket
            bucket = bucket._next

    def __len__(self) -> int:
        """The number of keys: reads every bucket (keep a ``Length`` for large trees)."""
        return sum(len(bucket._keys) for bucket in self._buckets())

    def __bool__(self) -> bool:
        return any(bucket._keys for bucket in self._buckets())

    def __iter__(self) -> Iterator[Any]:
        return iterate(self, KEYS, None, True, None, True)

    def has_key(self, key: Any) -> bool:
        """True when ``key`` is present."""
        return key in self

    def _view(self, what: int, min: Any, max: Any, excludemin: bool, excludemax: bool) -> RangeView:
        return RangeView(self, what, self._bound(min), not excludemin, self._bound(max), not excludemax)

    def _iter(self, what: int, min: Any, max: Any, excludemin: bool, excludemax: bool) -> Iterator[Any]:
        lo, hi = self._bound(min), self._bound(max)
        if empty_range(lo, not excludemin, hi, not excludemax):
            return iter(())
        return iterate(self, what, lo, not excludemin, hi, not excludemax)

    def keys(
        self, min: Any = None, max: Any = None, excludemin: bool = False, excludemax: bool = False
    ) -> RangeView:
        """The keys in [min, max] (bounds optional, excluded on request): a lazy sequence."""
        return self._view(KEYS, min, max, excludemin, excludemax)

    def iterkeys(
        self, min: Any = None, max: Any = None, excludemin: bool = False, excludemax: bool = False
    ) -> Iterator[Any]:
        """An iterator over the keys in [min, max]."""
        return self._iter(KEYS, min, max, excludemin, excludemax)

    def minKey(self, key: Any = None) -> Any:
        """The smallest key (at least ``key`` when given); ValueError when there is none."""
        if not self:
            raise ValueError("empty tree")
        # Not a walk: one position, then at most a step to the next bucket.
        bucket, i = self._position(self._bound(key), True)
        while bucket is not None:
            keys = bucket._keys
            if i < len(keys):
                return key_out(keys[i])
            bucket, i = bucket._next, 0
        raise ValueError("no key satisfies the conditions")

    def maxKey(self, key: Any = None) -> Any:
        """The largest key (at most ``key`` when given); ValueError when there is none."""
        if not self:
            raise ValueError("empty tree")
        found = _max_at_most(self, None if key is None else self._check_key(key))
        if found is _MISSING:
            raise ValueError("no key satisfies the conditions")
        return key_out(found)

    def _check(self) -> None:
        """Raise AssertionError if the tree's structure is damaged (see ``check``)."""
        from amberdb.btrees.check import check

        check(self)

    def __repr__(self) -> str:
        return f"<{self.__class__.__module__}.{self.__class__.__qualname__} object at {id(self):#x}>"


def _max_at_most(node: Any, key: Any) -> Any:
    """The largest key <= ``key`` (None: no bound) under ``node``, or _MISSING."""
    children = node._children
    start = len(children) - 1 if key is None else bisect_right(node._keys, key)
    for index in range(start, -1, -1):
        child = children[index]
        if node._leaf:
            keys = child._keys
            j = len(keys) if key is None else bisect_right(keys, key)
            if j:
                return keys[j - 1]
        else:
            found = _max_at_most(child, key)
            if found is not _MISSING:
                return found
    return _MISSING


class BTreeBase(TreeBase, MappingIteration):
    """A mapping tree (``<P>BTree``): the mapping API over the bucket chain."""

    __slots__ = ()
    _is_map = True

    if TYPE_CHECKING:  # made per family by hot_methods

        def __getitem__(self, key: Any) -> Any: ...
        def __setitem__(self, key: Any, value: Any) -> None: ...
        def __delitem__(self, key: Any) -> None: ...
        def get(self, key: Any, default: Any = None) -> Any: ...

    def setdefault(self, key: Any, default: Any) -> Any:
        """``self[key]``, first setting it to ``default`` when missing."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            self[key] = default
            value = self[key]
        return value

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value (or ``default``; KeyError without one)."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        del self[key]
        return value

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the item with the smallest key; KeyError when empty."""
        item = next(self._iter(ITEMS, None, None, False, False), None)
        if item is None:
            raise KeyError("popitem(): empty tree")
        del self[item[0]]
        return item  # type: ignore[no-any-return]

    def update(self, items: Any = (), /, **kwargs: Any) -> None:
        """Add the items of a mapping or of an iterable of pairs."""
        for key, value in _pairs(items):
            self[key] = value
        for key, value in kwargs.items():
            self[key] = value

    def values(
        self, min: Any = None, max: Any = None, excludemin: bool = False, excludemax: bool = False
    ) -> RangeView:
        """The values of the keys in [min, max]: a lazy sequence."""
        return self._view(VALUES, min, max, excludemin, excludemax)

    def items(
        self, min: Any = None, max: Any = None, excludemin: bool = False, excludemax: bool = False
    ) -> RangeView:
        """The (key, value) pairs of the keys in [min, max]: a lazy sequence."""
        return self._view(ITEMS, min, max, excludemin, excludemax)


class TreeSetBase(TreeBase):
    """A set tree (``<P>TreeSet``)."""

    __slots__ = ()

    def discard(self, key: Any) -> None:
        """Remove ``key`` if present."""
        try:
            self.remove(key)
        except KeyError:
            pass

    def pop(self) -> Any:
        """Remove and return the smallest key; KeyError when empty."""
        for key in self._iter(KEYS, None, None, False, False):
            self.remove(key)
            return key
        raise KeyError("pop from an empty set")

    def update(self, items: Iterable[Any]) -> int:
        """Add every key of ``items``; return how many were added."""
        add = self.add
        return sum(add(key) for key in items)

    def add(self, key: Any) -> int:
        raise NotImplementedError

    def remove(self, key: Any) -> None:
        raise NotImplementedError


# As ZODB's BTrees do (see _leaves for buckets and sets).
MutableMapping.register(BTreeBase)
MutableSet.register(TreeSetBase)


def hot_methods(kkind: Kind, vkind: Kind | None) -> dict[str, Callable[..., Any]]:
    """Lookup, insert and delete for a tree of the given kinds, with the checks inlined."""
    key_type, key_lo, key_hi = kkind.fast_type, kkind.lo, kkind.hi
    check_key = kkind.check
    # Lookups skip the key check; for object keys they still map None to its stand-in.  An
    # object key is also found by identity (its __eq__ may be broken), as in BTrees; tested
    # only after == fails, so a found key costs nothing more.
    object_keys = not kkind.numeric

    def contains(self: TreeBase, key: Any) -> bool:
        if object_keys and key is None:
            key = NONE_KEY
        node = self
        try:
            while not node._leaf:
                node = node._children[bisect_right(node._keys, key)]
            keys = node._children[bisect_right(node._keys, key)]._keys
            i = bisect_left(keys, key)
        except (IndexError, TypeError):  # empty tree; a key not comparable with the keys
            return False
        return i != len(keys) and (keys[i] == key or (object_keys and keys[i] is key))

    def _remove(self: TreeBase, key: Any) -> Any:
        """Delete ``key`` and return its value (None for sets); KeyError when missing."""
        if object_keys and key is None:
            key = NONE_KEY
        node = self
        try:
            while not node._leaf:
                node = node._children[bisect_right(node._keys, key)]
            bucket = node._children[bisect_right(node._keys, key)]
            keys = bucket._keys
            i = bisect_left(keys, key)
        except (IndexError, TypeError):
            raise KeyError(key_out(key)) from None
        if i == len(keys) or not (keys[i] == key or (object_keys and keys[i] is key)):
            raise KeyError(key_out(key))
        if bucket._p_jar is not None:
            mark_changed(bucket)
        if walks:
            keys_changed(self)
        del keys[i]
        value = None
        if vkind is not None:
            value = bucket._values.pop(i)
        if not keys:
            self._unlink(key)
        return value

    def _start(self: TreeBase, key: Any, value: Any) -> None:
        """The first key of an empty tree: its first bucket."""
        _touch(self)
        if walks:
            keys_changed(self)
        cls = self._bucket_class
        bucket = cls.__new__(cls)
        bucket._keys = kkind.make((key,))
        if vkind is not None:
            bucket._values = vkind.make((value,))
        bucket._next = None
        self._leaf = True
        self._keys = []
        self._children = [bucket]

    if vkind is None:

        def add(self: TreeBase, key: Any) -> int:
            """Add ``key``: 1 if added, 0 if it was there."""
            if type(key) is not key_type or not key_lo <= key <= key_hi:
                key = check_key(key, "key", self.__class__.__name__)
            node = self
            try:
                while not node._leaf:
                    node = node._children[bisect_right(node._keys, key)]
                bucket = node._children[bisect_right(node._keys, key)]
            except IndexError:
                _start(self, key, None)
                return 1
            keys = bucket._keys
            i = bisect_left(keys, key)
            if i != len(keys) and (keys[i] == key or (object_keys and keys[i] is key)):
                return 0
            if bucket._p_jar is not None:
                mark_changed(bucket)
            if walks:
                keys_changed(self)
            keys.insert(i, key)
            if len(keys) > self.max_leaf_size:
                self._grow(key)
            return 1

        def remove(self: TreeBase, key: Any) -> None:
            """Remove ``key``; KeyError when missing."""
            _remove(self, key)

        return {"__contains__": contains, "add": add, "insert": add, "remove": remove}

    value_type, value_lo, value_hi = vkind.fast_type, vkind.lo, vkind.hi
    check_value = vkind.check
    value_checked = vkind.letter != "O"
    compare_values = vkind.numeric

    def getitem(self: TreeBase, key: Any) -> Any:
        if object_keys and key is None:
            key = NONE_KEY
        node = self
        try:
            while not node._leaf:
                node = node._children[bisect_right(node._keys, key)]
            bucket = node._children[bisect_right(node._keys, key)]
            keys = bucket._keys
            i = bisect_left(keys, key)
        except (IndexError, TypeError):
            raise KeyError(key_out(key)) from None
        if i != len(keys) and (keys[i] == key or (object_keys and keys[i] is key)):
            return bucket._values[i]
        raise KeyError(key_out(key))

    def get(self: TreeBase, key: Any, default: Any = None) -> Any:
        """The value for ``key``, or ``default``."""
        if object_keys and key is None:
            key = NONE_KEY
        node = self
        try:
            while not node._leaf:
                node = node._children[bisect_right(node._keys, key)]
            bucket = node._children[bisect_right(node._keys, key)]
            keys = bucket._keys
            i = bisect_left(keys, key)
        except (IndexError, TypeError):
            return default
        if i != len(keys) and (keys[i] == key or (object_keys and keys[i] is key)):
            return bucket._values[i]
        return default

    def _set(self: TreeBase, key: Any, value: Any, replace: bool) -> int:
        if type(key) is not key_type or not key_lo <= key <= key_hi:
            key = check_key(key, "key", self.__class__.__name__)
        if value_checked and (type(value) is not value_type or not value_lo <= value <= value_hi):
            value = check_value(value, "value", self.__class__.__name__)
        node = self
        try:
            while not node._leaf:
                node = node._children[bisect_right(node._keys, key)]
            bucket = node._children[bisect_right(node._keys, key)]
        except IndexError:
            _start(self, key, value)
            return 1
        keys = bucket._keys
        i = bisect_left(keys, key)
        if i != len(keys) and (keys[i] == key or (object_keys and keys[i] is key)):
            if replace:
                values = bucket._values
                old = values[i]
                if old is not value and not (compare_values and old == value):
                    if bucket._p_jar is not None:
                        mark_changed(bucket)
                    values[i] = value
            return 0
        if bucket._p_jar is not None:
            mark_changed(bucket)
        if walks:
            keys_changed(self)
        keys.insert(i, key)
        bucket._values.insert(i, value)
        if len(keys) > self.max_leaf_size:
            self._grow(key)
        return 1

    def setitem(self: TreeBase, key: Any, value: Any) -> None:
        # _set inlined: this is the insert hot path
        if type(key) is not key_type or not key_lo <= key <= key_hi:
            key = check_key(key, "key", self.__class__.__name__)
        if value_checked and (type(value) is not value_type or not value_lo <= value <= value_hi):
            value = check_value(value, "value", self.__class__.__name__)
        node = self
        try:
            while not node._leaf:
                node = node._children[bisect_right(node._keys, key)]
            bucket = node._children[bisect_right(node._keys, key)]
        except IndexError:
            _start(self, key, value)
            return
        keys = bucket._keys
        i = bisect_left(keys, key)
        if i != len(keys) and (keys[i] == key or (object_keys and keys[i] is key)):
            values = bucket._values
            old = values[i]
            if old is not value and not (compare_values and old == value):
                if bucket._p_jar is not None:
                    mark_changed(bucket)
                values[i] = value
            return
        if bucket._p_jar is not None:
            mark_changed(bucket)
        if walks:
            keys_changed(self)
        keys.insert(i, key)
        bucket._values.insert(i, value)
        if len(keys) > self.max_leaf_size:
            self._grow(key)

    def insert(self: TreeBase, key: Any, value: Any) -> int:
        """Add ``key`` with ``value`` unless present: 1 if added, 0 if it was there."""
        return _set(self, key, value, False)

    def delitem(self: TreeBase, key: Any) -> None:
        _remove(self, key)

    methods: dict[str, Callable[..., Any]] = {
        "__contains__": contains,
        "__getitem__": getitem,
        "get": get,
        "__setitem__": setitem,
        "insert": insert,
        "__delitem__": delitem,
    }
    if vkind.numeric:
        methods["byValue"] = _by_value
    return methods


def _by_value(self: Any, min: Any) -> list[tuple[Any, Any]]:
    """(value, key) pairs of the items whose value is at least ``min``, largest first.

    Integer values are divided by a positive ``min`` (floor division), as ZODB's BTrees
    "normalize" them; float values are left as they are.
    """
    min = self._check_value(min)
    divisor = min if self._vkind.integer and min > 0 else None
    leaves = self._buckets() if isinstance(self, TreeBase) else (self,)
    # Stored keys (a None key is NONE_KEY, which sorts below the others), sorted, then
    # turned into the keys users see.
    found = [
        (v if divisor is None else v // divisor, k)
        for leaf in leaves
        for k, v in zip(leaf._keys, leaf._values)
        if v >= min
    ]
    found.sort(reverse=True)
    return [(v, key_out(k)) for v, k in found]
