"""Server processes for the server workload: ``amberdb serve`` and ZEO's ``runzeo``.

Each server runs in a process of its own, on a FileStorage, listening on 127.0.0.1; its
output goes to a log file next to the database (never to a pipe nobody reads, which would
stall it once full).  :class:`ServerProcess` starts one, waits until it listens, and stops
it (SIGTERM, then SIGKILL after a few seconds) however the caller leaves the ``with``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

__all__ = ["ServerProcess", "amberdb_server", "zeo_server"]

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The server must import what the clients store under (ZEO resolves conflicts on the
    # server, so it unpickles benchmarks.engines.zodb.Counter).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess:
    """One server process; ``address`` is its ``(host, port)`` once :meth:`start` returned."""

    def __init__(self, argv: list[str], log_path: str, listening: str, port: int | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.listening = re.compile(listening)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(),
                cwd=ROOT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = self.listening.search(Path(self.log_path).read_text(errors="replace"))
            if match is not None:
                port = int(match.group("port")) if self.port is None else self.port
                self.address = ("127.0.0.1", port)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(
            f"server {self.argv} did not start listening:\n{Path(self.log_path).read_text(errors='replace')}"
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def amberdb_server(path: str, log_path: str, extra: list[str] | None = None) -> ServerProcess:
    """``amberdb serve PATH --listen 127.0.0.1:0`` (the port it prints is the one used)."""
    argv = [sys.executable, *(extra or []), "-m", "amberdb", "serve", path, "--listen", "127.0.0.1:0"]
    return ServerProcess(argv, log_path, r"listening on 127\.0\.0\.1:(?P<port>\d+)")


def zeo_server(path: str, log_path: str, extra: list[str] | None = None) -> ServerProcess:
    """``runzeo -a 127.0.0.1:PORT -f PATH`` (runzeo logs the port asked for, not the bound
    one, so a free port is picked first)."""
    port = _free_port()
    argv = [sys.executable, *(extra or []), "-m", "ZEO.runzeo", "-a", f"127.0.0.1:{port}", "-f", path]
    return ServerProcess(argv, log_path, r"listening on", port=port)
