"""A follower beside the torn tail a dead writer left: polls must not keep reading it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amberdb.storage.file import FileStorage
from amberdb.storage.file import storage as storage_module
from amberdb.testing import commit
from amberdb.utils import z64


def test_polls_beside_a_dead_writers_torn_stream_read_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defect: a writer killed while streaming a big transaction leaves a zero header and
    # the bytes behind it until the next writer opens the file and cuts them.  Meanwhile
    # every poll of every follower -- every transaction.begin() of every connection --
    # scanned the whole torn stream again (72 MiB read per poll for a 64 MiB stream).
    path = tmp_path / "data.fs"
    with FileStorage(path) as writer:
        t1 = commit(writer, {z64: (z64, b"root")})
    follower = FileStorage(path, read_only=True)
    with open(path, "ab") as file:  # what the killed writer left: no valid transaction
        file.write(bytes(32) + os.urandom(1 << 16) * 64)
    scans: list[int] = []
    real_scan = storage_module.scan
    monkeypatch.setattr(storage_module, "scan", lambda *args: scans.append(1) or real_scan(*args))
    for _ in range(5):
        assert follower.poll_invalidations(t1) == (t1, ())
    assert len(scans) == 1, f"{len(scans)} scans of the same torn tail"
    # The next writer cuts the torn tail and commits: the follower sees it at once.
    with FileStorage(path) as writer:
        t2 = commit(writer, {z64: (t1, b"root 2")})
        assert follower.poll_invalidations(t1) == (t2, {z64})
        assert follower.load(z64) == (b"root 2", t2)
    follower.close()
