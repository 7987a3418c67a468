"""The server killed (SIGKILL) and restarted under its clients; persistent client caches
across restarts of everything."""

from __future__ import annotations

import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest

from tests.server.procs import Processes, finish, read_until

STREAM = """
import sys
import amberdb.transaction as transaction
from amberdb import ClientStorage, DB, PersistentMapping

port, count = int(sys.argv[1]), int(sys.argv[2])
db = DB(ClientStorage('127.0.0.1', port, timeout=15))
conn = db.open()
for attempt in transaction.attempts(5):
    with attempt:
        conn.root()['acks'] = PersistentMapping()
disconnects = 0
for n in range(count):
    for attempt in transaction.attempts(100):
        try:
            with attempt:
                conn.root()['acks'][str(n)] = n
                conn.root()['last'] = n
        except Exception as exc:
            print("ERROR", type(exc).__name__, exc, flush=True)
            raise
        if not attempt.succeeded:
            disconnects += 1
    print("ACK", n, flush=True)
print("DONE", disconnects, flush=True)
db.close()
"""


def test_server_sigkill_mid_stream_restart_nothing_acknowledged_lost(
    procs: Processes, tmp_path: Path
) -> None:
    import amberdb
    from amberdb import ClientStorage

    path = tmp_path / "data.fs"
    server = procs.serve(path)
    port = server.port
    count = 120
    client = procs.spawn(STREAM, str(port), str(count))
    read_until(client, "ACK 20", timeout=20)
    server.proc.send_signal(signal.SIGKILL)
    server.kill()
    time.sleep(0.3)  # the client's commits fail meanwhile and it retries, reconnecting
    server = procs.serve(path, listen=f"127.0.0.1:{port}")
    read_until(client, "ACK 60", timeout=30)
    server.proc.send_signal(signal.SIGKILL)  # and once more, at once
    server.kill()
    server = procs.serve(path, listen=f"127.0.0.1:{port}")
    status, out, err = finish(client, timeout=40)
    assert status == 0, out[-2000:] + err[-3000:]
    acked = [int(line.split()[1]) for line in out.splitlines() if line.startswith("ACK ")]
    assert acked == list(range(count))
    db = amberdb.DB(ClientStorage(server.address, timeout=10))
    try:
        with db.transaction() as conn:
            stored = dict(conn.root()["acks"])
            assert conn.root()["last"] == count - 1
        assert {int(k) for k in stored} >= set(acked)
        assert all(stored[str(n)] == n for n in acked)
    finally:
        db.close()


CACHED_READER = """
import sys, json
from amberdb import ClientStorage, DB
port, cache = int(sys.argv[1]), sys.argv[2]
db = DB(ClientStorage('127.0.0.1', port, cache_path=cache, timeout=10))
conn = db.open()
root = conn.root()
print(json.dumps({key: dict(root[key]) for key in sorted(root)}), flush=True)
db.close()
"""


def _write(address: tuple[str, int], values: dict[str, int]) -> None:
    import amberdb
    from amberdb import ClientStorage, PersistentMapping

    db = amberdb.DB(ClientStorage(address, timeout=10))
    try:
        with db.transaction() as conn:
            root = conn.root()
            for key, value in values.items():
                if key not in root:
                    root[key] = PersistentMapping()
                root[key]["v"] = value
    finally:
        db.close()


def test_persistent_client_cache_reloads_what_changed_while_away(procs: Processes, tmp_path: Path) -> None:
    import json

    path = tmp_path / "data.fs"
    cache = tmp_path / "client.cache"
    server = procs.serve(path)
    port = server.port
    _write(server.address, {f"k{i}": 0 for i in range(20)})
    first = procs.run(CACHED_READER, str(port), str(cache))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {f"k{i}": {"v": 0} for i in range(20)}
    assert cache.exists() and cache.stat().st_size > 0
    # Changed while the client is away; then the server dies and comes back.
    _write(server.address, {"k3": 3, "k7": 7})
    server.kill()
    server = procs.serve(path, listen=f"127.0.0.1:{port}")
    _write(server.address, {"k11": 11})
    second = procs.run(CACHED_READER, str(port), str(cache))
    assert second.returncode == 0, second.stderr
    expected = {f"k{i}": {"v": 0} for i in range(20)}
    expected.update(k3={"v": 3}, k7={"v": 7}, k11={"v": 11})
    assert json.loads(second.stdout) == expected
    # A client process SIGKILLed while it holds the cache, then objects change, then it returns.
    holder = procs.spawn(
        CACHED_READER.replace("db.close()", "import time; print('HELD', flush=True); time.sleep(60)"),
        str(port),
        str(cache),
    )
    read_until(holder, "HELD", timeout=20)
    holder.kill()
    holder.wait(10)
    _write(server.address, {"k0": 100, "k19": 119})
    third = procs.run(CACHED_READER, str(port), str(cache))
    assert third.returncode == 0, third.stderr
    expected.update(k0={"v": 100}, k19={"v": 119})
    assert json.loads(third.stdout) == expected


def test_cache_newer_than_a_restored_server_is_dropped(tmp_path: Path) -> None:
    """The server restored from a backup: a cache from the lost future is never trusted --
    neither when the server is behind it, nor after the restored server has committed past
    the cache's last tid (a tid this history never had)."""
    import amberdb
    from amberdb import ClientStorage, StorageServer
    from amberdb.storage.file import FileStorage
    from amberdb.storage.record_cache import CacheFileWarning

    path = tmp_path / "data.fs"
    backup = tmp_path / "backup.fs"
    cache = str(tmp_path / "client.cache")
    storage = FileStorage(path)
    with StorageServer(storage) as server:
        _write(server.address, {"a": 1, "b": 1})
        storage.close()
        shutil.copy(path, backup)
        storage = FileStorage(path)
    with StorageServer(storage) as server:
        _write(server.address, {"a": 2, "b": 2})
        db = amberdb.DB(ClientStorage(server.address, cache_path=cache, timeout=10))
        with db.transaction() as conn:
            assert conn.root()["a"]["v"] == 2 and conn.root()["b"]["v"] == 2
        db.close()
    storage.close()
    shutil.copy(backup, path)
    Path(f"{path}.index").unlink(missing_ok=True)
    storage = FileStorage(path)
    try:
        with StorageServer(storage, ("127.0.0.1", 0)) as server:
            # Restored, the server behind the cache (a copy of it: the client rewrites its own).
            behind = str(tmp_path / "behind.cache")
            shutil.copy(cache, behind)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                db = amberdb.DB(ClientStorage(server.address, cache_path=behind, timeout=10))
                try:
                    with db.transaction() as conn:
                        assert (conn.root()["a"]["v"], conn.root()["b"]["v"]) == (1, 1)
                finally:
                    db.close()
            assert any(issubclass(w.category, CacheFileWarning) for w in caught)
            # Restored, and then more commits than the lost ones: the server's last tid is past the cache's.
            _write(server.address, {"a": 5})
            _write(server.address, {"a": 6})
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                db = amberdb.DB(ClientStorage(server.address, cache_path=cache, timeout=10))
                try:
                    with db.transaction() as conn:
                        values = (conn.root()["a"]["v"], conn.root()["b"]["v"])
                finally:
                    db.close()
            assert values == (6, 1)
            assert any(issubclass(w.category, CacheFileWarning) for w in caught), [
                str(w.message) for w in caught
            ]
    finally:
        storage.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_file_is_dropped_not_trusted(tmp_path: Path, damage: str) -> None:
    import amberdb
    from amberdb import ClientStorage, StorageServer
    from amberdb.storage.file import FileStorage

    cache = tmp_path / "client.cache"
    storage = FileStorage(tmp_path / "data.fs")
    try:
        with StorageServer(storage) as server:
            _write(server.address, {f"k{i}": i for i in range(10)})
            db = amberdb.DB(ClientStorage(server.address, cache_path=str(cache), timeout=10))
            with db.transaction() as conn:
                assert [conn.root()[f"k{i}"]["v"] for i in range(10)] == list(range(10))
            db.close()
            data = cache.read_bytes()
            if damage == "garbage":
                cache.write_bytes(data[:64] + bytes(b ^ 0x5A for b in data[64:]))
            elif damage == "truncated":
                cache.write_bytes(data[: len(data) // 2])
            else:
                cache.write_bytes(b"")
            _write(server.address, {"k4": 44})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                db = amberdb.DB(ClientStorage(server.address, cache_path=str(cache), timeout=10))
                try:
                    with db.transaction() as conn:
                        values = [conn.root()[f"k{i}"]["v"] for i in range(10)]
                finally:
                    db.close()
            assert values == [0, 1, 2, 3, 44, 5, 6, 7, 8, 9]
    finally:
        storage.close()
