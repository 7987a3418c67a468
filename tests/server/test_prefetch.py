"""Prefetching over the network: Connection.prefetch and BTree range scans ask a
ClientStorage for many records in one batch instead of one round trip each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import amberdb.transaction as transaction
from amberdb import DB, ClientStorage, FileStorage, PersistentMapping, StorageServer
from amberdb.btrees import OOBTree
from tests.server.procs import count_single_loads


@pytest.fixture
def server(tmp_path: Path) -> Iterator[StorageServer]:
    storage = FileStorage(tmp_path / "data.fs")
    with StorageServer(storage) as running:
        yield running
    storage.close()


def test_connection_prefetch_fetches_ghosts_in_batches(
    server: StorageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = DB(ClientStorage(server.address))
    with db.transaction() as conn:
        conn.root.items = PersistentMapping({i: PersistentMapping(v=i) for i in range(300)})
    db.close()
    storage = ClientStorage(server.address)
    db = DB(storage)
    conn = db.open()
    assert conn.prefetches
    values = list(conn.root()["items"].values())
    loads = count_single_loads(storage, monkeypatch)
    conn.prefetch(values, [values[0]._p_oid])
    assert sum(item["v"] for item in values) == sum(range(300))
    assert len(loads) < 10, f"{len(loads)} of 300 objects were loaded one at a time"
    with pytest.raises(TypeError):
        conn.prefetch(b"short")
    with pytest.raises(TypeError):
        conn.prefetch(42)
    transaction.abort()
    db.close()


def test_prefetch_is_a_no_op_on_embedded_storages(tmp_path: Path) -> None:
    db = DB(FileStorage(tmp_path / "local.fs"))
    conn = db.open()
    assert not conn.prefetches
    conn.prefetch([conn.root()])
    conn.close()
    db.close()


def test_btree_range_scans_prefetch_their_buckets(
    server: StorageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = DB(ClientStorage(server.address))
    with db.transaction() as conn:
        tree = conn.root.tree = OOBTree()
        for i in range(20_000):
            tree[f"k{i:06d}"] = i
    db.close()
    storage = ClientStorage(server.address)
    db = DB(storage)
    conn = db.open()
    tree = conn.root()["tree"]
    loads = count_single_loads(storage, monkeypatch)
    assert list(tree.values(min="k001000", max="k015999")) == list(range(1000, 16000))
    buckets = storage.cache.misses
    assert len(loads) < max(10, buckets // 10), f"{len(loads)} single loads for about {buckets} records"
    # A whole scan (and len(), which reads every bucket) gives the same answers as without.
    assert len(tree) == 20_000
    assert sum(1 for _ in tree.items()) == 20_000
    transaction.abort()
    db.close()
