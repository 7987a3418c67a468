"""Issue 15 attacks that cross processes: claims of killed processes, rewrites under load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import amberdb
from amberdb import evolve

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def test_a_claim_of_a_killed_process_is_taken_over_at_once(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    amberdb.DB(str(path)).close()
    started = tmp_path / "started"
    script = textwrap.dedent(
        f"""
        import time, amberdb
        from amberdb import evolve
        def slow(conn):
            open({str(started)!r}, "w").close()
            time.sleep(60)
        evolve.Schema("killed", {{1: slow}}).run(amberdb.DB({str(path)!r}))
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], env=ENV)
    try:
        _wait_for(started, 30)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    db = amberdb.DB(str(path))
    ran: list[int] = []
    begun = time.monotonic()
    assert evolve.Schema("killed", {1: lambda conn: ran.append(1)}).run(db) == [1]
    assert time.monotonic() - begun < 10 and ran == [1]
    db.close()
