"""FileStorage's poll_invalidations against stores it refused, and a follower's memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from amberdb.exceptions import ConflictError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
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
