"""Workloads 7 and 8: integer BTrees (``IIBTree``) in memory, and persisted.

Keys are distinct random integers (seeded, so both engines get the same keys) below 2**31;
values equal keys.  In memory: insert every key into an empty tree, look every key up in a
different random order, and scan ten ranges of 10 % of the keys each (items/s over all
scans).  Persisted: build a tree in a FileStorage committing every ``per_commit`` inserts,
then, in a new process, scan the middle 10 % of the keys (cold range scan).  Cache size for
both engines: 10,000 objects.

Scale (``btree_scale``): build a tree of ascending keys far larger than the cache (10
million entries with ``--full``) committing every ``per_commit``, recording peak RSS after
each quarter, then scan all of it in a new process; cache size 2,000 objects.
"""

from __future__ import annotations

import os
import random

from benchmarks.engines import Engine
from benchmarks.measure import clock, peak_rss_mb

CACHE_SIZE = 10_000
SCANS = 10


def random_keys(n: int, seed: int) -> list[int]:
    """``n`` distinct random integers in [0, 2**31 - 1), the same for the same seed."""
    return random.Random(seed).sample(range(2**31 - 1), n)


def in_memory(engine: Engine, directory: str, n: int, seed: int = 42) -> dict[str, float]:
    """Insert, look up and range-scan ``n`` random keys in a tree that is never stored."""
    tree_class = engine.btree_class()
    keys = random_keys(n, seed)
    lookups = keys[:]
    random.Random(seed + 1).shuffle(lookups)
    ordered = sorted(keys)

    tree = tree_class()
    began = clock()
    for key in keys:
        tree[key] = key
    insert = clock() - began
    if len(tree) != n:
        raise AssertionError(f"tree has {len(tree)} keys after {n} inserts")

    total = 0
    began = clock()
    for key in lookups:
        total += tree[key]
    lookup = clock() - began
    if total != sum(keys):
        raise AssertionError("lookups returned wrong values")

    span = max(1, n // 10)
    scanned = expected = 0
    began = clock()
    for scan in range(SCANS):
        first = scan * (n - span) // max(1, SCANS - 1)
        for _key, _value in tree.items(ordered[first], ordered[first + span - 1]):
            scanned += 1
        expected += span
    scan_time = clock() - began
    if scanned != expected:
        raise AssertionError(f"range scans returned {scanned} items, expected {expected}")
    return {"btree_insert": n / insert, "btree_lookup": n / lookup, "btree_range": scanned / scan_time}


def _path(directory: str) -> str:
    return os.path.join(directory, "btree.fs")


def persisted_build(
    engine: Engine, directory: str, n: int, per_commit: int, seed: int = 7
) -> dict[str, float]:
    """Build an ``n``-entry tree in a FileStorage, committing every ``per_commit`` inserts."""
    tree_class = engine.btree_class()
    keys = random_keys(n, seed)
    db = engine.open_db(_path(directory), cache_size=CACHE_SIZE)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    conn.root()["tree"] = tree = tree_class()
    manager.commit()
    began = clock()
    for start in range(0, n, per_commit):
        for key in keys[start : start + per_commit]:
            tree[key] = key
        manager.commit()
    build = clock() - began
    if len(tree) != n:
        raise AssertionError(f"tree has {len(tree)} keys after {n} inserts")
    conn.close()
    db.close()
    return {"btree_build": n / build}


def persisted_cold_scan(engine: Engine, directory: str, n: int, seed: int = 7) -> dict[str, float]:
    """In a fresh process: open the database and scan the middle 10 % of the keys."""
    tree_class = engine.btree_class()  # also makes sure the class is importable
    ordered = sorted(random_keys(n, seed))
    span = max(1, n // 10)
    first = (n - span) // 2
    began = clock()
    db = engine.open_db(_path(directory), cache_size=CACHE_SIZE)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    tree = conn.root()["tree"]
    scanned = 0
    for _key, _value in tree.items(ordered[first], ordered[first + span - 1]):
        scanned += 1
    elapsed = clock() - began
    if scanned != span or not isinstance(tree, tree_class):
        raise AssertionError(f"cold range scan returned {scanned} items, expected {span}")
    manager.abort()
    conn.close()
    db.close()
    return {"btree_cold_scan": scanned / elapsed}


# -- workload 8b: a tree far larger than the cache ------------------------------------------

SCALE_CACHE_SIZE = 2_000
_SCALE_SPACING = 97  # ascending keys with gaps of 1..193: ids, the usual way big trees grow


def _scale_key(i: int) -> int:
    """The ``i``-th key of the scale workload: ascending, with pseudo-random gaps, < 2**31."""
    return i * _SCALE_SPACING + (i * 2654435761) % _SCALE_SPACING


def _scale_path(directory: str) -> str:
    return os.path.join(directory, "scale.fs")


def scale_build(engine: Engine, directory: str, n: int, per_commit: int) -> dict[str, float]:
    """Build an ``n``-entry tree with a small cache; peak RSS after each quarter of the entries.

    The keys are computed, never held in a list, so the process's memory is the database's:
    flat figures from the first quarter to the last show that memory does not grow with the
    tree.
    """
    tree_class = engine.btree_class()
    db = engine.open_db(_scale_path(directory), cache_size=SCALE_CACHE_SIZE)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    conn.root()["tree"] = tree = tree_class()
    manager.commit()
    quarters: list[float] = []
    began = clock()
    for start in range(0, n, per_commit):
        stop = min(n, start + per_commit)
        for i in range(start, stop):
            key = _scale_key(i)
            tree[key] = i
        manager.commit()
        while len(quarters) < 4 and stop >= (len(quarters) + 1) * n // 4:
            quarters.append(peak_rss_mb())
    build = clock() - began
    conn.close()
    db.close()
    return {
        "scale_build": n / build,
        **{f"scale_rss_q{q + 1}": mb for q, mb in enumerate(quarters)},
        "scale_rss_growth": quarters[-1] / quarters[0],
    }


def scale_scan(engine: Engine, directory: str, n: int, per_commit: int) -> dict[str, float]:
    """In a fresh process: iterate over every item, letting the cache shed buckets as it goes."""
    db = engine.open_db(_scale_path(directory), cache_size=SCALE_CACHE_SIZE)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    tree = conn.root()["tree"]
    scanned = total = 0
    began = clock()
    for key, value in tree.items():
        if key != _scale_key(value):
            raise AssertionError(f"scan found key {key} with value {value}")
        scanned += 1
        total += value
        if not scanned % per_commit:
            engine.incremental_gc(conn)
    elapsed = clock() - began
    peak = peak_rss_mb()
    if scanned != n or total != n * (n - 1) // 2:
        raise AssertionError(f"scan returned {scanned} items, expected {n}")
    manager.abort()
    conn.close()
    db.close()
    return {"scale_scan": n / elapsed, "scale_scan_rss": peak}
