"""current_records on the embedded storages: the ordered walk of the offset index, bounded
memory per page over 200,000 objects, and a FileStorage follower answering as of its polls."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest

from amberdb.storage.file import FileStorage
from amberdb.storage.history import iter_current_records
from amberdb.storage.memory import MemoryStorage
from amberdb.storage.offsets import OffsetIndex
from amberdb.testing import commit
from amberdb.testing.history_suite import node
from amberdb.testing.storage_suite import all_current_records
from amberdb.utils import p64, z64

OBJECTS = 200_000
PAGE = 1000


@pytest.mark.parametrize("floating", [False, True])
def test_items_after_is_the_sorted_items_from_an_oid(floating: bool) -> None:
    rng = random.Random(7)
    index = OffsetIndex(floating)
    oids = {*range(5_000, 6_000), *rng.sample(range(6_000, 60_000), 500), *range(200_000, 200_010)}
    oids |= {1 << 40, (1 << 40) + 7, (1 << 62) + 1}  # overflow past the array
    for oid in rng.sample(sorted(oids), len(oids)):
        index[oid] = oid * 3
    if floating:
        index[17] = 51  # below a floating index's base: overflow too
        oids.add(17)
    items = sorted((oid, oid * 3 if oid != 17 else 51) for oid in oids)
    assert index.items_after(-1, len(items) + 5) == items
    for _ in range(300):
        after = rng.choice([-1, 0, 17, 4_999, 5_500, 59_999, 1 << 40, 1 << 63, rng.randrange(0, 1 << 41)])
        limit = rng.randrange(1, 2_000)
        assert index.items_after(after, limit) == [item for item in items if item[0] > after][:limit]
    # Changes to the overflow show in the next walk.
    del index[1 << 40]
    index[1 << 50] = 9
    assert index.items_after((1 << 40) - 1, 3) == [
        ((1 << 40) + 7, ((1 << 40) + 7) * 3),
        (1 << 50, 9),
        ((1 << 62) + 1, ((1 << 62) + 1) * 3),
    ]
    assert index.items_after(5, 0) == []


def _fill(storage: MemoryStorage | FileStorage) -> None:
    for start in range(0, OBJECTS, 50_000):
        commit(storage, {p64(n): (z64, b"record %08d" % n) for n in range(start, start + 50_000)})


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_page_costs_memory_for_the_page_not_the_database(kind: str, tmp_path: Path) -> None:
    storage: MemoryStorage | FileStorage = (
        MemoryStorage() if kind == "memory" else FileStorage(tmp_path / "data.fs")
    )
    try:
        _fill(storage)
        after = None
        peaks = []
        pages = 0
        tracemalloc.start()
        try:
            while True:
                before, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                page = storage.current_records(after, PAGE)
                _, peak = tracemalloc.get_traced_memory()
                peaks.append(peak - before)
                if not page:
                    break
                assert len(page) == PAGE and page[0][2] == b"record %08d" % (pages * PAGE)
                after = page[-1][0]
                pages += 1
                del page
        finally:
            tracemalloc.stop()
        assert pages == OBJECTS // PAGE
        # A page of 1000 small records is some 200 KB of tuples and bytes; the database's
        # records alone would be 30 times that.
        assert max(peaks) < 600_000, max(peaks)
        assert max(peaks[-10:]) < 2 * max(peaks[:10]) + 50_000  # the last pages cost the first's
    finally:
        storage.close()


def test_a_follower_lists_what_its_polls_took_in(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    a, e = p64(1), p64(5)
    root, a1, a2, e2 = node(b"r1", a), node(b"a1"), node(b"a2"), node(b"e2")
    writer = FileStorage(path)
    try:
        t1 = commit(writer, {z64: (z64, root), a: (z64, a1)})
        follower = FileStorage(path, read_only=True)
        try:
            assert all_current_records(follower, 1) == [(z64, t1, root), (a, t1, a1)]
            t2 = commit(writer, {a: (t1, a2), e: (z64, e2)})
            # Not polled yet: the follower's last tid is t1, and so are its records.
            assert follower.last_tid() == t1
            assert all_current_records(follower, 2) == [(z64, t1, root), (a, t1, a1)]
            follower.poll_invalidations(t1)
            assert list(iter_current_records(follower, batch=2)) == [
                (z64, t1, root),
                (a, t2, a2),
                (e, t2, e2),
            ]
            writer.pack(t2)  # e is garbage; the follower reads the packed file after its next poll
            assert all_current_records(writer, 1) == [(z64, t1, root), (a, t2, a2)]
            follower.poll_invalidations(t2)
            assert all_current_records(follower, 3) == [(z64, t1, root), (a, t2, a2)]
        finally:
            follower.close()
    finally:
        writer.close()
