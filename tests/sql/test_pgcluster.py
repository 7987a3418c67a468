"""The throwaway PostgreSQL machinery (amberdb.testing.pgcluster) and its fixtures."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from amberdb.testing.pgcluster import PostgreSQLCluster, PostgreSQLReplica, find_bindir

ROOT = Path(__file__).resolve().parents[2]


def _count(dsn: str, table: str = "t") -> int:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def test_connects_and_runs_a_query(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('fsync', 'synchronous_commit', 'max_connections', 'wal_level', 'listen_addresses')"
            ).fetchall()
        )
    assert settings == {
        "fsync": "on",
        "synchronous_commit": "on",
        "max_connections": "200",
        "wal_level": "replica",
        "listen_addresses": "127.0.0.1",
    }


def test_unix_socket(pg_cluster: PostgreSQLCluster, pg_database: str) -> None:
    with psycopg.connect(pg_cluster.socket_dsn(pg_database)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (pg_database,)
        # No client address: the connection came over the socket, not TCP.
        assert conn.execute("SELECT inet_client_addr()").fetchone() == (None,)


def test_server_files_belong_to_the_server_user(pg_cluster: PostgreSQLCluster) -> None:
    expected = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert pg_cluster.data_dir.stat().st_uid == expected
    assert pg_cluster.is_running()


_seen_databases: list[str] = []


@pytest.mark.parametrize("turn", [1, 2])
def test_each_test_gets_a_fresh_database(pg_dsn: str, pg_database: str, turn: int) -> None:
    # Both turns create the same table: the second would fail on a shared database.
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE t (turn int)")
        conn.execute("INSERT INTO t VALUES (%s)", (turn,))
    assert _count(pg_dsn) == 1
    assert pg_database not in _seen_databases
    _seen_databases.append(pg_database)


def test_earlier_tests_databases_are_dropped(pg_cluster: PostgreSQLCluster, pg_database: str) -> None:
    existing = set(pg_cluster.psql("SELECT datname FROM pg_database").split())
    assert pg_database in existing
    assert not existing & set(_seen_databases)


def test_drop_database_disconnects_its_users(pg_cluster: PostgreSQLCluster) -> None:
    dsn = pg_cluster.create_database("amberdb test 'quoted'")
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")
        pg_cluster.drop_database("amberdb test 'quoted'")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert "amberdb test 'quoted'" not in pg_cluster.psql("SELECT datname FROM pg_database")
    pg_cluster.drop_database("amberdb test 'quoted'")  # gone already: nothing happens


def test_restart_immediate_keeps_commits_only(pg_cluster: PostgreSQLCluster, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    pending = psycopg.connect(pg_dsn)
    try:
        pending.execute("INSERT INTO t VALUES (2)")  # never committed
        pg_cluster.restart(mode="immediate")
        with pytest.raises(psycopg.OperationalError):
            pending.execute("SELECT 1")
    finally:
        pending.close()
    assert _count(pg_dsn) == 1
    assert pg_cluster.is_running()


def test_stop_and_start(pg_cluster: PostgreSQLCluster, pg_dsn: str) -> None:
    pg_cluster.stop()
    try:
        assert not pg_cluster.is_running()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg_dsn, connect_timeout=5).close()
        pg_cluster.stop()  # stopped already: nothing happens
    finally:
        pg_cluster.start()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_replica_follows_the_primary(pg_dsn: str, pg_database: str, pg_replica: PostgreSQLReplica) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
    pg_replica.wait_for_replay()
    replica_dsn = pg_replica.dsn(pg_database)
    assert replica_dsn != pg_dsn
    assert _count(replica_dsn) == 2
    with psycopg.connect(replica_dsn) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO t VALUES (3)")


def test_paused_replay_lags_until_resumed(
    pg_dsn: str, pg_database: str, pg_replica: PostgreSQLReplica
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
    pg_replica.wait_for_replay()
    replica_dsn = pg_replica.dsn(pg_database)

    pg_replica.pause_replay()
    assert pg_replica.replay_paused
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("CREATE TABLE u (x int)")
        lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert lsn is not None
    # The replica receives the change (its WAL arrives) but does not apply it.
    deadline = time.monotonic() + 30
    while pg_replica.psql(f"SELECT pg_last_wal_receive_lsn() >= '{lsn[0]}'::pg_lsn") != "t":
        assert time.monotonic() < deadline, "the replica never received the primary's WAL"
        time.sleep(0.02)
    assert _count(replica_dsn) == 0
    assert pg_replica.psql("SELECT to_regclass('u') IS NULL", pg_database) == "t"
    assert pg_replica.lag_bytes() > 0
    with pytest.raises(RuntimeError, match="paused"):
        pg_replica.wait_for_replay()

    pg_replica.resume_replay()
    pg_replica.wait_for_replay()
    assert _count(replica_dsn) == 1
    assert _count(replica_dsn, "u") == 0
    assert pg_replica.lag_bytes() == 0


def test_replica_is_read_only_for_databases(pg_replica: PostgreSQLReplica) -> None:
    with pytest.raises(RuntimeError, match="read-only"):
        pg_replica.create_database("nope")


def test_close_stops_the_server_and_removes_its_folder() -> None:
    with PostgreSQLCluster() as cluster:
        directory = cluster.directory
        pid = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
        assert cluster.psql("SELECT 1") == "1"
    assert cluster.closed
    assert not directory.exists()
    assert not _alive(pid)
    cluster.close()  # again: nothing happens
    with pytest.raises(RuntimeError, match="closed"):
        cluster.start()


def test_a_killed_runs_clusters_are_reaped_by_the_next() -> None:
    # Its own parent folder, so that only the cluster made here can be reaped; open to the
    # postgres user, as the system's temporary folder is.
    parent = Path(tempfile.mkdtemp(prefix="amberdb-reap-"))
    try:
        parent.chmod(0o755)
        maker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\n"
                "from amberdb.testing.pgcluster import PostgreSQLCluster\n"
                "cluster = PostgreSQLCluster(parent=sys.argv[1])\n"
                "print(cluster.data_dir, flush=True)\n"
                "time.sleep(120)\n",
                str(parent),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        )
        try:
            assert maker.stdout is not None
            data_dir = Path(maker.stdout.readline().strip())
        finally:
            maker.kill()  # no atexit hook runs: its cluster is orphaned
            maker.wait()
            if maker.stdout is not None:
                maker.stdout.close()
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        assert _alive(pid)
        PostgreSQLCluster(parent=parent, start=False).close()
        assert not data_dir.parent.exists()
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, "the orphaned postmaster still runs"
            time.sleep(0.05)
    finally:
        subprocess.run(["rm", "-rf", str(parent)], check=False)


def test_as_root_a_folder_closed_to_the_server_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the folder to another user")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(RuntimeError, match="closed to the user 'postgres'"):
        PostgreSQLCluster(parent=closed)


def test_missing_binaries_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AMBERDB_PG_BINDIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"initdb, pg_ctl, postgres") as raised:
        find_bindir()
    assert str(tmp_path) in str(raised.value)
    with pytest.raises(RuntimeError, match="not found"):
        PostgreSQLCluster()


@pytest.mark.parametrize(("require", "outcome"), [("", "1 skipped"), ("1", "1 error")])
def test_fixture_without_postgresql_skips_or_fails(tmp_path: Path, require: str, outcome: str) -> None:
    env = {**os.environ, "AMBERDB_PG_BINDIR": str(tmp_path), "AMBERDB_REQUIRE_POSTGRESQL": require}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{Path(__file__).relative_to(ROOT)}::test_connects_and_runs_a_query",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert outcome in run.stdout, run.stdout + run.stderr
    assert (run.returncode == 0) == (require == ""), run.stdout
    assert "initdb" in run.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent (init, for a daemon) has not reaped it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
