"""Group commit in FileStorage (storage invariants I3-I5, base invariants 2, 3 and 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from amberdb.exceptions import ConflictError, StorageError
from amberdb.record import encode_record
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage, verify
from amberdb.utils import Oid, Tid, p64, z64

META = TransactionMeta("tester", "group commit")


def _commit(fs: FileStorage, items: dict[Oid, tuple[Tid, bytes]]) -> Tid:
    fs.begin(META)
    try:
        for oid, (base, record) in items.items():
            fs.store(oid, base, record)
        fs.vote()
    except BaseException:
        fs.abort()
        raise
    return fs.finish()


def _slow_syncs(monkeypatch: pytest.MonkeyPatch, delay: float) -> list[int]:
    """Make every fdatasync ``delay`` seconds slower (a slow device); the calls are listed."""
    real = os.fdatasync
    calls: list[int] = []

    def slow(fd: int) -> None:
        real(fd)
        time.sleep(delay)
        calls.append(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    return calls


def _run_threads(count: int, target: object) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            target(n)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return errors


def test_threads_share_syncs_and_every_vote_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """N threads commit their own objects and a shared counter; every acknowledged commit is
    there after a reopen, tids increase in file order, and the threads shared fdatasyncs."""
    path = tmp_path / "data.fs"
    fs = FileStorage(path)
    counter = p64(1)
    _commit(fs, {counter: (z64, b"0")})
    syncs = _slow_syncs(monkeypatch, 0.002)
    threads, rounds = 8, 15
    acknowledged: dict[Oid, tuple[Tid, bytes]] = {}
    increments = [0]
    lock = threading.Lock()

    def worker(n: int) -> None:
        own = p64(100 + n)
        base = z64
        for i in range(rounds):
            shared = i % 5 == 0
            while True:
                fs.begin(META)
                try:
                    fs.store(own, base, b"%d-%d" % (n, i))
                    if shared:
                        record, tid = fs.load(counter)
                        fs.store(counter, tid, b"%d" % (int(record) + 1))
                    fs.vote()
                except ConflictError:
                    fs.abort()
                    continue
                except BaseException:
                    fs.abort()
                    raise
                base = fs.finish()
                break
            with lock:
                acknowledged[own] = (base, b"%d-%d" % (n, i))
                increments[0] += shared

    assert not _run_threads(threads, worker)
    monkeypatch.undo()
    commits = threads * rounds
    assert len(syncs) < commits, f"{len(syncs)} syncs for {commits} commits: none was shared"
    fs.close()
    assert verify(path).ok
    with FileStorage(path) as again:
        for oid, (tid, record) in acknowledged.items():
            assert again.load(oid) == (record, tid)
        assert again.load(counter)[0] == b"%d" % (increments[0])
        tids = [txn.tid for txn in again.iterator()]
        assert tids == sorted(set(tids))
        assert len(tids) == 1 + commits


def test_store_of_an_oid_in_flight_waits_for_its_outcome(tmp_path: Path) -> None:
    """Invariant 2 counts appended, unfinished transactions: a store based on an older tid
    conflicts with the committed one once it finished (not silently overwritten)."""
    with FileStorage(tmp_path / "data.fs") as fs:
        oid = p64(1)
        t1 = _commit(fs, {oid: (z64, b"one")})
        fs.begin(META)
        fs.store(oid, t1, b"two")
        fs.vote()  # appended and durable, not finished
        outcome: list[BaseException | None] = []

        def other() -> None:
            fs.begin(META)
            try:
                fs.store(oid, t1, b"three")  # based on t1, which is no longer the newest
            except ConflictError as exc:
                outcome.append(exc)
            finally:
                fs.abort()

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.1)
        assert not outcome  # still waiting for the appended transaction's outcome
        t2 = fs.finish()
        thread.join(10)
        assert isinstance(outcome[0], ConflictError)
        assert outcome[0].serials == (t2, t1)


def test_abort_after_vote_with_a_later_transaction_appended(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    fs = FileStorage(path)
    t0 = _commit(fs, {z64: (z64, b"root")})
    fs.begin(META)
    fs.store(p64(1), z64, b"aborted")
    fs.vote()
    later: list[Tid] = []
    voted = threading.Event()

    def second() -> None:
        fs.begin(META)
        fs.store(p64(2), z64, b"kept")
        fs.vote()
        voted.set()
        later.append(fs.finish())  # waits for the aborted one, below its tid

    thread = threading.Thread(target=second)
    thread.start()
    assert voted.wait(10)
    time.sleep(0.05)
    assert not later  # finish waits for every lower tid
    fs.abort()
    thread.join(10)
    assert later and later[0] > t0
    assert fs.last_tid() == later[0]
    assert [txn.tid for txn in fs.iterator()] == [t0, later[0]]
    fs.close()
    report = verify(path)
    assert report.ok, report
    for reopened in (FileStorage(path), FileStorage(path, read_only=True)):
        with reopened:
            assert [txn.tid for txn in reopened.iterator()] == [t0, later[0]]
            assert reopened.load(p64(2)) == (b"kept", later[0])
            assert len(reopened) == 2
            assert [info.tid for info in reopened.undo_log()] == [later[0], t0]
    with FileStorage(path) as fs:  # a new commit after the aborted one, then a pack
        root = encode_record("t:Obj", [(p64(2), "t:Obj")], b"root")
        t3 = _commit(fs, {z64: (t0, root), p64(2): (later[0], encode_record("t:Obj", [], b"again"))})
        assert t3 > later[0]
        fs.pack(t3)
        assert fs.load(z64) == (root, t3)
        assert [txn.tid for txn in fs.iterator()] == [t3]
    assert verify(path).ok
    with FileStorage(path) as fs:
        assert fs.load(z64) == (root, t3)


def test_abort_after_vote_alone_cuts_the_file(tmp_path: Path) -> None:
    """I5: nothing appended after it and nobody appending: the transaction is cut off."""
    path = tmp_path / "data.fs"
    with FileStorage(path) as fs:
        _commit(fs, {z64: (z64, b"root")})
        size = os.path.getsize(path)
        fs.begin(META)
        fs.store(p64(1), z64, b"gone")
        fs.vote()
        fs.abort()
        assert os.path.getsize(path) == size


def test_failed_sync_fails_its_group_and_refuses_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is guaranteed: every vote waiting on the failed fdatasync raises, the storage
    refuses every later begin/vote naming the failure, and since the first abort of a
    failed transaction cuts the file back to the last synced end (and that sync succeeds
    here), a reopen shows every acknowledged commit and none of the failed ones."""
    path = tmp_path / "data.fs"
    fs = FileStorage(path)
    _commit(fs, {z64: (z64, b"root")})
    real = os.fdatasync
    gate = threading.Barrier(8, timeout=30)
    calls: list[int] = []
    lock = threading.Lock()

    def failing_once(fd: int) -> None:
        with lock:
            calls.append(fd)
            first = len(calls) == 1
        if first:
            time.sleep(0.05)  # let the others append behind this sync
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing_once)
    acknowledged: list[Oid] = []
    failed: list[Oid] = []

    def worker(n: int) -> None:
        oid = p64(10 + n)
        gate.wait()
        fs.begin(META)
        fs.store(oid, z64, b"x")
        try:
            fs.vote()
        except (OSError, StorageError):
            failed.append(oid)
            fs.abort()
            return
        fs.finish()
        acknowledged.append(oid)

    errors = _run_threads(8, worker)
    assert all(isinstance(e, StorageError) for e in errors), errors  # begun after the failure
    assert failed, "the failing sync failed nobody"
    with pytest.raises(StorageError, match="failed an I/O operation; reopen it: .*Input/output"):
        fs.begin(META)
    monkeypatch.undo()
    fs.close()
    assert verify(path).ok
    with FileStorage(path) as again:
        for oid in acknowledged:
            assert again.load(oid)[0] == b"x"
        assert len(again) == 1 + len(acknowledged)


def test_fsync_false_never_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.fs"
    calls = _slow_syncs(monkeypatch, 0)
    with FileStorage(path, fsync=False) as fs:

        def worker(n: int) -> None:
            base = z64
            for i in range(10):
                base = _commit(fs, {p64(1 + n): (base, b"%d" % i)})

        assert not _run_threads(4, worker)
        assert calls == []
        assert len(fs) == 4


def test_no_writer_starves(tmp_path: Path) -> None:
    """The commit lock is handed over first come, first served: in a bounded run of 16
    writers every one of them commits, and none gets ten times another's share."""
    with FileStorage(tmp_path / "data.fs", fsync=False) as fs:
        counts = [0] * 16
        stop = time.monotonic() + 1.0

        def worker(n: int) -> None:
            base = z64
            while time.monotonic() < stop:
                base = _commit(fs, {p64(1 + n): (base, b"x")})
                counts[n] += 1

        assert not _run_threads(16, worker)
        assert min(counts) > 0, counts
        assert max(counts) <= 10 * min(counts), counts


_KILLED_CHILD = r"""
import sys, threading
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.utils import p64, z64

fs = FileStorage(sys.argv[1])
out = threading.Lock()

def worker(n):
    oid = p64(1000 + n)
    try:
        base = fs.load(oid)[1]
    except Exception:
        base = z64
    i = 0
    while True:
        i += 1
        fs.begin(TransactionMeta("child", ""))
        fs.store(oid, base, b"%d" % i)
        fs.vote()
        with out:  # acknowledged: the vote returned
            sys.stdout.write("%d %d\n" % (n, i))
            sys.stdout.flush()
        base = fs.finish()

for n in range(12):
    threading.Thread(target=worker, args=(n,), daemon=True).start()
threading.Event().wait()
"""


def test_sigkill_with_many_committing_threads_loses_no_acknowledged_vote(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    FileStorage(path).close()
    acknowledged: dict[int, int] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _KILLED_CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert child.stdout is not None
        try:
            for _ in range(150 + 100 * round_):
                line = child.stdout.readline()
                if not line:
                    break
                n, i = map(int, line.split())
                acknowledged[n] = max(acknowledged.get(n, 0), i)
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=30)
        assert acknowledged
        with FileStorage(path) as fs:
            for n, i in acknowledged.items():
                assert int(fs.load(p64(1000 + n))[0]) >= i
            tids = [txn.tid for txn in fs.iterator()]
            assert tids == sorted(set(tids))
        report = verify(path)
        assert report.ok, report
        # The next child starts counting from 1 again: only this round's acknowledgements.
        acknowledged.clear()
