"""The container API of every family: mappings, sets, lazy ranges, checks, iteration safety."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

import amberdb.btrees as btrees
from amberdb import Persistent
from amberdb.btrees import FAMILIES, check, family32, family64
from amberdb.persistent import persistent_class_named
from tests.btrees.families import PREFIXES, key, small_classes, value

N = 200


def _mapping_classes(prefix: str) -> list[type]:
    return [FAMILIES[prefix].BTree, FAMILIES[prefix].Bucket, small_classes(prefix)[0]]


def _set_classes(prefix: str) -> list[type]:
    return [FAMILIES[prefix].TreeSet, FAMILIES[prefix].Set, small_classes(prefix)[1]]


MAPPINGS = [(p, c) for p in PREFIXES for c in _mapping_classes(p)]
SETS = [(p, c) for p in PREFIXES for c in _set_classes(p)]


def _ids(params: list[tuple[str, type]]) -> list[str]:
    return [cls.__name__ for _, cls in params]


def _range(model: list[Any], lo: Any, hi: Any, excludemin: bool, excludemax: bool) -> list[Any]:
    # An excluded missing bound leaves out the smallest (largest) key, as in ZODB's BTrees.
    found = [k for k in model if (lo is None or k >= lo) and (hi is None or k <= hi)]
    if found and excludemin and (lo is None or found[0] == lo):
        del found[0]
    if found and excludemax and (hi is None or found[-1] == hi):
        del found[-1]
    return found


def _filled(prefix: str, cls: type) -> tuple[Any, dict[Any, Any]]:
    t = cls()
    model = {}
    order = list(range(0, 2 * N, 2))  # even i only: odd i are absent keys
    random.Random(prefix).shuffle(order)
    for i in order:
        k, v = key(prefix, i), value(prefix, i)
        t[k] = v
        model[k] = t[k]
    return t, model


def _bounds(prefix: str) -> list[Any]:
    return [
        None,
        key(prefix, -5),
        key(prefix, 0),
        key(prefix, 7),
        key(prefix, 100),
        key(prefix, 2 * N - 2),
        key(prefix, 999),
    ]


@pytest.mark.parametrize(("prefix", "cls"), MAPPINGS, ids=_ids(MAPPINGS))
def test_mapping_api(prefix: str, cls: type) -> None:
    t, model = _filled(prefix, cls)
    keys = sorted(model)
    assert len(t) == N and bool(t)
    assert list(t) == keys == list(t.keys())
    assert list(t.values()) == [model[k] for k in keys] == list(t.itervalues())
    assert list(t.items()) == [(k, model[k]) for k in keys] == list(t.iteritems())
    k0, k1, missing = key(prefix, 0), key(prefix, 2), key(prefix, 1)
    assert t[k0] == model[k0] and t.get(k0) == model[k0]
    assert t.get(missing) is None and t.get(missing, 5) == 5
    assert k0 in t and missing not in t and t.has_key(k0) and not t.has_key(missing)
    with pytest.raises(KeyError):
        t[missing]
    assert t.insert(k0, value(prefix, 9)) == 0 and t[k0] == model[k0]
    assert t.insert(missing, value(prefix, 9)) == 1 and t[missing] == t.get(missing)
    assert t.setdefault(missing, value(prefix, 11)) == t[missing]
    assert t.pop(missing) is not None and missing not in t
    assert t.pop(missing, "gone") == "gone"
    with pytest.raises(KeyError):
        t.pop(missing)
    with pytest.raises(KeyError):
        del t[missing]
    assert t.setdefault(missing, value(prefix, 3)) == t[missing]
    del t[missing]
    t[k1] = value(prefix, 42)
    model[k1] = t[k1]
    assert t.minKey() == keys[0] and t.maxKey() == keys[-1]
    assert t.minKey(key(prefix, 3)) == key(prefix, 4) and t.maxKey(key(prefix, 3)) == key(prefix, 2)
    assert t.minKey(key(prefix, 4)) == key(prefix, 4) and t.maxKey(key(prefix, 4)) == key(prefix, 4)
    with pytest.raises(ValueError):
        t.minKey(key(prefix, 2 * N))
    with pytest.raises(ValueError):
        t.maxKey(key(prefix, -1))
    for lo, hi in itertools.product(_bounds(prefix), repeat=2):
        for excludemin, excludemax in itertools.product((False, True), repeat=2):
            expected = _range(keys, lo, hi, excludemin, excludemax)
            flags = {"excludemin": excludemin, "excludemax": excludemax}
            assert list(t.keys(lo, hi, **flags)) == expected
            assert list(t.iterkeys(lo, hi, **flags)) == expected
            assert list(t.values(lo, hi, **flags)) == [model[k] for k in expected]
            assert list(t.itervalues(min=lo, max=hi, **flags)) == [model[k] for k in expected]
            assert list(t.items(lo, hi, **flags)) == [(k, model[k]) for k in expected]
            assert list(t.iteritems(lo, hi, **flags)) == [(k, model[k]) for k in expected]
            assert len(t.keys(lo, hi, **flags)) == len(expected)
    t.update({key(prefix, 1): value(prefix, 1)})
    t.update([(key(prefix, 3), value(prefix, 3))])
    assert key(prefix, 1) in t and key(prefix, 3) in t
    first = t.popitem()
    assert first[0] == keys[0] and keys[0] not in t
    check(t)
    for k in list(t.keys()):
        del t[k]
    assert len(t) == 0 and not t and list(t) == []
    with pytest.raises(ValueError):
        t.minKey()
    with pytest.raises(KeyError):
        t.popitem()
    check(t)
    t.update({k0: value(prefix, 0)})
    t.clear()
    assert len(t) == 0
    check(t)


@pytest.mark.parametrize("prefix", [p for p in PREFIXES if p[1] != "O"])
def test_by_value_on_numeric_values(prefix: str) -> None:
    for cls in _mapping_classes(prefix):
        t = cls({key(prefix, i): value(prefix, i % 7) for i in range(30)})
        low = value(prefix, 3)
        # Integer values are divided by a positive min, as in BTrees; floats are not.
        expected = [(v // low if prefix[1] != "F" else v, k) for k, v in t.items() if v >= low]
        assert t.byValue(low) == sorted(expected, reverse=True)
    assert not hasattr(FAMILIES["OO"].BTree(), "byValue")


@pytest.mark.parametrize(("prefix", "cls"), SETS, ids=_ids(SETS))
def test_set_api(prefix: str, cls: type) -> None:
    s = cls()
    order = list(range(0, 2 * N, 2))
    random.Random(prefix).shuffle(order)
    for i in order:
        assert s.add(key(prefix, i)) == 1
    assert s.add(key(prefix, 0)) == 0 and s.insert(key(prefix, 0)) == 0
    keys = sorted(key(prefix, i) for i in order)
    assert list(s) == keys == list(s.keys()) and len(s) == N
    assert key(prefix, 2) in s and key(prefix, 1) not in s and s.has_key(key(prefix, 2))
    with pytest.raises(KeyError):
        s.remove(key(prefix, 1))
    s.discard(key(prefix, 1))
    s.remove(key(prefix, 2))
    assert key(prefix, 2) not in s
    assert s.update([key(prefix, 1), key(prefix, 2), key(prefix, 4)]) == 2
    assert s.pop() == key(prefix, 0) and key(prefix, 0) not in s
    assert s.minKey() == key(prefix, 1) and s.maxKey() == keys[-1]
    assert s.minKey(key(prefix, 5)) == key(prefix, 6) and s.maxKey(key(prefix, 5)) == key(prefix, 4)
    model = sorted(s)
    for lo, hi in itertools.product(_bounds(prefix), repeat=2):
        for excludemin, excludemax in itertools.product((False, True), repeat=2):
            expected = _range(model, lo, hi, excludemin, excludemax)
            assert list(s.keys(lo, hi, excludemin=excludemin, excludemax=excludemax)) == expected
            assert list(s.iterkeys(lo, hi, excludemin, excludemax)) == expected
    check(s)
    while s:
        s.pop()
    with pytest.raises(KeyError):
        s.pop()
    check(s)
    s.update([key(prefix, 9)])
    s.clear()
    assert list(s) == []


@pytest.mark.parametrize("prefix", ["II", "OO", "QQ"])
def test_lazy_sequences_index_and_slice(prefix: str) -> None:
    tree_class, set_class = small_classes(prefix)
    t = tree_class({key(prefix, i): value(prefix, i) for i in range(50)})
    s = set_class(key(prefix, i) for i in range(50))
    for seq, expected in (
        (t.keys(), [key(prefix, i) for i in range(50)]),
        (t.values(), [value(prefix, i) for i in range(50)]),
        (t.items(), [(key(prefix, i), value(prefix, i)) for i in range(50)]),
        (t.keys(key(prefix, 10), key(prefix, 30), excludemin=True), [key(prefix, i) for i in range(11, 31)]),
        (s.keys(key(prefix, 5)), [key(prefix, i) for i in range(5, 50)]),
    ):
        assert len(seq) == len(expected) and bool(seq)
        for i in (0, 1, 7, len(expected) - 1, -1, -2, -len(expected)):
            assert seq[i] == expected[i]
        for bad in (len(expected), -len(expected) - 1):
            with pytest.raises(IndexError):
                seq[bad]
        for start, stop, step in itertools.product(
            (None, 0, 3, -4, 100), (None, 5, -2, 100), (None, 1, 2, -1)
        ):
            sliced = seq[start:stop:step]
            assert list(sliced) == expected[start:stop:step]
            if step in (None, 1):
                assert len(sliced) == len(expected[start:stop])
        assert list(seq[2:20][3:10][1:]) == expected[2:20][3:10][1:]
        assert seq[2:20][-1] == expected[2:20][-1]
        assert list(reversed(seq)) == expected[::-1]
    assert len(t.keys(key(prefix, 30), key(prefix, 10))) == 0 and not t.keys(key(prefix, 30), key(prefix, 10))
    assert list(t.keys(key(prefix, 3), key(prefix, 3), excludemin=True)) == []
    check(t)
    check(s)


INT_PREFIXES = [p for p in PREFIXES if p[0] != "O"]


@pytest.mark.parametrize("prefix", INT_PREFIXES)
def test_integer_keys_are_checked(prefix: str) -> None:
    kind = FAMILIES[prefix].key_kind
    for cls in (
        FAMILIES[prefix].BTree,
        FAMILIES[prefix].Bucket,
        FAMILIES[prefix].TreeSet,
        FAMILIES[prefix].Set,
    ):
        c = cls()
        store = c.add if hasattr(c, "add") else (lambda k, c=c: c.__setitem__(k, value(prefix, 1)))
        for bad in ("1", 1.0, None, b"1", (1,)):
            with pytest.raises(TypeError, match="must be an integer"):
                store(bad)
        for bad in (kind.lo - 1, kind.hi + 1, 2**64, -(2**64)):
            with pytest.raises(OverflowError, match="out of range") as info:
                store(bad)
            assert isinstance(info.value, TypeError)  # what BTrees raises
        store(kind.hi)
        store(kind.lo)
        store(True)
        assert list(c) == sorted({kind.lo, 1, kind.hi}) and all(type(k) is int for k in c)
        assert c.get("x") is None if hasattr(c, "get") else True
        assert "x" not in c and kind.hi + 1 not in c and 1.5 not in c
        with pytest.raises(TypeError):
            list(c.keys(min="a"))
        check(c)


@pytest.mark.parametrize("prefix", [p for p in PREFIXES if p[1] in "IULQ"])
def test_integer_values_are_checked(prefix: str) -> None:
    kind = FAMILIES[prefix].value_kind
    for cls in (FAMILIES[prefix].BTree, FAMILIES[prefix].Bucket):
        t = cls()
        k = key(prefix, 1)
        for bad in ("1", 1.5, None):
            with pytest.raises(TypeError, match="value must be an integer"):
                t[k] = bad
        for bad in (kind.lo - 1, kind.hi + 1):
            with pytest.raises(OverflowError, match=f"value {bad} is out of range"):
                t[k] = bad
        assert k not in t
        t[k] = False
        assert t[k] == 0 and type(t[k]) is int


@pytest.mark.parametrize("prefix", [p for p in PREFIXES if p[1] == "F"])
def test_float_values_accept_ints_and_floats(prefix: str) -> None:
    t = FAMILIES[prefix].BTree()
    t[1] = 1
    t[2] = 0.1
    assert t[1] == 1.0 and type(t[1]) is float and t[2] == 0.1
    for bad in ("x", None, 1j):
        with pytest.raises(TypeError, match="must be a float or an int"):
            t[3] = bad


class _Unordered:
    pass


class _Ordered:
    def __init__(self, n: int) -> None:
        self.n = n

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, _Ordered):
            return NotImplemented
        return self.n < other.n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Ordered) and self.n == other.n

    def __hash__(self) -> int:
        return self.n


@pytest.mark.parametrize("prefix", [p for p in PREFIXES if p[0] == "O"])
def test_object_keys_need_a_total_order(prefix: str) -> None:
    for cls in (
        FAMILIES[prefix].BTree,
        FAMILIES[prefix].Bucket,
        FAMILIES[prefix].TreeSet,
        FAMILIES[prefix].Set,
    ):
        c = cls()
        store = c.add if hasattr(c, "add") else (lambda k, c=c: c.__setitem__(k, value(prefix, 1)))
        for bad in (_Unordered(), object()):
            with pytest.raises(TypeError, match="default identity comparison"):
                store(bad)
        store(_Ordered(2))
        store(_Ordered(1))
        assert [o.n for o in c] == [1, 2]
        with pytest.raises(TypeError):
            store("a string among _Ordered keys")
        assert _Unordered() not in c
        check(c)


@pytest.mark.parametrize("prefix", [p for p in PREFIXES if p[0] == "O"])
def test_none_is_a_key_sorting_first_as_in_zodb(prefix: str) -> None:
    btree, treeset = small_classes(prefix)  # many buckets: None must stay in the first
    names = [f"k{i:03}" for i in range(40)]
    for cls in (btree, treeset, FAMILIES[prefix].Bucket, FAMILIES[prefix].Set):
        c = cls()
        is_map = not hasattr(c, "add")
        store = (lambda k, c=c: c.__setitem__(k, value(prefix, 1))) if is_map else c.add
        for name in names[20:]:
            store(name)
        store(None)
        for name in names[:20]:
            store(name)
        assert list(c) == [None, *names]
        assert None in c and c.has_key(None)
        assert c.minKey() is None and c.maxKey() == names[-1]
        assert list(c.keys())[:2] == [None, "k000"]
        assert list(c.keys(max="k000")) == [None, "k000"]  # None as a bound means "no bound"
        if is_map:
            assert c[None] == c.get(None) == value(prefix, 1)
            assert next(iter(c.items())) == (None, value(prefix, 1))
            assert c.insert(None, value(prefix, 1)) == 0
            del c[None]
        else:
            assert c.add(None) == 0
            c.remove(None)
        assert None not in c and list(c) == names
        with pytest.raises(KeyError) as missing:
            c.__delitem__(None) if is_map else c.remove(None)
        assert missing.value.args == (None,)  # the key as given, not its stand-in
        check(c)


def _mutators(c: Any, prefix: str) -> list[Any]:
    """Remove the key at index ``j``; insert a key just after it (so into the same bucket)."""
    if hasattr(c, "add"):
        return [lambda j: c.remove(key(prefix, 2 * j)), lambda j: c.add(key(prefix, 2 * j + 1))]
    return [
        lambda j: c.__delitem__(key(prefix, 2 * j)),
        lambda j: c.__setitem__(key(prefix, 2 * j + 1), value(prefix, 1)),
    ]


@pytest.mark.parametrize("prefix", ["II", "OO", "LF"])
def test_changing_size_while_iterating_raises(prefix: str) -> None:
    btree, treeset = small_classes(prefix)
    classes = [btree, treeset, FAMILIES[prefix].BTree, FAMILIES[prefix].TreeSet]
    classes += [FAMILIES[prefix].Bucket, FAMILIES[prefix].Set]
    for cls in classes:
        for mutate in range(2):
            c = cls()
            for i in range(30):
                if hasattr(c, "add"):
                    c.add(key(prefix, 2 * i))
                else:
                    c[key(prefix, 2 * i)] = value(prefix, i)
            seen = []
            with pytest.raises(RuntimeError, match="changed during iteration"):
                for j, k in enumerate(c):
                    seen.append(k)
                    _mutators(c, prefix)[mutate](j)
            assert seen == [key(prefix, 2 * j) for j in range(len(seen))]
            check(c)


def test_inserting_into_a_later_bucket_while_iterating_raises() -> None:
    # Such inserts could otherwise keep a walk going for ever (always one bucket ahead).
    t = small_classes("II")[0]({i: i for i in range(0, 60, 2)})
    seen = []
    with pytest.raises(RuntimeError, match="changed during iteration"):
        for k in t:
            seen.append(k)
            if k == 4:
                t[57] = 1
                t[59] = 1
    assert seen == [0, 2, 4]  # the walk stops at the end of the bucket it was in


def test_changing_values_while_iterating_is_allowed() -> None:
    t = small_classes("II")[0]({i: i for i in range(40)})
    for k, v in t.items():
        t[k] = v + 1
    assert list(t.values()) == list(range(1, 41))
    check(t)


def test_views_reflect_the_tree_when_used() -> None:
    t = btrees.IIBTree({i: i for i in range(10)})
    keys = t.keys(3)
    t[20] = 20
    del t[5]
    assert list(keys) == [3, 4, 6, 7, 8, 9, 20] and len(keys) == 7


def test_family_namespaces_and_class_names() -> None:
    assert family32.II.BTree is btrees.IIBTree and family32.IO.TreeSet is btrees.IOTreeSet
    assert family64.IO.BTree is btrees.LOBTree and family64.II.Set is btrees.LLSet
    assert family64.OI.Bucket is btrees.OLBucket and family64.IF.BTree is btrees.LFBTree
    assert family32.IU.BTree is btrees.IUBTree and family32.UF.Set is btrees.UFSet
    assert family64.IU.BTree is btrees.LQBTree and family64.UI.TreeSet is btrees.QLTreeSet
    assert family64.UF.Bucket is btrees.QFBucket and family64.OU.BTree is btrees.OQBTree
    assert family32.UU.family is family32 and family64.UF.family is family64
    assert family32.maxint == 2**31 - 1 and family32.minint == -(2**31)
    assert family64.maxint == 2**63 - 1 and family64.minint == -(2**63) and family64.maxuint == 2**64 - 1
    assert family32.II.family is family32 and family64.II.family is family64
    for prefix in PREFIXES:
        for kind in ("BTree", "Bucket", "TreeSet", "Set"):
            cls = getattr(btrees, f"{prefix}{kind}")
            assert cls is getattr(FAMILIES[prefix], kind)
            assert (cls.__module__, cls.__qualname__, cls.__name__) == (
                "amberdb.btrees",
                f"{prefix}{kind}",
                f"{prefix}{kind}",
            )
            assert issubclass(cls, Persistent)
            assert persistent_class_named(f"amberdb.btrees:{prefix}{kind}") is cls
            assert f"{prefix}{kind}" in btrees.__all__
    assert btrees.IOTreeSet is not btrees.IITreeSet
    assert btrees.IOTreeSet._kkind is btrees.IITreeSet._kkind


def test_reprs() -> None:
    assert repr(btrees.IISet([2, 1])) == "IISet([1, 2])"
    assert repr(btrees.IIBucket({1: 2})) == "IIBucket([(1, 2)])"
    assert "IIBTree" in repr(btrees.IIBTree()) and "keys view" in repr(btrees.IIBTree().keys())


def test_check_finds_damage() -> None:
    t = small_classes("II")[0]({i: i for i in range(30)})
    check(t)
    bucket = t._first_bucket()
    bucket._keys[0], bucket._keys[1] = bucket._keys[1], bucket._keys[0]
    with pytest.raises(AssertionError, match="out of order"):
        t._check()
    with pytest.raises(TypeError):
        check(object())


def test_copy_and_pickle_outside_a_database() -> None:
    import copy
    import pickle

    t = small_classes("OO")[0]({key("OO", i): value("OO", i) for i in range(20)})
    for other in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        assert list(other.items()) == list(t.items())
        other[key("OO", 100)] = 1
        assert key("OO", 100) not in t
        check(other)
    b = btrees.IIBucket({1: 2})
    c = copy.copy(b)
    c[3] = 4
    assert list(b.items()) == [(1, 2)]


class TinyOOBTree(btrees.OOBTree):
    """A subclass choosing its own node sizes, as BTrees allows."""

    max_leaf_size = 2
    max_internal_size = 3


class TinyIITreeSet(btrees.IITreeSet):
    max_leaf_size = 3
    max_internal_size = 4


def _shape(tree: Any) -> tuple[int, int, int]:
    """(depth, largest bucket, most children of a node)."""
    depth, biggest, widest = 1, 0, len(tree._children)
    nodes = [tree]
    while not nodes[0]._leaf:
        nodes = [child for node in nodes for child in node._children]
        widest = max([widest, *(len(node._children) for node in nodes)])
        depth += 1
    biggest = max(len(bucket) for bucket in tree._buckets())
    return depth, biggest, widest


def test_subclasses_choose_their_node_sizes() -> None:
    t = TinyOOBTree({f"k{i:02}": i for i in range(40)})
    s = TinyIITreeSet(range(40))
    assert _shape(t)[1:] == (2, 3) and _shape(s)[1:] == (3, 4) and _shape(t)[0] == 3
    check(t)
    check(s)
    assert btrees.OOBTree.max_leaf_size > 2  # the subclass changed only itself
    big = btrees.OOBTree({f"k{i:02}": i for i in range(40)})
    assert _shape(big) == (1, 40, 1)


def test_set_operators_keep_the_set_and_its_changes_commit() -> None:
    import amberdb
    import amberdb.transaction as transaction

    db = amberdb.DB(None)
    conn = db.open()
    conn.root.s = s = TinyIITreeSet(range(10))
    transaction.commit()
    s |= [20, 21]
    s -= range(5)
    s &= range(100)
    s ^= [5, 30]
    assert conn.root.s is s
    transaction.commit()
    fresh = db.open(transaction.TransactionManager())
    assert list(fresh.root.s) == [6, 7, 8, 9, 20, 21, 30]
    check(fresh.root.s)
    fresh.close()
    conn.close()
    db.close()


def test_display_shows_nodes_separators_and_keys(capsys: pytest.CaptureFixture[str]) -> None:
    from amberdb.btrees.check import display

    t = TinyOOBTree({f"k{i}": i for i in range(6)})
    t[None] = "none"
    display(t)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("TinyOOBTree at 0x") and out[0].endswith("children")
    assert [line.strip() for line in out if "separator" in line] == [
        "separator 'k0'",
        "separator 'k2'",
        "separator 'k4'",
    ]
    assert [line.strip() for line in out if ": " in line and "at 0x" not in line] == [
        "None: 'none'",
        *(f"'k{i}': {i}" for i in range(6)),
    ]
    display(btrees.IISet([1, 2]))
    assert capsys.readouterr().out.splitlines()[1:] == ["    1", "    2"]
    display(btrees.IIBTree())
    assert capsys.readouterr().out.endswith(": 0 children\n")
    with pytest.raises(TypeError):
        display({})
