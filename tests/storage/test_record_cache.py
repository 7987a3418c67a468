"""RecordCache: exact answers against a model of revisions, hostile files, threads."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from amberdb.storage.record_cache import (
    ENTRY_OVERHEAD,
    FORMAT_VERSION,
    MAGIC,
    CacheFileWarning,
    RecordCache,
)
from amberdb.utils import p64, u64, z64

# -- helpers ----------------------------------------------------------------------------------


def contents(cache: RecordCache) -> list[tuple[bytes, bytes, bytes | None, bytes]]:
    """Every cached revision, least recently used first (white box: the file keeps this order)."""
    return [(e.oid, e.start, e.end, e.record) for e in cache._lru]


def assert_empty(cache: RecordCache) -> None:
    assert len(cache) == 0
    assert cache.used == 0
    assert cache.last_tid == z64
    assert cache.database_id == b""


def seal(body: bytes) -> bytes:
    """A file body with the digest the reader expects: for files whose content is hostile."""
    return body + hashlib.sha256(body).digest()


def header(last_tid: bytes = p64(50), database_id: bytes = b"db", version: int = FORMAT_VERSION) -> bytes:
    return struct.pack(">8sI8sH", MAGIC, version, last_tid, len(database_id)) + database_id


def entry(oid: int, start: int, end: int | None, record: bytes, length: int | None = None) -> bytes:
    n = len(record) if length is None else length
    return struct.pack(">8s8s8sI", p64(oid), p64(start), z64 if end is None else p64(end), n) + record


def open_warned(path: Path, size: int = 1 << 20, match: str = "") -> RecordCache:
    with pytest.warns(CacheFileWarning, match=match) as caught:
        cache = RecordCache(size, path)
    assert str(path) in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the code that made the cache
    return cache


# -- the model --------------------------------------------------------------------------------

OIDS = st.integers(0, 5)
SIZES = st.sampled_from([0, ENTRY_OVERHEAD + 40, 3 * ENTRY_OVERHEAD, 8 * ENTRY_OVERHEAD, 1 << 20])


def record_of(oid: int, tid: int, length: int) -> bytes:
    # Unique per revision, so any wrong answer shows.
    return (b"%d@%d:" % (oid, tid)).ljust(length, b".")


class CacheVsHistory(RuleBasedStateMachine):
    """A server's history of commits; the cache is fed true facts about it, and is always
    right when it answers.

    The server may be ahead of the cache: its commits wait in ``pending`` until their
    invalidations are delivered, one transaction at a time, in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="recordcache")
        self.path = os.path.join(self.directory, "cache")
        self.history: dict[int, list[tuple[int, bytes]]] = {}  # oid -> [(start, record)], ascending
        self.server_last = 0
        self.cache_last = 0
        self.pending: list[tuple[int, list[int]]] = []
        self.cache = RecordCache(0)

    @initialize(size=SIZES)
    def make(self, size: int) -> None:
        self.size = size
        self.cache.close()
        self.cache = RecordCache(size, self.path)

    def teardown(self) -> None:
        self.cache.close()
        shutil.rmtree(self.directory)

    # What the server knows.

    def revision_before(self, oid: int, before: int) -> tuple[int, bytes] | None:
        found = None
        for start, record in self.history.get(oid, []):
            if start < before:
                found = (start, record)
        return found

    @rule(oids=st.sets(OIDS, min_size=1, max_size=3), gap=st.integers(1, 3), length=st.integers(0, 200))
    def commit(self, oids: set[int], gap: int, length: int) -> None:
        tid = max(self.server_last, self.cache_last) + gap
        for oid in oids:
            self.history.setdefault(oid, []).append((tid, record_of(oid, tid, length)))
        self.server_last = tid
        self.pending.append((tid, sorted(oids)))

    # Facts fed to the cache.

    @precondition(lambda self: self.pending)
    @rule()
    def deliver_invalidation(self) -> None:
        tid, oids = self.pending.pop(0)
        self.cache.invalidate(p64(tid), [p64(oid) for oid in oids])
        self.cache_last = tid

    @rule(gap=st.integers(0, 2))
    def quiet_advance(self, gap: int) -> None:
        # Nothing committed between the cache's last tid and the next pending commit.
        limit = self.pending[0][0] - 1 if self.pending else self.server_last + 2
        tid = min(self.cache_last + gap, limit)
        if tid < self.cache_last:
            return
        self.cache.last_tid = p64(tid)
        self.cache_last = tid

    @rule(oid=OIDS, newest=st.booleans())
    def store_current(self, oid: int, newest: bool) -> None:
        # ``newest``: the server's current revision, which may be ahead of the cache (the
        # race store must refuse); otherwise the revision current as of the cache's last tid.
        found = self.revision_before(oid, self.server_last + 1 if newest else self.cache_last + 1)
        if found is None:
            return
        start, record = found
        before = len(self.cache)
        self.cache.store(p64(oid), p64(start), record)
        if start > self.cache_last:
            assert len(self.cache) <= before
            assert self.cache.load(p64(oid)) is None or self.cache.load(p64(oid)) != (record, p64(start))

    @rule(oid=OIDS, index=st.integers(0, 10))
    def store_old(self, oid: int, index: int) -> None:
        revisions = self.history.get(oid, [])
        if index + 1 >= len(revisions):
            return
        (start, record), (end, _) = revisions[index], revisions[index + 1]
        self.cache.store(p64(oid), p64(start), record, end=p64(end))

    @rule(oid=OIDS, tid=st.integers(1, 40), end=st.integers(0, 40))
    def store_rejects_empty_ranges(self, oid: int, tid: int, end: int) -> None:
        if end > tid:
            return
        with pytest.raises(ValueError, match="must end after it starts"):
            self.cache.store(p64(oid), p64(tid), b"x", end=p64(end))

    @rule(oids=st.sets(OIDS, max_size=3))
    def drop(self, oids: set[int]) -> None:
        self.cache.drop(p64(oid) for oid in oids)
        for oid in oids:
            assert self.cache.load(p64(oid)) is None
            assert self.cache.load_before(p64(oid), p64(self.server_last + 5)) is None

    @rule(keep_position=st.booleans())
    def clear(self, keep_position: bool) -> None:
        tid = self.cache_last if keep_position else 0
        self.cache.clear(b"other", p64(tid))
        self.cache_last = tid
        assert len(self.cache) == 0
        assert self.cache.used == 0
        assert self.cache.database_id == b"other"

    @rule()
    def invalidate_backwards_is_refused(self) -> None:
        if self.cache_last == 0:
            return
        held = contents(self.cache)
        with pytest.raises(ValueError, match="older than"):
            self.cache.invalidate(p64(self.cache_last - 1), [p64(0)])
        assert contents(self.cache) == held

    @rule()
    def save_and_reopen(self) -> None:
        held = contents(self.cache)
        database_id, last_tid = self.cache.database_id, self.cache.last_tid
        self.cache.close()
        assert stat.S_IMODE(os.stat(self.path).st_mode) == 0o600
        self.cache = RecordCache(self.size, self.path)
        assert contents(self.cache) == held
        assert (self.cache.database_id, self.cache.last_tid) == (database_id, last_tid)

    # Answers.

    @rule(oid=OIDS)
    def load(self, oid: int) -> None:
        answer = self.cache.load(p64(oid))
        if answer is not None:
            truth = self.revision_before(oid, self.cache_last + 1)
            assert truth is not None
            assert answer == (truth[1], p64(truth[0]))

    @rule(oid=OIDS, before=st.integers(0, 60))
    def load_before(self, oid: int, before: int) -> None:
        answer = self.cache.load_before(p64(oid), p64(before))
        if answer is not None:
            truth = self.revision_before(oid, before)
            assert truth is not None
            assert answer == (truth[1], p64(truth[0]))

    @invariant()
    def accounting(self) -> None:
        held = contents(self.cache)
        assert len({(oid, start) for oid, start, *_ in held}) == len(held)  # each revision once
        assert self.cache.used == sum(len(record) + ENTRY_OVERHEAD for *_, record in held)
        assert self.cache.used <= self.cache.size
        assert len(self.cache) == len(held)
        assert u64(self.cache.last_tid) == self.cache_last


TestCacheVsHistory = CacheVsHistory.TestCase
TestCacheVsHistory.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


# -- plain behaviour --------------------------------------------------------------------------


def test_hits_and_misses() -> None:
    cache = RecordCache()
    cache.last_tid = p64(10)
    assert cache.load(p64(1)) is None
    cache.store(p64(1), p64(7), b"seven")
    assert cache.load(p64(1)) == (b"seven", p64(7))
    assert cache.load_before(p64(1), p64(7)) is None  # snapshots below 7 do not see it
    assert cache.load_before(p64(1), p64(11)) == (b"seven", p64(7))
    assert cache.load_before(p64(1), p64(12)) is None  # beyond what the cache knows
    cache.invalidate(p64(12), [p64(1)])
    assert cache.load(p64(1)) is None
    assert cache.load_before(p64(1), p64(12)) == (b"seven", p64(7))
    assert cache.load_before(p64(1), p64(13)) is None
    assert (cache.hits, cache.misses) == (3, 5)
    assert len(cache) == 1
    assert cache.used == 5 + ENTRY_OVERHEAD
    cache.close()


def test_current_store_ahead_of_invalidations_is_refused() -> None:
    cache = RecordCache()
    cache.last_tid = p64(10)
    cache.store(p64(1), p64(11), b"from a transaction whose invalidation is on its way")
    assert len(cache) == 0
    cache.invalidate(p64(11), [p64(1)])
    cache.store(p64(1), p64(11), b"now it is current")
    assert cache.load(p64(1)) == (b"now it is current", p64(11))
    cache.close()


def test_stale_current_store_of_an_ended_revision_is_refused() -> None:
    cache = RecordCache()
    cache.last_tid = p64(10)
    cache.store(p64(1), p64(5), b"five")
    cache.invalidate(p64(12), [p64(1)])
    cache.store(p64(1), p64(5), b"five")  # read from the server before the invalidation
    assert cache.load(p64(1)) is None
    cache.store(p64(1), p64(12), b"twelve")
    cache.store(p64(1), p64(3), b"three")  # older than the current entry: ignored
    assert cache.load(p64(1)) == (b"twelve", p64(12))
    cache.close()


def test_a_revision_known_old_then_stored_current_is_held_once(tmp_path: Path) -> None:
    cache = RecordCache(path=tmp_path / "cache")
    cache.last_tid = p64(10)
    cache.store(p64(1), p64(5), b"five", end=p64(12))  # the server is ahead of the cache
    cache.store(p64(1), p64(5), b"five")
    cache.store(p64(1), p64(5), b"five", end=p64(12))  # the current entry already answers
    assert contents(cache) == [(p64(1), p64(5), None, b"five")]
    cache.invalidate(p64(12), [p64(1)])
    assert contents(cache) == [(p64(1), p64(5), p64(12), b"five")]
    cache.close()
    again = RecordCache(path=tmp_path / "cache")
    assert again.load_before(p64(1), p64(12)) == (b"five", p64(5))
    again.close()


def test_the_revision_an_invalidation_wrote_stays_current() -> None:
    cache = RecordCache()
    cache.last_tid = p64(12)
    cache.store(p64(1), p64(12), b"twelve")
    cache.invalidate(p64(12), [p64(1)])
    assert cache.load(p64(1)) == (b"twelve", p64(12))
    cache.close()


def test_eviction_is_least_recently_used_and_by_bytes() -> None:
    cache = RecordCache(3 * (ENTRY_OVERHEAD + 10))
    cache.last_tid = p64(1)
    for oid in range(3):
        cache.store(p64(oid), p64(1), b"%010d" % oid)
    assert cache.load(p64(0)) is not None  # 1 is now the least recently used
    cache.store(p64(3), p64(1), b"%010d" % 3)
    assert [u64(oid) for oid, *_ in contents(cache)] == [2, 0, 3]
    cache.store(p64(4), p64(1), b"x" * (cache.size - ENTRY_OVERHEAD + 1))  # bigger than everything
    assert len(cache) == 3
    cache.store(p64(0), p64(1), b"y" * (cache.size - ENTRY_OVERHEAD))  # fills it alone
    assert [u64(oid) for oid, *_ in contents(cache)] == [0]
    assert cache.used == cache.size
    cache.close()


def test_a_too_big_current_store_still_forgets_the_older_current_entry() -> None:
    cache = RecordCache(ENTRY_OVERHEAD + 10)
    cache.last_tid = p64(9)
    cache.store(p64(1), p64(3), b"three")
    cache.store(p64(1), p64(9), b"x" * 100)
    assert cache.load(p64(1)) is None
    cache.close()


def test_bad_arguments() -> None:
    cache = RecordCache()
    with pytest.raises(ValueError, match="negative"):
        RecordCache(-1)
    with pytest.raises(ValueError, match="8 bytes"):
        cache.store(b"short", z64, b"")
    with pytest.raises(ValueError, match="8 bytes"):
        cache.load_before(z64, b"\1")
    with pytest.raises(ValueError, match="database_id"):
        cache.database_id = b"x" * 1025
    with pytest.raises(ValueError, match="older than"):
        cache.last_tid = p64(5)
        cache.last_tid = p64(4)
    cache.close()


def test_closed_cache_raises_and_close_is_idempotent(tmp_path: Path) -> None:
    cache = RecordCache(path=tmp_path / "c")
    cache.last_tid = p64(3)
    cache.store(p64(1), p64(3), b"r")
    cache.close()
    cache.close()
    assert len(cache) == 0
    for call in (
        lambda: cache.load(p64(1)),
        lambda: cache.load_before(p64(1), p64(2)),
        lambda: cache.store(p64(1), p64(1), b""),
        lambda: cache.invalidate(p64(4), []),
        lambda: cache.drop([]),
        lambda: cache.clear(),
        cache.save,
    ):
        with pytest.raises(ValueError, match="closed"):
            call()
    reopened = RecordCache(path=tmp_path / "c")
    assert reopened.load(p64(1)) == (b"r", p64(3))
    reopened.close()


def test_memory_only_save_is_a_no_op() -> None:
    cache = RecordCache()
    cache.save()
    assert not cache.writes_file
    cache.close()


def test_missing_file_is_fine_and_save_creates_it_private(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    cache = RecordCache(path=path)
    assert_empty(cache)
    cache.database_id = b"the database"
    cache.last_tid = p64(9)
    cache.store(p64(1), p64(9), b"a")
    cache.store(p64(2), p64(3), b"b", end=p64(8))
    cache.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cache.close()
    again = RecordCache(path=str(path))
    assert again.database_id == b"the database"
    assert again.last_tid == p64(9)
    assert again.load(p64(1)) == (b"a", p64(9))
    assert again.load_before(p64(2), p64(5)) == (b"b", p64(3))
    again.close()


def test_a_smaller_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    big = RecordCache(10 * ENTRY_OVERHEAD, path)
    big.last_tid = p64(1)
    for oid in range(5):
        big.store(p64(oid), p64(1), b"")
    big.close()
    small = RecordCache(2 * ENTRY_OVERHEAD, path)
    assert [u64(oid) for oid, *_ in contents(small)][-2:] == [3, 4]
    assert small.used <= small.size
    small.close()


def test_a_smaller_cache_skips_an_entry_bigger_than_itself_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    big = RecordCache(10 * ENTRY_OVERHEAD, path)
    big.last_tid = p64(1)
    big.store(p64(1), p64(1), b"small")
    big.store(p64(2), p64(1), b"x" * ENTRY_OVERHEAD)  # the most recently used
    big.close()
    small = RecordCache(ENTRY_OVERHEAD + 100, path)
    assert [u64(oid) for oid, *_ in contents(small)] == [1]
    small.close()


# -- damaged and hostile files ------------------------------------------------------------------


def small_file(tmp_path: Path) -> tuple[Path, list[tuple[bytes, bytes, bytes | None, bytes]]]:
    path = tmp_path / "original"
    cache = RecordCache(path=path)
    cache.database_id = b"id"
    cache.last_tid = p64(20)
    cache.store(p64(1), p64(20), b"one")
    cache.store(p64(2), p64(4), b"two, old", end=p64(9))
    cache.store(p64(3), p64(10), b"")
    held = contents(cache)
    cache.close()
    return path, held


def test_every_flipped_byte_and_every_truncation_gives_a_warning_and_an_empty_cache(tmp_path: Path) -> None:
    path, _ = small_file(tmp_path)
    data = path.read_bytes()
    assert 100 < len(data) < 300
    damaged = tmp_path / "damaged"
    variants = [data[:i] for i in range(len(data))]
    variants += [
        data[:i] + bytes([data[i] ^ flip]) + data[i + 1 :] for i in range(len(data)) for flip in (1, 0xFF)
    ]
    for variant in variants:
        damaged.write_bytes(variant)
        cache = open_warned(damaged)
        assert_empty(cache)
        cache.close()


def test_an_intact_copy_reads_back_exactly(tmp_path: Path) -> None:
    path, held = small_file(tmp_path)
    copy = tmp_path / "copy"
    copy.write_bytes(path.read_bytes())
    cache = RecordCache(path=copy)
    assert contents(cache) == held
    assert (cache.database_id, cache.last_tid) == (b"id", p64(20))
    cache.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=400), prefix=st.sampled_from([b"", MAGIC, header()]))
def test_random_garbage_gives_a_warning(tmp_path: Path, garbage: bytes, prefix: bytes) -> None:
    path = tmp_path / "garbage"
    path.write_bytes(prefix + garbage)
    cache = open_warned(path)
    assert_empty(cache)
    cache.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300), size=st.sampled_from([0, ENTRY_OVERHEAD + 50, 1 << 20]))
def test_sealed_hostile_entries_load_soundly_or_warn(tmp_path: Path, body: bytes, size: int) -> None:
    # The digest matches, so only the parser's own checks stand between the bytes and the cache.
    path = tmp_path / "hostile"
    path.write_bytes(seal(header() + body))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = RecordCache(size, path)
    assert all(issubclass(w.category, CacheFileWarning) for w in caught)
    if caught:
        assert_empty(cache)
    held = contents(cache)
    assert cache.used == sum(len(record) + ENTRY_OVERHEAD for *_, record in held) <= size
    for _oid, start, end, _ in held:
        assert (end is None and start <= cache.last_tid) or (end is not None and start < end)
    cache.close()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (entry(1, 5, None, b"", length=2**32 - 1), "claims 4294967295 bytes"),
        (entry(1, 5, None, b"abc", length=4), "claims 4 bytes"),
        (entry(1, 5, None, b"r")[:20], "cut short"),
        (entry(1, 60, None, b"r"), "current entry .* impossible"),  # current beyond last_tid
        (entry(1, 5, None, b"r") + entry(1, 6, None, b"s"), "current entry .* impossible"),
        (entry(1, 5, 5, b"r"), "old entry .* impossible"),
        (entry(1, 5, 7, b"r") + entry(1, 5, 8, b"s"), "old entry .* impossible"),
        (entry(1, 5, None, b"r") + entry(1, 5, 8, b"s"), "both current and old"),
    ],
)
def test_sealed_impossible_files(tmp_path: Path, body: bytes, match: str) -> None:
    path = tmp_path / "hostile"
    path.write_bytes(seal(header() + body))
    cache = open_warned(path, match=match)
    assert_empty(cache)
    cache.close()


def test_a_future_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future"
    path.write_bytes(seal(header(version=FORMAT_VERSION + 1) + entry(1, 5, None, b"r")))
    cache = open_warned(path, match=f"format version {FORMAT_VERSION + 1}")
    assert_empty(cache)
    cache.close()


def test_an_impossible_database_id_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "id"
    path.write_bytes(seal(struct.pack(">8sI8sH", MAGIC, FORMAT_VERSION, z64, 2000) + b"x" * 2000))
    cache = open_warned(path, size=1 << 20, match="database id length 2000")
    assert_empty(cache)
    cache.close()


def test_a_file_longer_than_the_size_allows_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(seal(header() + entry(1, 5, None, b"r" * 5000)))
    cache = open_warned(path, size=1000, match="more than a cache of size 1000")
    assert_empty(cache)
    cache.close()


def test_an_unreadable_path_warns(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    cache = open_warned(tmp_path / "dir", match="not a regular file")
    assert_empty(cache)
    cache.close()
    os.mkfifo(tmp_path / "fifo")
    fifo = open_warned(tmp_path / "fifo", match="not a regular file")
    assert not fifo.writes_file
    fifo.close()
    nowhere = open_warned(tmp_path / "missing" / "cache", match="lock file cannot be opened")
    assert not nowhere.writes_file
    nowhere.close()


def test_a_second_cache_on_the_same_file_runs_in_memory_only(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    first = RecordCache(path=path)
    first.last_tid = p64(5)
    first.store(p64(1), p64(5), b"first's")
    first.save()
    saved = path.read_bytes()
    second = open_warned(path, match="another cache .* has it open")
    assert_empty(second)
    assert not second.writes_file
    second.last_tid = p64(7)
    second.store(p64(2), p64(7), b"second's")
    assert second.load(p64(2)) == (b"second's", p64(7))
    second.save()
    second.close()
    assert path.read_bytes() == saved
    first.close()
    third = RecordCache(path=path)
    assert third.load(p64(1)) == (b"first's", p64(5))
    assert third.load(p64(2)) is None
    third.close()


def test_a_cache_held_by_another_process_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from amberdb.storage.record_cache import RecordCache; "
            "c = RecordCache(path=sys.argv[1]); print('ready', flush=True); sys.stdin.read(); c.close()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"ready\n"
        cache = open_warned(path, match="another cache")
        assert not cache.writes_file
        cache.close()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        assert holder.stdout is not None
        holder.stdout.close()
    cache = RecordCache(path=path)  # the lock went with the process
    assert cache.writes_file
    cache.close()


# -- threads ------------------------------------------------------------------------------------


def test_threads_never_see_a_wrong_answer(tmp_path: Path) -> None:
    """Loaders, storers, a committer and a saver at once; every answer is checked against the
    history, which only grows.

    Current stores and invalidations are ordered by the caller's own lock, as store's
    docstring asks; loads, old-revision stores, drops and saves take no lock but the cache's.
    """
    cache = RecordCache(40 * (ENTRY_OVERHEAD + 20), tmp_path / "cache")
    history: dict[int, list[tuple[int, bytes]]] = {oid: [] for oid in range(20)}
    history_lock = threading.Lock()
    caller_lock = threading.Lock()
    last = [0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def revisions(oid: int) -> list[tuple[int, bytes]]:
        with history_lock:
            return list(history[oid])

    def committer() -> None:
        for tid in range(1, 400):
            with caller_lock:
                oids = [(tid * 7 + k) % 20 for k in range(tid % 3 + 1)]
                with history_lock:
                    for oid in oids:
                        history[oid].append((tid, record_of(oid, tid, 20)))
                    last[0] = tid
                cache.invalidate(p64(tid), [p64(oid) for oid in oids])
            time.sleep(0.001)  # let the workers find something cached between commits
        stop.set()

    def worker(seed: int) -> None:
        chance = random.Random(seed)
        while not stop.is_set():
            step = chance.randrange(1 << 30)
            oid = chance.randrange(20)
            action = chance.randrange(5)
            if action == 0:
                with caller_lock:
                    known = revisions(oid)
                    if known:
                        cache.store(p64(oid), p64(known[-1][0]), known[-1][1])
            elif action == 1:
                known = revisions(oid)
                if len(known) >= 2:
                    i = step % (len(known) - 1)
                    cache.store(p64(oid), p64(known[i][0]), known[i][1], end=p64(known[i + 1][0]))
            elif action == 2:
                seen = u64(cache.last_tid)
                answer = cache.load(p64(oid))
                if answer is not None:
                    record, start = answer
                    known = revisions(oid)
                    assert (u64(start), record) in known
                    later = [t for t, _ in known if t > u64(start)]
                    assert not later or later[0] > seen  # it was current at some moment of the load
            elif action == 3:
                before = step % (last[0] + 2) + 1
                answer = cache.load_before(p64(oid), p64(before))
                if answer is not None:
                    truth = [(t, r) for t, r in revisions(oid) if t < before]
                    assert truth and answer == (truth[-1][1], p64(truth[-1][0]))
            elif step % 20 == 0:
                cache.drop([p64(oid)])
            elif step % 50 == 1:
                cache.save()

    def guarded(target: object, *args: int) -> None:
        try:
            target(*args)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=guarded, args=(committer,))]
    threads += [threading.Thread(target=guarded, args=(worker, seed)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert cache.hits > 100
    cache.close()
