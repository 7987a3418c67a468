"""``amberdb serve`` as an operator runs it, and the other commands given amberdb:// URIs."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import amberdb
from amberdb import ClientStorage, PersistentMapping
from tests.server.procs import Processes, free_port


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_exits_0_on_signal_and_logs_each_connect_and_disconnect(
    procs: Processes, tmp_path: Path, sig: int
) -> None:
    server = procs.serve(tmp_path / "data.fs")
    for n in range(3):
        db = amberdb.DB(ClientStorage(server.address, timeout=10, name=f"app-{n}"))
        with db.transaction() as conn:
            conn.root()[f"k{n}"] = n
        db.close()
    log = server.wait_log(" disconnected", count=3)
    lines = log.splitlines()
    for n in range(3):
        assert len([line for line in lines if f"(app-{n}) connected" in line]) == 1, log
        assert len([line for line in lines if f"(app-{n}) disconnected" in line]) == 1, log
    # A client still connected when the signal comes does not keep it from exiting.
    held = ClientStorage(server.address, timeout=10)
    try:
        assert server.stop(sig, timeout=15) == 0, server.log()
    finally:
        held.close()
    assert "Traceback" not in server.log()
    assert server.lines == [f"listening on 127.0.0.1:{server.port}"]


def _one_line_error(result: object) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.returncode not in (0, None), stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_commands_with_an_amberdb_uri(procs: Processes, tmp_path: Path) -> None:
    server = procs.serve(tmp_path / "data.fs")
    uri = f"amberdb://127.0.0.1:{server.port}?timeout=10"
    db = amberdb.DB(ClientStorage(server.address, timeout=10))
    try:
        for n in range(5):
            with db.transaction() as conn:
                conn.root()[f"k{n}"] = PersistentMapping(v=n)
        with db.transaction() as conn:
            del conn.root()["k0"]  # garbage for pack
    finally:
        db.close()
    results = {
        "info": procs.cli("info", uri),
        "verify": procs.cli("verify", uri),
        "pack": procs.cli("pack", uri),
        "copy": procs.cli("copy", uri, str(tmp_path / "copy.fs")),
        "backup": procs.cli("backup", uri, str(tmp_path / "backup")),
        "history": procs.cli("history", uri, "0"),
        "undo-log": procs.cli("undo-log", uri),
    }
    for name, result in results.items():
        assert "Traceback" not in result.stderr, f"{name}: {result.stderr}"
        if result.returncode != 0:
            _one_line_error(result)
    assert results["info"].returncode == 0, results["info"].stderr
    assert results["verify"].returncode == 0, results["verify"].stderr
    assert results["pack"].returncode == 0, results["pack"].stderr
    assert results["copy"].returncode == 0, results["copy"].stderr
    copied = amberdb.DB(str(tmp_path / "copy.fs"))
    try:
        with copied.transaction() as conn:
            assert sorted(conn.root()) == ["k1", "k2", "k3", "k4"]
    finally:
        copied.close()
    if results["backup"].returncode != 0:
        assert "file" in results["backup"].stderr.lower()


def test_command_with_an_unreachable_server_fails_in_one_line(procs: Processes, tmp_path: Path) -> None:
    port = free_port()
    for _ in range(4):  # the stray lines come from a race, lost about 3 times in 4
        gone = procs.cli("info", f"amberdb://127.0.0.1:{port}?timeout=0.5", timeout=30)
        _one_line_error(gone)


def test_serve_bad_arguments_fail_in_one_line(procs: Processes, tmp_path: Path) -> None:
    for args in (
        ["--listen", "nonsense"],
        ["--listen", "127.0.0.1:99999"],
        ["--listen", "127.0.0.1:0", "--tls-cert", str(tmp_path / "missing.pem")],
        ["--listen", "127.0.0.1:0", "--tls-cert", str(tmp_path / "a"), "--tls-key", str(tmp_path / "b")],
        ["--listen", "127.0.0.1:0", "--tokens", str(tmp_path / "no-such-tokens.json")],
        [],
    ):
        result = procs.cli("serve", str(tmp_path / "data.fs"), *args, timeout=20)
        _one_line_error(result)
    busy = procs.serve(tmp_path / "data.fs")
    taken = procs.cli("serve", str(tmp_path / "other.fs"), "--listen", f"127.0.0.1:{busy.port}", timeout=20)
    _one_line_error(taken)
    second = procs.cli("serve", str(tmp_path / "data.fs"), "--listen", "127.0.0.1:0", timeout=20)
    _one_line_error(second)  # the data file is locked by the first server
