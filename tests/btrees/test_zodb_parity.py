"""Behaviour compared with ZODB's BTrees package (the real one, C implementation) as an oracle.

Each test runs the same operations on an AmberDB container and on the BTrees container of
the same family and requires the same outcome.  Deliberate differences are left out where
they would show: ``F`` values are 64-bit floats here (BTrees: 32-bit), so float values are
compared approximately and integers too big for a C long are accepted as ``F`` values.
"""

from __future__ import annotations

import copy
import functools
import importlib
import pickle
from collections.abc import Iterable, Mapping, MutableMapping, MutableSet, Sized
from collections.abc import Set as AbstractSet
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amberdb.btrees import FAMILIES, check
from tests.btrees.families import PREFIXES, key, small_classes, value

BTrees = pytest.importorskip("BTrees")


def zodb_class(prefix: str, kind: str) -> Any:
    """The BTrees class ``<prefix><kind>``, e.g. ``zodb_class("IU", "BTree")``."""
    return getattr(importlib.import_module(f"BTrees.{prefix}BTree"), f"{prefix}{kind}")


def outcome(action: Any, *args: Any) -> Any:
    """("ok", result) or ("error", the exception's kind) for calling ``action(*args)``."""
    try:
        return "ok", action(*args)
    except TypeError:  # BTreesOverflowError is a TypeError too, as BTrees' range errors are
        return "error", TypeError
    except (ValueError, KeyError, IndexError) as exc:
        return "error", type(exc)


_INTEGERS = [0, 1, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32 - 1, 2**32]
_INTEGERS += [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, True]
_OTHERS = [1.5, 2.0, "x", b"x", None, (1,)]


def _keys_of(cls: Any, items: dict[Any, Any]) -> list[Any]:
    return list(cls(items).keys())


def _values_of(cls: Any, items: dict[Any, Any]) -> list[Any]:
    return list(cls(items).values())


@pytest.mark.parametrize("prefix", PREFIXES)
def test_keys_and_values_accepted_as_in_zodb(prefix: str) -> None:
    ours, theirs = FAMILIES[prefix].BTree, zodb_class(prefix, "BTree")
    some_key = "k" if prefix[0] == "O" else 1
    for candidate in _INTEGERS + _OTHERS:
        if prefix[0] != "O" or candidate is not None:  # None sorts first: a test of its own
            expected = outcome(_keys_of, theirs, {candidate: 1})
            assert outcome(_keys_of, ours, {candidate: 1}) == expected, candidate
        if prefix[1] == "F" and isinstance(candidate, int) and not -(2**63) <= candidate < 2**63:
            continue  # 64-bit floats take any int; BTrees' conversion goes through a C long
        expected = outcome(_values_of, theirs, {some_key: candidate})
        got = outcome(_values_of, ours, {some_key: candidate})
        if prefix[1] == "F" and expected[0] == got[0] == "ok":
            assert got[1] == pytest.approx(expected[1]), candidate
        else:
            assert got == expected, candidate


def test_family_namespaces_as_in_zodb() -> None:
    from amberdb import btrees

    for ours, theirs in ((btrees.family32, BTrees.family32), (btrees.family64, BTrees.family64)):
        assert (ours.minint, ours.maxint, ours.maxuint) == (theirs.minint, theirs.maxint, theirs.maxuint)
        for name in ("IO", "OI", "II", "IF", "IU", "UI", "UU", "UO", "OU", "UF", "OO"):
            module = getattr(theirs, name)
            family = getattr(ours, name)
            assert module.__name__ == f"BTrees.{family.prefix}BTree", name
            for kind in ("BTree", "Bucket", "TreeSet", "Set"):
                assert getattr(family, kind).__name__ == getattr(module, f"{family.prefix}{kind}").__name__
            if hasattr(module, "family"):
                assert family.family is ours
    assert len(PREFIXES) == len(set(PREFIXES)) == 21
    assert {f"BTrees.{prefix}BTree" for prefix in PREFIXES} | {"BTrees.fsBTree"} == {
        name for name in BTrees.__all__ if name.startswith("BTrees.")
    }


def _classes(prefix: str, is_map: bool) -> list[Any]:
    """Our classes of one shape: tree, small-node tree (many buckets), leaf."""
    btree, treeset = small_classes(prefix)
    family = FAMILIES[prefix]
    return [family.BTree, btree, family.Bucket] if is_map else [family.TreeSet, treeset, family.Set]


_bound = st.none() | st.integers(-2, 42)


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.sampled_from(["II", "OO", "UF", "LQ"]),
    is_map=st.booleans(),
    ids=st.sets(st.integers(0, 40), max_size=30),
    lo=_bound,
    hi=_bound,
    excludemin=st.booleans(),
    excludemax=st.booleans(),
)
def test_ranges_as_in_zodb(
    prefix: str, is_map: bool, ids: set[int], lo: Any, hi: Any, excludemin: bool, excludemax: bool
) -> None:
    # A missing bound that is excluded leaves out the smallest (largest) key.
    lo_key = None if lo is None else key(prefix, lo)
    hi_key = None if hi is None else key(prefix, hi)
    args = (lo_key, hi_key, excludemin, excludemax)
    kind = ("BTree", "Bucket") if is_map else ("TreeSet", "Set")
    methods = ["keys", "iterkeys"] + (["values", "itervalues", "items", "iteritems"] if is_map else [])
    for zodb_kind, cls in zip((kind[0], kind[0], kind[1]), _classes(prefix, is_map)):
        if is_map:
            items = {key(prefix, i): value(prefix, i) for i in ids}
            theirs, ours = zodb_class(prefix, zodb_kind)(items), cls(items)
        else:
            theirs, ours = (
                zodb_class(prefix, zodb_kind)(key(prefix, i) for i in ids),
                cls(key(prefix, i) for i in ids),
            )
        for method in methods:
            if not hasattr(theirs, method):
                continue  # BTrees' sets have no iterkeys
            expected = list(getattr(theirs, method)(*args))
            got = getattr(ours, method)(*args)
            assert list(got) == expected, (cls.__name__, method, args)
            if not method.startswith("iter"):
                assert len(got) == len(expected), (cls.__name__, method, args)


_SETOP_KINDS = ["BTree", "Bucket", "TreeSet", "Set", "SmallBTree", "SmallTreeSet"]


def _pair(prefix: str, kind: str, keys: list[Any]) -> tuple[Any, Any]:
    """(BTrees', ours) containers of ``kind`` holding ``keys`` (values derived from them)."""
    is_map = kind.endswith("BTree") or kind == "Bucket"
    base = kind.removeprefix("Small")
    if kind.startswith("Small"):
        cls = small_classes(prefix)[0 if is_map else 1]
    else:
        cls = getattr(FAMILIES[prefix], kind)
    theirs_cls = zodb_class(prefix, base)
    if is_map:
        items = {k: value(prefix, len(str(k))) for k in keys}
        return theirs_cls(items), cls(items)
    return theirs_cls(keys), cls(keys)


def _contents(c: Any) -> Any:
    if isinstance(c, tuple):  # weighted operations
        return c[0], _contents(c[1])
    return type(c).__name__, list(c.items()) if hasattr(c, "values") else list(c)


@settings(max_examples=100, deadline=None)
@given(
    prefix=st.sampled_from(["OO", "OI"]),
    kind1=st.sampled_from(_SETOP_KINDS),
    kind2=st.sampled_from(_SETOP_KINDS),
    a=st.sets(st.none() | st.integers(0, 30).map(lambda i: f"k{i:02}"), max_size=12),
    b=st.sets(st.none() | st.integers(0, 30).map(lambda i: f"k{i:02}"), max_size=12),
)
def test_set_operations_with_none_keys_as_in_zodb(
    prefix: str, kind1: str, kind2: str, a: set[Any], b: set[Any]
) -> None:
    (theirs1, ours1), (theirs2, ours2) = _pair(prefix, kind1, list(a)), _pair(prefix, kind2, list(b))
    module = importlib.import_module(f"BTrees.{prefix}BTree")
    operations = ["union", "intersection", "difference"]
    operations += ["weightedUnion", "weightedIntersection"] if prefix == "OI" else []
    for operation in operations:
        expected = getattr(module, operation)(theirs1, theirs2)
        got = getattr(FAMILIES[prefix], operation)(ours1, ours2)
        assert _contents(got) == _contents(expected), operation


@pytest.mark.parametrize("kind", ["BTree", "Bucket"])
def test_update_with_other_than_pairs_raises_type_error_as_in_zodb(kind: str) -> None:
    for bad in ([(1, 2, 3)], [(1,)], [()], [1], ["ab"], "ab", [(1, 2), (3, 4, 5)]):
        for cls in (zodb_class("II", kind), getattr(FAMILIES["II"], kind)):
            with pytest.raises(TypeError):
                cls().update(bad)
    for cls in (zodb_class("II", kind), getattr(FAMILIES["II"], kind)):
        c = cls()
        c.update([(1, 2)])
        c.update({3: 4})
        assert list(c.items()) == [(1, 2), (3, 4)]


@functools.total_ordering
class _BrokenComparison:
    """Equal to nothing, not even itself, and below nothing."""

    def __eq__(self, other: object) -> bool:
        return False

    __lt__ = __eq__
    __hash__ = object.__hash__


def _identity_outcomes(c: Any, is_map: bool) -> list[Any]:
    bad = _BrokenComparison()
    if is_map:
        c[bad] = value("OI", 4)
        c[bad] = value("OI", 5)  # replaces: the key is found
    else:
        c.add(bad)
        c.add(bad)
    found = [bad in c, list(c) == [bad], len(c)]
    if is_map:
        found += [c[bad], c.get(bad), c.setdefault(bad, 1)]
        del c[bad]
    else:
        c.remove(bad)
    return [*found, bad in c, list(c)]


@pytest.mark.parametrize("prefix", [p for p in PREFIXES if p[0] == "O"])
def test_keys_are_found_by_identity_as_in_zodb(prefix: str) -> None:
    btree, treeset = small_classes(prefix)
    for kind, ours in (("BTree", btree), ("Bucket", None), ("TreeSet", treeset), ("Set", None)):
        is_map = kind in ("BTree", "Bucket")
        for cls in (ours, getattr(FAMILIES[prefix], kind)):
            if cls is not None:
                expected = _identity_outcomes(zodb_class(prefix, kind)(), is_map)
                assert _identity_outcomes(cls(), is_map) == expected, cls.__name__


@pytest.mark.parametrize("prefix", PREFIXES)
def test_abstract_base_classes_as_in_zodb(prefix: str) -> None:
    btree, treeset = small_classes(prefix)
    for kind, subclass in (("BTree", btree), ("Bucket", None), ("TreeSet", treeset), ("Set", None)):
        theirs = zodb_class(prefix, kind)()
        for cls in (getattr(FAMILIES[prefix], kind), subclass):
            if cls is not None:
                for abc in (Mapping, MutableMapping, AbstractSet, MutableSet, Sized, Iterable):
                    assert isinstance(cls(), abc) == isinstance(theirs, abc), (cls.__name__, abc)


def test_families_pickle_and_copy_as_themselves_as_in_zodb() -> None:
    from amberdb import btrees

    for ours, theirs in ((btrees.family32, BTrees.family32), (btrees.family64, BTrees.family64)):
        for family in (ours, theirs):
            for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
                assert pickle.loads(pickle.dumps(family, protocol)) is family
            assert copy.deepcopy(family) is family and copy.copy(family) is family
            assert copy.deepcopy({"f": [family]})["f"][0] is family
    assert b"amberdb.btrees" in pickle.dumps(btrees.family64, 0)


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.sampled_from(["II", "LL"]),  # the families whose BTrees have byValue
    kind=st.sampled_from(["BTree", "Bucket", "SmallBTree"]),
    items=st.dictionaries(st.integers(-20, 20), st.integers(-100, 100), max_size=30),
    low=st.integers(-30, 60),
)
def test_by_value_as_in_zodb(prefix: str, kind: str, items: dict[int, int], low: int) -> None:
    # Values at least min, largest first; divided by a positive min (50, 40 by 20: 2, 2).
    theirs = zodb_class(prefix, kind.removeprefix("Small"))(items)
    ours = (small_classes(prefix)[0] if kind.startswith("Small") else getattr(FAMILIES[prefix], kind))(items)
    assert ours.byValue(low) == list(theirs.byValue(low))
    for bad in (2.5, "a"):
        with pytest.raises(TypeError):
            theirs.byValue(bad)
        with pytest.raises(TypeError):
            ours.byValue(bad)


def test_by_value_divides_as_the_issue_says() -> None:
    for cls in (FAMILIES["II"].BTree, zodb_class("II", "BTree")):
        assert list(cls({5: 50, 4: 40, 3: 30, 2: 20}).byValue(20)) == [(2, 5), (2, 4), (1, 3), (1, 2)]


def _normalized(result: Any) -> Any:
    """A result's class (without our test-only "Small" prefix) and contents."""
    name = type(result).__name__.removeprefix("Small")
    if hasattr(result, "values"):
        return name, list(result.keys()), list(result.values())
    return name, list(result)


def _same(got: Any, expected: Any, prefix: str) -> None:
    got, expected = _normalized(got), _normalized(expected)
    if prefix[1] == "F" and len(got) == 3 == len(expected):
        assert got[:2] == expected[:2] and got[2] == pytest.approx(expected[2])
    else:
        assert got == expected


_KEY_IDS = st.sets(st.integers(0, 25), max_size=15)


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.sampled_from(["II", "OO", "UF", "LQ", "OU"]),
    kind1=st.sampled_from(_SETOP_KINDS),
    kind2=st.sampled_from([*_SETOP_KINDS, "list", "set", "tuple"]),
    a=_KEY_IDS,
    b=_KEY_IDS,
)
def test_operators_as_in_zodb(prefix: str, kind1: str, kind2: str, a: set[int], b: set[int]) -> None:
    # | & give a Set, - a Set (a Bucket for a mapping on the left), ^ (sets only) the left
    # operand's class; the in-place forms change the set itself.
    theirs1, ours1 = _pair(prefix, kind1, [key(prefix, i) for i in sorted(a)])
    keys2 = [key(prefix, i) for i in sorted(b)]
    if kind2 in ("list", "set", "tuple"):
        theirs2 = ours2 = {"list": list, "set": set, "tuple": tuple}[kind2](keys2)
    else:
        theirs2, ours2 = _pair(prefix, kind2, keys2)
    is_set = not hasattr(theirs1, "values")
    operations = ["__or__", "__and__", "__sub__", "__ror__", "__rand__"] + (["__xor__"] if is_set else [])
    for operation in operations:
        _same(getattr(ours1, operation)(ours2), getattr(theirs1, operation)(theirs2), prefix)
    if not is_set:
        for missing in ("__xor__", "__ior__", "__iand__", "__isub__", "__ixor__", "isdisjoint"):
            assert not hasattr(theirs1, missing) and not hasattr(ours1, missing), missing
        return
    assert ours1.isdisjoint(ours2) == theirs1.isdisjoint(theirs2)
    if kind2 in ("list", "set", "tuple"):  # reflected: Python tries the set's method
        assert _normalized(ours2 | ours1) == _normalized(theirs2 | theirs1)
        assert _normalized(ours2 & ours1) == _normalized(theirs2 & theirs1)
        assert sorted(ours2 ^ ours1) == sorted(theirs2 ^ theirs1)  # (BTrees: a list, set or tuple)
    for operation in ("__ior__", "__iand__", "__isub__", "__ixor__"):
        theirs, ours = _pair(prefix, kind1, [key(prefix, i) for i in sorted(a)])
        expected = getattr(theirs, operation)(theirs2)
        got = getattr(ours, operation)(ours2)
        assert got is ours and expected is theirs
        _same(got, expected, prefix)
        check(ours)


def test_in_place_operators_on_a_set_with_itself_as_in_zodb() -> None:
    ours = FAMILIES["II"]
    for make in (zodb_class("II", "TreeSet"), zodb_class("II", "Set"), ours.TreeSet, ours.Set):
        s = make([1, 2, 3])
        s |= s
        assert list(s) == [1, 2, 3]
        s &= s
        assert list(s) == [1, 2, 3]
        s ^= s
        assert list(s) == []
        s = make([1, 2, 3])
        s -= s
        assert list(s) == []


@pytest.mark.parametrize("prefix", ["II", "OO", "QF"])
def test_set_indexing_as_in_zodb(prefix: str) -> None:
    keys = [key(prefix, i) for i in range(0, 20, 3)]
    theirs, ours = zodb_class(prefix, "Set")(keys), FAMILIES[prefix].Set(keys)
    for index in range(-len(keys) - 2, len(keys) + 2):
        assert outcome(ours.__getitem__, index) == outcome(theirs.__getitem__, index), index
    for bad in (slice(0, 2), 1.0, "1"):
        assert outcome(ours.__getitem__, bad) == outcome(theirs.__getitem__, bad) == ("error", TypeError)
    for tree_set in (zodb_class(prefix, "TreeSet")(keys), FAMILIES[prefix].TreeSet(keys)):
        with pytest.raises(TypeError):
            tree_set[0]
    assert FAMILIES["OO"].Set([None, "a"])[0] is None


def test_node_sizes_are_class_attributes_as_in_zodb() -> None:
    for prefix in PREFIXES:
        for kind in ("BTree", "TreeSet"):
            ours = getattr(FAMILIES[prefix], kind)
            assert hasattr(zodb_class(prefix, kind), "max_leaf_size")
            assert ours.max_leaf_size > 1 and ours.max_internal_size > 2
            # ours are larger than BTrees' (30/250 object keys, 120/500 integers): see _families
        assert not hasattr(FAMILIES[prefix].Bucket, "max_leaf_size")
