"""Helpers of the PostgreSQL fault tests: URIs, the server's view of AmberDB's sessions, and a
TCP proxy that can lose the reply to a COMMIT (what a network cut at the worst moment does).

Everything here is bounded in time; the proxy's threads end when it is closed.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from amberdb.testing.pgcluster import PostgreSQLCluster


class BugReproducedError(AssertionError):
    """Raised by a test marked ``xfail(strict=True, raises=BugReproducedError)`` where it observes
    the bug its marker names, so that any other failure (of its setup, say) still fails it,
    and a fix turns it into an XPASS that fails the run until the marker goes."""


def pg_uri(cluster: PostgreSQLCluster, database: str, **options: object) -> str:
    """``postgresql://user@host:port/database?option=value...`` (values as given)."""
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"postgresql://{cluster.user}@{cluster.host}:{cluster.port}/{database}" + (
        f"?{query}" if query else ""
    )


def wait_for(condition: Callable[[], Any], timeout: float, what: str, pause: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something true (returned); AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(pause)


def backends(cluster: PostgreSQLCluster, database: str, where: str = "true") -> list[int]:
    """Pids of AmberDB's sessions (application_name 'amberdb') on ``database`` matching ``where``
    (SQL on pg_stat_activity's columns)."""
    out = cluster.psql(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'amberdb'"
        f" AND datname = '{database}' AND ({where}) ORDER BY pid"
    )
    return [int(pid) for pid in out.split()]


def terminate(cluster: PostgreSQLCluster, database: str, where: str = "true") -> int:
    """End AmberDB's sessions on ``database`` matching ``where`` (pg_terminate_backend) and wait
    until they are gone; how many there were."""
    pids = backends(cluster, database, where)
    if pids:
        cluster.psql(f"SELECT pg_terminate_backend(pid) FROM unnest(ARRAY{pids}) AS pid")
        listed = ",".join(map(str, pids))
        wait_for(
            lambda: cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid IN ({listed})") == "0",
            10,
            f"sessions {pids} to end",
        )
    return len(pids)


class CommitCutProxy:
    """A TCP proxy in front of a PostgreSQL server that can cut a session at its COMMIT.

    Connect through it with :meth:`dsn` (no TLS or GSS negotiation, so the proxy can read
    the frontend's messages).  :meth:`cut_next_commit` arms a one-shot fault for the next
    ``COMMIT`` a client sends (simple-query protocol, as psycopg sends a statement without
    parameters):

    - ``after_reply=True``: the COMMIT reaches the server, the server answers, and the answer
      is thrown away as the client's side is closed -- the commit happened, the client cannot
      know.
    - ``after_reply=False``: the COMMIT reaches the server and the client's side is closed
      at once, while the server's side stays open: whatever the server does with the
      COMMIT, it does after the client has seen the connection drop.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: bool | None = None
        self.cut = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        accept = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        accept.start()
        self._threads.append(accept)

    def dsn(self, cluster: PostgreSQLCluster, database: str) -> str:
        return (
            f"host=127.0.0.1 port={self.port} user={cluster.user} dbname={database}"
            " sslmode=disable gssencmode=disable"
        )

    def cut_next_commit(self, after_reply: bool) -> None:
        with self._lock:
            self._armed = after_reply
            self.cut.clear()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> CommitCutProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            session = _Session(self, client, server)
            for target in (session.upstream, session.downstream):
                thread = threading.Thread(target=target, name="proxy-pump", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _take_fault(self) -> bool | None:
        with self._lock:
            armed, self._armed = self._armed, None
            return armed


class _Session:
    """One proxied connection: client -> server parsed message by message, server -> client
    copied (or dropped once the session is cut)."""

    def __init__(self, proxy: CommitCutProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.fault: bool | None = None  # after_reply, once this session's COMMIT was cut
        self.replied = threading.Event()

    def _cut_client(self) -> None:
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RDWR)
        self.proxy.cut.set()

    def upstream(self) -> None:
        buffer = b""
        started = False
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                buffer += data
                while True:
                    if not started:
                        if len(buffer) < 4:
                            break
                        (length,) = struct.unpack("!I", buffer[:4])
                        if len(buffer) < length:
                            break
                        message, buffer = buffer[:length], buffer[length:]
                        started = True
                    else:
                        if len(buffer) < 5:
                            break
                        (length,) = struct.unpack("!I", buffer[1:5])
                        if len(buffer) < length + 1:
                            break
                        message, buffer = buffer[: length + 1], buffer[length + 1 :]
                    fault = None
                    if message[:1] == b"Q" and message[5:].rstrip(b"\0").strip().upper() == b"COMMIT":
                        fault = self.proxy._take_fault()
                        # Set before the COMMIT goes on, so that no part of its answer passes.
                        self.fault = fault
                    self.server.sendall(message)
                    if fault is not None:
                        if fault:
                            self.replied.wait(10)
                        self._cut_client()
                        return
        except OSError:
            pass
        finally:
            if self.fault is None:
                with contextlib.suppress(OSError):
                    self.server.shutdown(socket.SHUT_WR)

    def downstream(self) -> None:
        try:
            while True:
                data = self.server.recv(65536)
                if not data:
                    break
                if self.fault is not None:
                    self.replied.set()
                    continue  # the client is cut: the server's answers go nowhere
                self.client.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_RDWR)
