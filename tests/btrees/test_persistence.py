"""Trees in a database: separate records, few records written and read, conflict resolution."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.btrees import (
    FAMILIES,
    BTreesConflictError,
    IIBTree,
    IIBucket,
    IISet,
    IITreeSet,
    Length,
    OOBTree,
    OOBucket,
    OOSet,
    check,
    family32,
    family64,
)
from amberdb.conflict import PersistentReference
from amberdb.exceptions import ConflictError, RecordDecodeError
from amberdb.persistent import Persistent, class_name
from amberdb.record import REFERENCE_GLOBAL, decode_header, encode_record
from amberdb.storage.base import TransactionMeta
from amberdb.unpickler import load_state
from amberdb.utils import p64
from tests.btrees.families import PREFIXES, key, small_classes, value


class _LoadCounter:
    """Counts the records a connection loads from the storage."""

    def __init__(self, db: amberdb.DB) -> None:
        self.count = 0
        storage = db.storage
        load = storage.load

        def counting_load(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return load(*args, **kwargs)

        storage.load = counting_load  # type: ignore[method-assign]


def _last_records(db: amberdb.DB) -> int:
    return len(list(db.storage.iterator())[-1].records)


def _depth(tree: Any) -> int:
    depth, node = 1, tree
    while not node._leaf:
        node, depth = node._children[0], depth + 1
    return depth


@pytest.fixture
def db() -> Iterator[amberdb.DB]:
    database = amberdb.DB(None)
    yield database
    database.close()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_round_trip_every_family(db: amberdb.DB, prefix: str) -> None:
    family = FAMILIES[prefix]
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    order = list(range(3000))
    random.Random(1).shuffle(order)
    root = conn.root()
    root["tree"] = family.BTree({key(prefix, i): value(prefix, i) for i in order})
    root["small"] = small_classes(prefix)[0]({key(prefix, i): value(prefix, i) for i in order[:300]})
    root["treeset"] = family.TreeSet(key(prefix, i) for i in order)
    root["bucket"] = family.Bucket({key(prefix, i): value(prefix, i) for i in range(10)})
    root["set"] = family.Set(key(prefix, i) for i in range(10))
    tm.commit()
    conn.cache_minimize()
    tree = root["tree"]
    assert tree._p_changed is None  # a ghost until used
    expected = [(key(prefix, i), root["tree"][key(prefix, i)]) for i in range(3000)]
    assert list(tree.items()) == expected
    assert list(root["treeset"]) == [key(prefix, i) for i in range(3000)]
    assert list(root["small"].keys()) == sorted(key(prefix, i) for i in order[:300])
    assert list(root["bucket"].items()) == [
        (key(prefix, i), root["bucket"][key(prefix, i)]) for i in range(10)
    ]
    assert list(root["set"]) == [key(prefix, i) for i in range(10)]
    for name in ("tree", "small", "treeset", "bucket", "set"):
        check(root[name])
    conn2 = db.open(transaction_manager=transaction.TransactionManager())
    assert list(conn2.root()["small"].items()) == list(root["small"].items())
    tm.abort()


def test_a_big_tree_is_many_small_records_and_a_change_writes_one(db: amberdb.DB) -> None:
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    keys = random.Random(2).sample(range(10**9), 50_000)
    conn.root()["tree"] = tree = IIBTree()
    for k in keys:
        tree[k] = k
    tm.commit()
    records = {r.oid for r in list(db.storage.iterator())[-1].records}
    assert len(records) > 100  # root, nodes and buckets are separate records
    assert max(len(r.record) for r in list(db.storage.iterator())[-1].records) < 20_000
    conn.cache_minimize()
    tree = conn.root()["tree"]

    tree[keys[0]] = -1
    tm.commit()
    assert _last_records(db) == 1  # the bucket only

    tree[keys[1] + 1 if keys[1] + 1 not in tree else keys[1] - 1] = 7
    del tree[keys[2]]
    tm.commit()
    assert _last_records(db) <= 2

    # a split writes the bucket, its new neighbour and their parent
    bucket = tree._children[0]
    while not isinstance(bucket, IIBucket):
        bucket = bucket._children[0]
    free = [k for k in range(bucket._keys[0], bucket._keys[-1]) if k not in tree]
    for k in free[: tree.max_leaf_size]:
        tree[k] = k
    tm.commit()
    assert 3 <= _last_records(db) <= 8
    check(tree)


def test_lookups_and_range_searches_read_few_records(db: amberdb.DB) -> None:
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["tree"] = tree = small_classes("II")[0]({i: i for i in range(3000)})
    tm.commit()
    depth = _depth(tree)
    assert depth >= 5
    counter = _LoadCounter(db)
    conn.cache_minimize()
    tree = conn.root()["tree"]
    assert tree[1500] == 1500
    assert counter.count == depth + 2  # the root mapping, one record per node level, the bucket
    conn.cache_minimize()
    counter.count = 0
    assert list(conn.root()["tree"].keys(1000, 1029)) == list(range(1000, 1030))
    # one path down, then the buckets in range (at most 3 keys each, at least 1)
    assert counter.count <= depth + 2 + 30
    conn.cache_minimize()
    counter.count = 0
    assert len(conn.root()["tree"].keys(1000, 1029)) == 30
    assert counter.count <= depth + 2 + 30
    tm.abort()


def test_a_scan_with_cache_gc_keeps_few_objects_loaded(db: amberdb.DB) -> None:
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["tree"] = small_classes("LL")[0]({i: i for i in range(2000)})
    tm.commit()
    conn.cache_minimize()
    conn.cache_size = 50
    total = 0
    for i, k in enumerate(conn.root()["tree"]):
        total += k
        if i % 100 == 0:
            conn.cache_gc()
            assert len(conn._cache._lru) < 200
    assert total == sum(range(2000))
    tm.abort()


def test_subclass_attributes_are_kept(db: amberdb.DB) -> None:
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tree = small_classes("OO")[0]({"a": 1})
    tree.title = "catalog"  # a subclass without __slots__ has a __dict__
    conn.root()["tree"] = tree
    tm.commit()
    conn.cache_minimize()
    assert conn.root()["tree"].title == "catalog" and conn.root()["tree"]["a"] == 1
    tm.abort()


def test_length_counts_and_survives_a_round_trip(db: amberdb.DB) -> None:
    length = Length(3)
    length.change(4)
    assert length() == 7 and length.value == 7
    length.set(10)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["n"] = length
    tm.commit()
    conn.cache_minimize()
    assert conn.root()["n"]() == 10
    conn.root()["n"].change(-1)
    assert conn.root()["n"]._p_changed
    tm.commit()
    conn.cache_minimize()
    assert conn.root()["n"].value == 9 and "9" in repr(conn.root()["n"])
    tm.abort()


# -- resolvers on states -------------------------------------------------------------------


def _state(cls: type, data: Any, next_bucket: Any = None) -> Any:
    obj = cls(data)
    obj._next = next_bucket
    return obj.__getstate__()


def _resolve(cls: type, old: Any, saved: Any, new: Any, next_bucket: Any = None) -> Any:
    states = [_state(cls, data, next_bucket) for data in (old, saved, new)]
    merged = cls.__new__(cls)._p_resolveConflict(*states)
    result = cls.__new__(cls)
    result.__setstate__(merged)
    assert result._next == next_bucket
    return list(result.items()) if hasattr(result, "items") else list(result)


OLD = {1: 1, 5: 5, 9: 9}


@pytest.mark.parametrize("cls", [IIBucket, OOBucket])
def test_bucket_resolver_merges_changes_of_different_keys(cls: type) -> None:
    ref = PersistentReference(p64(7), "amberdb.btrees:IIBucket")
    assert _resolve(cls, OLD, {**OLD, 3: 3}, {**OLD, 7: 7}, ref) == [(1, 1), (3, 3), (5, 5), (7, 7), (9, 9)]
    assert _resolve(cls, OLD, {**OLD, 1: 10}, {**OLD, 9: 90}) == [(1, 10), (5, 5), (9, 90)]
    assert _resolve(cls, OLD, {1: 1, 9: 9}, {**OLD, 9: 90, 10: 10}) == [(1, 1), (9, 90), (10, 10)]
    assert _resolve(cls, OLD, {5: 5, 9: 9}, {1: 1, 5: 5}) == [(5, 5)]  # deleting first keys merges too
    assert _resolve(cls, OLD, OLD, {**OLD, 5: 50}) == [(1, 1), (5, 50), (9, 9)]
    assert _resolve(cls, {}, {1: 1}, {2: 2}) == [(1, 1), (2, 2)]  # a standalone bucket


@pytest.mark.parametrize(
    ("saved", "new", "reason"),
    [
        ({**OLD, 5: 6}, {**OLD, 5: 7}, "same key changed in both"),
        ({**OLD, 5: 6}, {**OLD, 5: 6}, "same key changed in both"),
        ({**OLD, 3: 3}, {**OLD, 3: 3}, "same key inserted in both"),
        ({1: 1, 9: 9}, {1: 1, 9: 9}, "same key deleted in both"),
        ({1: 1, 9: 9}, {**OLD, 5: 50}, "deleted in one transaction and changed in the other"),
        ({**OLD, 5: 50}, {1: 1, 9: 9}, "deleted in one transaction and changed in the other"),
        ({}, {**OLD, 3: 3}, "bucket emptied"),
        ({1: 1}, {5: 5, 9: 9}, "bucket emptied"),
    ],
)
def test_bucket_resolver_refuses(saved: Any, new: Any, reason: str) -> None:
    with pytest.raises(BTreesConflictError, match=reason) as info:
        _resolve(IIBucket, OLD, saved, new)
    assert isinstance(info.value, ConflictError)


def test_bucket_resolver_refuses_when_a_split_is_involved() -> None:
    old = _state(IIBucket, OLD)
    split = _state(IIBucket, {1: 1, 5: 5}, PersistentReference(p64(9), "amberdb.btrees:IIBucket"))
    new = _state(IIBucket, {**OLD, 7: 7})
    with pytest.raises(BTreesConflictError, match="split"):
        IIBucket.__new__(IIBucket)._p_resolveConflict(old, split, new)
    with pytest.raises(BTreesConflictError, match="split"):
        IIBucket.__new__(IIBucket)._p_resolveConflict(old, new, split)


def test_bucket_resolver_compares_references_by_equality() -> None:
    def ref(n: int) -> PersistentReference:
        return PersistentReference(p64(n), "tests:Thing")

    old = _state(OOBucket, {"a": ref(1), "b": ref(2)})
    saved = _state(OOBucket, {"a": ref(1), "b": ref(3)})
    new = _state(OOBucket, {"a": ref(4), "b": ref(2)})
    merged = OOBucket.__new__(OOBucket)._p_resolveConflict(old, saved, new)
    assert merged[1] == [ref(4), ref(3)]
    clash = _state(OOBucket, {"a": ref(5), "b": ref(2)})
    with pytest.raises(BTreesConflictError, match="same key changed"):
        OOBucket.__new__(OOBucket)._p_resolveConflict(old, new, clash)


@pytest.mark.parametrize("cls", [IISet, OOSet])
def test_set_resolver(cls: type) -> None:
    k = (lambda i: i) if cls is IISet else (lambda i: f"k{i}")
    old = [k(1), k(5), k(9)]
    assert _resolve(cls, old, [*old, k(3)], [*old, k(7)]) == sorted([*old, k(3), k(7)])
    assert _resolve(cls, old, [k(1), k(9)], [*old, k(7)]) == sorted([k(1), k(9), k(7)])
    with pytest.raises(BTreesConflictError, match="inserted in both"):
        _resolve(cls, old, [*old, k(3)], [*old, k(3)])
    with pytest.raises(BTreesConflictError, match="deleted in both"):
        _resolve(cls, old, [k(1), k(9)], [k(1), k(9)])
    with pytest.raises(BTreesConflictError, match="emptied"):
        _resolve(cls, old, [], [*old, k(7)])


def test_length_resolver_adds_both_deltas() -> None:
    assert Length.__new__(Length)._p_resolveConflict(10, 13, 8) == 11


def test_trees_have_no_resolver() -> None:
    for prefix in PREFIXES:
        assert not hasattr(FAMILIES[prefix].BTree, "_p_resolveConflict")
        assert not hasattr(FAMILIES[prefix].TreeSet, "_p_resolveConflict")


# -- two connections --------------------------------------------------------------------------


def _two_connections(db: amberdb.DB, obj: Any) -> tuple[Any, Any, Any, Any]:
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    conn1 = db.open(transaction_manager=tm1)
    conn1.root()["obj"] = obj
    tm1.commit()
    conn2 = db.open(transaction_manager=tm2)
    return tm1, conn1.root()["obj"], tm2, conn2.root()["obj"]


@pytest.mark.parametrize("cls", [IIBTree, OOBTree, IITreeSet])
def test_disjoint_inserts_into_one_bucket_both_commit(db: amberdb.DB, cls: type) -> None:
    k = (lambda i: i) if cls is not OOBTree else (lambda i: f"k{i:03d}")
    start = cls()
    for i in range(0, 100, 10):
        if hasattr(start, "add"):
            start.add(k(i))
        else:
            start[k(i)] = i
    tm1, t1, tm2, t2 = _two_connections(db, start)
    store = (lambda t, i: t.add(k(i))) if hasattr(start, "add") else (lambda t, i: t.__setitem__(k(i), i))
    store(t1, 11)
    if hasattr(start, "add"):
        t1.remove(k(50))
    else:
        del t1[k(50)]
    store(t2, 12)
    tm1.commit()
    tm2.commit()
    tm1.begin()
    expected = sorted({*(k(i) for i in range(0, 100, 10)), k(11), k(12)} - {k(50)})
    assert list(t1) == expected
    check(t1)


def test_same_key_updates_conflict(db: amberdb.DB) -> None:
    tm1, t1, tm2, t2 = _two_connections(db, IIBTree({1: 1, 2: 2}))
    t1[1] = 10
    t2[1] = 20
    tm1.commit()
    with pytest.raises(ConflictError, match="same key changed in both"):
        tm2.commit()
    tm2.abort()
    tm1.begin()
    assert t1[1] == 10


def test_a_split_conflicts_with_a_change_of_the_same_bucket(db: amberdb.DB) -> None:
    tree_class = small_classes("II")[0]
    tm1, t1, tm2, t2 = _two_connections(db, tree_class({1: 1, 2: 2}))
    t1[3] = 3
    t1[4] = 4  # splits the only bucket
    t2[0] = 0
    tm1.commit()
    with pytest.raises(ConflictError):
        tm2.commit()
    tm2.abort()


def test_length_changes_in_two_connections_add_up(db: amberdb.DB) -> None:
    tm1, n1, tm2, n2 = _two_connections(db, Length(10))
    n1.change(3)
    n2.change(-1)
    tm1.commit()
    tm2.commit()
    tm1.begin()
    assert n1() == 12


def test_none_keys_are_stored_as_none_and_merge_like_any_key(db: amberdb.DB) -> None:
    tm1, t1, tm2, t2 = _two_connections(db, OOBTree({"b": 2, "d": 4}))
    t1[None] = 0  # None sorts first: into the same (only) bucket as t2's change
    t2["c"] = 3
    tm1.commit()
    tm2.commit()
    tm2.begin()
    assert list(t2.items()) == [(None, 0), ("b", 2), ("c", 3), ("d", 4)]
    bucket = t2._first_bucket()
    record, _ = db.storage.load(bucket._p_oid)
    header = decode_header(record)
    ghosts = [object()] * len(header.refs)
    state = load_state(record[header.state_offset :], db._resolver, ghosts, REFERENCE_GLOBAL, True)
    assert state[0][0] is None
    t1[None] = 1
    t2[None] = 2
    tm1.commit()
    with pytest.raises(ConflictError, match=r"same key changed in both transactions: key None"):
        tm2.commit()
    tm2.abort()


class FamilyUser(Persistent):
    """Keeps its BTrees family as an attribute, the way ZODB applications often do."""

    def __init__(self, family: Any) -> None:
        self.family = family
        self.tree = family.IO.BTree()


def test_families_are_stored_as_themselves(tmp_path: Path) -> None:
    path = str(tmp_path / "data.fs")
    db = amberdb.DB(path)
    conn = db.open()
    conn.root.user32, conn.root.user64 = FamilyUser(family32), FamilyUser(family64)
    conn.root.both = [family32, family64]
    transaction.commit()
    assert b"amberdb.btrees" in db.storage.load(conn.root.user64._p_oid)[0]
    fresh = db.open(transaction.TransactionManager())
    assert fresh.root.user32.family is family32 and fresh.root.user64.family is family64
    assert fresh.root.both[0] is family32 and fresh.root.both[1] is family64
    fresh.close()
    conn.close()
    db.close()
    db = amberdb.DB(path)  # a new database: nothing cached
    conn = db.open()
    assert conn.root.user64.family is family64 and conn.root.user64.tree.__class__ is family64.IO.BTree
    conn.close()
    db.close()


def test_a_record_cannot_change_a_family(db: amberdb.DB) -> None:
    conn = db.open()
    conn.root.user = FamilyUser(family64)
    transaction.commit()
    oid = conn.root.user._p_oid
    assert b"\x8c\x0eamberdb.btrees\x94\x8c\x08family64\x94\x93" in db.storage.load(oid)[0]
    family = b"\x8c\x0eamberdb.btrees\x8c\x08family64\x93"  # the global the writer names
    # {"family": family64} with a BUILD setting family64.bits, as a tampered record could say
    state = b"\x80\x05}\x8c\x06family" + family + b"}\x8c\x04bitsK\x01sbs."
    storage = db.storage
    storage.begin(TransactionMeta(description="tampering"))
    storage.store(oid, storage.load(oid)[1], encode_record(class_name(FamilyUser), [], state))
    storage.vote()
    storage.finish()
    reader = db.open(transaction.TransactionManager())
    with pytest.raises(RecordDecodeError, match="did not build"):
        reader.get(oid).family  # noqa: B018 - loads the state
    assert family64.bits == 64
    reader.close()
    conn.close()
