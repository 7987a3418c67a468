"""FileStorage's poll_invalidations against stores it refused, and a follower's memory."""

from __future__ import annotations

import tracemalloc
from collections import deque
from pathlib import Path

import pytest

from amberdb.exceptions import ConflictError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.file import storage as storage_module
from amberdb.testing import commit
from amberdb.utils import p64, z64


def test_a_store_refused_as_a_conflict_is_not_reported_as_changed(tmp_path: Path) -> None:
    # Defect: FileStorage.store noted the oid as changed before checking its base tid, so a
    # poll reported an oid that a refused (conflicting) store never wrote -- the kit's own
    # state machine (tests/storage/test_conformance.py::TestFileStorage::test_state_machine)
    # failed on it now and then: begin, a stale store, vote, finish, poll.
    with FileStorage(tmp_path / "data.fs") as storage:
        t1 = commit(storage, {z64: (z64, b"a"), p64(1): (z64, b"b")})
        t2 = commit(storage, {z64: (t1, b"a2")})
        storage.begin(TransactionMeta())
        with pytest.raises(ConflictError):
            storage.store(z64, t1, b"stale")  # refused: the transaction stays open without it
        storage.store(p64(1), t1, b"b2")
        storage.vote()
        t3 = storage.finish()
        assert storage.poll_invalidations(t2) == (t3, {p64(1)})


def test_the_poll_window_costs_the_memory_it_is_sized_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defect: _POLL_WINDOW ("about this many oids in all, 8 bytes each": 8 MiB) counted one
    # unit per remembered transaction besides its oids, but an entry (tid bytes, array,
    # tuple, deque slot) costs ~200 bytes: a writer or follower of a file of small commits
    # held ~110 MiB (1-oid transactions) to ~180 MiB (transactions only creating objects)
    # for polls, per process.
    window = 2048
    monkeypatch.setattr(storage_module, "_POLL_WINDOW", window)
    with FileStorage(tmp_path / "data.fs", fsync=False) as storage:
        first = last = commit(storage, {z64: (z64, b"r")})
        recent: deque[bytes] = deque(maxlen=20)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(4000):
                last = commit(storage, {z64: (last, b"r")})
                recent.append(last)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held < 3 * window * 8, f"{held} bytes held for a window of {window} oids"
        # Recent snapshots still get exact answers; old ones are told to forget everything.
        assert storage.poll_invalidations(recent[0]) == (last, {z64})
        assert storage.poll_invalidations(first) == (last, None)
