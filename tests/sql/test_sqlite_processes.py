"""SQLiteStorage shared by real processes: transfers, SIGKILL mid-commit, fairness, the lock
timeout, the WAL's size and the durability settings.

The children are :mod:`tests.sql.sqlite_procs` roles, started with a pipe on stdin (the
``go`` and ``stop`` signals) and killed, whatever happens, by the ``procs`` fixture.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import PersistentList, PersistentMapping
from amberdb.btrees import OOBTree
from amberdb.btrees.length import Length
from amberdb.exceptions import POSKeyError, TransientError, TransientStorageError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.sql.sqlite import SQLiteStorage
from amberdb.utils import p64, u64, z64
from tests.server.procs import Processes, child_env, finish, read_until
from tests.sql.sqlite_procs import ABORTED_BASE, CHILD, SLOT_BASE, SLOTS, new_record, slot_record

ROOT = Path(__file__).resolve().parents[2]


def start(procs: Processes, role: str, *args: object) -> subprocess.Popen[str]:
    """Start the :mod:`~tests.sql.sqlite_procs` role with stdin, stdout and stderr piped."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, role, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(ROOT),
        cwd=procs.directory,
        start_new_session=True,
    )
    procs.children.append(proc)
    return proc


def tell(proc: subprocess.Popen[str], line: str = "go") -> None:
    """Write a line to a child's stdin."""
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def start_together(children: list[subprocess.Popen[str]]) -> None:
    """Wait until every child is READY, then tell them all to go."""
    for child in children:
        read_until(child, "READY", timeout=30)
    for child in children:
        tell(child)


def results(proc: subprocess.Popen[str], timeout: float = 45.0) -> list[str]:
    """The child's stdout lines once it exited with status 0 (its stdin closed first)."""
    status, out, err = finish(proc, timeout=timeout)
    assert status == 0, err
    return out.splitlines()


def numbers(line: str) -> dict[str, str]:
    """``"COMMITS 3 RETRIES 0"`` as ``{"COMMITS": "3", "RETRIES": "0"}``."""
    words = line.split()
    return dict(zip(words[::2], words[1::2], strict=True))


def new_database(path: Path, **roots: Any) -> None:
    """Create the database at ``path`` holding ``roots`` under the root."""
    db = amberdb.DB(SQLiteStorage(path))
    try:
        with db.transaction() as conn:
            conn.root().update(roots)
    finally:
        db.close()


def report(what: str, **values: object) -> None:
    """Numbers worth reading in the test's output (``pytest -s``)."""
    print(f"\n[{what}] " + " ".join(f"{key}={value}" for key, value in values.items()))


# -- 1. transfers ------------------------------------------------------------------------------


def test_random_transfers_by_four_processes_conserve_money_and_lose_no_ack(
    procs: Processes, tmp_path: Path
) -> None:
    """Four processes move money between ten accounts (in a BTree) with ``attempts()``,
    each acknowledging a transfer once its commit returned; a fifth only reads.  Every
    read transaction saw the total; every acknowledged transfer is in the log and the
    balances, once."""
    path = tmp_path / "data.sqlite"
    workers, count, accounts, total = 4, 30, 10, 1000
    new_database(
        path,
        accounts=OOBTree({i: PersistentMapping(balance=total // accounts) for i in range(accounts)}),
        log=PersistentList(PersistentList() for _ in range(workers)),
    )
    started = time.monotonic()
    children = [start(procs, "transfer", path, w, count, total) for w in range(workers)]
    reader = start(procs, "reader", path, total)
    start_together([*children, reader])
    acked: list[list[Any]] = []
    retries = 0
    for child in children:
        lines = results(child)
        assert lines[-1] == "DONE 0", f"a writer's reader transaction saw a mixed snapshot: {lines[-5:]}"
        acked += [json.loads(line[4:]) for line in lines if line.startswith("ACK ")]
        retries += int(lines[-2].split()[1])
    (line,) = (line for line in results(reader) if line.startswith("READS "))
    reads = numbers(line)
    assert reads["MIXED"] == "0", f"the reader saw mixed snapshots: {line}"
    assert int(reads["READS"]) > 0
    elapsed = time.monotonic() - started
    report(
        "transfers", acked=len(acked), retries=retries, reader_reads=reads["READS"], seconds=f"{elapsed:.1f}"
    )
    assert len(acked) == workers * count
    assert retries > 0, "no transfer ever conflicted: the test proved little"
    db = amberdb.DB(SQLiteStorage(path, read_only=True))
    try:
        with db.transaction() as conn:
            balances = [conn.root()["accounts"][i]["balance"] for i in range(accounts)]
            logged = [list(entry) for log in conn.root()["log"] for entry in log]
    finally:
        db.close()
    assert sum(balances) == total
    assert sorted(map(str, logged)) == sorted(map(str, acked))  # each acknowledged transfer, once
    expected = [total // accounts] * accounts
    for _, a, b, amount in acked:
        expected[a] -= amount
        expected[b] += amount
    assert balances == expected


# -- 2. SIGKILL mid-commit -----------------------------------------------------------------------


def check_after_kill(path: Path, acked: dict[int, tuple[str, str]], aborted: list[int]) -> dict[int, bytes]:
    """Verify the database a killed writer left; return the committed ``txn`` numbers'
    tids.  Every transaction is whole, every acknowledged one is there, no aborted one is."""
    storage = SQLiteStorage(path, lock_timeout=5)
    try:
        committed: dict[int, bytes] = {}
        created: dict[bytes, int] = {}
        tids = []
        for txn in storage.iterator():
            tids.append(txn.tid)
            if not txn.meta.description.startswith("txn "):
                continue
            i = int(txn.meta.description.split()[1])
            records = {data.oid: data.record for data in txn.records}
            for j in range(SLOTS):
                assert records.pop(p64(SLOT_BASE + j)) == slot_record(i, j), (i, j)
            ((oid, data),) = records.items()  # the object it created, nothing else
            assert data == new_record(i)
            assert oid not in created, f"oid {oid.hex()} created twice, by {created.get(oid)} and {i}"
            created[oid] = i
            committed[i] = txn.tid
        assert tids == sorted(set(tids))
        for i, (tid, oid) in acked.items():
            assert committed.get(i) == bytes.fromhex(tid), f"acknowledged transaction {i} is missing"
            assert storage.load(bytes.fromhex(oid)) == (new_record(i), bytes.fromhex(tid))
        for i in aborted:
            assert i not in committed
            with pytest.raises(POSKeyError):
                storage.load(p64(ABORTED_BASE + i))
        newest = max(committed)
        for j in range(SLOTS):  # the current state is one transaction's, never a mix
            assert storage.load(p64(SLOT_BASE + j)) == (slot_record(newest, j), committed[newest])
        assert u64(storage.new_oid()) > max(map(u64, created))
    finally:
        storage.close()
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return committed


def commit_lock_is_free(path: Path) -> bool:
    """Whether nobody holds the commit lock file (taken and let go at once)."""
    fd = os.open(f"{path}.commit-lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_sigkill_mid_commit_loses_nothing_acknowledged(procs: Processes, tmp_path: Path) -> None:
    """A writer committing in a loop (four slots rewritten and one object created per
    transaction, some records of 1 MiB, some transactions lingering between vote and finish,
    some voted and aborted) is SIGKILLed at random moments, round after round.  After each
    kill: every acknowledged transaction is there, every transaction is whole, the current
    state is one transaction's, no aborted one shows, the file passes integrity_check, the
    commit lock is free and the next process commits at once."""
    path = tmp_path / "killed.sqlite"
    SQLiteStorage(path).close()
    rng = random.Random(20250114)
    acked: dict[int, tuple[str, str]] = {}
    aborted: list[int] = []
    next_i = 0
    rounds = 0
    in_flight = 0  # committed but killed before the acknowledgement
    between_vote_and_finish = 0  # rounds whose last line was a vote
    deadline = time.monotonic() + 25
    while rounds < 6 and time.monotonic() < deadline:
        rounds += 1
        first = next_i
        writer = start(procs, "kill-writer", path, first)
        read_until(writer, "ok ", timeout=30)  # killed while committing, not while importing
        if rounds % 2:
            time.sleep(rng.uniform(0.0, 0.6))  # a random moment
        else:
            while int(read_until(writer, "voted ", timeout=10)[-1].split()[1]) % 5 != 4:
                pass  # aimed: between the vote and the finish of a lingering transaction
        os.killpg(writer.pid, signal.SIGKILL)
        status, out, err = finish(writer, timeout=30)
        assert status == -signal.SIGKILL, err
        mine = []
        voted = None
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "ok":
                acked[int(parts[1])] = (parts[2], parts[3])
                mine.append(int(parts[1]))
                voted = None
            elif len(parts) == 2 and parts[0] == "aborted":
                aborted.append(int(parts[1]))
                mine.append(int(parts[1]))
            elif len(parts) == 2 and parts[0] == "voted":
                voted = int(parts[1])
            # else: a line cut by the kill, never acknowledged
        between_vote_and_finish += voted is not None
        committed = check_after_kill(path, acked, aborted)
        unacknowledged = [i for i in committed if i >= first and i not in acked]
        assert all(i > max(mine) for i in unacknowledged), (unacknowledged, max(mine))
        assert len(unacknowledged) <= 1
        in_flight += len(unacknowledged)
        assert commit_lock_is_free(path)
        storage = SQLiteStorage(path, lock_timeout=5)
        try:
            began = time.monotonic()
            storage.begin(TransactionMeta(description="after the kill"))
            mine_oid = p64(SLOT_BASE - 1)  # never allocated: the writer's slots moved the allocator past it
            storage.store(mine_oid, storage.load(mine_oid)[1] if rounds > 1 else z64, b"round %d" % rounds)
            storage.vote()
            storage.finish()
            assert time.monotonic() - began < 2.0, "the commit after the kill waited for a lock"
        finally:
            storage.close()
        next_i = max(mine) + 2  # skip one: it may or may not have committed
    report(
        "sigkill",
        rounds=rounds,
        killed_between_vote_and_finish=between_vote_and_finish,
        acknowledged=len(acked),
        aborted=len(aborted),
        committed_unacknowledged=in_flight,
    )
    assert rounds >= 4
    assert between_vote_and_finish >= 1


# -- 3. fairness ---------------------------------------------------------------------------------

FAIR_WORKERS = 8
FAIR_SECONDS = 3.0


def check_fair(name: str, lines: list[dict[str, str]]) -> list[int]:
    """Every process made at least 5% of the mean number of commits; the counts."""
    commits = [int(line["COMMITS"]) for line in lines]
    mean = statistics.mean(commits)
    report(
        name,
        commits=commits,
        min=min(commits),
        max=max(commits),
        mean=f"{mean:.1f}",
        retries=sum(int(line["RETRIES"]) for line in lines),
        slowest_commit_s=max(float(line["SLOWEST"]) for line in lines),
    )
    assert min(commits) >= 0.05 * mean, f"a process starved: {commits}"
    return commits


def test_eight_writers_on_their_own_objects_all_progress(procs: Processes, tmp_path: Path) -> None:
    """Eight processes commit to their own object for 3 s (no conflicts): each makes at
    least 5% of the mean number of commits, and every commit is counted in the data."""
    path = tmp_path / "fair.sqlite"
    new_database(path, slots=PersistentList(PersistentMapping(count=0) for _ in range(FAIR_WORKERS)))
    children = [start(procs, "own-slot", path, w, FAIR_SECONDS) for w in range(FAIR_WORKERS)]
    start_together(children)
    lines = [numbers(results(child)[-1]) for child in children]
    commits = check_fair("own objects", lines)
    db = amberdb.DB(SQLiteStorage(path, read_only=True))
    try:
        with db.transaction() as conn:
            assert [slot["count"] for slot in conn.root()["slots"]] == commits
    finally:
        db.close()


def test_eight_writers_on_one_resolvable_counter_all_progress(procs: Processes, tmp_path: Path) -> None:
    """Eight processes add one to the same ``Length`` for 3 s: the conflicts are resolved
    (``_p_resolveConflict``), each process makes at least 5% of the mean, the total is
    the sum of the commits."""
    path = tmp_path / "counter.sqlite"
    new_database(path, counter=Length())
    children = [start(procs, "shared-counter", path, FAIR_SECONDS) for _ in range(FAIR_WORKERS)]
    start_together(children)
    lines = [numbers(results(child)[-1]) for child in children]
    commits = check_fair("one counter", lines)
    db = amberdb.DB(SQLiteStorage(path, read_only=True))
    try:
        with db.transaction() as conn:
            assert conn.root()["counter"].value == sum(commits)
    finally:
        db.close()


# -- 4. a lock held by another process -----------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("raw", r"stayed locked by another process for more than 1 s while voting"),
        ("voted", r"another process held the commit lock for more than 1 s"),
    ],
)
def test_a_held_lock_fails_a_commit_after_lock_timeout(
    procs: Processes, tmp_path: Path, how: str, message: str
) -> None:
    """Another process holds the write lock (a plain sqlite3 ``BEGIN IMMEDIATE``, or an
    AmberDB storage voted and not finished): a commit fails after ``lock_timeout`` (1 s)
    with TransientStorageError saying so, which ``attempts()`` retries; nothing of it is
    committed; once the holder lets go the commit goes through at once."""
    path = tmp_path / "locked.sqlite"
    new_database(path, value=0)
    holder = start(procs, "hold", path, how)
    read_until(holder, "HELD", timeout=30)
    db = amberdb.DB(SQLiteStorage(path, lock_timeout=1.0))
    try:
        before = db.last_tid()
        began = time.monotonic()
        with pytest.raises(TransientStorageError, match=message) as failed, db.transaction() as conn:
            conn.root()["value"] = 1
        waited = time.monotonic() - began
        report(f"lock held ({how})", waited_s=f"{waited:.2f}", error=str(failed.value))
        assert 0.9 <= waited < 6.0
        assert isinstance(failed.value, TransientError)
        assert transaction.TransactionManager().isRetryableError(failed.value)
        assert db.last_tid() == before
        tell(holder, "release")
        read_until(holder, "RELEASED", timeout=10)
        began = time.monotonic()
        with db.transaction() as conn:
            conn.root()["value"] = 2
        assert time.monotonic() - began < 3.0  # no wait for a lock (it would have failed at 1 s)
        assert db.last_tid() > before
    finally:
        db.close()
    results(holder)
    check = amberdb.DB(SQLiteStorage(path, read_only=True))
    try:
        with check.transaction() as conn:
            assert conn.root()["value"] == 2
    finally:
        check.close()
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("SELECT count(*) FROM amberdb_schema WHERE name = 'held-by'").fetchall() == [(0,)]


def test_a_retry_after_a_lock_timeout_while_allocating_oids_commits(procs: Processes, tmp_path: Path) -> None:
    """The first attempt adds an object while another process holds the write lock: oid
    allocation times out (TransientStorageError); the holder lets go; ``attempts()`` runs
    the block again and reports success -- so its changes must be in the database."""
    path = tmp_path / "locked.sqlite"
    new_database(path)
    holder = start(procs, "hold", path, "raw")
    read_until(holder, "HELD", timeout=30)
    db = amberdb.DB(SQLiteStorage(path, lock_timeout=0.5))
    try:
        conn = db.open()
        tries = 0
        for attempt in transaction.attempts(3):
            with attempt:
                tries += 1
                if tries == 2:
                    tell(holder, "release")
                    read_until(holder, "RELEASED", timeout=10)
                conn.root()["new"] = PersistentMapping(attempt=tries)
        assert tries == 2
        conn.close()
    finally:
        db.close()
    results(holder)
    check = amberdb.DB(SQLiteStorage(path, read_only=True))
    try:
        with check.transaction() as conn:
            assert "new" in conn.root(), "attempts() reported a commit that wrote nothing"
            assert conn.root()["new"]["attempt"] == 2
    finally:
        check.close()


def lock_waiters() -> list[threading.Thread]:
    """The threads SQLiteStorage started to wait for the commit lock."""
    return [thread for thread in threading.enumerate() if thread.name == "amberdb-sqlite-commit-lock"]


def join_lock_waiters() -> None:
    for thread in lock_waiters():
        thread.join(10)
        assert not thread.is_alive()


def time_out_once(storage: SQLiteStorage) -> None:
    """A vote of ``storage`` that waits for the commit lock and gives up."""
    storage.begin(TransactionMeta(description="times out"))
    storage.store(p64(7), z64, b"never")
    with pytest.raises(TransientStorageError, match="commit lock"):
        storage.vote()
    storage.abort()


def test_a_given_up_lock_wait_outlives_close_quietly(
    procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage whose commit timed out waiting for another process's lock is closed; when
    that process lets go, nothing of the closed storage fails (no exception in a thread)."""
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    path = tmp_path / "locked.sqlite"
    SQLiteStorage(path).close()
    holder = start(procs, "hold", path, "voted")
    read_until(holder, "HELD", timeout=30)
    storage = SQLiteStorage(path, lock_timeout=0.2)
    time_out_once(storage)
    storage.close()
    tell(holder, "release")
    read_until(holder, "RELEASED", timeout=10)
    results(holder)
    join_lock_waiters()
    assert errors == []


class Voter(threading.Thread):
    """Commits one transaction of ``storage`` in a thread: sets ``voted`` once its vote
    returned, finishes when ``finishing`` is set."""

    def __init__(self, storage: SQLiteStorage, number: int) -> None:
        super().__init__(name=f"voter-{number}")
        self.storage = storage
        self.number = number
        self.voted = threading.Event()
        self.finishing = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        storage, number = self.storage, self.number
        try:
            storage.begin(TransactionMeta(description=f"retry {number}"))
            storage.store(p64(8), storage.load(p64(8))[1] if number else z64, b"%d" % number)
            storage.vote()
            self.voted.set()
            self.finishing.wait(10)
            storage.finish()
        except BaseException as exc:
            self.error = exc
        finally:
            self.voted.set()


def test_a_given_up_lock_wait_never_releases_the_next_commits_lock(procs: Processes, tmp_path: Path) -> None:
    """A commit times out waiting for another process's lock and is retried at once; when
    the other process lets go the retry votes -- and holds the commit lock until it
    finishes.  (A race: tried up to 30 times, a round shows the bug about half the time.)"""
    path = tmp_path / "locked.sqlite"
    SQLiteStorage(path).close()
    storage = SQLiteStorage(path, lock_timeout=0.1)
    holder = start(procs, "hold", path, "voted")
    try:
        for round_ in range(30):
            if round_:
                tell(holder, "again")
            read_until(holder, "HELD", timeout=30)
            time_out_once(storage)
            storage.lock_timeout = 10.0
            voter = Voter(storage, round_)
            voter.start()
            deadline = time.monotonic() + 0.2
            while len(lock_waiters()) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)  # the race is likelier with both waits blocked: given up, retry
            tell(holder, "release")
            read_until(holder, "RELEASED", timeout=10)
            assert voter.voted.wait(10)
            free = commit_lock_is_free(path)
            voter.finishing.set()
            voter.join(10)
            assert voter.error is None
            # A given-up wait ends once it gets the lock (it lets go of it at once).
            join_lock_waiters()
            storage.lock_timeout = 0.1
            assert not free, f"round {round_}: the commit lock was free while a commit was voted"
    finally:
        storage.close()
    results(holder)


# -- 5. the WAL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "size", "limit", "readers"),
    [
        pytest.param(600, 256 << 10, 0, 1, id="150MB-one-reader"),
        pytest.param(600, 256 << 10, 0, 3, id="150MB-three-readers"),
        pytest.param(600, 64 << 10, 1 << 20, 3, id="38MB-limit-1MiB-three-readers"),
    ],
)
def test_the_wal_stays_bounded_while_processes_keep_reading(
    procs: Processes, tmp_path: Path, count: int, size: int, limit: int, readers: int
) -> None:
    """A process commits ``count`` records of ``size`` bytes while ``readers`` others keep
    loading them (from the database: their caches hold nothing): the -wal file never grows
    past twice the storage's limit (``limit``, or the module's 64 MiB), a few records and 1 MiB."""
    from amberdb.storage.sql import sqlite as module

    path = tmp_path / "wal.sqlite"
    SQLiteStorage(path).close()
    writer = start(procs, "wal-writer", path, count, size, limit)
    readings = [start(procs, "wal-reader", path) for _ in range(readers)]
    began = time.monotonic()
    start_together([writer, *readings])
    written = results(writer, timeout=55)[-1].split()
    read = [results(reader)[-1].split() for reader in readings]
    elapsed = time.monotonic() - began
    biggest, final, slowest = int(written[1]), int(written[2]), written[4]
    seen_by_readers = max(int(words[3]) for words in read)
    bound = limit or module._WAL_LIMIT
    report(
        f"WAL {count} x {size >> 10} KiB, limit {bound >> 20} MiB, {readers} readers",
        written_MiB=(count * size) >> 20,
        max_wal_after_commit_MiB=f"{biggest / (1 << 20):.1f}",
        max_wal_seen_by_readers_MiB=f"{seen_by_readers / (1 << 20):.1f}",
        final_wal_MiB=f"{final / (1 << 20):.1f}",
        slowest_commit_s=slowest,
        reads=[int(words[1]) for words in read],
        seconds=f"{elapsed:.1f}",
    )
    assert all(int(words[1]) > 0 for words in read)
    assert max(biggest, seen_by_readers) <= 2 * bound + 4 * size + (1 << 20)


# -- 6. durability settings -------------------------------------------------------------------------


def test_every_connection_is_wal_and_synchronous_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each SQLite connection the storage makes -- to read, to commit, to allocate oids, read
    only too -- reports ``synchronous`` 2 (FULL) and ``journal_mode`` wal."""
    seen: list[tuple[bool, int, str]] = []
    connect = SQLiteStorage._connect

    def recording(self: SQLiteStorage, write: bool) -> Any:
        conn = connect(self, write)
        (synchronous,) = conn.execute("PRAGMA synchronous").fetchone()
        (journal,) = conn.execute("PRAGMA journal_mode").fetchone()
        seen.append((self.read_only, synchronous, journal))
        return conn

    monkeypatch.setattr(SQLiteStorage, "_connect", recording)
    path = tmp_path / "durable.sqlite"
    db = amberdb.DB(SQLiteStorage(path))
    try:
        with db.transaction() as conn:
            conn.root()["thing"] = PersistentMapping(a=1)  # a new object: oids allocated
        writer = db.storage._writer_conn  # type: ignore[attr-defined]
        assert writer.execute("PRAGMA synchronous").fetchone() == (2,)
        assert writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        db.close()
    reader = amberdb.DB(SQLiteStorage(path, read_only=True))
    try:
        with reader.transaction() as conn:
            assert conn.root()["thing"]["a"] == 1
    finally:
        reader.close()
    assert len(seen) >= 4
    assert {(synchronous, journal) for _, synchronous, journal in seen} == {(2, "wal")}
    assert {read_only for read_only, _, _ in seen} == {False, True}
    with closing(sqlite3.connect(path)) as raw:  # the mode is the file's: every process gets it
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
