"""The ``amberdb`` command, run as a user runs it: ``python -m amberdb ...`` in a subprocess.

Each test builds a real file database with the object layer, runs a subcommand and checks
its output and exit status.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.btrees import OOBTree
from amberdb.record import decode_header, encode_record
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.utils import oid_repr, p64, z64

SRC = str(Path(amberdb.__file__).resolve().parents[1])


def run(*args: str, check: int | None = 0, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m amberdb ARGS`` with this checkout's sources; asserts the exit status."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "amberdb", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check is not None:
        assert result.returncode == check, (result.returncode, result.stdout, result.stderr)
    return result


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("amberdb: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def commit(db: amberdb.DB, note: str, change: Any, user: str = "tester") -> None:
    with db.transaction() as conn:
        txn = conn.transaction_manager.get()
        txn.note(note)
        txn.user = user
        change(conn.root)


def make_database(path: Path) -> None:
    """Three transactions: a mapping, a 300-key OOBTree of lists, then a change to the mapping."""
    db = amberdb.DB(str(path))

    def first(root: Any) -> None:
        root.m = amberdb.PersistentMapping(a=1, marker="UNIQUE-MARKER-0123456789")

    def second(root: Any) -> None:
        tree = OOBTree()
        for i in range(300):
            tree[f"k{i:04d}"] = amberdb.PersistentList([i])
        root.tree = tree

    def third(root: Any) -> None:
        root.m["b"] = 2

    commit(db, "first", first)
    commit(db, "second", second)
    commit(db, "third", third)
    db.close()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "data.fs"
    make_database(path)
    return path


def transactions(path: Path) -> list[tuple[bytes, TransactionMeta, list[tuple[bytes, bytes, bytes]]]]:
    storage = FileStorage(path, read_only=True)
    try:
        return [
            (txn.tid, txn.meta, [(d.oid, d.tid, d.record) for d in txn.records]) for txn in storage.iterator()
        ]
    finally:
        storage.close()


# -- info -----------------------------------------------------------------------------------


def test_info_lists_size_objects_transactions_and_classes(database: Path) -> None:
    out = run("info", str(database)).stdout
    assert f"size:         {database.stat().st_size:,} bytes" in out
    assert "objects:      308" in out  # root, m, tree, its 5 buckets, 300 lists
    assert "transactions: 4" in out  # the root's creation, then three
    assert "amberdb.containers:PersistentList" in out


def test_info_json(database: Path) -> None:
    report = json.loads(run("info", f"file://{database}", "--json").stdout)
    assert report["size"] == database.stat().st_size
    tids = [tid for tid, _, _ in transactions(database)]
    assert report["transactions"] == len(tids)
    assert report["first_commit"]["tid"] == oid_repr(tids[0])
    assert report["last_commit"]["tid"] == oid_repr(tids[-1])
    classes = report["classes"]
    assert classes["amberdb.containers:PersistentList"] == 300
    assert classes["amberdb.btrees:OOBTree"] == 1
    assert classes["amberdb.containers:PersistentMapping"] == 2  # the root and m
    assert report["objects"] == sum(classes.values())
    datetime.datetime.fromisoformat(report["last_commit"]["time"])


def test_read_only_commands_work_while_a_writer_has_the_file_open(database: Path) -> None:
    writer = FileStorage(database)
    try:
        run("info", str(database))
        run("verify", str(database))
    finally:
        writer.close()


# -- errors ---------------------------------------------------------------------------------


def test_unknown_scheme_is_one_line(tmp_path: Path) -> None:
    result = run("info", "nosuch://x", check=2)
    assert_one_line_error(result, "unknown storage scheme 'nosuch'")


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.fs"
    for command in (["info"], ["verify"], ["pack"], ["backup"], ["undo-log"]):
        args = [*command, str(missing)] + ([str(tmp_path / "b")] if command == ["backup"] else [])
        assert_one_line_error(run(*args, check=2), "no such file")
        assert not missing.exists()


def test_not_an_amberdb_file_is_one_line(tmp_path: Path) -> None:
    other = tmp_path / "other.fs"
    other.write_bytes(b"this is not a database" * 10)
    assert_one_line_error(run("info", str(other), check=2))


def test_usage_errors_are_one_line(database: Path) -> None:
    assert_one_line_error(run(check=2))
    assert_one_line_error(run("info", check=2), "URI")
    assert_one_line_error(run("history", str(database), "zz", check=2), "not an oid")
    assert_one_line_error(run("frobnicate", check=2), "frobnicate")


def test_locked_file_gives_a_clear_message(database: Path) -> None:
    holder = FileStorage(database)  # this process holds the writer's lock
    try:
        result = run("pack", str(database), check=2)
    finally:
        holder.close()
    line = assert_one_line_error(result, "already open for writing by another process")
    assert f"pid {os.getpid()}" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run("--debug", "info", "nosuch://x", check=None)
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_help_lists_every_subcommand() -> None:
    out = run("--help").stdout
    for name in ("info", "pack", "verify", "history", "undo-log", "copy", "backup", "restore"):
        assert name in out


# -- verify ---------------------------------------------------------------------------------


def test_verify_a_sound_database(database: Path) -> None:
    result = run("verify", str(database))
    assert result.stdout.strip().endswith("OK")
    report = json.loads(run("verify", str(database), "--json").stdout)
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["counts"]["reachable"] == 308
    assert report["counts"]["btrees"] == 1


def test_verify_finds_a_flipped_byte(database: Path) -> None:
    db = amberdb.DB(str(database), read_only=True)
    with db.transaction() as conn:
        m_oid = conn.root.m._p_oid
    db.close()
    data = bytearray(database.read_bytes())
    at = data.rindex(b"UNIQUE-MARKER")  # in m's newest revision
    data[at + 3] ^= 0x20
    database.write_bytes(bytes(data))
    result = run("verify", str(database), check=1)
    assert "checksum mismatch" in result.stdout
    report = json.loads(run("verify", str(database), "--json", check=1).stdout)
    assert report["ok"] is False
    (checksum,) = [p for p in report["problems"] if p["check"] == "checksum" and p["file"] == "data"]
    assert checksum["offset"] < at and f"offset {checksum['offset']}" in checksum["message"]
    # The index file lets the file open; loading m's newest revision then fails its checksum.
    (unreadable,) = [p for p in report["problems"] if p["check"] == "record"]
    assert unreadable["oid"] == oid_repr(m_oid)
    assert unreadable["path"][-1] == f"{oid_repr(m_oid)} (unreadable)"


def test_verify_a_damaged_file_without_its_index(database: Path) -> None:
    Path(str(database) + ".index").unlink()
    data = bytearray(database.read_bytes())
    data[data.rindex(b"UNIQUE-MARKER") + 3] ^= 0x20
    database.write_bytes(bytes(data))
    report = json.loads(run("verify", str(database), "--json", check=1).stdout)
    assert report["problems"][0]["check"] == "checksum"
    assert any("does not open as it is" in note for note in report["notes"])
    result = run("info", str(database), check=1)
    assert_one_line_error(result, "amberdb verify")


def test_verify_finds_a_dangling_reference(database: Path) -> None:
    db = amberdb.DB(str(database))
    with db.transaction() as conn:
        conn.root.holder = amberdb.PersistentMapping()
    with db.transaction() as conn:
        holder_oid = conn.root.holder._p_oid
        root_class = decode_header(db.storage.load(z64)[0]).class_name
    storage = db.storage
    _, serial = storage.load(holder_oid)
    missing = p64(999_999)
    record = encode_record(
        "amberdb.containers:PersistentMapping",
        [(missing, "amberdb.containers:PersistentList")],
        pickle.dumps({"data": {}}, protocol=5),
    )
    storage.begin(TransactionMeta(description="hand-written record"))
    storage.store(holder_oid, serial, record)
    storage.vote()
    storage.finish()
    db.close()

    result = run("verify", str(database), check=1)
    assert "dangling reference" in result.stdout
    assert oid_repr(missing) in result.stdout
    report = json.loads(run("verify", str(database), "--json", check=1).stdout)
    (problem,) = report["problems"]
    assert problem["check"] == "reference"
    assert problem["oid"] == oid_repr(missing)
    assert problem["referenced_by"] == oid_repr(holder_oid)
    assert problem["path"] == [
        f"0x0 ({root_class})",
        f"{oid_repr(holder_oid)} (amberdb.containers:PersistentMapping)",
        f"{oid_repr(missing)} (missing)",
    ]


def test_verify_finds_a_damaged_btree(database: Path) -> None:
    db = amberdb.DB(str(database))
    with db.transaction() as conn:
        tree = conn.root.tree
        tree_oid = tree._p_oid
        bucket = tree._children[1]
        bucket._keys.reverse()  # keys out of order
        bucket._values.reverse()
        bucket._p_changed = True
    db.close()
    result = run("verify", str(database), check=1)
    assert "keys out of order" in result.stdout
    report = json.loads(run("verify", str(database), "--json", check=1).stdout)
    (problem,) = report["problems"]
    assert problem["check"] == "btree"
    assert problem["oid"] == oid_repr(tree_oid)
    assert problem["path"][-1] == f"{oid_repr(tree_oid)} (amberdb.btrees:OOBTree)"
    assert problem["path"][0].startswith("0x0 (")


def test_verify_checks_a_bucket_outside_a_tree(tmp_path: Path) -> None:
    from amberdb.btrees import OOBucket

    path = tmp_path / "b.fs"
    db = amberdb.DB(str(path))
    with db.transaction() as conn:
        bucket = OOBucket()
        for key in "abc":
            bucket[key] = key
        conn.root.bucket = bucket
    with db.transaction() as conn:
        conn.root.bucket._keys.reverse()
        conn.root.bucket._p_changed = True
    db.close()
    report = json.loads(run("verify", str(path), "--json", check=1).stdout)
    (problem,) = report["problems"]
    assert problem["check"] == "btree" and "out of order" in problem["message"]


class Unimportable(amberdb.Persistent):
    """Defined only in the test process: the verify subprocess cannot import it."""


def test_verify_never_loads_application_classes(tmp_path: Path) -> None:
    path = tmp_path / "app.fs"
    db = amberdb.DB(str(path), allowed_classes=[Unimportable])
    with db.transaction() as conn:
        tree = OOBTree()
        for i in range(200):
            tree[f"k{i:04d}"] = Unimportable()
        conn.root.tree = tree
        conn.root.plain = Unimportable()
    db.close()
    report = json.loads(run("verify", str(path), "--json").stdout)
    assert report["ok"], report
    assert report["counts"]["btrees"] == 1


# -- backup and restore ---------------------------------------------------------------------


def manifest(directory: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((directory / "backup.json").read_text())
    return loaded


def add_commits(path: Path, count: int, start: int) -> None:
    db = amberdb.DB(str(path))
    for i in range(start, start + count):

        def change(root: Any, i: int = i) -> None:
            root.m[f"extra{i}"] = amberdb.PersistentList(range(i))

        commit(db, f"extra {i}", change, user=f"user{i}")
    db.close()


def test_backup_incremental_and_restore(database: Path, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    first_size = database.stat().st_size
    out = run("backup", str(database), str(backups)).stdout
    assert "full copy" in out
    (segment,) = manifest(backups)["segments"]
    assert (segment["start"], segment["end"]) == (0, first_size)
    assert (backups / segment["file"]).stat().st_size == first_size
    assert segment["file_id"] == database.read_bytes()[8:16].hex()

    time.sleep(0.02)
    middle = time.time()
    time.sleep(0.02)
    add_commits(database, 3, 0)
    second_size = database.stat().st_size
    out = run("backup", f"file://{database}", str(backups)).stdout
    assert "incremental" in out
    segments = manifest(backups)["segments"]
    assert len(segments) == 2
    tail = segments[1]
    assert (tail["start"], tail["end"]) == (first_size, second_size)
    assert (backups / tail["file"]).stat().st_size == second_size - first_size  # only the tail
    assert tail["chain"] == segments[0]["chain"]

    out = run("backup", str(database), str(backups)).stdout
    assert "nothing new" in out
    assert len(manifest(backups)["segments"]) == 2

    restored = tmp_path / "restored.fs"
    run("restore", str(backups), str(restored))
    assert restored.read_bytes() == database.read_bytes()
    assert transactions(restored) == transactions(database)

    earlier = tmp_path / "earlier.fs"
    report = json.loads(run("restore", str(backups), str(earlier), "--at", repr(middle), "--json").stdout)
    before = [txn for txn in transactions(database) if txn[0] < tid_at(middle)]
    assert transactions(earlier) == before
    assert report["transactions"] == len(before)
    db = amberdb.DB(str(earlier), read_only=True)
    with db.transaction() as conn:
        assert "extra0" not in conn.root.m
    db.close()

    iso = datetime.datetime.fromtimestamp(middle, datetime.timezone.utc).isoformat()
    at_iso = tmp_path / "at-iso.fs"
    run("restore", str(backups), str(at_iso), "--at", iso)
    assert transactions(at_iso) == before

    # restore never overwrites
    assert_one_line_error(run("restore", str(backups), str(restored), check=2), "exists")


def tid_at(seconds: float) -> bytes:
    from amberdb.utils import tid_from_time

    return tid_from_time(seconds)


def test_restore_refuses_a_damaged_segment(database: Path, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    run("backup", str(database), str(backups))
    add_commits(database, 2, 0)
    run("backup", str(database), str(backups))
    name = manifest(backups)["segments"][1]["file"]
    damaged = bytearray((backups / name).read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    (backups / name).write_bytes(bytes(damaged))
    target = tmp_path / "restored.fs"
    result = run("restore", str(backups), str(target), check=1)
    assert_one_line_error(result, name, "sha256")
    assert not target.exists()
    assert not Path(str(target) + ".tmp").exists()


def test_backup_starts_a_new_chain_when_the_file_is_replaced(database: Path, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    run("backup", str(database), str(backups))
    other = tmp_path / "other.fs"
    make_database(other)  # another file id, as a pack makes
    add_commits(other, 1, 0)
    os.replace(other, database)
    if os.path.exists(str(other) + ".index"):
        os.replace(str(other) + ".index", str(database) + ".index")
    out = run("backup", str(database), str(backups)).stdout
    assert "new full chain" in out
    segments = manifest(backups)["segments"]
    assert [s["chain"] for s in segments] == [1, 2]
    assert segments[1]["start"] == 0
    restored = tmp_path / "restored.fs"
    run("restore", str(backups), str(restored))
    assert transactions(restored) == transactions(database)


def test_backup_while_a_writer_commits_takes_only_committed_transactions(
    database: Path, tmp_path: Path
) -> None:
    writer = FileStorage(database)
    _, serial = writer.load(z64)
    writer.begin(TransactionMeta(description="in flight"))
    writer.store(z64, serial, writer.load(z64)[0])
    writer.vote()  # durable but not finished: not committed for readers while the writer lives
    try:
        backups = tmp_path / "backups"
        run("backup", str(database), str(backups))
        (segment,) = manifest(backups)["segments"]
        restored = tmp_path / "restored.fs"
        run("restore", str(backups), str(restored))
        assert all(meta.description != "in flight" for _, meta, _ in transactions(restored))
        assert segment["end"] < database.stat().st_size
    finally:
        writer.abort()
        writer.close()


def test_backup_of_a_new_memory_storage_is_refused(tmp_path: Path) -> None:
    assert_one_line_error(run("backup", "memory:", str(tmp_path / "b"), check=2), "in-memory storage")
    assert not (tmp_path / "b").exists()


def test_backup_of_a_sqlite_database_goes_through_a_mirror(tmp_path: Path) -> None:
    uri = f"sqlite://{tmp_path / 'app.sqlite'}"
    db = amberdb.DB(uri)
    with db.transaction() as conn:
        conn.root.n = 1
    db.close()
    run("backup", uri, str(tmp_path / "b"))
    db = amberdb.DB(uri)
    with db.transaction() as conn:
        conn.root.n = 2
    db.close()
    second = run("backup", uri, str(tmp_path / "b"))
    assert "1 new transaction" in second.stdout and "incremental" in second.stdout
    run("restore", str(tmp_path / "b"), str(tmp_path / "restored.fs"))
    run("copy", str(tmp_path / "restored.fs"), f"sqlite://{tmp_path / 'back.sqlite'}")
    db = amberdb.DB(f"sqlite://{tmp_path / 'back.sqlite'}")
    with db.transaction() as conn:
        assert conn.root.n == 2
    db.close()


# -- pack, history, undo-log, copy ----------------------------------------------------------


def test_pack_reports_sizes(database: Path, tmp_path: Path) -> None:
    add_commits(database, 3, 0)
    result = run("pack", str(database), "--json")
    report = json.loads(result.stdout)
    assert report["size_after"] <= report["size_before"]
    run("verify", str(database))


def test_history_newest_first(database: Path) -> None:
    add_commits(database, 2, 0)
    db = amberdb.DB(str(database))
    with db.transaction() as conn:
        m_oid = conn.root.m._p_oid
    db.close()
    report = json.loads(run("history", str(database), oid_repr(m_oid), "--json").stdout)
    revisions = report["revisions"]
    assert [r["description"] for r in revisions] == ["extra 1", "extra 0", "third", "first"]
    assert revisions[0]["user"] == "user1"
    assert all(r["size"] > 0 for r in revisions)
    decimal = json.loads(
        run("history", str(database), str(int.from_bytes(m_oid, "big")), "--size", "2", "--json").stdout
    )
    assert decimal["revisions"] == revisions[:2]
    out = run("history", str(database), oid_repr(m_oid)).stdout
    assert "extra 1" in out
    assert_one_line_error(run("history", str(database), "0x7777", check=1), "no object 0x7777")


def test_undo_log_newest_first(database: Path) -> None:
    add_commits(database, 3, 0)
    report = json.loads(run("undo-log", str(database), "--limit", "2", "--json").stdout)
    assert [t["description"] for t in report["transactions"]] == ["extra 2", "extra 1"]
    assert report["transactions"][0]["user"] == "user2"
    assert "extra 2" in run("undo-log", str(database)).stdout


def test_copy_then_verify(database: Path, tmp_path: Path) -> None:
    destination = tmp_path / "copy.fs"
    out = run("copy", str(database), str(destination)).stdout
    assert "copied" in out and out.strip().endswith("OK")
    assert transactions(destination) == transactions(database)
    report = json.loads(run("copy", str(database), str(destination), "--json").stdout)
    assert report["copied_transactions"] == 0 and report["ok"]


@pytest.fixture(autouse=True)
def _no_stray_transaction() -> Iterator[None]:
    yield
    transaction.abort()


# -- the progress line ----------------------------------------------------------------------


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def _drive(stream: _Stream, quiet: bool = False) -> str:
    from amberdb.cli.progress import Progress

    clock = [100.0]
    progress = Progress("copying", quiet=quiet, stream=stream)  # type: ignore[arg-type]
    progress._now = lambda: clock[0]
    progress._start = clock[0]
    for step in range(101):
        clock[0] += 0.1
        progress.update(step * 1024 * 1024, 100 * 1024 * 1024)
    progress.close()
    return stream.text


def test_progress_on_a_terminal_redraws_one_line() -> None:
    text = _drive(_Stream(tty=True))
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = text.split("\r\x1b[K")[1:]
    assert 30 < len(frames) <= 101
    assert "MiB/s" in frames[10] and "left" in frames[10] and "%" in frames[10]
    assert frames[-1].startswith("copying  100.0%")


def test_progress_elsewhere_prints_a_few_plain_lines() -> None:
    lines = _drive(_Stream(tty=False)).splitlines()
    assert 5 <= len(lines) <= 12  # about every 10%
    assert "\r" not in "".join(lines)
    assert lines[-1].startswith("copying  100.0%")


def test_progress_quiet_prints_nothing() -> None:
    assert _drive(_Stream(tty=True), quiet=True) == ""
