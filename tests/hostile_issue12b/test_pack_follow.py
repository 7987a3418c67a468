"""Packs seen by a read-only follower in another process, and what a pack does to oids."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import amberdb
from amberdb.storage.file import FileStorage
from amberdb.utils import p64, u64
from tests.storage.test_pack import Model, rec

SRC = str(Path(amberdb.__file__).resolve().parents[1])
pytestmark = pytest.mark.timeout(180)

FOLLOWER = r"""
import sys, time
import amberdb
from amberdb.exceptions import ConflictError
db = amberdb.DB(sys.argv[1], read_only=True)
deadline = time.monotonic() + 60
seen = set()
while time.monotonic() < deadline:
    with db.transaction() as conn:
        root = conn.root
        if getattr(root, "items", None) is None:
            continue
        a, b, n = root.a["n"], root.b["n"], len(root.items)
        if not (a == b == n):
            print("inconsistent", a, b, n, flush=True)
            sys.exit(1)
        seen.add(a)
        if a >= int(sys.argv[2]):
            break
print("saw", len(seen), flush=True)
db.close()
"""


def test_a_follower_process_reads_consistent_states_through_repeated_packs(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    db = amberdb.DB(str(path))
    with db.transaction() as conn:
        conn.root.a = amberdb.PersistentMapping(n=0)
        conn.root.b = amberdb.PersistentMapping(n=0)
        conn.root.items = amberdb.PersistentList()
    last = 400
    child = subprocess.Popen(
        [sys.executable, "-c", FOLLOWER, str(path), str(last)],
        env=dict(os.environ, PYTHONPATH=SRC),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for i in range(1, last + 1):
            with db.transaction() as conn:
                conn.root.a["n"] = i
                conn.root.b["n"] = i
                conn.root.items.append(amberdb.PersistentMapping(i=i))
                conn.root.garbage = amberdb.PersistentList([i] * 50)  # the previous one is garbage
            if i % 7 == 0:
                db.pack()
            time.sleep(0.002)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
        db.close()
    assert child.returncode == 0, (out, err)
    assert "Traceback" not in err, err
    assert int(out.split()[-1]) > 20, out  # it followed many states, across many packs


def test_an_open_after_a_pack_and_a_crash_never_reuses_a_dropped_oid(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    fs = FileStorage(path)
    model.commit(fs, {0: rec([1], b"root"), 1: rec([], b"a")})
    garbage = u64(fs.new_oid())
    model.commit(fs, {garbage: rec([], b"unreferenced")})
    fs.pack(fs.last_tid())
    # A crash now: no clean close writes an index; the one the pack wrote must keep the next oid.
    fs._release_files()
    fs._closed = True
    with FileStorage(path) as again:
        assert u64(again.new_oid()) > garbage
        assert again.new_oid() != p64(garbage)


def test_pack_command_on_an_empty_file_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.fs"
    path.write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "amberdb", "pack", str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=SRC),
        timeout=60,
    )
    assert "Traceback" not in result.stderr
    assert path.stat().st_size == 0
