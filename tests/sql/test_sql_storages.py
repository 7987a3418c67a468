"""What both SQL storages promise beyond the conformance kit: the versioned schema, the refs
column and pack inside the database, batched prefetch, the record cache, copy between every
kind of storage, and what users see in URIs, reprs and errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import amberdb
from amberdb import DB, PersistentList, PersistentMapping, open_storage
from amberdb.exceptions import StorageError
from amberdb.record import references
from amberdb.storage.base import Storage
from amberdb.storage.sql import core
from amberdb.storage.sql.core import SQLStorage, to_sql
from amberdb.testing.pgcluster import PostgreSQLCluster


@pytest.fixture(params=["sqlite", "postgresql"])
def uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URI of a new, empty database of each SQL kind."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'db.sqlite'}"
    cluster: PostgreSQLCluster = request.getfixturevalue("pg_cluster")
    database: str = request.getfixturevalue("pg_database")
    return f"postgresql://{cluster.user}@{cluster.host}:{cluster.port}/{database}"


def _raw(storage: Storage, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    assert isinstance(storage, SQLStorage)

    def run(cursor: Any) -> list[Any]:
        cursor.execute(storage._sql(sql), params)
        return list(cursor.fetchall()) if cursor.description else []

    return storage._read(run, "a test's query")


def _fill(db: DB) -> None:
    with db.transaction() as conn:
        conn.root.items = PersistentList(PersistentMapping(n=i) for i in range(20))
        conn.root.name = "filled"


def test_the_schema_is_versioned_and_a_newer_one_is_refused(uri: str) -> None:
    storage = open_storage(uri)
    assert isinstance(storage, SQLStorage)
    assert storage.schema_version() == core.SCHEMA_VERSION
    _raw(storage, "UPDATE amberdb_schema SET value = '99' WHERE name = 'version'")
    storage.close()
    with pytest.raises(StorageError, match=r"schema version 99, newer than .* upgrade AmberDB"):
        open_storage(uri)


def test_an_older_schema_is_upgraded_only_when_asked(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    DB(uri).close()
    steps: list[int] = []

    def step(storage: SQLStorage, cursor: Any) -> None:
        steps.append(1)
        cursor.execute("CREATE TABLE amberdb_upgrade_check (x INTEGER)")

    monkeypatch.setattr(core, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(core.UPGRADES, 1, step)
    with pytest.raises(StorageError, match=r"schema version 1, older than .* 'amberdb upgrade-schema URI'"):
        open_storage(uri)
    assert steps == []
    assert core.upgrade_schema(uri) == (1, 2)
    assert core.upgrade_schema(uri) == (2, 2)
    assert steps == [1]
    storage = open_storage(uri)
    assert isinstance(storage, SQLStorage)
    assert storage.schema_version() == 2
    assert _raw(storage, "SELECT count(*) FROM amberdb_upgrade_check") == [(0,)]
    storage.close()


def test_upgrade_schema_from_the_command_line(uri: str) -> None:
    DB(uri).close()
    done = subprocess.run(
        [sys.executable, "-m", "amberdb", "upgrade-schema", uri], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "version 1 already" in done.stdout


def test_a_history_mode_mismatch_is_refused_clearly(uri: str) -> None:
    DB(uri).close()
    with pytest.raises(StorageError, match=r"history-preserving database but was opened with history=false"):
        open_storage(uri + "?history=false")


def test_a_read_only_storage_creates_nothing(uri: str) -> None:
    with pytest.raises((StorageError, FileNotFoundError), match=r"creates none"):
        open_storage(uri, read_only=True)


def test_refs_hold_each_records_references_and_pack_reads_no_record(uri: str) -> None:
    db = DB(uri)
    _fill(db)
    with db.transaction() as conn:
        del conn.root.items[5:]
    storage = db.storage
    for zoid, state, refs in _raw(storage, "SELECT zoid, state, refs FROM amberdb_object"):
        expected = [to_sql(oid) for oid in references(bytes(state))]
        stored = refs if isinstance(refs, list) else __import__("json").loads(refs)
        assert stored == expected, zoid
    assert isinstance(storage, SQLStorage)

    def no_loads(*args: object, **kwargs: object) -> None:
        raise AssertionError("pack shipped a record to Python")

    storage.load = no_loads  # type: ignore[method-assign]
    storage.prefetch = no_loads  # type: ignore[method-assign]
    try:
        db.pack()
    finally:
        del storage.load, storage.prefetch
    with db.transaction() as conn:
        assert [item["n"] for item in conn.root.items] == [0, 1, 2, 3, 4]
    assert len(storage) == 1 + 1 + 5
    db.close()


def test_prefetch_fills_the_cache_in_one_query(uri: str) -> None:
    db = DB(uri)
    _fill(db)
    db.close()
    storage = open_storage(uri)
    assert isinstance(storage, SQLStorage)
    oids = [from_row for (from_row,) in _raw(storage, "SELECT DISTINCT zoid FROM amberdb_object")]
    queries: list[str] = []
    real = storage._read_for_load

    def counted(action: Any, doing: str) -> Any:
        queries.append(doing)
        return real(action, doing)

    storage._read_for_load = counted  # type: ignore[method-assign]
    storage.prefetch([core.from_sql(zoid) for zoid in oids])
    assert len(queries) == 1
    for zoid in oids:
        storage.load(core.from_sql(zoid))
    assert len(queries) == 1, "a load after prefetch went to the database"
    storage.close()


def test_the_cache_file_is_used_again_and_refreshed(uri: str, tmp_path: Path) -> None:
    cache = tmp_path / "records.cache"
    db = DB(uri)
    _fill(db)
    db.close()
    warm = open_storage(f"{uri}{'&' if '?' in uri else '?'}cache_path={cache}")
    db = DB(warm)
    with db.transaction() as conn:
        assert len(conn.root.items) == 20
    db.close()
    assert cache.exists()
    # Another process changes one object while no cache is open.
    other = DB(uri)
    with other.transaction() as conn:
        conn.root.items[3]["n"] = "changed"
    other.close()
    again = open_storage(f"{uri}{'&' if '?' in uri else '?'}cache_path={cache}")
    assert isinstance(again, SQLStorage)
    assert len(again.record_cache) > 0
    db = DB(again)
    with db.transaction() as conn:
        assert conn.root.items[3]["n"] == "changed"
        assert conn.root.items[4]["n"] == 4
    assert again.record_cache.hits > 0
    db.close()


def test_names_reprs_and_errors_never_show_a_password(
    pg_cluster: PostgreSQLCluster, pg_database: str
) -> None:
    secret = "s3cr3t-Pa55"
    uri = f"postgresql://{pg_cluster.user}:{secret}@{pg_cluster.host}:{pg_cluster.port}/{pg_database}"
    storage = open_storage(uri)
    assert secret not in storage.name and secret not in repr(storage)
    storage.close()
    with pytest.raises(ValueError) as bad_option:
        open_storage(uri + "?cache_size=lots")
    assert secret not in str(bad_option.value)
    wrong_port = f"postgresql://{pg_cluster.user}:{secret}@{pg_cluster.host}:1/{pg_database}"
    with pytest.raises(StorageError) as unreachable:
        amberdb.PostgreSQLStorage(wrong_port, connect_timeout=2)
    assert secret not in str(unreachable.value)


def test_a_finished_read_leaves_the_session_idle(pg_cluster: PostgreSQLCluster, pg_database: str) -> None:
    uri = f"postgresql://{pg_cluster.user}@{pg_cluster.host}:{pg_cluster.port}/{pg_database}"
    db = DB(uri)
    _fill(db)
    conn = db.open()
    assert [item["n"] for item in conn.root.items] == list(range(20))
    conn.transaction_manager.commit()
    states = pg_cluster.psql(
        f"SELECT state FROM pg_stat_activity WHERE application_name = 'amberdb' AND datname = '{pg_database}'"
    ).split()
    assert states and set(states) == {"idle"}, states
    timeout = pg_cluster.psql(
        "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'", pg_database
    )
    assert timeout == "0"  # the server's default: the storage sets its own per session
    conn.close()
    db.close()


@pytest.fixture
def filled_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "source.fs"
    db = DB(path)
    _fill(db)
    for i in range(5):
        with db.transaction() as conn:
            conn.transaction_manager.get().note(f"step {i}")
            conn.root.items[i]["n"] = -i
    db.close()
    yield path


def _iterated(uri: str) -> list[Any]:
    storage = open_storage(uri, read_only=True)
    try:
        return [
            (txn.tid, txn.meta, sorted((r.oid, r.tid, r.record) for r in txn.records))
            for txn in storage.iterator()
        ]
    finally:
        storage.close()


def test_copy_file_to_postgresql_to_sqlite_to_file_keeps_every_transaction(
    filled_file: Path, pg_cluster: PostgreSQLCluster, pg_database: str, tmp_path: Path
) -> None:
    postgresql = f"postgresql://{pg_cluster.user}@{pg_cluster.host}:{pg_cluster.port}/{pg_database}"
    sqlite = f"sqlite://{tmp_path / 'copy.sqlite'}"
    back = str(tmp_path / "back.fs")
    for source, destination in ((str(filled_file), postgresql), (postgresql, sqlite), (sqlite, back)):
        done = subprocess.run(
            [sys.executable, "-m", "amberdb", "copy", source, destination],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ},
        )
        assert done.returncode == 0, done.stdout + done.stderr
    expected = _iterated(str(filled_file))
    assert len(expected) == 7
    for uri in (postgresql, sqlite, back):
        assert _iterated(uri) == expected, uri
