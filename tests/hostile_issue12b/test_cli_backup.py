"""``amberdb backup``/``restore`` against hostile manifests, times and packs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import amberdb
from amberdb.cli.common import iso_time, parse_time
from amberdb.record import encode_record
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.utils import oid_repr, p64, tid_from_time, time_from_tid, z64

SRC = str(Path(amberdb.__file__).resolve().parents[1])
pytestmark = pytest.mark.timeout(120)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(
        [sys.executable, "-m", "amberdb", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("amberdb: error: "), lines[0]
    return lines[0]


def make_db(path: Path) -> None:
    db = amberdb.DB(str(path))
    with db.transaction() as conn:
        conn.root.a = amberdb.PersistentMapping(v=1)
    db.close()


@pytest.fixture
def backup(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data.fs"
    make_db(data)
    directory = tmp_path / "bk"
    result = run("backup", str(data), str(directory))
    assert result.returncode == 0, result.stderr
    return data, directory


def test_restore_at_a_time_before_the_pack_of_the_only_chain_is_not_silently_inconsistent(
    tmp_path: Path,
) -> None:
    """The chain restore picks for ``--at`` was packed after that moment: the state at that
    moment is gone from it (the pack kept only each object's newest revision), so a restore
    there must refuse, not write a database whose root refers to a missing object."""
    data = tmp_path / "data.fs"
    db = amberdb.DB(str(data))
    with db.transaction() as conn:
        conn.root.a = amberdb.PersistentMapping(v=1)
    moment = time_from_tid(db.storage.last_tid())
    with db.transaction() as conn:
        conn.root.a["v"] = 2  # the only revision of `a` the pack keeps
    db.pack()
    db.close()
    directory = tmp_path / "bk"
    assert run("backup", str(data), str(directory)).returncode == 0
    target = tmp_path / "restored.fs"
    result = run("restore", str(directory), str(target), "--at", repr(moment))
    if result.returncode == 0:
        # What a user relies on: what restore wrote is the database as it was then.
        check = run("verify", str(target))
        assert check.returncode == 0, check.stdout
    else:
        one_line_error(result)
        assert not target.exists()


def make_db_with_tids(path: Path, tids: list[bytes]) -> None:
    storage = FileStorage(path)
    serial = z64
    for i, tid in enumerate(tids):
        storage.begin(TransactionMeta(description=f"t{i}"), tid)
        record = encode_record(
            "amberdb.containers:PersistentMapping", [], pickle.dumps({"data": {"i": i}}, 5)
        )
        storage.store(z64, serial, record)
        storage.vote()
        serial = storage.finish()
    storage.close()


def rounded_down_tid() -> bytes:
    """A tid whose time, as every amberdb command shows it, lies before the tid itself."""
    base = int.from_bytes(tid_from_time(1_700_000_000.0), "big")
    for k in range(1, 10_000):
        tid = p64(base + k * 977)
        if parse_time(iso_time(time_from_tid(tid))) < time_from_tid(tid):
            return tid
    raise AssertionError("no such tid")  # pragma: no cover


def test_restore_at_the_time_undo_log_shows_includes_that_transaction(tmp_path: Path) -> None:
    wanted = rounded_down_tid()
    before = p64(int.from_bytes(wanted, "big") - 10**9)
    after = p64(int.from_bytes(wanted, "big") + 10**9)
    data = tmp_path / "data.fs"
    make_db_with_tids(data, [before, wanted, after])
    log = json.loads(run("undo-log", str(data), "--json").stdout)["transactions"]
    shown = {row["tid"]: row["time"] for row in log}[oid_repr(wanted)]
    directory = tmp_path / "bk"
    assert run("backup", str(data), str(directory)).returncode == 0
    target = tmp_path / "restored.fs"
    result = run("restore", str(directory), str(target), "--at", shown, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["last_tid"] == oid_repr(wanted)


@pytest.mark.parametrize("text", ["nan", "NaN", "-nan"])
def test_restore_at_nan_is_a_usage_error(backup: tuple[Path, Path], tmp_path: Path, text: str) -> None:
    _, directory = backup
    target = tmp_path / "r.fs"
    result = run("restore", str(directory), str(target), f"--at={text}")
    assert result.returncode == 2
    assert "is not a time" in one_line_error(result)
    assert not target.exists()


def test_restore_at_year_one_is_a_usage_error(backup: tuple[Path, Path], tmp_path: Path) -> None:
    _, directory = backup
    result = run("restore", str(directory), str(tmp_path / "r.fs"), "--at", "0001-01-01T00:00:00+00:00")
    assert result.returncode == 2
    one_line_error(result)


def tamper(directory: Path, change: Any) -> None:
    manifest = json.loads((directory / "backup.json").read_text())
    change(manifest)
    (directory / "backup.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_restore_never_reads_a_segment_outside_the_backup_directory(
    backup: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    _, directory = backup
    segment = json.loads((directory / "backup.json").read_text())["segments"][0]["file"]
    outside = tmp_path / "outside.fs"
    shutil.move(directory / segment, outside)  # same bytes, same sha256: only the name is hostile
    name = "../outside.fs" if kind == "relative" else str(outside)
    tamper(directory, lambda m: m["segments"][0].update(file=name))
    target = tmp_path / "r.fs"
    result = run("restore", str(directory), str(target))
    assert result.returncode != 0
    one_line_error(result)
    assert not target.exists()


def _drop(key: str) -> Any:
    return lambda m: m["segments"][0].pop(key)


SHAPES = {
    "manifest is a list": lambda m: (m.clear(), m.update(format=1, segments=[5])),
    "segment without chain": _drop("chain"),
    "segment without sha256": _drop("sha256"),
    "segment without end": _drop("end"),
    "file is null": lambda m: m["segments"][0].update(file=None),
    "last_tid not hex": lambda m: m["segments"][0].update(last_tid="zz"),
}


@pytest.mark.parametrize(
    ("command", "shape"),
    [
        *(("restore", shape) for shape in sorted(SHAPES) if shape != "last_tid not hex"),
        *(
            ("backup", shape)
            for shape in sorted(SHAPES)
            if shape not in ("file is null", "segment without sha256")
        ),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_reported_as_damaged(
    backup: tuple[Path, Path], tmp_path: Path, shape: str, command: str
) -> None:
    data, directory = backup
    tamper(directory, SHAPES[shape])
    if command == "restore":
        result = run("restore", str(directory), str(tmp_path / "r.fs"))
    else:
        result = run("backup", str(data), str(directory))
    line = one_line_error(result)
    assert result.returncode == 1, line
    assert "backup.json" in line


def test_backup_pack_backup_restores_both_points(tmp_path: Path) -> None:
    data = tmp_path / "data.fs"
    db = amberdb.DB(str(data))
    with db.transaction() as conn:
        conn.root.a = amberdb.PersistentMapping(v=1)
    directory = tmp_path / "bk"
    assert run("backup", str(data), str(directory)).returncode == 0
    first_time = time_from_tid(db.storage.last_tid())
    with db.transaction() as conn:
        conn.root.a["v"] = 2
        conn.root.b = amberdb.PersistentList([1])
    db.pack()
    with db.transaction() as conn:
        conn.root.a["v"] = 3
    db.close()
    result = run("backup", str(data), str(directory), "--json")
    assert result.returncode == 0
    assert "new full chain" in json.loads(result.stdout)["message"]
    for at, expected in ((repr(first_time), 1), (None, 3)):
        target = tmp_path / f"r{expected}.fs"
        extra = [] if at is None else ["--at", at]
        result = run("restore", str(directory), str(target), *extra)
        assert result.returncode == 0, result.stderr
        assert run("verify", str(target)).returncode == 0
        rdb = amberdb.DB(str(target), read_only=True)
        with rdb.transaction() as conn:
            assert conn.root.a["v"] == expected
        rdb.close()


def test_backup_while_a_writer_process_commits_restores_complete_transactions(tmp_path: Path) -> None:
    data = tmp_path / "data.fs"
    make_db(data)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, amberdb\n"
            "db = amberdb.DB(sys.argv[1])\n"
            "for i in range(400):\n"
            "    with db.transaction() as conn:\n"
            "        conn.root.a['v'] = i\n"
            "        conn.root.a.setdefault('log', amberdb.PersistentList()).append('x' * (i % 7) * 3000)\n"
            "db.close()\n",
            str(data),
        ],
        env=dict(os.environ, PYTHONPATH=SRC),
    )
    directory = tmp_path / "bk"
    try:
        for _ in range(8):
            result = run("backup", str(data), str(directory), "-q")
            assert result.returncode == 0, result.stderr
    finally:
        assert writer.wait(120) == 0
    assert run("backup", str(data), str(directory), "-q").returncode == 0
    manifest = json.loads((directory / "backup.json").read_text())
    for i, segment in enumerate(manifest["segments"]):
        target = tmp_path / f"r{i}.fs"
        at = repr(time_from_tid(bytes.fromhex(segment["last_tid"])) + 1e-3)
        result = run("restore", str(directory), str(target), "--at", at, "-q", "--json")
        assert result.returncode == 0, result.stderr
        assert run("verify", str(target), "-q").returncode == 0
    last = tmp_path / "r_last.fs"
    assert run("restore", str(directory), str(last), "-q").returncode == 0
    rdb = amberdb.DB(str(last), read_only=True)
    with rdb.transaction() as conn:
        assert conn.root.a["v"] == 399
        assert len(conn.root.a["log"]) == 400
    rdb.close()


def test_a_backup_interrupted_before_its_manifest_does_not_block_the_next_one(
    backup: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from amberdb.cli import backup as backup_module
    from amberdb.cli import main

    data, directory = backup
    db = amberdb.DB(str(data))
    with db.transaction() as conn:
        conn.root.a["v"] = 2
    db.close()

    def interrupted(path: str, data: bytes) -> None:
        raise KeyboardInterrupt  # the user's ^C, after the segment was renamed into place

    with monkeypatch.context() as patch:
        patch.setattr(backup_module, "replace_file", interrupted)
        assert main(["backup", str(data), str(directory), "-q"]) == 130
    # The previous backup is as it was...
    assert len(json.loads((directory / "backup.json").read_text())["segments"]) == 1
    capsys.readouterr()
    # ...and the next backup (a cron job, say) just works.
    assert main(["backup", str(data), str(directory), "-q"]) == 0, capsys.readouterr().err
    target = tmp_path / "r.fs"
    assert main(["restore", str(directory), str(target), "-q"]) == 0
    rdb = amberdb.DB(str(target), read_only=True)
    with rdb.transaction() as conn:
        assert conn.root.a["v"] == 2
    rdb.close()


def test_backing_up_another_database_into_a_backup_directory_is_refused(
    backup: tuple[Path, Path], tmp_path: Path
) -> None:
    first, directory = backup
    other = tmp_path / "other.fs"
    db = amberdb.DB(str(other))
    with db.transaction() as conn:
        conn.root.a = amberdb.PersistentMapping(v="other")
    db.close()
    result = run("backup", str(other), str(directory))
    assert result.returncode == 2
    assert str(first) in one_line_error(result) or "backup.json" in result.stderr
