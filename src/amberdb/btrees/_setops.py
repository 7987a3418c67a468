"""Set algebra over buckets, sets, trees and tree sets of any family.

The results are those of ZODB's ``BTrees`` for the same inputs:

* ``union(c1, c2)``, ``intersection(c1, c2)``: a ``<P>Set`` of keys (values ignored); if
  one argument is None, the other is returned as it is.
* ``difference(c1, c2)``: the keys (a ``<P>Set``) or items (a ``<P>Bucket``, when ``c1``
  is a mapping) of ``c1`` whose key is not in ``c2``; None if ``c1`` is None, ``c1`` if
  ``c2`` is None.
* ``weightedUnion(c1, c2, w1=1, w2=1)``, ``weightedIntersection(...)``: ``(weight,
  result)``: for two sets ``(1, union)`` / ``(w1 + w2, intersection)``, otherwise ``(1,
  bucket)`` whose values are ``v1 * w1 + v2 * w2`` (a set's value is 1, a missing key's 0).
  Only families with numeric values.
* ``multiunion(seq)``: the ``<P>Set`` of every key of the collections and every integer in
  ``seq`` (integer keys only).

The family of the result (``<P>``) is that of the first argument that is an AmberDB
collection (for the weighted operations: of the first mapping); the functions of a family
namespace (``family32.II.union``) use that family when no argument is one.  Any other
argument may be a plain iterable of keys.  Keys from a collection of another key kind, or
from a plain iterable, are checked against the result's key kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain
from typing import TYPE_CHECKING, Any

from amberdb.btrees._kinds import key_out
from amberdb.btrees._leaves import FamilyMember, LeafBase

__all__ = [
    "MappingOperators",
    "SetOperators",
    "difference",
    "intersection",
    "multiunion",
    "union",
    "weightedIntersection",
    "weightedUnion",
]


def _family_of(*collections: Any) -> Any:
    for c in collections:
        if isinstance(c, FamilyMember):
            return c._family
    return None


def _result_family(default: Any, *collections: Any) -> Any:
    family = _family_of(*collections) or default
    if family is None:
        raise TypeError(
            "set operations need at least one AmberDB BTrees collection (or use a family's "
            "functions, e.g. amberdb.btrees.family32.II.union)"
        )
    return family


def _is_map(c: Any) -> bool:
    return isinstance(c, FamilyMember) and c._is_map


def _keys(c: Any, family: Any) -> list[Any]:
    """The sorted, distinct keys of ``c``, fit for ``family``."""
    if isinstance(c, FamilyMember):
        # The keys as stored (a None key as NONE_KEY, which sorts first), not as iteration
        # gives them: a None key would not compare with the others.
        keys: list[Any]
        if isinstance(c, LeafBase):
            keys = c._keys
        else:
            keys = list(chain.from_iterable(b._keys for b in c._buckets()))  # type: ignore[attr-defined]
        if c._kkind is family.key_kind:
            return keys
        check = family.key_kind.check
        return [check(key, "key", family.Set.__name__) for key in keys]
    check = family.key_kind.check
    keys = sorted(check(key, "key", family.Set.__name__) for key in c)
    return [key for i, key in enumerate(keys) if i == 0 or keys[i - 1] != key]


def _items(c: Any, family: Any) -> tuple[list[Any], list[Any] | None]:
    """Keys and values (None for sets and plain iterables) of ``c``."""
    if not _is_map(c):
        return _keys(c, family), None
    if isinstance(c, LeafBase):
        values: list[Any] = c._values  # type: ignore[attr-defined]
    else:
        values = list(chain.from_iterable(b._values for b in c._buckets()))
    return _keys(c, family), values


def _merge(a: list[Any], b: list[Any]) -> Iterator[tuple[Any, int, int]]:
    """(key, index in a or -1, index in b or -1) for the union of two sorted key lists."""
    i = j = 0
    na, nb = len(a), len(b)
    while i < na and j < nb:
        x, y = a[i], b[j]
        if x < y:
            yield x, i, -1
            i += 1
        elif y < x:
            yield y, -1, j
            j += 1
        else:
            yield x, i, j
            i += 1
            j += 1
    for k in range(i, na):
        yield a[k], k, -1
    for k in range(j, nb):
        yield b[k], -1, k


def _new_set(family: Any, keys: list[Any]) -> Any:
    cls = family.Set
    result = cls.__new__(cls)
    result._keys = family.key_kind.make(keys)
    result._next = None
    return result


def _new_bucket(family: Any, keys: list[Any], values: list[Any]) -> Any:
    cls = family.Bucket
    result = cls.__new__(cls)
    result._keys = family.key_kind.make(keys)
    result._values = family.value_kind.make(values)
    result._next = None
    return result


def union(c1: Any, c2: Any, _default: Any = None) -> Any:
    """The ``<P>Set`` of the keys of both; the other argument when one is None."""
    if c1 is None:
        return c2
    if c2 is None:
        return c1
    family = _result_family(_default, c1, c2)
    return _new_set(family, [key for key, _, _ in _merge(_keys(c1, family), _keys(c2, family))])


def intersection(c1: Any, c2: Any, _default: Any = None) -> Any:
    """The ``<P>Set`` of the keys in both; the other argument when one is None."""
    if c1 is None:
        return c2
    if c2 is None:
        return c1
    family = _result_family(_default, c1, c2)
    a, b = _keys(c1, family), _keys(c2, family)
    return _new_set(family, [key for key, i, j in _merge(a, b) if i >= 0 and j >= 0])


def difference(c1: Any, c2: Any, _default: Any = None) -> Any:
    """The keys (a Set) or items (a Bucket, for a mapping ``c1``) of ``c1`` not in ``c2``."""
    if c1 is None:
        return None
    if c2 is None:
        return c1
    family = _result_family(_default, c1, c2)
    keys, values = _items(c1, family)
    kept = [(key, i) for key, i, j in _merge(keys, _keys(c2, family)) if i >= 0 and j < 0]
    if values is None:
        return _new_set(family, [key for key, _ in kept])
    return _new_bucket(family, [key for key, _ in kept], [values[i] for _, i in kept])


def _weighted_family(default: Any, c1: Any, c2: Any) -> Any:
    family = _family_of(*(c for c in (c1, c2) if _is_map(c))) or _result_family(default, c1, c2)
    if not family.value_kind.numeric:
        raise TypeError(
            f"weighted set operations need numeric values, and {family.BTree.__name__} values are objects"
        )
    return family


def _weighted(c1: Any, c2: Any, w1: Any, w2: Any, default: Any, union_: bool) -> tuple[Any, Any]:
    if c1 is None:
        return (0, None) if c2 is None else (w2, c2)
    if c2 is None:
        return w1, c1
    family = _weighted_family(default, c1, c2)
    if not _is_map(c1) and not _is_map(c2):
        if union_:
            return 1, union(c1, c2, default)
        return w1 + w2, intersection(c1, c2, default)
    keys1, values1 = _items(c1, family)
    keys2, values2 = _items(c2, family)
    check = family.value_kind.check
    owner = family.Bucket.__name__
    keys: list[Any] = []
    values: list[Any] = []
    for key, i, j in _merge(keys1, keys2):
        if (i < 0 or j < 0) and not union_:
            continue
        v1 = 0 if i < 0 else (1 if values1 is None else values1[i])
        v2 = 0 if j < 0 else (1 if values2 is None else values2[j])
        keys.append(key)
        values.append(check(v1 * w1 + v2 * w2, "value", owner))
    return 1, _new_bucket(family, keys, values)


def weightedUnion(
    c1: Any, c2: Any, weight1: Any = 1, weight2: Any = 1, _default: Any = None
) -> tuple[Any, Any]:
    """``(weight, result)``: the union of two sets, or a bucket of weighted value sums."""
    return _weighted(c1, c2, weight1, weight2, _default, True)


def weightedIntersection(
    c1: Any, c2: Any, weight1: Any = 1, weight2: Any = 1, _default: Any = None
) -> tuple[Any, Any]:
    """``(weight, result)``: the intersection of two sets, or a bucket of weighted value sums."""
    return _weighted(c1, c2, weight1, weight2, _default, False)


def multiunion(seq: Iterable[Any], _default: Any = None) -> Any:
    """The ``<P>Set`` of all the keys of the collections and the integers in ``seq``."""
    items = list(seq)
    family = _family_of(*items) or _default
    if family is None:
        from amberdb.btrees._families import FAMILIES

        family = FAMILIES["LL"]
    kind = family.key_kind
    if not kind.integer:
        raise TypeError(f"multiunion needs integer keys, and {family.Set.__name__} keys are objects")
    owner = family.Set.__name__
    found: set[int] = set()
    for item in items:
        if isinstance(item, int):
            found.add(kind.check(item, "key", owner))
        else:
            found.update(_keys(item, family))
    return _new_set(family, sorted(found))


# -- operators --------------------------------------------------------------------------
#
# The results are those of ZODB's BTrees (C implementation): ``|`` and ``&`` give a
# ``<P>Set`` whatever the operands, ``-`` a ``<P>Set`` or, for a mapping on the left, a
# ``<P>Bucket``; ``^`` (sets only) a container of the left operand's class.  The other
# operand may be any collection or iterable of keys.


class MappingOperators:
    """``|``, ``&`` and ``-`` of buckets and trees (the keys; ``-`` keeps the items)."""

    __slots__ = ()

    def __or__(self, other: Any) -> Any:
        return union(self, other)

    __ror__ = __or__

    def __and__(self, other: Any) -> Any:
        return intersection(self, other)

    __rand__ = __and__

    def __sub__(self, other: Any) -> Any:
        return difference(self, other)


class SetOperators(MappingOperators):
    """The set operators of sets and tree sets, their in-place forms, and ``isdisjoint``."""

    __slots__ = ()

    if TYPE_CHECKING:  # provided by SetBase and TreeSetBase

        def add(self, key: Any) -> int: ...
        def remove(self, key: Any) -> None: ...
        def update(self, items: Iterable[Any]) -> int: ...
        def __contains__(self, key: Any) -> bool: ...

    def __rsub__(self, other: Any) -> Any:
        return difference(other, self)  # the keys of ``other`` (checked for this family) not here

    def _merged(self, other: Any) -> list[tuple[Any, int, int]]:
        """:func:`_merge` of this set's keys and ``other``'s, computed before anything changes."""
        family = _family_of(self)
        return list(_merge(_keys(self, family), _keys(other, family)))

    def __xor__(self, other: Any) -> Any:
        result = self.__class__()
        result.update(key_out(key) for key, i, j in self._merged(other) if i < 0 or j < 0)
        return result

    __rxor__ = __xor__

    def isdisjoint(self, other: Iterable[Any]) -> bool:
        """True when no key of ``other`` is in this set."""
        return not any(key in self for key in other)

    # The in-place forms change the set through add and remove (which mark it changed).
    def __ior__(self, other: Any) -> Any:
        for key, i, _ in self._merged(other):
            if i < 0:
                self.add(key_out(key))
        return self

    def __iand__(self, other: Any) -> Any:
        for key, _, j in self._merged(other):
            if j < 0:
                self.remove(key_out(key))
        return self

    def __isub__(self, other: Any) -> Any:
        for key, i, j in self._merged(other):
            if i >= 0 and j >= 0:
                self.remove(key_out(key))
        return self

    def __ixor__(self, other: Any) -> Any:
        for key, i, j in self._merged(other):
            if i < 0:
                self.add(key_out(key))
            elif j >= 0:
                self.remove(key_out(key))
        return self
