"""Set algebra: results against Python sets and dicts, and result kinds against ZODB's BTrees."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amberdb.btrees as btrees
from amberdb.btrees import (
    FAMILIES,
    check,
    difference,
    intersection,
    multiunion,
    union,
    weightedIntersection,
    weightedUnion,
)
from tests.btrees.families import PREFIXES, key, small_classes, value

small_keys = st.sets(st.integers(0, 40), max_size=25)


def _make(prefix: str, kind: str, keys: set[int], salt: int = 0) -> Any:
    if kind == "SmallBTree":
        return small_classes(prefix)[0]({key(prefix, i): value(prefix, i + salt) for i in keys})
    if kind == "SmallTreeSet":
        return small_classes(prefix)[1](key(prefix, i) for i in keys)
    cls = getattr(FAMILIES[prefix], kind)
    if kind in ("BTree", "Bucket"):
        return cls({key(prefix, i): value(prefix, i + salt) for i in keys})
    return cls(key(prefix, i) for i in keys)


KINDS = ["BTree", "Bucket", "TreeSet", "Set", "SmallBTree", "SmallTreeSet"]


def _is_map(kind: str) -> bool:
    return kind in ("BTree", "Bucket", "SmallBTree")


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.sampled_from(PREFIXES),
    kind1=st.sampled_from(KINDS),
    kind2=st.sampled_from(KINDS),
    a=small_keys,
    b=small_keys,
)
def test_union_intersection_difference_match_python_sets(
    prefix: str, kind1: str, kind2: str, a: set[int], b: set[int]
) -> None:
    c1, c2 = _make(prefix, kind1, a), _make(prefix, kind2, b, salt=1)
    family = FAMILIES[prefix]
    u = union(c1, c2)
    assert type(u) is family.Set and list(u) == [key(prefix, i) for i in sorted(a | b)]
    i = intersection(c1, c2)
    assert type(i) is family.Set and list(i) == [key(prefix, x) for x in sorted(a & b)]
    d = difference(c1, c2)
    expected = [key(prefix, x) for x in sorted(a - b)]
    if _is_map(kind1):
        assert type(d) is family.Bucket
        assert list(d.items()) == [(k, c1[k]) for k in expected]
    else:
        assert type(d) is family.Set and list(d) == expected
    for result in (u, i, d):
        check(result)
    # plain iterables of keys work in place of a collection
    assert list(union(c1, [key(prefix, x) for x in b])) == list(u)
    assert list(difference(c1, {key(prefix, x) for x in b}).keys()) == expected


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.sampled_from([p for p in PREFIXES if p[1] in "IF"]),
    kind1=st.sampled_from(KINDS),
    kind2=st.sampled_from(KINDS),
    a=small_keys,
    b=small_keys,
    w1=st.integers(0, 3),
    w2=st.integers(0, 3),
)
def test_weighted_operations_match_python_dicts(
    prefix: str, kind1: str, kind2: str, a: set[int], b: set[int], w1: int, w2: int
) -> None:
    c1, c2 = _make(prefix, kind1, a), _make(prefix, kind2, b, salt=1)
    family = FAMILIES[prefix]
    v1 = {key(prefix, i): (c1[key(prefix, i)] if _is_map(kind1) else 1) for i in a}
    v2 = {key(prefix, i): (c2[key(prefix, i)] if _is_map(kind2) else 1) for i in b}
    weight, result = weightedUnion(c1, c2, w1, w2)
    if not _is_map(kind1) and not _is_map(kind2):
        assert (weight, type(result)) == (1, family.Set) and list(result) == sorted(v1.keys() | v2.keys())
    else:
        assert weight == 1 and type(result) is family.Bucket
        expected = {k: v1.get(k, 0) * w1 + v2.get(k, 0) * w2 for k in v1.keys() | v2.keys()}
        assert dict(result.items()) == expected and list(result) == sorted(expected)
    weight, result = weightedIntersection(c1, c2, w1, w2)
    if not _is_map(kind1) and not _is_map(kind2):
        assert (weight, type(result)) == (w1 + w2, family.Set) and list(result) == sorted(
            v1.keys() & v2.keys()
        )
    else:
        assert weight == 1 and type(result) is family.Bucket
        expected = {k: v1[k] * w1 + v2[k] * w2 for k in v1.keys() & v2.keys()}
        assert dict(result.items()) == expected
    check(result)


def test_none_arguments() -> None:
    s = btrees.IISet([1, 2])
    assert union(None, s) is s and union(s, None) is s and union(None, None) is None
    assert intersection(None, s) is s and intersection(s, None) is s
    assert difference(None, s) is None and difference(s, None) is s
    assert weightedUnion(None, None) == (0, None) and weightedUnion(None, s, 2, 3) == (3, s)
    assert weightedUnion(s, None, 2, 3) == (2, s) and weightedIntersection(s, None, 2, 3) == (2, s)


def test_multiunion() -> None:
    result = multiunion([btrees.IISet([1, 5]), btrees.IITreeSet([5, 7]), btrees.IIBTree({9: 1}), 3, [11, 1]])
    assert type(result) is btrees.IISet and list(result) == [1, 3, 5, 7, 9, 11]
    assert type(multiunion([btrees.QQSet([2**64 - 1])])) is btrees.QQSet
    assert type(btrees.family32.II.multiunion([1, 2])) is btrees.IISet
    assert type(multiunion([1, 2])) is btrees.LLSet
    with pytest.raises(TypeError, match="integer keys"):
        multiunion([btrees.OOSet(["a"])])
    with pytest.raises(OverflowError):
        btrees.family32.II.multiunion([2**40])


def test_family_functions_pick_their_family_for_plain_iterables() -> None:
    assert type(btrees.family64.II.union([1, 2], [3])) is btrees.LLSet
    assert type(btrees.family32.IF.weightedUnion([1, 2], [1])[1]) is btrees.IFSet
    assert type(btrees.family32.OO.intersection(["a"], ["a"])) is btrees.OOSet
    assert type(btrees.family32.IO.difference([1, 2], [2])) is btrees.IOSet
    with pytest.raises(TypeError, match="at least one"):
        union([1], [2])


def test_weighted_operations_need_numeric_values() -> None:
    with pytest.raises(TypeError, match="numeric values"):
        weightedUnion(btrees.IOBTree({1: "a"}), btrees.IOBTree({2: "b"}))


def test_keys_of_another_kind_are_checked() -> None:
    assert list(union(btrees.IISet([1]), btrees.LLSet([2]))) == [1, 2]
    with pytest.raises(OverflowError):
        union(btrees.IISet([1]), btrees.LLSet([2**40]))


def _zodb_module(prefix: str) -> Any:
    return importlib.import_module(f"BTrees.{prefix}BTree")


@pytest.mark.parametrize("prefix", ["II", "IO", "OO", "IF", "LL", "OI", "QQ"])
def test_result_kinds_match_zodb_btrees(prefix: str) -> None:
    pytest.importorskip("BTrees")
    theirs = _zodb_module(prefix)
    ours = FAMILIES[prefix]
    numeric = prefix[1] in "IFLQ"
    for kind1 in ("BTree", "Bucket", "TreeSet", "Set"):
        for kind2 in ("BTree", "Bucket", "TreeSet", "Set"):

            def build(module: Any, kind: str, keys: tuple[int, ...]) -> Any:
                cls = getattr(module, f"{prefix}{kind}") if module is not ours else getattr(ours, kind)
                if kind in ("BTree", "Bucket"):
                    return cls({key(prefix, i): value(prefix, i) for i in keys})
                return cls([key(prefix, i) for i in keys])

            a, b = (1, 2, 3), (2, 3, 4)
            pairs = [
                (build(theirs, kind1, a), build(theirs, kind2, b)),
                (build(ours, kind1, a), build(ours, kind2, b)),
            ]
            operations = ["union", "intersection", "difference"] + (
                ["weightedUnion", "weightedIntersection"] if numeric else []
            )
            for operation in operations:
                expected = getattr(theirs, operation)(*pairs[0])
                got = getattr(btrees, operation)(*pairs[1])
                if isinstance(expected, tuple):
                    assert expected[0] == got[0], operation
                    expected, got = expected[1], got[1]
                assert type(got).__name__ == type(expected).__name__, (operation, kind1, kind2)
                assert list(got) == list(expected)
                if hasattr(expected, "values"):
                    if numeric:
                        assert list(got.values()) == pytest.approx(list(expected.values()))
                    else:
                        assert list(got.values()) == list(expected.values())
