"""``amberdb serve --tokens FILE`` reads the file again on SIGHUP: a token added with
``amberdb token add`` works without a restart; a broken file keeps the old tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amberdb import AuthenticationError, ClientStorage
from amberdb.server.auth import add_token


def _wait_for_line(process: subprocess.Popen[str], prefix: str, seconds: float = 20.0) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"no {prefix!r} line from the server")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_sighup_reloads_the_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    first = add_token(tokens, "first")
    command = [sys.executable, "-m", "amberdb", "serve", str(tmp_path / "data.fs")]
    server = subprocess.Popen(
        [*command, "--listen", "127.0.0.1:0", "--tokens", str(tokens)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(_wait_for_line(server, "listening on ").rsplit(":", 1)[1])
        ClientStorage("127.0.0.1", port, token=first, timeout=10).close()
        second = add_token(tokens, "second", "ro")
        with pytest.raises(AuthenticationError):
            ClientStorage("127.0.0.1", port, token=second, timeout=10)
        tokens.write_text("not json")  # a broken file: the tokens in force stay
        os.kill(server.pid, signal.SIGHUP)
        time.sleep(0.3)
        ClientStorage("127.0.0.1", port, token=first, timeout=10).close()
        add_token(tmp_path / "fresh.json", "unused")
        tokens.unlink()
        os.replace(tmp_path / "fresh.json", tokens)
        third = add_token(tokens, "third", "ro")
        os.kill(server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                client = ClientStorage("127.0.0.1", port, token=third, timeout=10)
                break
            except AuthenticationError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert client.read_only
        client.close()
        with pytest.raises(AuthenticationError):
            ClientStorage("127.0.0.1", port, token=first, timeout=10)  # gone from the new file
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "tokens not reloaded" in err and "tokens reloaded: 2" in err
