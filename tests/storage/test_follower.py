"""I12: a read-only FileStorage follows another process's commits in poll_invalidations.

Writers run in child processes (``follow_child.py``) while this process polls; the
step-by-step tests drive a writer and a follower in one process, where every interleaving
is chosen, not hoped for.  Every test also relies on I9 (what a live writer may take back
stays out) and I4 (a voted transaction without a writer is committed).
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amberdb
import amberdb.transaction as transaction
from amberdb.exceptions import CorruptedDataError, POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.file import storage as storage_module
from amberdb.utils import Oid, Tid, p64, u64, z64

from .conftest import commit
from .follow_child import ABORTED_BASE, BIG_OID, NEW_OID, OIDS, big_record, plan, record

CHILD = Path(__file__).with_name("follow_child.py")
META = TransactionMeta()
pytestmark = pytest.mark.timeout(60)


class Child:
    """A ``follow_child.py`` process; its stdout lines arrive through a thread, one at a time."""

    def __init__(self, *args: object) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, wanted: Callable[[list[str]], bool], timeout: float = 30) -> list[str]:
        """The words of the first line from now on that ``wanted`` accepts."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError("the writer process said nothing for too long") from None
            if line is None:
                self.proc.wait(timeout=10)
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"the writer process ended ({self.proc.returncode}): {stderr}")
            words = line.split()
            if wanted(words):
                return words

    def expect_word(self, word: str) -> list[str]:
        return self.expect(lambda words: words[:1] == [word])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@contextmanager
def child(*args: object) -> Iterator[Child]:
    process = Child(*args)
    try:
        yield process
    finally:
        process.stop()


class PlanModel:
    """What follow_child's ``plan`` mode has committed after each of its transactions."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.i = 0
        self.writer: dict[int, int] = {}  # oid -> number of the last transaction writing it
        self.changed: dict[int, set[Oid]] = {}  # transaction -> oids it changed (not created)

    def committed(self, i: int) -> bool:
        return not plan(self.seed, i)[2]

    def advance(self, i: int) -> None:
        assert i >= self.i, "the follower went back in time"
        for j in range(self.i + 1, i + 1):
            if self.committed(j):
                oids = plan(self.seed, j)[0]
                self.changed[j] = {z64} | {p64(oid) for oid in oids if oid in self.writer}
                self.writer.update(dict.fromkeys(oids, j))
        self.i = i

    def changed_between(self, since: int, i: int) -> set[Oid]:
        return set().union(*(self.changed.get(j, set()) for j in range(since + 1, i + 1)))

    def check(self, fs: FileStorage, newest: Tid, tids: dict[int, Tid]) -> int:
        """Every load agrees with the transaction the root names, which is ``newest``; its number."""
        root, root_tid = fs.load(z64)
        assert root_tid == newest, "the root is written by every transaction"
        i = int(root)  # never b"aborted"
        self.advance(i)
        tids[i] = newest
        for oid in range(1, OIDS + 1):
            j = self.writer.get(oid)
            if j is None:
                with pytest.raises(POSKeyError):
                    fs.load(p64(oid))
                continue
            oids, size, _ = plan(self.seed, j)
            data, tid = fs.load(p64(oid))
            assert data == record(j, oid, size if oid == oids[0] else 40), (oid, j, i)
            assert tid == tids.get(j, tid) and tid <= newest
        for j in range(max(1, i - 3), i + 2):  # i + 1 may be voted right now, and then aborted
            if not self.committed(j):
                with pytest.raises(POSKeyError):
                    fs.load(p64(ABORTED_BASE + j))
        return i


def test_follower_sees_whole_transactions_of_a_writing_process(tmp_path: Path) -> None:
    """I12, I9: every poll moves to a whole finished transaction; changed oids are exact.

    The writer commits transactions of random oids and sizes (some streamed, some voted
    and aborted) as fast as it can, while this process polls, sometimes from older
    snapshots, and loads every oid after each poll.
    """
    path = tmp_path / "data.fs"
    seed = 20261211
    rng = random.Random(seed)
    model = PlanModel(seed)
    with child("plan", path, seed, 2.5) as writer:
        writer.expect_word("ready")
        fs = FileStorage(path, read_only=True)
        tids: dict[int, Tid] = {}
        seen = [(fs.last_tid(), model.check(fs, fs.last_tid(), tids))]
        finished = False
        while not finished:
            finished = writer.proc.poll() is not None  # then this poll is the last, and sees all
            since, since_i = seen[-1] if rng.random() < 0.8 else rng.choice(seen)
            newest, changed = fs.poll_invalidations(since)
            assert newest >= seen[-1][0]
            assert fs.last_tid() == newest
            i = model.check(fs, newest, tids)
            assert changed is not None
            assert set(changed) == model.changed_between(since_i, i)
            if newest > seen[-1][0]:
                seen.append((newest, i))
        fs.close()
        last = int(writer.expect_word("done")[1])
        assert writer.proc.returncode == 0
    assert seen[-1][1] == max(j for j in range(last + 1) if j == 0 or model.committed(j))
    assert len(seen) > 10, "the follower should have caught the writer mid-way many times"


def test_follower_takes_a_voted_transaction_once_its_writer_is_dead(tmp_path: Path) -> None:
    """I12, I9, I4: killed after vote, before finish: left out while alive, committed once dead."""
    path = tmp_path / "data.fs"
    with child("voted", path) as writer:
        t3 = bytes.fromhex(writer.expect(lambda words: words[:2] == ["ok", "3"])[2])
        with FileStorage(path, read_only=True) as fs:
            assert fs.last_tid() == t3
            writer.expect_word("voted")
            assert fs.poll_invalidations(t3) == (t3, ())
            assert fs.load(z64) == (b"3", t3)
            with pytest.raises(POSKeyError):
                fs.load(p64(NEW_OID))
            writer.kill()
            image = path.read_bytes()
            newest, changed = fs.poll_invalidations(t3)
            assert newest > t3 and changed == {z64}  # NEW_OID is new: nobody has it cached
            assert fs.last_tid() == newest
            assert fs.load(z64) == (b"4", newest)
            assert fs.load(p64(NEW_OID)) == (b"new in 4", newest)
            assert fs.poll_invalidations(newest) == (newest, ())
            assert path.read_bytes() == image  # a follower changes nothing, not even `v`


@pytest.mark.parametrize("how", ["pause", "torn", "header"])
def test_follower_beside_a_writer_killed_while_streaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """I12, I2, I9: a streamed transaction (> FLUSH_SIZE) is never seen half-written.

    ``pause``: killed while the stream waits behind its zero header; ``torn``: killed in the
    middle of writing the big record; ``header``: killed after vote's header write, before
    its sync, which leaves a whole voted transaction that is committed once nobody can
    abort it.  While the writer streams, polls do not even read the stream.
    """
    scans = []
    real_scan = storage_module.scan
    monkeypatch.setattr(storage_module, "scan", lambda *args: scans.append(1) or real_scan(*args))
    path = tmp_path / "data.fs"
    with child("stream", path, how) as writer:
        t3 = bytes.fromhex(writer.expect(lambda words: words[:2] == ["ok", "3"])[2])
        with FileStorage(path, read_only=True) as fs:
            assert fs.last_tid() == t3
            if how == "pause":
                writer.expect_word("streaming")
                assert path.stat().st_size > fs.size() + 2 * storage_module.FLUSH_SIZE
                scans.clear()
                for _ in range(3):
                    assert fs.poll_invalidations(t3) == (t3, ())
                assert not scans, "a poll read the stream of a live writer"
                writer.kill()
            while writer.proc.poll() is None:
                if fs.poll_invalidations(t3) != (t3, ()):
                    # The kernel drops a dying process's lock before its parent can reap it.
                    assert how == "header"
                    break
                assert fs.load(z64) == (b"3", t3)
            assert writer.proc.wait(timeout=10) == -signal.SIGKILL
            newest, changed = fs.poll_invalidations(t3)
            if how == "header":
                assert newest > t3 and changed == {z64}
                assert fs.load(z64) == (b"big", newest)
                assert fs.load(p64(BIG_OID)) == (big_record(), newest)
            else:
                assert (newest, changed) == (t3, ())
                assert fs.load(z64) == (b"3", t3)
                with pytest.raises(POSKeyError):
                    fs.load(p64(BIG_OID))


def test_db_on_a_follower_moves_only_at_transaction_boundaries(tmp_path: Path) -> None:
    """I12 through a DB: begin() shows the writer's newer commits, a transaction never does."""
    path = tmp_path / "data.fs"

    def committed_at_least(n: int) -> Callable[[list[str]], bool]:
        return lambda words: words[0] == "ok" and int(words[1]) >= n

    with child("db", path, 8) as writer:
        writer.expect_word("ready")
        db = amberdb.DB(FileStorage(path, read_only=True))
        conn = db.open()
        try:
            transaction.begin()
            n0 = conn.root().get("n", 0)
            writer.expect(committed_at_least(n0 + 3))
            assert conn.root().get("n", 0) == n0
            conn.cache_minimize()  # the root reloads, as of the transaction's snapshot
            assert conn.root().get("n", 0) == n0
            transaction.begin()
            n1 = conn.root()["n"]
            assert n1 >= n0 + 3
            seen_tid = conn.root()._p_serial
            writer.expect(committed_at_least(n1 + 2))
            assert conn.root()["n"] == n1
            assert db.last_tid() > seen_tid  # the DB asks the file, not what was taken in
            transaction.abort()
            assert conn.root()["n"] >= n1 + 2
        finally:
            transaction.abort()
            conn.close()
            db.close()


# -- one process, every interleaving chosen ------------------------------------------------

STEP = st.tuples(
    st.frozensets(st.integers(1, 6), min_size=1),  # the oids a transaction writes
    st.integers(1, 6000),  # its first record's size: above 3000 it is streamed out
    st.sampled_from(["finish", "abort", "abort after vote"]),
    st.frozensets(st.sampled_from(["stored", "voted"])),  # where the follower polls mid-way
    st.integers(0, 1 << 16),  # picks the snapshot the follower polls from afterwards
)


def check_loads(fs: FileStorage, state: dict[Oid, tuple[bytes, Tid]], before: Tid | None = None) -> None:
    for oid in map(p64, range(7)):
        if oid in state:
            assert fs.load(oid, before) == state[oid]
        else:
            with pytest.raises(POSKeyError):
                fs.load(oid, before)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, min_size=1, max_size=10))
def test_follower_step_by_step_matches_the_writer(
    program: list[tuple[frozenset[int], int, str, frozenset[str], int]],
) -> None:
    """I12, I9, base invariants 1 and 7: polls after and during every step of a commit."""
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(storage_module, "FLUSH_SIZE", 3000):
        path = os.path.join(tmp, "data.fs")
        writer = FileStorage(path, fsync=False)
        t0 = commit(writer, {z64: (z64, b"root")})
        follower = FileStorage(path, read_only=True)
        state: dict[Oid, tuple[bytes, Tid]] = {z64: (b"root", t0)}
        history = [(t0, dict(state))]
        changes: list[tuple[Tid, set[Oid]]] = []
        try:
            assert follower.poll_invalidations(z64) == (t0, None)  # older than its open
            for n, (oids, size, ending, looks, pick) in enumerate(program):
                writer.begin(META)
                items = {
                    p64(oid): b"%d:%d:" % (n, oid) + b"." * (size if k == 0 else 9)
                    for k, oid in enumerate(sorted(oids))
                }
                for oid, data in items.items():
                    writer.store(oid, state.get(oid, (b"", z64))[1], data)
                last = history[-1][0]
                if "stored" in looks:
                    assert follower.poll_invalidations(last) == (last, ())
                    check_loads(follower, state)
                if ending == "abort":
                    writer.abort()
                else:
                    writer.vote()
                    if "voted" in looks:  # a live writer may still abort it
                        assert follower.poll_invalidations(last) == (last, ())
                        check_loads(follower, state)
                    if ending == "abort after vote":
                        writer.abort()
                    else:
                        tid = writer.finish()
                        changes.append((tid, {oid for oid in items if oid in state}))
                        state.update((oid, (data, tid)) for oid, data in items.items())
                        history.append((tid, dict(state)))
                since, then = history[pick % len(history)]
                newest, changed = follower.poll_invalidations(since)
                assert newest == history[-1][0] == follower.last_tid()
                assert changed is not None
                assert set(changed) == set().union(*(oids for tid, oids in changes if tid > since))
                check_loads(follower, state)
                assert len(follower) == len(state)
                check_loads(follower, then, p64(u64(since) + 1))  # old snapshots still read as they were
        finally:
            follower.close()
            writer.close()


def test_a_snapshot_older_than_the_window_gets_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """I12, base invariant 7: a follower remembers changes within the same window as a writer."""
    monkeypatch.setattr(storage_module, "_POLL_WINDOW", 6)
    monkeypatch.setattr(storage_module, "_ENTRY_COST", 1)  # a transaction costs its oids + 1
    path = tmp_path / "data.fs"
    with FileStorage(path) as writer, FileStorage(path, read_only=True) as follower:
        tids = {p64(oid): z64 for oid in range(9)}

        def change(*oids: int) -> Tid:
            tid = commit(writer, {p64(oid): (tids[p64(oid)], b"%d" % oid) for oid in oids})
            tids.update(dict.fromkeys(map(p64, oids), tid))
            return tid

        t0 = change(*range(9))
        assert follower.poll_invalidations(z64) == (t0, set())  # the follower saw them all created
        steps = [t0] + [change(1, 2) for _ in range(4)]  # 3 window slots each: the last two fit
        assert follower.poll_invalidations(steps[2]) == (steps[4], {p64(1), p64(2)})
        assert follower.poll_invalidations(steps[1]) == (steps[4], None)
        assert follower.poll_invalidations(t0) == (steps[4], None)
        big = change(*range(1, 9))  # more changed oids than the window holds
        assert follower.poll_invalidations(big) == (big, ())
        assert follower.poll_invalidations(steps[4]) == (big, None)


def test_a_salvaged_storage_stays_its_snapshot(tmp_path: Path) -> None:
    """I12: salvage=True is a frozen snapshot, never a follower."""
    path = tmp_path / "data.fs"
    with FileStorage(path) as writer:
        t1 = commit(writer, {z64: (z64, b"one")})
        with (
            FileStorage(path, read_only=True, salvage=True) as salvaged,
            FileStorage(path, read_only=True) as follower,
        ):
            t2 = commit(writer, {z64: (t1, b"two"), p64(1): (z64, b"new")})
            assert salvaged.poll_invalidations(t1) == (t1, ())
            assert salvaged.last_tid() == t1 and len(salvaged) == 1
            assert salvaged.load(z64) == (b"one", t1)
            assert follower.poll_invalidations(t1) == (t2, {z64})
            assert follower.load(p64(1)) == (b"new", t2)


def test_a_file_cut_below_the_followed_end_is_damage_not_sigbus(tmp_path: Path) -> None:
    """I12: a follower whose file shrank below its end raises naming the file; it never maps past the end."""
    path = tmp_path / "data.fs"
    with FileStorage(path) as writer:
        t1 = commit(writer, {z64: (z64, b"one")})
    with FileStorage(path, read_only=True) as follower:
        assert follower.load(z64) == (b"one", t1)
        os.truncate(path, path.stat().st_size - 10)
        with pytest.raises(
            CorruptedDataError, match=re.escape(str(path)) + ".*shorter than its committed end"
        ):
            follower.poll_invalidations(t1)


def test_a_follower_opened_before_the_writer_wrote_the_file_header(tmp_path: Path) -> None:
    """I12: an empty file reads as an empty storage; the file id comes from the header once written."""
    path = tmp_path / "data.fs"
    path.write_bytes(b"")
    with FileStorage(path, read_only=True) as follower:
        assert follower.poll_invalidations(z64) == (z64, ())
        with FileStorage(path) as writer:
            assert follower.poll_invalidations(z64) == (z64, ())
            t1 = commit(writer, {z64: (z64, b"one")})
            newest, changed = follower.poll_invalidations(z64)
            assert newest == t1 and changed is not None and not changed  # the root is new
            assert follower.load(z64) == (b"one", t1)


def test_threads_polling_and_loading_while_the_follower_moves(tmp_path: Path) -> None:
    """I12: a merge happens under the load lock: a load never sees part of a followed transaction.

    A writer thread writes the same counter into every oid of each transaction; reader
    threads share one follower, each polling, then loading every oid as of its poll.
    """
    path = tmp_path / "data.fs"
    oids = [p64(oid) for oid in range(8)]
    errors: list[BaseException] = []
    stop = threading.Event()
    with FileStorage(path, fsync=False) as writer, FileStorage(path, read_only=True) as follower:
        tid = commit(writer, {oid: (z64, b"0") for oid in oids})
        assert follower.poll_invalidations(z64)[0] == tid

        def write() -> None:
            nonlocal tid
            for n in range(1, 400):
                tid = commit(writer, {oid: (tid, b"%d" % n) for oid in oids})
            stop.set()

        def read() -> None:
            try:
                since = z64
                while not stop.is_set():
                    newest, _ = follower.poll_invalidations(since)
                    assert newest >= since
                    seen = {follower.load(oid, p64(u64(newest) + 1)) for oid in oids}
                    assert len(seen) == 1 and seen.pop()[1] == newest
                    since = newest
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors, errors
        assert follower.poll_invalidations(z64)[0] == tid
