"""The client in this process against a StorageServer thread: prefetch, history, undo,
iterator and pack through the client, with another client holding objects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import ClientStorage, PersistentMapping, StorageServer
from amberdb.storage.file import FileStorage


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, int]]:
    storage = FileStorage(tmp_path / "data.fs")
    try:
        with StorageServer(storage) as server:
            address = server.address
            assert isinstance(address, tuple)
            yield address
    finally:
        storage.close()


def _db(address: tuple[str, int]) -> amberdb.DB:
    return amberdb.DB(ClientStorage(address, timeout=10))


def test_prefetch_loads_ghosts_in_one_batch(served: tuple[str, int]) -> None:
    db = _db(served)
    try:
        with db.transaction() as conn:
            conn.root()["items"] = [PersistentMapping(n=n) for n in range(300)]
    finally:
        db.close()
    reader = _db(served)
    try:
        storage = reader.storage
        assert isinstance(storage, ClientStorage)
        with reader.transaction() as conn:
            items = conn.root()["items"]
            loads = []
            original = storage._load_remote  # type: ignore[attr-defined]
            storage._load_remote = lambda oid, before: loads.append(oid) or original(oid, before)  # type: ignore[attr-defined]
            conn.prefetch(items)
            conn.prefetch(items)  # again: nothing left to ask
            conn.prefetch([], *(item._p_oid for item in items[:5]))
            assert [item["n"] for item in items] == list(range(300))
            assert loads == [], f"{len(loads)} objects loaded one by one after prefetch"
    finally:
        reader.close()


def test_history_undo_and_iterator_through_the_client(served: tuple[str, int]) -> None:
    db = _db(served)
    try:
        for value in range(4):
            with db.transaction() as conn:
                conn.root()["v"] = value
        history = db.history(amberdb.utils.z64, 10)
        assert len(history) == 5  # the root's creation and four changes
        log = db.undo_log(0, 20)
        assert len(log) >= 4
        db.undo(log[0]["id"])
        transaction.commit()
        with db.transaction() as conn:
            assert conn.root()["v"] == 2
        tids = [txn.tid for txn in db.storage.iterator()]
        assert tids == sorted(tids) and len(tids) == 6
        assert len(list(db.storage.iterator(tids[2], tids[3]))) == 2
    finally:
        db.close()


def test_pack_through_a_client_while_another_holds_objects(served: tuple[str, int]) -> None:
    writer, holder = _db(served), _db(served)
    try:
        with writer.transaction() as conn:
            conn.root()["keep"] = PersistentMapping(v=0)
            conn.root()["drop"] = PersistentMapping(v=0)
        for n in range(1, 6):
            with writer.transaction() as conn:
                conn.root()["keep"]["v"] = n
        tm = transaction.TransactionManager()
        held = holder.open(tm)
        dropped = held.root()["drop"]
        kept = held.root()["keep"]
        assert kept["v"] == 5 and dropped["v"] == 0
        with writer.transaction() as conn:
            del conn.root()["drop"]
        size_before = writer.storage_size()
        writer.pack()
        assert writer.storage_size() < size_before
        # The holder's snapshot predates the pack; it still reads what it held...
        assert kept["v"] == 5
        # ... and, in a new transaction, sees the packed database.
        tm.begin()
        assert "drop" not in held.root() and held.root()["keep"]["v"] == 5
        # Referring to a removed object again: refused (a retryable conflict) or stored
        # again -- never a dangling reference.
        try:
            held.root()["back"] = dropped
            tm.commit()
        except amberdb.exceptions.ConflictError:
            tm.abort()
        with tm:
            held.root()["keep"]["v"] = 6
        held.close()
        with writer.transaction() as conn:
            assert conn.root()["keep"]["v"] == 6
            if "back" in conn.root():
                assert conn.root()["back"]["v"] == 0  # stored again, whole
    finally:
        writer.close()
        holder.close()
