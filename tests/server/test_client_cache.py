"""The client's record cache across restarts: kept where the server vouches for it, dropped
(with a warning) where it cannot be trusted, never serving a stale state."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from amberdb import DB, ClientStorage, FileStorage, PersistentMapping, StorageServer
from amberdb.storage.record_cache import CacheFileWarning
from tests.server.procs import count_single_loads


class Served:
    """A server on a FileStorage that can be stopped and started again on the same port."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.port = 0
        self.storage: FileStorage | None = None
        self.server: StorageServer | None = None
        self.start()

    def start(self) -> None:
        self.storage = FileStorage(self.path)
        self.server = StorageServer(self.storage, ("127.0.0.1", self.port)).start()
        self.port = self.server.address[1]  # type: ignore[index]

    def stop(self) -> None:
        assert self.server is not None and self.storage is not None
        self.server.close()
        self.storage.close()
        self.server = self.storage = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    running = Served(tmp_path / "data.fs")
    yield running
    if running.server is not None:
        running.stop()


def _fill(served: Served, count: int = 50) -> None:
    db = DB(ClientStorage(served.address))
    with db.transaction() as conn:
        conn.root.items = PersistentMapping({i: PersistentMapping(v=i) for i in range(count)})
    db.close()


def _values(storage: ClientStorage) -> dict[int, int]:
    db = DB(storage)
    conn = db.open()
    found = {key: item["v"] for key, item in conn.root()["items"].items()}
    conn.close()
    db.close()
    return found


def test_cache_file_survives_a_restart_and_drops_what_changed_meanwhile(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(served)
    cache = str(tmp_path / "client.cache")
    assert _values(ClientStorage(served.address, cache_path=cache)) == {i: i for i in range(50)}
    # While that client is away, another changes one object.
    db = DB(ClientStorage(served.address))
    with db.transaction() as conn:
        conn.root.items[7]["v"] = 700
    db.close()
    storage = ClientStorage(served.address, cache_path=cache)
    loads = count_single_loads(storage, monkeypatch)
    assert _values(storage) == {**{i: i for i in range(50)}, 7: 700}
    # Only the changed object came from the server; the rest from the cache file.
    assert len(loads) == 1


def test_cache_file_survives_a_server_restart(served: Served, tmp_path: Path) -> None:
    _fill(served)
    cache = str(tmp_path / "client.cache")
    assert _values(ClientStorage(served.address, cache_path=cache)) == {i: i for i in range(50)}
    served.stop()
    served.start()
    db = DB(ClientStorage(served.address))
    with db.transaction() as conn:
        conn.root.items[3]["v"] = 300
    db.close()
    assert _values(ClientStorage(served.address, cache_path=cache))[3] == 300


def test_a_cache_newer_than_a_restored_server_is_dropped_with_a_warning(
    served: Served, tmp_path: Path
) -> None:
    _fill(served)
    served.stop()
    backup = tmp_path / "backup.fs"
    shutil.copy(served.path, backup)
    served.start()
    cache = str(tmp_path / "client.cache")
    db = DB(ClientStorage(served.address, cache_path=cache))
    with db.transaction() as conn:
        conn.root.items[1]["v"] = 100  # only in the database that is about to be replaced
    db.close()
    served.stop()
    shutil.copy(backup, served.path)  # "restored from a backup"
    (tmp_path / "data.fs.index").unlink(missing_ok=True)
    served.start()
    with pytest.warns(CacheFileWarning, match="newer than the server's"):
        storage = ClientStorage(served.address, cache_path=cache)
    assert _values(storage)[1] == 1


def test_a_damaged_cache_file_is_dropped_with_a_warning(served: Served, tmp_path: Path) -> None:
    _fill(served)
    cache = tmp_path / "client.cache"
    _values(ClientStorage(served.address, cache_path=str(cache)))
    data = bytearray(cache.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cache.write_bytes(bytes(data))
    with pytest.warns(CacheFileWarning):
        storage = ClientStorage(served.address, cache_path=str(cache))
    assert _values(storage) == {i: i for i in range(50)}


def test_reconnecting_client_keeps_what_did_not_change(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(served)
    storage = ClientStorage(served.address, timeout=10)
    db = DB(storage)
    conn = db.open()
    assert sum(item["v"] for item in conn.root()["items"].values()) == sum(range(50))
    conn.transaction_manager.abort()
    served.stop()
    served.start()
    other = DB(ClientStorage(served.address))
    with other.transaction() as c:
        c.root.items[9]["v"] = 900
    other.close()
    loads = count_single_loads(storage, monkeypatch)
    conn.cache_minimize()
    conn.transaction_manager.begin()
    items = conn.root()["items"]
    assert {key: item["v"] for key, item in items.items()} == {**{i: i for i in range(50)}, 9: 900}
    # The root, the mapping and the changed item at most: the rest is still cached.
    assert len(loads) <= 3, loads
    conn.transaction_manager.abort()
    db.close()
