"""Real processes for the server tests: ``amberdb serve`` and client scripts, on 127.0.0.1,
each bounded in time and always killed by whoever started it."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SRC = str(Path(__file__).resolve().parents[2] / "src")
START_TIMEOUT = 20.0


def child_env(*extra_path: str | os.PathLike[str]) -> dict[str, str]:
    """The environment of a child: only ``src`` (and ``extra_path``) importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = os.pathsep.join([SRC, *map(str, extra_path)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Served:
    """One ``amberdb serve`` process: its port, its stderr (the log) and how to stop it."""

    def __init__(
        self, target: str | os.PathLike[str], *args: str, listen: str = "127.0.0.1:0", cwd: Path
    ) -> None:
        self.target = str(target)
        self.args = args
        self.cwd = cwd
        self.log_path = cwd / f"serve-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "amberdb", "serve", self.target, *args]
        if listen:
            command += ["--listen", listen]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=child_env(),
            cwd=cwd,
            start_new_session=True,
        )
        self.host = ""
        self.port = 0
        self.lines: list[str] = []
        try:
            line = self._read_line(START_TIMEOUT)
            if not line.startswith("listening on "):
                raise RuntimeError(f"amberdb serve printed {line!r}; log: {self.log()}")
            where = line[len("listening on ") :]
            host, _, port = where.rpartition(":")
            self.host, self.port = host, int(port)
        except BaseException:
            self.kill()
            raise

    def _read_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buffer = b""
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"amberdb serve said nothing within {timeout} s; log: {self.log()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(
                        f"amberdb serve exited ({self.proc.wait(5)}) before listening; log: {self.log()}"
                    )
                buffer += chunk
        line, _, _ = buffer.partition(b"\n")
        self.lines.append(line.decode())
        return line.decode()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> str:
        """Wait until ``text`` appears ``count`` times in the log; the log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if log.count(text) >= count or time.monotonic() > deadline:
                return log
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig``; the exit status (killed if it does not exit within ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close_files()
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            with _suppress_lookup():
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.kill()
        self.proc.wait(10)
        self._close_files()

    def _close_files(self) -> None:
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        if not self._log.closed:
            self._log.close()


@contextmanager
def _suppress_lookup() -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, PermissionError):
        pass


class Processes:
    """Everything a test started; :meth:`cleanup` kills what is still running."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[Served] = []
        self.children: list[subprocess.Popen[str]] = []

    def serve(self, target: str | os.PathLike[str], *args: str, listen: str = "127.0.0.1:0") -> Served:
        server = Served(target, *args, listen=listen, cwd=self.directory)
        self.servers.append(server)
        return server

    def spawn(
        self, code: str, *args: str, extra_path: Sequence[str | os.PathLike[str]] = ()
    ) -> subprocess.Popen[str]:
        """Start ``python -c code args...`` with stdout and stderr piped (text)."""
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(*extra_path),
            cwd=self.directory,
            start_new_session=True,
        )
        self.children.append(proc)
        return proc

    def run(
        self, code: str, *args: str, timeout: float = 30.0, extra_path: Sequence[str | os.PathLike[str]] = ()
    ) -> subprocess.CompletedProcess[str]:
        proc = self.spawn(code, *args, extra_path=extra_path)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"child did not finish within {timeout} s:\n{out}\n{err}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "amberdb", *args],
            capture_output=True,
            text=True,
            env=child_env(),
            cwd=self.directory,
            timeout=timeout,
        )

    def cleanup(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                with _suppress_lookup():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
            with _suppress_lookup():
                proc.communicate(timeout=10)
        for server in self.servers:
            server.kill()


_READ: dict[int, tuple[bytearray, list[str]]] = {}
"""Per child pid: bytes of its stdout read but not yet split into lines, and the lines
:func:`read_until` consumed (``finish`` returns them too)."""


def finish(proc: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str, str]:
    """Wait for a spawned child; (status, all its stdout, stderr); killed past ``timeout``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child did not finish within {timeout} s:\n{out}\n{err}") from None
    buffer, lines = _READ.pop(proc.pid, (bytearray(), []))
    earlier = "".join(line + "\n" for line in lines) + buffer.decode(errors="replace")
    return proc.returncode, earlier + out, err


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 20.0) -> list[str]:
    """Lines of ``proc``'s stdout up to and including the first one that starts with ``marker``
    (read from the pipe itself: a buffered reader would hide lines from ``select``)."""
    assert proc.stdout is not None
    buffer, consumed = _READ.setdefault(proc.pid, (bytearray(), []))
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while True:
        while b"\n" in buffer:
            raw, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            line = raw.decode(errors="replace")
            consumed.append(line)
            lines.append(line)
            if line.startswith(marker):
                return lines
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {timeout} s; got {lines}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            raise AssertionError(f"the child ended before {marker!r}; got {lines}; stderr: {_stderr(proc)}")
        buffer += chunk


def _stderr(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None or proc.stderr is None:
        return "(running)"
    return proc.stderr.read()


def raw_connect(address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    return sock


def wait_closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Read and drop until the peer closes (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        if not data:
            return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_cert(directory: Path, name: str, cn: str = "localhost") -> tuple[Path, Path] | None:
    """A self-signed certificate (CA too) and key for ``cn`` and 127.0.0.1, or None if openssl is missing."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    try:
        result = subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={cn}",
                "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-addext", "basicConstraints=critical,CA:TRUE",
            ],
            capture_output=True,
            timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return cert, key


def count_single_loads(storage: Any, monkeypatch: Any) -> list[bytes]:
    """Record every load a ClientStorage sends to its server one record at a time (prefetch
    batches and cache hits are not counted)."""
    loads: list[bytes] = []
    original = storage._load_remote

    def counting(oid: bytes, before: Any) -> Any:
        loads.append(oid)
        return original(oid, before)

    monkeypatch.setattr(storage, "_load_remote", counting)
    return loads
