"""Crash safety of FileStorage.  Each test names the storage.py invariant (I1..I8) it checks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amberdb.exceptions import FileFormatError, POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.file import format as fmt
from amberdb.utils import p64, z64

from .conftest import commit
from .crash_writer import ABORTED_BASE, record_for

META = TransactionMeta()


def build(path: Path) -> tuple[list[bytes], int, int]:
    """Three committed transactions plus a final one; returns (tids, start, end) of the final."""
    tids = []
    with FileStorage(path) as fs:
        for i in range(3):
            tids.append(commit(fs, {p64(i + 1): (z64, b"committed %d" % i)}, TransactionMeta("u", f"d{i}")))
        start = path.stat().st_size
        tids.append(
            commit(
                fs,
                {p64(1): (tids[0], b"torn"), p64(10): (z64, b"new" * 20), p64(11): (z64, b"")},
                TransactionMeta("user", "the last one", b'{"x": 1}'),
            )
        )
        end = path.stat().st_size
    os.unlink(str(path) + ".index")
    return tids, start, end


def check_intact(fs: FileStorage, tids: list[bytes]) -> None:
    """The first three transactions of build() are there, the final one is not."""
    for i in range(3):
        assert fs.load(p64(i + 1)) == (b"committed %d" % i, tids[i])
    with pytest.raises(POSKeyError):
        fs.load(p64(10))
    assert fs.last_tid() == tids[2]
    assert [t.tid for t in fs.iterator()] == tids[:3]


def reopen_commit_reopen(path: Path, tids: list[bytes]) -> None:
    """A writable open works after the damage, a new commit lands and survives a reopen."""
    with FileStorage(path) as fs:
        check_intact(fs, tids)
        new = commit(fs, {p64(1): (tids[0], b"after the crash")})
    os.unlink(str(path) + ".index")
    with FileStorage(path) as fs:
        assert fs.load(p64(1)) == (b"after the crash", new)
        assert fs.last_tid() == new


def test_truncated_at_every_byte_of_last_transaction(tmp_path: Path) -> None:
    """I3: a torn last transaction (any prefix of it) is ignored and truncated away."""
    source = tmp_path / "source.fs"
    tids, start, end = build(source)
    data = source.read_bytes()
    path = tmp_path / "torn.fs"
    index = Path(str(path) + ".index")
    for cut in range(start, end):
        # A crash leaves no index describing bytes it cut: each round starts without one.
        index.unlink(missing_ok=True)
        path.write_bytes(data[:cut])
        with FileStorage(path, read_only=True) as ro:
            check_intact(ro, tids)
        assert path.stat().st_size == cut  # read-only never truncates
        with FileStorage(path) as fs:
            check_intact(fs, tids)
        assert path.stat().st_size == start
        if cut % 17 == 0 or cut == end - 1:  # the full reopen cycle on a sample keeps this fast
            index.unlink()
            path.write_bytes(data[:cut])
            reopen_commit_reopen(path, tids)


def test_damaged_last_transaction_is_an_error_not_a_torn_tail(tmp_path: Path) -> None:
    """I3: a complete last transaction that fails a check is never truncated: every open refuses."""
    source = tmp_path / "source.fs"
    tids, start, end = build(source)
    data = source.read_bytes()
    path = tmp_path / "garbled.fs"
    for pos in range(start, end):
        damaged = bytearray(data)
        damaged[pos] ^= 0x5A
        path.write_bytes(damaged)
        for read_only in (False, True):
            expected = rf"garbled\.fs is damaged at offset {start}\b.*salvage"
            with pytest.raises(FileFormatError, match=expected):
                FileStorage(path, read_only=read_only)
        assert path.read_bytes() == damaged
        with FileStorage(path, read_only=True, salvage=True) as salvaged:
            check_intact(salvaged, tids)
            assert salvaged.damage is not None and salvaged.damage.offset == start


def test_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    """I3: a crash after the file grew, before the data landed, leaves zeros: a torn tail."""
    source = tmp_path / "source.fs"
    tids, start, _ = build(source)
    path = tmp_path / "zeros.fs"
    path.write_bytes(source.read_bytes()[:start] + b"\0" * 4096)
    reopen_commit_reopen(path, tids)


def test_corrupt_middle_transaction_is_an_error(tmp_path: Path) -> None:
    """I3: damage followed by a valid transaction is corruption: FileFormatError, file untouched."""
    source = tmp_path / "source.fs"
    build(source)
    data = source.read_bytes()
    middle = fmt.FILE_HEADER.size + fmt.decode_txn_header(data, fmt.FILE_HEADER.size).length
    length = fmt.decode_txn_header(data, middle).length
    path = tmp_path / "corrupt.fs"
    for pos in range(middle, middle + length):
        damaged = bytearray(data)
        damaged[pos] ^= 0xA5
        path.write_bytes(damaged)
        for read_only in (False, True):
            with pytest.raises(FileFormatError, match=rf"corrupt\.fs.*offset {middle}\b"):
                FileStorage(path, read_only=read_only)
        assert path.read_bytes() == damaged


def test_corrupt_middle_behind_index(tmp_path: Path) -> None:
    """I6, I10: a valid index is trusted for its prefix (fast open); damage there shows on load."""
    path = tmp_path / "data.fs"
    tids, _, _ = build(path)
    FileStorage(path).close()  # writes the index again
    data = bytearray(path.read_bytes())
    # Inside the first transaction's data record header (after 32 + len("u") + len("d0") and
    # the durable mark).
    data[fmt.FILE_HEADER.size + fmt.TXN_HEADER.size + 3 + fmt.DURABLE_MARK.size + 2] ^= 1
    path.write_bytes(data)
    with FileStorage(path) as fs:
        assert fs.last_tid() == tids[-1]
        with pytest.raises(FileFormatError, match="oid 0x1"):
            fs.load(p64(1), before=tids[1])
    os.unlink(str(path) + ".index")
    with pytest.raises(FileFormatError, match=rf"offset {fmt.FILE_HEADER.size}\b"):
        FileStorage(path)
    assert path.read_bytes() == data


def test_voted_transaction_survives_crash(tmp_path: Path) -> None:
    """I4: once vote returned, the transaction is on disk, even without finish."""
    path = tmp_path / "data.fs"
    tids, _, _ = build(path)
    with FileStorage(path) as fs:
        fs.begin(META)
        fs.store(p64(50), z64, b"voted")
        fs.vote()
        crashed = path.read_bytes()  # the disk at a crash right after vote
        fs.abort()
    path.write_bytes(crashed)
    os.unlink(str(path) + ".index")
    with FileStorage(path) as fs:
        record, tid = fs.load(p64(50))
        assert record == b"voted"
        assert tid > tids[-1]


def test_abort_after_vote_never_resurrects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """I5: a crash inside abort leaves the transaction as voted; once abort synced, it is gone."""
    path = tmp_path / "data.fs"
    tids, _, end = build(path)
    snapshots: dict[str, bytes] = {}
    real_ftruncate, real_fsync = os.ftruncate, os.fsync

    def before_truncate(fd: int, length: int) -> None:
        snapshots["before truncate"] = path.read_bytes()
        real_ftruncate(fd, length)

    def at_sync(fd: int) -> None:
        snapshots["at sync"] = path.read_bytes()  # what a crash before the sync returns may leave
        real_fsync(fd)

    with FileStorage(path) as fs:
        fs.begin(META)
        fs.store(p64(50), z64, b"aborted")
        fs.vote()
        monkeypatch.setattr(os, "ftruncate", before_truncate)
        monkeypatch.setattr(os, "fsync", at_sync)
        fs.abort()
        monkeypatch.undo()
    assert len(snapshots["before truncate"]) > end
    assert len(snapshots["at sync"]) == end  # nothing of it left to find, not even a header
    for moment, crashed in snapshots.items():
        path.write_bytes(crashed)
        Path(str(path) + ".index").unlink(missing_ok=True)
        with FileStorage(path) as fs:
            if moment == "before truncate":  # abort had not returned: as voted, so committed
                assert fs.load(p64(50))[0] == b"aborted"
                assert fs.last_tid() > tids[-1]
            else:
                with pytest.raises(POSKeyError):
                    fs.load(p64(50))
                assert fs.last_tid() == tids[-1]


# -- real crashes --------------------------------------------------------------------------------


WRITER = Path(__file__).with_name("crash_writer.py")


def test_sigkill_keeps_every_acknowledged_commit(tmp_path: Path) -> None:
    """I2, I4, I5, I7: SIGKILL at random moments loses nothing that was acknowledged."""
    path = tmp_path / "killed.fs"
    rng = random.Random(20240611)
    acked: dict[int, bytes] = {}
    aborted: list[int] = []
    next_i = 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    deadline = time.monotonic() + 20
    rounds = 0
    while rounds < 5 and time.monotonic() < deadline:
        rounds += 1
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(path), str(next_i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        # Wait for the first acknowledgement so the kill lands while committing, not importing.
        first = proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        for line in (first + rest).decode().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "ok":
                acked[int(parts[1])] = bytes.fromhex(parts[2])
            elif len(parts) == 2 and parts[0] == "aborted":
                aborted.append(int(parts[1]))
            # else: a line cut by the kill, never acknowledged
        assert acked, err.decode()
        next_i = max([*acked, *aborted]) + 2  # skip one: it may or may not have committed
        with FileStorage(path) as fs:  # the dead writer's flock is gone
            for i, tid in acked.items():
                assert fs.load(p64(i + 1)) == (record_for(i), tid), i
            for i in aborted:
                with pytest.raises(POSKeyError):
                    fs.load(p64(ABORTED_BASE + i))
            root, root_tid = fs.load(z64)
            assert root_tid >= max(acked.values())
            assert int(root) >= max(acked)
            tids = [t.tid for t in fs.iterator()]
            assert tids == sorted(set(tids))
    assert rounds >= 3
