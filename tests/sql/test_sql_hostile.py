"""Hostile tests of the SQL storages (issue 14): what someone else wrote into the tables, what a
caller passes in, protocol misuse from threads and forked children, and caches that outlive the
data they came from.

Every test stands for a promise: no record exhausts memory or crashes the process, nothing
committed is lost or silently wrong, errors name what is wrong (table, oid, tid), big
transactions run in bounded memory, DSN passwords are never shown, SQL is never injected.  A test marked
``xfail(strict=True, reason="bug: ...")`` shows a defect: it fails now and passes once fixed.
Raw SQL goes through a driver connection of its own (never through the storage under test).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

import amberdb
from amberdb import DB, PersistentList, PersistentMapping, open_storage
from amberdb.exceptions import (
    POSKeyError,
    StorageError,
    StorageForkedError,
    StorageTransactionError,
)
from amberdb.storage.base import TransactionMeta
from amberdb.storage.memory import MemoryStorage
from amberdb.storage.sql.core import SQLStorage, to_sql
from amberdb.testing.pgcluster import PostgreSQLCluster
from amberdb.utils import oid_repr, p64, u64, z64

MAX_SQL = (1 << 63) - 1
_SRC = str(Path(amberdb.__file__).resolve().parents[1])


# -- where the data lives ---------------------------------------------------------------------------


@dataclass
class Target:
    """One empty database of one kind: open storages on it and run raw SQL against it."""

    kind: str
    where: str  # the SQLite file, or a libpq DSN
    uri: str
    opened: list[SQLStorage] = field(default_factory=list)

    def open(self, **options: Any) -> SQLStorage:
        cls = amberdb.SQLiteStorage if self.kind == "sqlite" else amberdb.PostgreSQLStorage
        storage = cls(self.where, **options)
        self.opened.append(storage)
        return storage

    def sql(self, text: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """One statement (``%s`` placeholders) on a connection of its own, autocommitted."""
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.where, isolation_level=None, timeout=10)
            try:
                return conn.execute(text.replace("%s", "?"), params).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.where, autocommit=True) as pg:
            cursor = pg.execute(text, params)
            return cursor.fetchall() if cursor.description else []

    def recreate_table(self, table: str, columns: str) -> None:
        """Make ``table`` again with ``columns`` (dropping its constraints), keeping its rows."""
        self.sql(f"CREATE TABLE hostile_copy ({columns})")
        self.sql(f"INSERT INTO hostile_copy SELECT * FROM {table}")
        self.sql(f"DROP TABLE {table}")
        self.sql(f"ALTER TABLE hostile_copy RENAME TO {table}")


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """An empty database of each kind; every storage opened through it is closed after the test."""
    if request.param == "sqlite":
        path = str(tmp_path / "db.sqlite")
        found = Target("sqlite", path, f"sqlite://{path}")
    else:
        cluster: PostgreSQLCluster = request.getfixturevalue("pg_cluster")
        database: str = request.getfixturevalue("pg_database")
        uri = f"postgresql://{cluster.user}@{cluster.host}:{cluster.port}/{database}"
        found = Target("postgresql", cluster.dsn(database), uri)
    yield found
    for storage in found.opened:
        with contextlib.suppress(Exception):
            storage.close()
    with warnings.catch_warnings():
        # Connections a failing read dropped (see test_a_read_that_fails_in_python_keeps_no_connection)
        # are collected here, not in whichever later test the garbage collector happens to run.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def kinds(*, both: str | None = None, sqlite: str | None = None, postgresql: str | None = None) -> Any:
    """Run a test on both kinds, as an expected failure (a known bug) where a reason is given."""
    sqlite, postgresql = sqlite or both, postgresql or both

    def one(kind: str, bug: str | None) -> Any:
        marks = [pytest.mark.xfail(strict=True, reason=f"bug: {bug}")] if bug else []
        return pytest.param(kind, marks=marks, id=kind)

    return pytest.mark.parametrize(
        "target", [one("sqlite", sqlite), one("postgresql", postgresql)], indirect=True
    )


def commit(
    storage: Any,
    *stores: tuple[bytes, bytes, bytes],
    meta: TransactionMeta | None = None,
    tid: bytes | None = None,
) -> bytes:
    """Commit ``(oid, base_tid, record)`` stores in one transaction; abort it if anything fails."""
    storage.begin(meta or TransactionMeta(), tid=tid)
    try:
        for oid, base, record in stores:
            storage.store(oid, base, record)
        storage.vote()
        return storage.finish()  # type: ignore[no-any-return]
    except BaseException:
        storage.abort()
        raise


def tree(storage: SQLStorage) -> tuple[DB, bytes, bytes]:
    """A database whose root reaches a child that reaches a grandchild (real records); returns
    the DB and the child's and grandchild's oids."""
    db = DB(storage)
    with db.transaction() as conn:
        conn.root.child = PersistentMapping(n=1)
        conn.root.child["grand"] = PersistentMapping(n=2)
    with db.transaction() as conn:
        conn.root.child["n"] = 3
        child, grand = conn.root.child._p_oid, conn.root.child["grand"]._p_oid
    return db, child, grand


def _env() -> dict[str, str]:
    """The environment of a child interpreter that imports this checkout's amberdb."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([_SRC, os.environ.get("PYTHONPATH", "")])}


def python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (that imports this checkout's amberdb)."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def amberdb_cli(*args: str) -> None:
    """Run the ``amberdb`` command line, which must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "amberdb", *args], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert done.returncode == 0, done.stdout + done.stderr


_OPEN = """
import resource, sys, amberdb
kind, where = sys.argv[1], sys.argv[2]
cls = amberdb.SQLiteStorage if kind == "sqlite" else amberdb.PostgreSQLStorage

def peak():
    # The peak RSS of this process image in bytes.  Not getrusage's ru_maxrss: Linux carries the
    # parent's high-water mark over fork and exec, so a child of a big test process starts "peaked".
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""


# -- hostile rows -------------------------------------------------------------------------------------

OID = p64(0x1234)


@pytest.mark.parametrize("value", [5, "text"], ids=["integer", "text"])
def test_sqlite_a_state_that_is_not_a_blob_is_refused_naming_the_row(tmp_path: Path, value: Any) -> None:
    target = Target("sqlite", str(tmp_path / "db.sqlite"), "")
    storage = target.open()
    tid = commit(storage, (OID, z64, b"record"))
    target.sql("UPDATE amberdb_object SET state = %s WHERE zoid = %s", (value, to_sql(OID)))
    fresh = target.open(cache_size=0)
    with pytest.raises(StorageError, match=oid_repr(OID)):
        fresh.load(OID)
    with pytest.raises(StorageError, match=oid_repr(OID)):
        fresh.load(OID, p64(u64(tid) + 1))
    with pytest.raises(StorageError, match=oid_repr(OID)):
        list(fresh.iterator())


@kinds()
def test_a_null_state_is_refused_naming_the_row(target: Target) -> None:
    storage = target.open()
    commit(storage, (OID, z64, b"record"))
    if target.kind == "sqlite":
        target.recreate_table(
            "amberdb_object", "zoid INTEGER NOT NULL, tid INTEGER NOT NULL, state BLOB, refs TEXT"
        )
    else:
        target.sql("ALTER TABLE amberdb_object ALTER COLUMN state DROP NOT NULL")
    target.sql("UPDATE amberdb_object SET state = NULL WHERE zoid = %s", (to_sql(OID),))
    fresh = target.open(cache_size=0)
    for read in (lambda: fresh.load(OID), lambda: list(fresh.iterator()), lambda: fresh.history(OID)):
        with pytest.raises(StorageError, match=oid_repr(OID)):
            read()


_TRUSTS_REFS = (
    "pack trusts the refs column over the record header: a row whose refs lies ([]) loses what its"
    " record reaches"
)


@pytest.mark.parametrize(
    ("target", "refs"),
    [
        *(
            pytest.param(
                "sqlite",
                refs,
                id=f"sqlite-{refs}",
            )
            for refs in ("'[null]'", "'[1.5]'", "'[\"abc\"]'", "'{}'", "'[[1]]'")
        ),
        pytest.param(
            "sqlite",
            "'[]'",
            marks=pytest.mark.xfail(strict=True, reason=f"bug: {_TRUSTS_REFS}"),
            id="sqlite-lie",
        ),
        pytest.param(
            "postgresql",
            "'{}'::bigint[]",
            marks=pytest.mark.xfail(strict=True, reason=f"bug: {_TRUSTS_REFS}"),
            id="postgresql-lie",
        ),
        pytest.param("sqlite", "'not json'", id="sqlite-not-json"),
        pytest.param("postgresql", "ARRAY[NULL]::bigint[]", id="postgresql-null-element"),
    ],
    indirect=["target"],
)
def test_pack_never_drops_an_object_a_record_reaches_whatever_the_refs_column_holds(
    target: Target, refs: str
) -> None:
    db, child, grand = tree(target.open())
    storage = db.storage
    target.sql(f"UPDATE amberdb_object SET refs = {refs} WHERE zoid = %s", (to_sql(child),))
    with contextlib.suppress(StorageError):  # refusing to pack is fine
        storage.pack(time.time() + 60)
    fresh = target.open(cache_size=0)
    for oid in (z64, child, grand):
        fresh.load(oid)  # POSKeyError: pack deleted an object the root reaches
    db.close()


@kinds()
def test_pack_refusing_garbage_refs_names_the_row(target: Target) -> None:
    db, child, _ = tree(target.open())
    garbage = "'not json'" if target.kind == "sqlite" else "ARRAY[1, NULL]::bigint[]"
    target.sql(f"UPDATE amberdb_object SET refs = {garbage} WHERE zoid = %s", (to_sql(child),))
    with pytest.raises(StorageError, match=rf"oid {oid_repr(child)}\b"):
        db.storage.pack(time.time() + 60)
    db.close()


def test_extreme_and_empty_transaction_rows_are_read_as_they_are(target: Target) -> None:
    storage = target.open()
    first = commit(storage, (z64, z64, b"root"))
    # A transaction row without objects, then one at the top of the tid range.
    middle = p64(u64(first) + 5)
    for tid in (to_sql(middle), MAX_SQL):
        target.sql(
            "INSERT INTO amberdb_transaction (tid, username, description, extension) VALUES (%s, %s, %s, %s)",
            (tid, b"someone", b"else", b""),
        )
    newest, oids = storage.poll_invalidations(first)
    assert newest == b"\xff" * 8
    assert oids is not None and list(oids) == []
    assert [(txn.tid, len(txn.records)) for txn in storage.iterator()] == [
        (first, 1),
        (middle, 0),
        (b"\xff" * 8, 0),
    ]
    with pytest.raises(StorageError, match="no tid left"):
        commit(storage, (z64, first, b"again"))
    assert storage.load(z64) == (b"root", first)
    assert target.open().load(z64) == (b"root", first)


@kinds()
def test_a_revision_without_its_transaction_row_is_not_silently_left_out_of_a_copy(target: Target) -> None:
    storage = target.open()
    first = commit(storage, (z64, z64, b"root-1"))
    commit(storage, (z64, first, b"root-2"))
    orphan = p64(42)
    target.sql(
        "INSERT INTO amberdb_object (zoid, tid, state, refs) VALUES (%s, %s, %s, NULL)",
        (to_sql(orphan), to_sql(first) + 1, b"orphan"),
    )
    fresh = target.open(cache_size=0)
    assert fresh.load(orphan)[0] == b"orphan"
    copy = MemoryStorage()
    try:
        copy.copy_transactions_from(fresh)
    except StorageError as refused:
        assert oid_repr(orphan) in str(refused)
        return
    assert copy.load(orphan)[0] == b"orphan"


# -- hostile amberdb_schema and amberdb_oid -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "opened_with_history"),
    [
        pytest.param(
            "history",
            "maybe",
            False,
            id="history-maybe",
        ),
        pytest.param(
            "history",
            None,
            False,
            id="history-missing",
        ),
        pytest.param(
            "packed_tid",
            "zz",
            True,
            id="packed-not-hex",
        ),
        pytest.param(
            "packed_tid",
            "ab",
            True,
            id="packed-short",
        ),
        pytest.param(
            "database_id",
            None,
            True,
            id="database-id-missing",
        ),
        pytest.param("version", "abc", True, id="version-abc"),
        pytest.param("version", "1; DROP TABLE amberdb_object", True, id="version-injection"),
        pytest.param("version", None, True, id="version-missing"),
    ],
)
def test_garbage_in_amberdb_schema_is_refused_at_open_naming_the_row(
    target: Target, name: str, value: str | None, opened_with_history: bool
) -> None:
    storage = target.open()
    tid = commit(storage, (z64, z64, b"root"))
    storage.close()
    if value is None:
        target.sql("DELETE FROM amberdb_schema WHERE name = %s", (name,))
    else:
        target.sql("UPDATE amberdb_schema SET value = %s WHERE name = %s", (value, name))
    with pytest.raises(StorageError, match=name):
        target.open(history=opened_with_history)
    assert target.sql("SELECT count(*) FROM amberdb_object WHERE tid = %s", (to_sql(tid),)) == [(1,)]


@kinds()
def test_a_duplicated_schema_row_is_refused(target: Target) -> None:
    target.open().close()
    target.recreate_table("amberdb_schema", "name TEXT, value TEXT")
    target.sql("INSERT INTO amberdb_schema (name, value) VALUES ('history', 'false')")
    with pytest.raises(StorageError, match="history"):
        target.open(history=False)


@kinds()
def test_garbage_written_into_amberdb_schema_while_open_gives_storage_errors(target: Target) -> None:
    storage = target.open()
    tid = commit(storage, (z64, z64, b"root"))
    target.sql("UPDATE amberdb_schema SET value = 'zz' WHERE name = 'packed_tid'")
    with pytest.raises(StorageError, match="packed_tid"):
        storage.poll_invalidations(tid)


def test_a_read_that_fails_in_python_keeps_no_connection(pg_dsn: str) -> None:
    target = Target("postgresql", pg_dsn, "")
    storage = target.open()
    try:
        tid = commit(storage, (z64, z64, b"root"))
        target.sql("UPDATE amberdb_schema SET value = 'zz' WHERE name = 'packed_tid'")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                with contextlib.suppress(Exception):
                    storage.poll_invalidations(tid)
            gc.collect()
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert not leaked, leaked
    finally:
        storage.close()


def test_a_database_id_changed_while_open_is_reported_by_the_next_poll(target: Target) -> None:
    storage = target.open()
    tid = commit(storage, (z64, z64, b"root"))
    target.sql("UPDATE amberdb_schema SET value = 'f00d' WHERE name = 'database_id'")
    with pytest.raises(StorageError, match=r"replaced .* to f00d"):
        storage.poll_invalidations(tid)


@kinds()
def test_a_commit_after_the_database_was_replaced_is_refused(target: Target) -> None:
    storage = target.open()
    commit(storage, (z64, z64, b"root"))
    target.sql("UPDATE amberdb_schema SET value = 'f00d' WHERE name = 'database_id'")
    with pytest.raises(StorageError, match="replaced"):
        commit(storage, (OID, z64, b"into the replacement"))
    assert target.sql("SELECT count(*) FROM amberdb_object WHERE zoid = %s", (to_sql(OID),)) == [(0,)]


@pytest.mark.parametrize(
    ("table", "operation"),
    [
        ("amberdb_object", "load"),
        ("amberdb_object", "commit"),
        ("amberdb_object", "pack"),
        ("amberdb_transaction", "poll"),
        ("amberdb_transaction", "commit"),
        ("amberdb_transaction", "iterator"),
        ("amberdb_schema", "poll"),
        ("amberdb_oid", "new_oid"),
    ],
)
def test_a_table_dropped_while_open_gives_a_storage_error_naming_it(
    target: Target, table: str, operation: str
) -> None:
    storage = target.open()
    tid = commit(storage, (z64, z64, b"root"))
    assert storage.load(z64) == (b"root", tid)  # now cached
    target.sql(f"DROP TABLE {table}")
    run: dict[str, Callable[[], object]] = {
        "load": lambda: storage.load(OID),
        "commit": lambda: commit(storage, (OID, z64, b"x")),
        "pack": lambda: storage.pack(tid),
        "poll": lambda: storage.poll_invalidations(tid),
        "iterator": lambda: list(storage.iterator()),
        "new_oid": lambda: [storage.new_oid() for _ in range(200)],
    }
    with pytest.raises(StorageError, match=table):
        run[operation]()
    assert storage.load(z64) == (b"root", tid)  # the cache still answers; the storage still works


@kinds()
def test_an_empty_oid_table_gives_a_storage_error_naming_it(target: Target) -> None:
    storage = target.open()
    target.sql("DELETE FROM amberdb_oid")
    with pytest.raises(StorageError, match="amberdb_oid"):
        storage.new_oid()


@pytest.mark.parametrize(
    ("target", "restored"),
    [
        pytest.param(kind, restored, id=f"{kind}-{name}")
        for kind in ("sqlite", "postgresql")
        for name, restored in (("near-the-top", [(1 << 63) - 64]), ("the-top", [150, (1 << 63) - 1]))
    ],
    indirect=["target"],
)
def test_oids_stored_by_a_restore_are_never_handed_out_again(target: Target, restored: list[int]) -> None:
    storage = target.open()
    first = commit(storage, (z64, z64, b"root"))
    high = [p64(oid) for oid in restored]
    commit(storage, *[(oid, z64, oid) for oid in high], tid=p64(u64(first) + 1))
    fresh = target.open(cache_size=0)
    for oid in high:
        assert fresh.load(oid)[0] == oid
    handed: list[bytes] = []
    with contextlib.suppress(StorageError):  # oids used up: said clearly, fine
        for _ in range(250):
            handed.append(fresh.new_oid())
    assert len(set(handed)) == len(handed), "new_oid handed out an oid twice"
    assert not set(handed) & {z64, *high}, "new_oid handed out an oid that has a record"


@pytest.mark.parametrize("target", ["sqlite", "postgresql"], indirect=True)
def test_an_oid_above_2_63_is_refused_as_filestorage_refuses_it(target: Target) -> None:
    storage = target.open()
    first = commit(storage, (z64, z64, b"root"))
    storage.begin(TransactionMeta(), tid=p64(u64(first) + 1))
    with pytest.raises(ValueError, match=r"above 2\*\*63-1"):
        storage.store(p64(1 << 63), z64, b"too high")
    storage.abort()
    assert storage.last_tid() == first


# -- hostile input through the API --------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "history=maybe",
        "history=",
        "history=true&history=false",
        "cache_size=-5",
        "cache_size=lots",
        "lock_timeout=soon",
    ],
)
def test_bad_uri_options_are_refused_naming_the_option(target: Target, query: str) -> None:
    key = query.split("=")[0].replace("_", "[_ ]")
    with pytest.raises(ValueError, match=key):
        open_storage(f"{target.uri}?{query}")


def test_history_and_cache_size_arguments_are_checked(target: Target) -> None:
    with pytest.raises(TypeError, match="history"):
        target.open(history="false")
    with pytest.raises(ValueError, match="negative"):
        target.open(cache_size=-1)


@pytest.mark.parametrize(
    ("target", "value"),
    [
        pytest.param(
            kind,
            value,
            id=f"{kind}-{value}",
        )
        for kind in ("sqlite", "postgresql")
        for value in (-1.0, math.nan, math.inf)
    ],
    indirect=["target"],
)
def test_a_lock_timeout_that_is_not_a_positive_number_is_refused_naming_it(
    target: Target, value: float
) -> None:
    try:
        with pytest.raises(ValueError, match="lock_timeout"):
            target.open(lock_timeout=value)
    finally:
        with warnings.catch_warnings():
            # (Today PostgreSQL leaks the connection whose settings failed: see the next test.)
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def test_postgresql_a_connection_whose_settings_fail_is_closed(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    def refused(self: Any, conn: Any, write: bool) -> None:
        raise psycopg.errors.InvalidParameterValue("idle_in_transaction_session_timeout refused")

    monkeypatch.setattr(amberdb.PostgreSQLStorage, "_configure", refused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(StorageError, match="idle_in_transaction_session_timeout"):
            amberdb.PostgreSQLStorage(pg_dsn)
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked, leaked


def test_postgresql_lock_timeout_zero_never_waits_forever(pg_dsn: str) -> None:
    holder = amberdb.PostgreSQLStorage(pg_dsn)
    try:
        try:
            waiter = amberdb.PostgreSQLStorage(pg_dsn, lock_timeout=0)
        except ValueError:
            return  # refused: fine
        try:
            commit(holder, (z64, z64, b"root"))
            holder.begin(TransactionMeta())
            holder.store(OID, z64, b"holder")
            holder.vote()
            outcome: dict[str, object] = {}

            def wait() -> None:
                try:
                    outcome["tid"] = commit(waiter, (p64(7), z64, b"waiter"))
                except StorageError as exc:
                    outcome["error"] = exc

            thread = threading.Thread(target=wait)
            thread.start()
            thread.join(3)
            still_waiting = thread.is_alive()
            holder.abort()
            thread.join(10)
            assert not still_waiting, "lock_timeout=0 waited more than 3 s for the commit lock"
        finally:
            waiter.close()
    finally:
        holder.close()


def test_postgresql_committers_reaching_the_same_tables_through_different_search_paths_share_the_lock(
    pg_dsn: str,
) -> None:
    plain = amberdb.PostgreSQLStorage(pg_dsn)
    first = commit(plain, (z64, z64, b"root"))
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA elsewhere")  # empty: the tables are still found in public
    detour = amberdb.PostgreSQLStorage(pg_dsn + " options='-csearch_path=elsewhere,public'")
    try:
        assert detour.load(z64) == (b"root", first)
        # Oids from new_oid: below amberdb_oid's counter, so no vote updates (and row-locks) it.
        mine, theirs = plain.new_oid(), detour.new_oid()
        plain.begin(TransactionMeta())
        plain.store(mine, z64, b"plain")
        plain.vote()
        outcome: dict[str, object] = {}

        def other() -> None:
            outcome["tid"] = commit(detour, (theirs, z64, b"detour"))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(1.5)
        blocked = thread.is_alive()
        plain_tid = plain.finish()
        thread.join(10)
        assert blocked, "the second committer voted while the first held the commit lock"
        assert plain_tid < outcome["tid"]  # type: ignore[operator]
    finally:
        detour.close()
        plain.close()


def test_postgresql_uri_options_cannot_inject_sql(
    pg_cluster: PostgreSQLCluster, pg_database: str, pg_dsn: str
) -> None:
    base = f"postgresql://{pg_cluster.user}@{pg_cluster.host}:{pg_cluster.port}/{pg_database}"
    amberdb.PostgreSQLStorage(pg_dsn).close()
    for options in (
        "-csearch_path%3Dpublic%27%3B%20DROP%20TABLE%20amberdb_object%3B--",
        "-csearch_path%3D%22x%22%22%3B%20DROP%20TABLE%20amberdb_object%3B%20--%22",
    ):
        with pytest.raises(StorageError):
            open_storage(f"{base}?options={options}&connect_timeout=5")
    storage = amberdb.PostgreSQLStorage(pg_dsn)
    assert len(storage) == 0  # amberdb_object is still there
    storage.close()


def test_postgresql_unix_socket_uri_opens(pg_cluster: PostgreSQLCluster, pg_database: str) -> None:
    socket = quote(str(pg_cluster.socket_dir), safe="")
    uri = f"postgresql:///{pg_database}?host={socket}&port={pg_cluster.port}&user={pg_cluster.user}"
    storage = open_storage(uri)
    storage.close()


@pytest.mark.parametrize(
    "dsn",
    [
        pytest.param(
            "postgresql://someone:s3cr3t%ZZpart@127.0.0.1:1/db",
            id="bad-percent-escape",
        ),
        pytest.param(
            "host=127.0.0.1 port=1 password=s3cr3t secretpart dbname=db",
            id="unquoted-space",
        ),
        pytest.param("postgresql://someone@127.0.0.1:1/db?password=s3cr3tsecretpart", id="query-password"),
        pytest.param("host=127.0.0.1 port=1 password=s3cr3tsecretpart dbname=db", id="keyword-password"),
    ],
)
def test_postgresql_errors_never_show_a_password(pg_cluster: PostgreSQLCluster, dsn: str) -> None:
    with pytest.raises((StorageError, ValueError)) as failed:
        amberdb.PostgreSQLStorage(dsn, connect_timeout=2)
    shown = "".join(traceback.format_exception(failed.value))
    assert "s3cr3t" not in shown and "secretpart" not in shown, shown


@pytest.mark.parametrize(
    ("name", "decoy"), [("db#1.sqlite", "db"), ("db?x=1.sqlite", "db"), ("100%41.sqlite", "100A.sqlite")]
)
def test_a_read_only_sqlite_storage_opens_its_own_file_whatever_its_name(
    tmp_path: Path, name: str, decoy: str
) -> None:
    for file, root in ((decoy, b"decoy"), (name, b"real")):
        storage = amberdb.SQLiteStorage(tmp_path / file)
        commit(storage, (z64, z64, root))
        storage.close()
    reader = amberdb.SQLiteStorage(tmp_path / name, read_only=True)
    try:
        assert reader.load(z64)[0] == b"real"
    finally:
        reader.close()


def test_sqlite_paths_with_odd_characters_work_through_uris(tmp_path: Path) -> None:
    folder = tmp_path / 'we\'ird "dir" #1 ?x=1 100%41 \u00fc\u65e5'
    folder.mkdir()
    path = folder / "d\u00e9j\u00e0 vu.sqlite"
    storage = open_storage("sqlite://" + quote(str(path)))
    tid = commit(storage, (z64, z64, b"root"))
    storage.close()
    assert path.exists()
    reader = open_storage("sqlite://" + quote(str(path)) + "?history=true")
    assert reader.load(z64) == (b"root", tid)
    reader.close()


def test_odd_metadata_and_empty_and_big_records_round_trip(target: Target) -> None:
    meta = TransactionMeta(
        user="a\x00b\udcff'; DROP TABLE amberdb_object; --",
        description="\ud800lone surrogate\x00",
        extension=b"\x00\xff" * (4 << 20),
    )
    big = os.urandom(50 << 20)
    storage = target.open(cache_size=0)
    tid = commit(storage, (z64, z64, b""), (OID, z64, big), meta=meta)
    del storage
    fresh = target.open(cache_size=0)
    assert fresh.load(z64) == (b"", tid)
    assert fresh.load(OID) == (big, tid)
    del big
    (txn,) = list(fresh.iterator())
    assert txn.meta == meta
    assert fresh.undo_log()[0].meta == meta
    assert fresh.history(z64)[0].meta == meta and fresh.history(z64)[0].size == 0
    with pytest.raises(StorageError, match=rf"oid {oid_repr(z64)} .* no readable header"):
        fresh.pack(tid)
    assert fresh.load(z64) == (b"", tid)


_LOAD_PEAK = (
    _OPEN
    + """
from amberdb.utils import p64
storage = cls(where, cache_size=0)
before = peak()
record, tid = storage.load(p64(0x1234))
size = len(record)
del record
after = peak()
storage.close()
print(size, after - before)
"""
)


@kinds()
def test_loading_a_big_record_costs_little_more_than_the_record(target: Target) -> None:
    storage = target.open(cache_size=0)
    commit(storage, (OID, z64, os.urandom(50 << 20)))
    storage.close()
    size, growth = map(int, python(_LOAD_PEAK, target.kind, target.where).stdout.split())
    assert size == 50 << 20
    assert growth < 3 * size, f"loading a {size >> 20} MB record grew the peak RSS by {growth >> 20} MB"


_BIG_COMMIT = (
    _OPEN
    + """
import os
from amberdb.storage.base import TransactionMeta
from amberdb.utils import p64, z64
count, size = int(sys.argv[3]), int(sys.argv[4])
storage = cls(where, cache_size=0)
blob = os.urandom(size)
before = peak()
storage.begin(TransactionMeta())
for i in range(count):
    storage.store(p64(i + 1), z64, i.to_bytes(8, "big") + blob)
storage.vote()
storage.finish()
after = peak()
print(after - before)
storage.close()
"""
)


@kinds()
def test_a_big_transaction_commits_in_bounded_memory(target: Target) -> None:
    target.open().close()
    count, size = 160, 1 << 20
    growth = int(python(_BIG_COMMIT, target.kind, target.where, str(count), str(size)).stdout)
    assert growth < 100 << 20, f"a {count * size >> 20} MB transaction grew the peak RSS by {growth >> 20} MB"


_ITERATE = (
    _OPEN
    + """
storage = cls(where, cache_size=0)
before = peak()
count = 0
for txn in storage.iterator():
    count += len(txn.records)
    del txn
after = peak()
storage.close()
print(count, after - before)
"""
)


@kinds()
def test_iterating_big_transactions_holds_few_of_them_at_once(target: Target) -> None:
    storage = target.open(cache_size=0)
    blob = os.urandom(4 << 20)
    for i in range(24):
        commit(storage, (p64(i + 1), z64, i.to_bytes(8, "big") + blob))
    storage.close()
    count, growth = map(int, python(_ITERATE, target.kind, target.where).stdout.split())
    assert count == 24
    assert growth < 40 << 20, f"iterating 24 transactions of 4 MB grew the peak RSS by {growth >> 20} MB"


# -- protocol misuse and concurrency -------------------------------------------------------------------


def test_the_commit_protocol_refuses_misuse_from_threads_and_out_of_order(target: Target) -> None:
    storage = target.open()
    first = commit(storage, (z64, z64, b"root"))
    storage.begin(TransactionMeta())
    refused: list[str] = []

    def intruder() -> None:
        for name, call in (
            ("store", lambda: storage.store(OID, z64, b"intruder")),
            ("vote", storage.vote),
            ("finish", storage.finish),
        ):
            try:
                call()
            except StorageTransactionError:
                refused.append(name)

    thread = threading.Thread(target=intruder)
    thread.start()
    thread.join(10)
    assert refused == ["store", "vote", "finish"]
    storage.store(z64, first, b"root-2")
    storage.vote()
    with pytest.raises(StorageTransactionError):
        storage.store(OID, z64, b"after vote")
    second = storage.finish()
    with pytest.raises(StorageTransactionError):
        storage.finish()
    storage.abort()  # after finish: nothing to abort
    with pytest.raises(StorageTransactionError):
        storage.vote()
    assert target.open().load(z64) == (b"root-2", second)
    with pytest.raises(POSKeyError):
        target.open().load(OID)


@kinds()
def test_abort_from_another_thread_leaves_the_owners_transaction_alone(target: Target) -> None:
    storage = target.open()
    first = commit(storage, (z64, z64, b"root"))
    storage.begin(TransactionMeta())
    storage.store(z64, first, b"root-2")
    thread = threading.Thread(target=storage.abort)
    thread.start()
    thread.join(10)
    try:
        storage.vote()
        tid = storage.finish()
    except BaseException:
        storage.abort()
        raise
    assert target.open().load(z64) == (b"root-2", tid)


def test_close_while_another_thread_votes_fails_that_vote_cleanly(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = target.open()
    first = commit(storage, (z64, z64, b"root"))
    inside, go = threading.Event(), threading.Event()
    real = type(storage)._write_rows

    def held(self: SQLStorage, cursor: Any, tid: bytes) -> None:
        inside.set()
        go.wait(10)
        real(self, cursor, tid)

    monkeypatch.setattr(type(storage), "_write_rows", held)
    outcome: dict[str, BaseException] = {}

    def vote() -> None:
        try:
            commit(storage, (z64, first, b"root-2"))
        except BaseException as exc:
            outcome["error"] = exc

    voter = threading.Thread(target=vote)
    voter.start()
    assert inside.wait(10)
    closer = threading.Thread(target=storage.close)
    closer.start()
    closer.join(5)
    closed = not closer.is_alive()
    go.set()
    voter.join(10)
    closer.join(10)
    monkeypatch.undo()
    assert closed, "close() waited for the voting thread"
    assert isinstance(outcome.get("error"), StorageError), outcome
    other = target.open()
    assert other.load(z64) == (b"root", first)
    commit(other, (OID, z64, b"still works"))


@kinds()
def test_close_while_another_thread_waits_for_the_commit_lock_returns_at_once(target: Target) -> None:
    holder = target.open()
    first = commit(holder, (z64, z64, b"root"))
    waiter = target.open(lock_timeout=20)
    holder.begin(TransactionMeta())
    holder.store(OID, z64, b"holder")
    holder.vote()
    outcome: dict[str, BaseException] = {}

    def wait() -> None:
        try:
            commit(waiter, (p64(7), z64, b"waiter"))
        except BaseException as exc:
            outcome["error"] = exc

    voting = threading.Thread(target=wait)
    voting.start()
    time.sleep(0.5)  # the waiter is now blocked on the commit lock
    closer = threading.Thread(target=waiter.close)
    closer.start()
    closer.join(2)
    prompt = not closer.is_alive()
    holder.finish()
    voting.join(20)
    closer.join(20)
    assert prompt, "close() blocked while another thread waited for the commit lock"
    assert isinstance(outcome.get("error"), StorageError), outcome
    check = target.open()
    assert check.load(z64) == (b"root", first)
    with pytest.raises(POSKeyError):
        check.load(p64(7))


_NEW_OIDS = (
    _OPEN
    + """
import json, threading
storages = [cls(where) for _ in range(2)]
got = []
def take(storage):
    mine = [storage.new_oid().hex() for _ in range(150)]
    got.extend(mine)
threads = [threading.Thread(target=take, args=(s,)) for s in storages for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
for s in storages: s.close()
print(json.dumps(got))
"""
)


def test_new_oid_is_unique_across_threads_instances_and_processes(target: Target) -> None:
    target.open().close()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _NEW_OIDS, target.kind, target.where],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(3)
    ]
    here = target.open()
    mine = [here.new_oid().hex() for _ in range(300)]
    everything = list(mine)
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        everything += json.loads(out)
    assert len(everything) == 300 + 3 * 2 * 4 * 150
    assert len(set(everything)) == len(everything)
    assert z64.hex() not in everything


def _in_child(work: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Run ``work`` in a forked child and return what it reported (the child never returns)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            try:
                report = work()
            except BaseException as exc:
                report = {"crashed": repr(exc)}
            os.write(write, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)  # type: ignore[no-any-return]


def _forked_calls(calls: dict[str, Callable[[], object]]) -> dict[str, object]:
    report: dict[str, object] = {}
    for name, call in calls.items():
        try:
            call()
            report[name] = "ran"
        except StorageForkedError:
            report[name] = "forked"
        except BaseException as exc:
            report[name] = repr(exc)
    return report


def test_after_fork_the_child_is_refused_and_the_parent_keeps_working(target: Target) -> None:
    storage = target.open()
    first = commit(storage, (z64, z64, b"root"))
    for _ in range(3):  # pooled connections and the writer exist before the fork
        storage.poll_invalidations(first)

    def child() -> dict[str, object]:
        report = _forked_calls(
            {
                "load": lambda: storage.load(z64),
                "poll": lambda: storage.poll_invalidations(first),
                "new_oid": storage.new_oid,
                "begin": lambda: storage.begin(TransactionMeta()),
                "iterator": lambda: list(storage.iterator()),
            }
        )
        storage.close()
        gc.collect()  # the child's copies of the connections are freed here
        return report

    assert set(_in_child(child).values()) == {"forked"}
    second = commit(storage, (z64, first, b"root-2"), (OID, z64, b"after the fork"))
    assert storage.poll_invalidations(first)[0] == second
    other = target.open(cache_size=0)
    assert other.load(z64) == (b"root-2", second) and other.load(OID) == (b"after the fork", second)
    if target.kind == "sqlite":
        assert target.sql("PRAGMA integrity_check") == [("ok",)]


@kinds()
def test_after_fork_the_child_cannot_end_the_parents_transaction(target: Target) -> None:
    storage = target.open()
    first = commit(storage, (z64, z64, b"root"))
    storage.begin(TransactionMeta())
    storage.store(z64, first, b"root-2")
    storage.store(OID, z64, b"voted before the fork")
    storage.vote()

    def child() -> dict[str, object]:
        return _forked_calls(
            {
                "store": lambda: storage.store(p64(9), z64, b"child"),
                "vote": storage.vote,
                "abort": storage.abort,
                "finish": storage.finish,
            }
        )

    report = _in_child(child)
    tid = storage.finish()
    other = target.open(cache_size=0)
    assert other.load(OID) == (b"voted before the fork", tid), report
    assert other.load(z64) == (b"root-2", tid)
    assert set(report.values()) == {"forked"}, report


# -- caches that outlive their data --------------------------------------------------------------------

_COMMIT_IN_ANOTHER_PROCESS = """
import sys, time
from amberdb import DB
db = DB(sys.argv[1])
with db.transaction() as conn:
    if sys.argv[2] == "change":
        conn.root.items[3]["n"] = sys.argv[3]
    elif sys.argv[2] == "cut":
        del conn.root.items[5:]
if sys.argv[2] == "cut":
    db.pack(time.time() + 60)
db.close()
"""


def test_a_warm_cache_follows_commits_and_packs_of_another_process(target: Target, tmp_path: Path) -> None:
    cache = tmp_path / "records.cache"
    db = DB(target.open(cache_path=cache))
    with db.transaction() as conn:
        conn.root.items = PersistentList(PersistentMapping(n=i) for i in range(20))
    with db.transaction() as conn:
        assert [item["n"] for item in conn.root.items] == list(range(20))
    python(_COMMIT_IN_ANOTHER_PROCESS, target.uri, "change", "changed")
    with db.transaction() as conn:
        assert conn.root.items[3]["n"] == "changed"
    python(_COMMIT_IN_ANOTHER_PROCESS, target.uri, "cut", "")
    with db.transaction() as conn:
        assert [item["n"] for item in conn.root.items] == [0, 1, 2, "changed", 4]
    db.close()
    assert cache.exists()
    python(_COMMIT_IN_ANOTHER_PROCESS, target.uri, "change", "again")  # while no cache is open
    again = DB(target.open(cache_path=cache))
    with again.transaction() as conn:
        assert [item["n"] for item in conn.root.items] == [0, 1, 2, "again", 4]
    again.close()


@kinds()
def test_a_database_restored_from_a_backup_under_the_same_name_is_noticed(
    target: Target, tmp_path: Path
) -> None:
    cache = tmp_path / "records.cache"
    backup = tmp_path / "backup.fs"
    db = DB(target.open(cache_path=cache))
    with db.transaction() as conn:
        conn.root.value = "backed up"
    amberdb_cli("copy", target.uri, str(backup))
    with db.transaction() as conn:
        conn.root.value = "after the backup"
    with db.transaction() as conn:
        assert conn.root.value == "after the backup"  # cached now
    # Restore: the database is replaced by a fresh copy of the backup, under the same name.
    if target.kind == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(target.where + suffix)
    else:
        for table in ("amberdb_object", "amberdb_transaction", "amberdb_schema", "amberdb_oid"):
            target.sql(f"DROP TABLE {table}")
    amberdb_cli("copy", str(backup), target.uri)
    # The process that had the old database open: never the old answer, never a lost commit.
    try:
        with db.transaction() as conn:
            assert conn.root.value == "backed up"
    except StorageError:
        pass  # "the database was replaced": fine
    try:
        with db.transaction() as conn:
            conn.root.written = "after the restore"
    except StorageError:
        pass
    else:
        check = DB(target.uri)
        with check.transaction() as conn:
            assert conn.root.get("written") == "after the restore", (
                "a commit acknowledged after the restore is lost"
            )
        check.close()
    db.close()
    reopened = DB(target.open(cache_path=cache))
    with reopened.transaction() as conn:
        assert conn.root.value == "backed up"
    reopened.close()
