"""CURRENT_RECORDS (protocol version 2): the server's caps and refusals, the broadcast rule,
and a client facing a version 1 server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import amberdb.server.server as server_module
from amberdb import ClientStorage, StorageServer
from amberdb.exceptions import StorageError
from amberdb.server import protocol
from amberdb.server.protocol import Kind
from amberdb.storage.file import FileStorage
from amberdb.storage.history import iter_current_records
from amberdb.storage.memory import MemoryStorage
from amberdb.testing import commit
from amberdb.utils import p64, z64


@pytest.fixture
def server(tmp_path: Path) -> Iterator[StorageServer]:
    storage = FileStorage(tmp_path / "data.fs")
    try:
        with StorageServer(storage) as running:
            yield running
    finally:
        storage.close()


@pytest.fixture
def client(server: StorageServer) -> Iterator[ClientStorage]:
    storage = ClientStorage(server.address, timeout=10)
    try:
        yield storage
    finally:
        storage.close()


def test_bad_arguments_get_an_error_reply_and_the_connection_stays(client: ClientStorage) -> None:
    tid = commit(client, {z64: (z64, b"root")})
    for fields, says in (
        ([None, 0], "limit must be an integer of at least 1"),
        ([None, -5], "limit must be an integer of at least 1"),
        ([None, "ten"], "limit must be an integer of at least 1"),
        ([b"short", 10], "after must be an oid"),
        ([7, 10], "after must be an oid"),
    ):
        with pytest.raises(StorageError, match=says):
            client._call(Kind.CURRENT_RECORDS, fields)  # type: ignore[arg-type]
    assert client.ping() == tid  # still connected
    with pytest.raises(ValueError):
        client.current_records(None, 0)
    assert client.current_records() == [(z64, tid, b"root")]


def test_the_server_caps_the_limit(client: ClientStorage) -> None:
    count = 10_050
    tid = commit(client, {p64(n): (z64, b"%d" % n) for n in range(count)})
    (entries,) = client._call(Kind.CURRENT_RECORDS, [None, 1 << 40])
    assert isinstance(entries, list) and len(entries) == 10_000
    page = client.current_records(None, 50_000)
    assert len(page) == 10_000 and page[-1] == (p64(9_999), tid, b"9999")
    assert len(list(iter_current_records(client, batch=50_000))) == count


def test_a_reply_carries_a_few_mib_at_most(client: ClientStorage) -> None:
    big = [b"%d" % n * (1 << 20) for n in range(1, 13)]  # 1..2 MiB each
    tid = commit(client, {p64(n): (z64, record) for n, record in enumerate(big)})
    page = client.current_records(None, 100)
    assert 0 < len(page) < len(big)
    assert sum(len(record) for _, _, record in page) < (4 << 20) + (2 << 20)
    assert list(iter_current_records(client, batch=100)) == [
        (p64(n), tid, record) for n, record in enumerate(big)
    ]


def test_records_are_as_of_the_last_broadcast_tid(tmp_path: Path) -> None:
    storage = MemoryStorage()
    with StorageServer(storage) as running:
        t1 = commit(storage, {z64: (z64, b"r1"), p64(1): (z64, b"a1")})
        # Committed past the server: not announced until its next publish.
        t2 = commit(storage, {p64(1): (t1, b"a2"), p64(2): (z64, b"b2")})
        assert running.broadcast_tid < t1
        assert running.current_records(None, 10, z64) == []
        assert running.current_records(None, 10, t1) == [[z64, t1, b"r1"], [p64(1), t1, b"a1"]]
        assert running.current_records(z64, 1, t2) == [[p64(1), t2, b"a2"]]


def test_a_version_1_server_makes_the_client_refuse_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that offers only version 1, as every server before CURRENT_RECORDS did.
    monkeypatch.setattr(server_module, "encode_hello", lambda: protocol.encode_hello(1))
    storage = FileStorage(tmp_path / "data.fs")
    try:
        with StorageServer(storage) as old:
            client = ClientStorage(old.address, timeout=10)
            try:
                tid = commit(client, {z64: (z64, b"root")})
                with pytest.raises(StorageError, match="cannot list its current records.*version 1"):
                    client.current_records()
                with pytest.raises(StorageError, match="cannot list its current records"):
                    list(iter_current_records(client))
                assert client.load(z64) == (b"root", tid)  # the connection is unharmed
            finally:
                client.close()
    finally:
        storage.close()


def test_a_storage_without_the_capability_is_named(tmp_path: Path) -> None:
    class Bare:
        name = "bare"

    with pytest.raises(StorageError, match="storage bare cannot list its current records"):
        list(iter_current_records(Bare()))  # type: ignore[arg-type]


def test_the_server_accepts_both_hello_versions() -> None:
    assert protocol.OLDEST_PROTOCOL_VERSION == 1 and protocol.PROTOCOL_VERSION == 2
    assert protocol.decode_hello(protocol.encode_hello()[4:]) == 2
