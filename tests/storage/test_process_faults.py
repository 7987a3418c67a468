"""Real processes killed at system calls of commit and of recovery, and readers beside aborting writers.

Each test names the storage.py invariant it checks.  Children run ``fault_child.py``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from amberdb.exceptions import POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage, verify
from amberdb.storage.file import format as fmt
from amberdb.utils import p64, z64

from .fault_child import ABORTED_BASE, TRANSACTIONS, record_for
from .layout import transactions

CHILD = Path(__file__).with_name("fault_child.py")
HOWS = ("before", "after", "torn")
pytestmark = pytest.mark.timeout(240)


def run_child(*args: object, timeout: float = 60) -> tuple[int, list[str], str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, str(CHILD), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return done.returncode, done.stdout.splitlines(), done.stderr


def calls_made(lines: list[str]) -> int:
    (last,) = [line for line in lines if line.startswith("calls ")]
    return int(last.split()[1])


def kill_points(lines: list[str]) -> list[tuple[int, str]]:
    """Every call of a run, killed before and after it, and torn where a kill can tear it."""
    points = []
    for line in lines:
        if line.startswith("call "):
            _, number, name = line.split()
            hows = HOWS if name == "pwrite-pages" else HOWS[:2]
            points += [(int(number), how) for how in hows]
    return points


def check_after_crash(path: Path, lines: list[str]) -> None:
    """Every acknowledged commit is there, no aborted one is, and the file opens and verifies."""
    acked: dict[int, bytes] = {}
    aborted: list[int] = []
    for line in lines:
        parts = line.split()
        if parts[:1] == ["ok"]:
            acked[int(parts[1])] = bytes.fromhex(parts[2])
        elif parts[:1] == ["aborted"]:
            aborted.append(int(parts[1]))
    ro_tids: list[bytes] = []
    if path.exists() and path.stat().st_size:
        before = path.read_bytes()
        with FileStorage(path, read_only=True) as ro:  # no writer is alive: it judges as one would
            ro_tids = [t.tid for t in ro.iterator()]
        assert path.read_bytes() == before
    with FileStorage(path) as fs:  # never refused: a crash only ever leaves a torn tail (I3)
        for i, tid in acked.items():
            assert fs.load(p64(i + 1)) == (record_for(i), tid), i
        for i in aborted:
            with pytest.raises(POSKeyError):
                fs.load(p64(ABORTED_BASE + i))
        tids = [t.tid for t in fs.iterator()]
        assert tids == sorted(set(tids))
        if acked:
            root, root_tid = fs.load(z64)
            assert root_tid >= max(acked.values()) and int(root) >= max(acked)
    assert ro_tids == tids
    report = verify(path)
    assert report.ok, str(report)
    assert not report.notes, report.notes  # the writable open cut or finished whatever was left


def test_sigkill_at_system_calls_of_commits(tmp_path: Path) -> None:
    """I2, I3, I4, I5: killed before, after or in the middle of any write or sync of a commit."""
    returncode, lines, err = run_child("commit", tmp_path / "count.fs", 0, "before")
    assert returncode == 0, err
    total = calls_made(lines)
    assert total > 3 * TRANSACTIONS
    every = kill_points(lines)
    assert any(how == "torn" for _, how in every)
    points = sorted(set(random.Random(20261130).sample(every, 45)) | {(1, "before"), (total, "after")})
    for n, (kill_at, how) in enumerate(points):
        path = tmp_path / f"killed{n}.fs"
        returncode, lines, err = run_child("commit", path, kill_at, how)
        assert returncode == -signal.SIGKILL, (kill_at, how, err)
        check_after_crash(path, lines)


def recovery_images(tmp_path: Path) -> dict[str, tuple[bytes, int]]:
    """Files a crash leaves for an open to recover: (bytes, transactions committed in them)."""
    path = tmp_path / "image.fs"
    images: dict[str, tuple[bytes, int]] = {}
    with FileStorage(path) as fs:
        for i in range(3):
            fs.begin(TransactionMeta())
            fs.store(p64(i + 1), z64, record_for(i))
            fs.vote()
            fs.finish()
        fs.begin(TransactionMeta())
        fs.store(p64(50), z64, os.urandom(3 * 4096))  # three pages, written by vote in one go
        fs.vote()
        images["voted tail"] = (path.read_bytes(), 4)
        fs.abort()
        fs.begin(TransactionMeta())
        fs.store(p64(51), z64, os.urandom(2 << 20))  # streamed behind a zero header
        images["in progress tail"] = (path.read_bytes(), 3)
        fs.abort()
    data = images["voted tail"][0]
    images["cut tail"] = (data[: len(data) - 5000], 3)
    last = transactions(data)[-1][0]
    assert data[last + fmt.STATUS_OFFSET : last + fmt.STATUS_OFFSET + 1] == fmt.STATUS_VOTED
    return images


def test_sigkill_during_recovery(tmp_path: Path) -> None:
    """I3, I4: killed while an open cuts a torn tail or marks a voted one finished: open again."""
    for n, (name, (image, committed)) in enumerate(recovery_images(tmp_path).items()):
        path = tmp_path / f"{name.replace(' ', '-')}.fs"
        path.write_bytes(image)
        returncode, lines, err = run_child("open", path, 0, "before")
        assert returncode == 0, err
        assert calls_made(lines) >= 4
        points = kill_points(lines)
        if n:  # the calls of close (sync, index file) are the same for every image: once is enough
            first_sync = next(int(line.split()[1]) for line in lines if line.endswith(" fsync"))
            points = [(kill_at, how) for kill_at, how in points if kill_at <= first_sync]
        for kill_at, how in points:
            path.write_bytes(image)
            Path(str(path) + ".index").unlink(missing_ok=True)
            returncode, _, err = run_child("open", path, kill_at, how)
            assert returncode == -signal.SIGKILL, err
            with FileStorage(path) as fs:
                assert [t.tid for t in fs.iterator()] == [t.tid for t in _committed(image, committed)]
                for i in range(min(committed, 3)):
                    assert fs.load(p64(i + 1))[0] == record_for(i)
                if committed == 4:
                    assert fs.load(p64(50))
            assert verify(path).ok


def _committed(image: bytes, count: int) -> list[fmt.TxnHeader]:
    full = bytearray(image)
    found = []
    pos = fmt.FILE_HEADER.size
    for _ in range(count):
        h = fmt.decode_txn_header(full, pos)
        found.append(h)
        pos += h.length
    return found


def test_readers_during_voted_then_aborted_transactions(tmp_path: Path) -> None:
    """I9 (defect 5): readers opening during votes that are aborted see no phantom data, no SIGBUS."""
    path = tmp_path / "flapping.fs"
    seconds = 4.0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    writer = subprocess.Popen(
        [sys.executable, str(CHILD), "flap", str(path), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    readers = [
        subprocess.Popen(
            [sys.executable, str(CHILD), "read", str(path), str(seconds - 0.5)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        outputs = [reader.communicate(timeout=60) for reader in readers]
        writer_out = writer.communicate(timeout=60)
    finally:
        for process in [writer, *readers]:
            if process.poll() is None:
                process.kill()
    assert writer.returncode == 0, writer_out[1]
    for reader, (out, err) in zip(readers, outputs):
        assert reader.returncode == 0, f"reader died with {reader.returncode}: {err}"  # -7 is SIGBUS
        assert int(out.split()[-1]) > 10, out
    with FileStorage(path) as fs:
        i = int(fs.load(z64)[0])
        assert i > 10
        for j in range(i):
            with pytest.raises(POSKeyError):
                fs.load(p64(ABORTED_BASE + j))
