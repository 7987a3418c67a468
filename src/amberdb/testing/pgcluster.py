"""Throwaway PostgreSQL servers for tests and benchmarks.

:class:`PostgreSQLCluster` makes a new cluster with ``initdb`` in a temporary folder and runs it
on 127.0.0.1 (a free port) and on a Unix socket in that folder; :meth:`~PostgreSQLCluster.close`
stops it and deletes the folder.  :meth:`~PostgreSQLCluster.make_replica` adds a streaming
hot standby (:class:`PostgreSQLReplica`) whose replay can be paused to simulate lag.

Only the server binaries are needed (PostgreSQL 14 or newer; CI uses 15): ``initdb``,
``pg_ctl`` and ``postgres`` on ``PATH`` or in ``pg_config --bindir``, and ``psql`` (and
``pg_basebackup`` for replicas) beside them.  No Python driver is needed: the few statements
this module runs go through ``psql``.  PostgreSQL refuses to run as root, so as root the
binaries run as the ``postgres`` user (``runuser``) and the folder is given to that user.

    with PostgreSQLCluster() as cluster:
        cluster.create_database("app")
        psycopg.connect(cluster.dsn("app"))
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

__all__ = ["PostgreSQLCluster", "PostgreSQLReplica", "find_bindir"]

# Names the folders this module makes, so that a later run can find those a killed run left.
DIR_PREFIX = "amberdb-pg-"
# The pid of the process that made the folder, so that a later run can tell it is orphaned.
OWNER_FILE = "owner.pid"
STARTUP_TIMEOUT = 60  # seconds: pg_ctl -t (startup includes crash recovery after a kill)
COMMAND_TIMEOUT = 120.0  # seconds: any one command; initdb and pg_basebackup are the slowest
SUPERUSER = "postgres"
REQUIRED = ("initdb", "pg_ctl", "postgres")
MIN_VERSION = 14  # pg_get_wal_replay_pause_state() and DROP DATABASE ... WITH (FORCE)

# Settings for tests: durability as in production (fsync, synchronous commit, full page writes
# kept: the tests kill the server and check what survived), room for many connections, and
# what a streaming hot standby needs.
TEST_SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "wal_level": "replica",
    "max_wal_senders": "5",
    # A stopped or lagging replica catches up from what the primary kept, without a slot that
    # would pin WAL on the primary after the replica is gone.
    "wal_keep_size": "256MB",
    "hot_standby": "on",
    # Vacuum on the primary does not cancel a long read on the replica.
    "hot_standby_feedback": "on",
    # After the primary restarts, a standby retries every 5 s by default: too slow for tests.
    "wal_retrieve_retry_interval": "200ms",
    # Checkpoints only when asked (CREATE/DROP DATABASE, shutdown), not in the middle of a test.
    "max_wal_size": "1GB",
    "log_min_messages": "warning",
    "log_checkpoints": "off",
    "log_line_prefix": "'%m [%p] '",
}

# Trust on the socket and on 127.0.0.1 only, replication included (pg_basebackup, standbys).
PG_HBA = """\
# Written by amberdb.testing.pgcluster: a throwaway cluster, trusted on this host only.
local   all             all                     trust
host    all             all     127.0.0.1/32    trust
local   replication     all                     trust
host    replication     all     127.0.0.1/32    trust
"""


_Cluster = TypeVar("_Cluster", bound="PostgreSQLCluster")


def find_bindir() -> Path:
    """The folder of the PostgreSQL server binaries; RuntimeError naming where it looked if none.

    ``AMBERDB_PG_BINDIR`` if set; else the folder ``initdb`` on ``PATH`` links to (so every tool
    comes from one version even when only a few are linked onto ``PATH``); else
    ``pg_config --bindir``; else the newest Debian-style ``/usr/lib/postgresql/*/bin``.
    """
    looked: list[str] = []
    candidates: list[Path] = []
    override = os.environ.get("AMBERDB_PG_BINDIR")
    if override:
        candidates.append(Path(override))
        looked.append(f"$AMBERDB_PG_BINDIR ({override})")
    else:
        initdb = shutil.which("initdb")
        looked.append(f"PATH ({'initdb at ' + initdb if initdb else 'no initdb'})")
        if initdb:
            candidates.append(Path(os.path.realpath(initdb)).parent)
            candidates.append(Path(initdb).parent)
        pg_config = shutil.which("pg_config")
        if pg_config:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
                ).stdout.strip()
                candidates.append(Path(out))
                looked.append(f"`pg_config --bindir` ({out})")
        else:
            looked.append("`pg_config --bindir` (no pg_config on PATH)")
        debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
        candidates += map(Path, debian)
        looked.append(f"/usr/lib/postgresql/*/bin ({', '.join(debian) or 'none'})")
    for candidate in candidates:
        if all(os.access(candidate / name, os.X_OK) for name in REQUIRED):
            return candidate
    raise RuntimeError(
        f"PostgreSQL server binaries not found: looked for {', '.join(REQUIRED)} in "
        f"{'; '.join(looked)}.  Install PostgreSQL (Debian: apt-get install postgresql-15) or set "
        "AMBERDB_PG_BINDIR to the folder holding them."
    )


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path))


def _free_port() -> int:
    # The port is free now; PostgreSQL binds it a moment later.  Another process can take it in
    # between, which start() notices in the log and answers by trying another port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _check_reachable(folder: Path, user: pwd.struct_passwd) -> None:
    # As root the folder is made by us and handed to the server's user, who must also be able to
    # pass through every folder above it: pytest's /tmp/pytest-of-root, for one, is closed to it.
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for ancestor in [folder, *folder.parents]:
        st = ancestor.stat()
        if st.st_uid == user.pw_uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in groups:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            raise RuntimeError(
                f"{ancestor} is closed to the user {user.pw_name!r} the server runs as (PostgreSQL refuses "
                "root): put the cluster's folder where that user can reach it (parent=...)"
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _dsn_value(value: str | int) -> str:
    text = str(value)
    if text and not re.search(r"[\s'\\]", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conf_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _clean_env() -> dict[str, str]:
    # PG* variables of the caller (PGHOST, PGOPTIONS, PGSERVICE...) would change where psql and
    # pg_basebackup connect or how; everything they need is on their command lines.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PostgreSQLCluster:
    """A new PostgreSQL cluster in a temporary folder, started on 127.0.0.1 and a Unix socket.

    ``settings`` are added to (and override) :data:`TEST_SETTINGS`.  ``parent`` is where the
    temporary folder goes (the system's by default); as root it must be open to the
    ``postgres`` user.  The cluster is stopped and its folder removed by :meth:`close`, by
    leaving a ``with`` block, or at interpreter exit at the latest.
    """

    host = "127.0.0.1"
    user = SUPERUSER

    def __init__(
        self,
        *,
        settings: Mapping[str, str] | None = None,
        parent: str | os.PathLike[str] | None = None,
        os_user: str = "postgres",
        start: bool = True,
    ) -> None:
        self.bindir = find_bindir()
        self.version = self._server_version()
        # PostgreSQL refuses to run as root: as root, every server-side command runs as os_user.
        self._as_user: list[str] = []
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root, PostgreSQL needs runuser (util-linux) to drop to a user")
            try:
                self._owner = pwd.getpwnam(os_user)
            except KeyError:
                raise RuntimeError(
                    f"running as root, PostgreSQL must run as another user, and there is no user {os_user!r}"
                ) from None
            self._as_user = [runuser, "-u", os_user, "--"]
        self.os_user = os_user
        self._closed = False
        self._creator = os.getpid()
        parent_dir = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        if self._owner is not None:
            _check_reachable(parent_dir.resolve(), self._owner)
        self._reap_orphans(parent_dir)
        self._replicas: list[PostgreSQLReplica] = []
        self.directory = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent))
        self.data_dir = self.directory / "data"
        self.socket_dir = self.directory
        self.log_path = self.directory / "postgresql.log"
        self.port = 0
        self.settings = {**TEST_SETTINGS, **(settings or {})}
        # Registered before anything can fail, so a half-made cluster is cleaned up too.
        atexit.register(self._close_at_exit)
        try:
            (self.directory / OWNER_FILE).write_text(f"{os.getpid()}\n")
            if self._owner is not None:
                os.chown(self.directory, self._owner.pw_uid, self._owner.pw_gid)
            self.port = _free_port()
            self._make_data_dir()
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.directory} port={self.port}>"

    def __enter__(self: _Cluster) -> _Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- connecting ---------------------------------------------------------------------------

    def dsn(self, dbname: str = "amberdb_test", **params: str | int) -> str:
        """A libpq DSN for ``dbname`` over TCP; ``params`` are added (``connect_timeout=5``)."""
        parts = {"host": self.host, "port": self.port, "user": self.user, "dbname": dbname, **params}
        return " ".join(f"{key}={_dsn_value(value)}" for key, value in parts.items())

    def socket_dsn(self, dbname: str = "amberdb_test", **params: str | int) -> str:
        """A libpq DSN for ``dbname`` over the Unix socket."""
        return self.dsn(dbname, **{"host": str(self.socket_dir), **params})

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with psql (stopping at the first error) and return its unaligned output."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        # psql connects over TCP with trust: it needs no OS user of its own, so runs as we do.
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "--no-psqlrc",
                "--quiet",
                "--no-align",
                "--tuples-only",
                "--set",
                "ON_ERROR_STOP=1",
                "--dbname",
                self.dsn(dbname, connect_timeout=10),
                "--command",
                sql,
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=_clean_env(),
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed on {sql!r} (exit {result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its DSN."""
        self.psql(f"CREATE DATABASE {_quote_ident(name)}")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting whoever is still connected to it."""
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    # -- running ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it accepts connections (at most 60 s)."""
        self._check_open()
        for attempt in range(3):
            try:
                self._pg_ctl("start", "-l", str(self.log_path))
                return
            except RuntimeError:
                # The free port found at construction was taken before the server bound it.
                if attempt == 2 or "could not bind" not in self.log_tail():
                    raise
                self.port = _free_port()
                self._write_settings({"port": str(self.port)})

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate); nothing if it is not running."""
        self._check_open()
        if self.is_running():
            self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: as if killed, no shutdown checkpoint) and start it again."""
        self._check_open()
        self._pg_ctl("restart", "-m", mode, "-l", str(self.log_path))

    def is_running(self) -> bool:
        """Whether a server runs on this cluster's data folder."""
        if self._closed:
            return False
        # pg_ctl status: 0 running, 3 not running, 4 no data folder.
        return self._run(self._server_command("pg_ctl", "status", "-D", str(self.data_dir))) == 0

    def close(self) -> None:
        """Stop the server, whatever state it is in, and remove its folder; again does nothing."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        try:
            # A standby whose primary is gone would only retry, and keep running.
            for replica in self._replicas:
                replica.close()
            if (self.data_dir / "postmaster.pid").exists():
                # Immediate: the data is thrown away, so a clean shutdown would only cost time.
                self._run(self._server_command("pg_ctl", "stop", "-m", "immediate", "-D", str(self.data_dir)))
                self._kill_postmaster(self.data_dir)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _close_at_exit(self) -> None:
        # A child forked from the test process inherits this hook; the server is its parent's.
        if os.getpid() == self._creator:
            self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- replicas -----------------------------------------------------------------------------

    def make_replica(self, *, settings: Mapping[str, str] | None = None) -> PostgreSQLReplica:
        """A streaming hot standby of this (running) cluster, in its own folder on its own port."""
        self._check_open()
        replica = PostgreSQLReplica(self, settings=settings)
        self._replicas.append(replica)
        return replica

    # -- internals ----------------------------------------------------------------------------

    def _make_data_dir(self) -> None:
        # --no-sync: initdb's own final fsync only guards against an OS crash, which the tests
        # never make; the server's fsync=on, which they do test, is unaffected.
        self._check(
            "initdb", f"--pgdata={self.data_dir}", f"--username={SUPERUSER}", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        self._write_hba()
        self._write_settings({**self.settings, **self._local_settings()})

    def _local_settings(self) -> dict[str, str]:
        return {"port": str(self.port), "unix_socket_directories": _conf_string(str(self.socket_dir))}

    def _write_hba(self) -> None:
        self._write_file(self.data_dir / "pg_hba.conf", PG_HBA)

    def _write_settings(self, settings: Mapping[str, str]) -> None:
        # Appended: the last setting of a name in postgresql.conf wins, so later calls override.
        conf = self.data_dir / "postgresql.conf"
        lines = "".join(f"{name} = {value}\n" for name, value in settings.items())
        self._write_file(conf, conf.read_text() + "\n# amberdb.testing.pgcluster\n" + lines)

    def _write_file(self, path: Path, text: str) -> None:
        # Rewritten in place, so the file keeps the owner and mode initdb gave it.
        with open(path, "w") as f:
            f.write(text)

    def _pg_ctl(self, action: str, *args: str) -> None:
        try:
            self._check(
                "pg_ctl", action, "-D", str(self.data_dir), "-w", "-t", str(STARTUP_TIMEOUT), "-s", *args
            )
        except RuntimeError as error:
            raise RuntimeError(f"{error}\nserver log ({self.log_path}):\n{self.log_tail()}") from None

    def _server_command(self, program: str, *args: str) -> list[str]:
        # As root, through runuser: the server and its tools run as (and write files for) os_user.
        return [*self._as_user, str(self.bindir / program), *args]

    def _check(self, program: str, *args: str) -> None:
        result = subprocess.run(
            self._server_command(program, *args),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            # The caller's working folder may be closed to the postgres user.
            cwd=self.directory,
            env=_clean_env(),
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise RuntimeError(f"{program} {' '.join(args)} failed (exit {result.returncode}): {output}")

    def _run(self, command: Sequence[str], cwd: Path | None = None) -> int:
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=cwd or self.directory,
            env=_clean_env(),
            timeout=COMMAND_TIMEOUT,
            check=False,
        ).returncode

    def _server_version(self) -> int:
        out = subprocess.run(
            [str(self.bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        match = re.search(r"(\d+)(?:\.\d+)?", out)
        if match is None or int(match.group(1)) < MIN_VERSION:
            raise RuntimeError(
                f"PostgreSQL {MIN_VERSION} or newer needed; {self.bindir / 'postgres'} is {out.strip()!r}"
            )
        return int(match.group(1))

    def _reap_orphans(self, parent: Path) -> None:
        # A test run killed outright (SIGKILL, a CI timeout) runs no atexit hook: the clusters it
        # made still run.  The next run stops those whose maker is gone.  A folder with no owner
        # file yet may be one another process is making now: left alone.
        for directory in parent.glob(DIR_PREFIX + "*"):
            try:
                pid = int((directory / OWNER_FILE).read_text())
            except (OSError, ValueError):
                continue
            if pid == os.getpid() or _pid_alive(pid):
                continue
            data_dir = directory / "data"
            if (data_dir / "postmaster.pid").exists():
                self._run(
                    self._server_command("pg_ctl", "stop", "-m", "immediate", "-D", str(data_dir)), parent
                )
                self._kill_postmaster(data_dir)
            shutil.rmtree(directory, ignore_errors=True)

    def _kill_postmaster(self, data_dir: Path) -> None:
        # Last resort when pg_ctl could not stop it; its children exit when they see it gone.
        try:
            pid = int((data_dir / "postmaster.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return
        # The pid file may be stale and its pid reused by an unrelated process.
        if b"postgres" in cmdline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")


class PostgreSQLReplica(PostgreSQLCluster):
    """A streaming hot standby of a :class:`PostgreSQLCluster` (``pg_basebackup -R -X stream``).

    Read-only: connect with :meth:`dsn`.  :meth:`pause_replay` holds back what it applies (it
    still receives the primary's WAL) until :meth:`resume_replay`: a replica lagging on demand.
    """

    def __init__(self, primary: PostgreSQLCluster, *, settings: Mapping[str, str] | None = None) -> None:
        self.primary = primary
        self._paused = False
        # Only what is asked here goes on top of the primary's copied settings: the defaults again
        # would undo the primary's own (and a standby may not have fewer connections).
        self._replica_settings = dict(settings or {})
        super().__init__(settings=settings, parent=primary.directory.parent, os_user=primary.os_user)

    def _make_data_dir(self) -> None:
        # --checkpoint=fast: the backup starts at a checkpoint, which is otherwise spread over
        # minutes.  -R writes standby.signal and primary_conninfo; -X stream copies the WAL
        # written meanwhile, so the replica starts consistent.
        self._check(
            "pg_basebackup", f"--pgdata={self.data_dir}", f"--host={self.primary.host}",
            f"--port={self.primary.port}", f"--username={SUPERUSER}", "--write-recovery-conf",
            "--wal-method=stream", "--checkpoint=fast", "--no-sync",
        )  # fmt: skip
        # The copied postgresql.conf names the primary's port and socket folder: these override.
        self._write_settings({**self._replica_settings, **self._local_settings()})

    @property
    def replay_paused(self) -> bool:
        """Whether :meth:`pause_replay` was called and :meth:`resume_replay` not since."""
        return self._paused

    def pause_replay(self, timeout: float = 30.0) -> None:
        """Stop applying the primary's changes, and wait until replay has really stopped."""
        self.psql("SELECT pg_wal_replay_pause()")
        self._paused = True
        # pg_wal_replay_pause() only requests the pause: until the startup process sees it, a
        # change arriving now could still be applied.
        self._wait_for(
            lambda: self.psql("SELECT pg_get_wal_replay_pause_state()") == "paused",
            timeout,
            "replay to pause",
        )

    def start(self) -> None:
        """Start the replica; it replays again (a pause does not outlive the server)."""
        super().start()
        self._paused = False

    def restart(self, mode: str = "immediate") -> None:
        """Restart the replica; it replays again (a pause does not outlive the server)."""
        super().restart(mode)
        self._paused = False

    def resume_replay(self) -> None:
        """Apply the primary's changes again (those received while paused first)."""
        self.psql("SELECT pg_wal_replay_resume()")
        self._paused = False

    def wait_for_replay(self, timeout: float = 30.0) -> None:
        """Wait until the replica has applied all the primary had written when this was called."""
        if self._paused:
            raise RuntimeError(f"{self!r}: replay is paused, it would never catch up")
        target = self.primary.psql("SELECT pg_current_wal_lsn()")
        self._wait_for(
            lambda: self.psql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn") == "t",
            timeout,
            f"replay up to {target}",
        )

    def lag_bytes(self) -> int:
        """How many bytes of the primary's WAL the replica has not applied yet."""
        current = self.primary.psql("SELECT pg_current_wal_lsn()")
        return int(self.psql(f"SELECT pg_wal_lsn_diff('{current}', pg_last_wal_replay_lsn())") or 0)

    def create_database(self, name: str) -> str:
        """Not on a replica: create the database on the primary, then wait for replay."""
        raise RuntimeError("a replica is read-only: create the database on the primary")

    def make_replica(self, *, settings: Mapping[str, str] | None = None) -> PostgreSQLReplica:
        """Not supported: cascading replicas are not needed by the tests."""
        raise RuntimeError("make replicas of the primary, not of a replica")

    def _wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r}: no {what} within {timeout} s\nserver log:\n{self.log_tail()}")
            time.sleep(0.02)
