"""The shape of RelStorage's own tests, against PostgreSQLStorage (and SQLiteStorage where it
costs little): invalidation across storage instances, a process that never reads older data
than it has seen, votes of two storage instances contending for the commit lock, and
conflicting commits from threads of separate storages merged by ``_p_resolveConflict``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import amberdb
from amberdb import PersistentList, PersistentMapping, open_storage
from amberdb.btrees import Length
from amberdb.exceptions import TransientStorageError, VoteConflictError
from amberdb.storage.base import Storage, TransactionMeta
from amberdb.testing.pgcluster import PostgreSQLCluster, PostgreSQLReplica
from amberdb.transaction import TransactionManager
from amberdb.utils import Oid
from tests.sql.faulttools import BugReproducedError, pg_uri, wait_for

KINDS = ["sqlite", "postgresql"]


def _make_uri(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite://{tmp_path / 'db.sqlite'}"
    cluster: PostgreSQLCluster = request.getfixturevalue("pg_cluster")
    return pg_uri(cluster, request.getfixturevalue("pg_database"))


@pytest.fixture(params=KINDS)
def uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URI of a new, empty database of each SQL kind."""
    return _make_uri(request.param, request, tmp_path)


def _with(uri: str, **options: object) -> str:
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"{uri}{'&' if '?' in uri else '?'}{query}"


def _objects(uri: str, *names: str) -> list[Oid]:
    """Make ``root[name] = PersistentMapping(value=0)`` for each name; their oids."""
    db = amberdb.DB(uri)
    try:
        with db.transaction() as conn:
            for name in names:
                conn.root()[name] = PersistentMapping(value=0)
        with db.transaction() as conn:
            return [conn.root()[name]._p_oid for name in names]
    finally:
        db.close()


# -- invalidation across storage instances (checkCrossConnectionInvalidation/Isolation) ---------


@pytest.mark.parametrize("history", [True, False], ids=["history", "history-free"])
def test_a_change_through_one_db_reaches_the_other_dbs_next_transaction(uri: str, history: bool) -> None:
    uri = _with(uri, history=str(history).lower())
    db1, db2 = amberdb.DB(uri), amberdb.DB(uri)
    tm1, tm2 = TransactionManager(), TransactionManager()
    try:
        with db1.transaction() as conn:
            conn.root()["thing"] = PersistentMapping(value=1)
        c1, c2 = db1.open(tm1), db2.open(tm2)
        tm2.begin()
        thing2 = c2.root()["thing"]
        assert thing2["value"] == 1  # loaded: in c2's object cache and db2's records cache
        oid = thing2._p_oid
        tm1.begin()
        c1.root()["thing"]["value"] = 2
        c1.root()["added"] = PersistentMapping(value="new")
        tm1.commit()
        tid = db1.storage.last_tid()
        # c2's transaction goes on seeing its snapshot (isolation) ...
        assert thing2["value"] == 1
        assert "added" not in c2.root()
        tm2.abort()
        # ... and its next transaction sees the commit: the object was invalidated.
        tm2.begin()
        assert thing2._p_changed is None, "still holds the old state"
        assert thing2["value"] == 2
        assert c2.root()["added"]["value"] == "new"
        assert db2.storage.last_tid() == tid
        assert db2.storage.load(oid)[1] == tid  # the records cache let go of the old revision
        # And the other way round.
        thing2["value"] = 3
        tm2.commit()
        tm1.begin()
        assert c1.root()["thing"]["value"] == 3
        tm1.abort()
        c1.close()
        c2.close()
    finally:
        tm1.abort()
        tm2.abort()
        db1.close()
        db2.close()


# -- never back in time -------------------------------------------------------------------------


class _Writer(threading.Thread):
    """Commits counter = 1, 2, 3... through a storage of its own; ``acked`` is the last value
    whose commit returned."""

    def __init__(self, uri: str) -> None:
        super().__init__(name="writer", daemon=True)
        self.db = amberdb.DB(uri)
        self.acked = 0
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.db.transaction() as conn:
                    conn.root()["counter"]["value"] = self.acked + 1
                self.acked += 1
                time.sleep(0.01)
        except BaseException as error:
            self.failure = error


@pytest.mark.parametrize("setup", ["sqlite", "postgresql", "postgresql-lagging-replica"])
def test_a_process_never_reads_older_data_than_it_has_seen(
    setup: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A reader polls and commits while a writer commits: each transaction of the reader sees
    at least what the writer had acknowledged before it began, never less than the reader's
    previous transaction, and the reader's own last commit.  With a replica, replay is paused
    for the middle third: the replica then never answers (it is behind what the reader saw)."""
    uri = _make_uri(setup.split("-")[0], request, tmp_path)
    _objects(uri, "counter", "mine")
    replica: PostgreSQLReplica | None = None
    reader_uri = uri
    if setup == "postgresql-lagging-replica":
        replica = request.getfixturevalue("pg_replica")
        replica.wait_for_replay()
        database = request.getfixturevalue("pg_database")
        reader = amberdb.PostgreSQLStorage(
            request.getfixturevalue("pg_dsn"), replicas=[replica.dsn(database)], replica_timeout=0.2
        )
        reader_db = amberdb.DB(reader)
    else:
        reader_db = amberdb.DB(reader_uri)
    storage = reader_db.storage
    writer = _Writer(uri)
    manager = TransactionManager()
    steps = 30
    served: list[int] = []
    try:
        conn = reader_db.open(manager)
        writer.start()
        last_value, last_tid = 0, storage.last_tid()
        for step in range(steps):
            if replica is not None:
                if step == steps // 3:
                    served.append(storage.replica_loads)  # type: ignore[attr-defined]
                    replica.pause_replay()
                elif step == steps // 3 + 1:
                    # The replica may have replayed all the reader had seen when it paused;
                    # the reader's commit since (the step before) it has not.
                    served.append(storage.replica_loads)  # type: ignore[attr-defined]
                elif step == 2 * steps // 3:
                    served.append(storage.replica_loads)  # type: ignore[attr-defined]
                    replica.resume_replay()
            floor = writer.acked
            manager.begin()
            if step % 3 == 0:
                conn.cache_minimize()
            value = conn.root()["counter"]["value"]
            assert value >= floor, f"step {step}: read {value}, the writer had committed {floor}"
            assert value >= last_value, f"step {step}: read {value} after {last_value}"
            assert conn.root()["mine"]["value"] == step, "the reader's own last commit is not there"
            assert storage.last_tid() >= last_tid
            last_value, last_tid = value, storage.last_tid()
            conn.root()["mine"]["value"] = step + 1
            manager.commit()
            assert storage.last_tid() > last_tid  # its own commit, seen at once
            last_tid = storage.last_tid()
        writer.stop.set()
        writer.join(10)
        assert writer.failure is None, writer.failure
        assert writer.acked > 0 and last_value > 0  # the reader saw the writer at work
        if replica is not None:
            served.append(storage.replica_loads)  # type: ignore[attr-defined]
            before_pause, lagging, paused, resumed = served
            assert before_pause > 0, "the replica served nothing while it kept up"
            assert paused == lagging, "a lagging replica answered a load"
            assert resumed > paused, "the replica served nothing once it replayed again"
        conn.close()
    finally:
        writer.stop.set()
        writer.join(10)
        manager.abort()
        writer.db.close()
        reader_db.close()
        if replica is not None and replica.replay_paused:
            replica.resume_replay()


# -- votes contending for the commit lock -------------------------------------------------------


def _second_commit(storage: Storage, oid: Oid, outcome: list[Any]) -> threading.Thread:
    """A thread committing ``oid`` again (its current record, stored on its current tid)
    through ``storage``; what happened goes to ``outcome``: ``("voted", when)`` then the tid,
    or the error."""
    record, tid = storage.load(oid)

    def commit() -> None:
        try:
            storage.begin(TransactionMeta(description="second"))
            storage.store(oid, tid, record)
            storage.vote()
            outcome.append(("voted", time.monotonic()))
            outcome.append(storage.finish())
        except BaseException as error:
            storage.abort()
            outcome.append(error)

    return threading.Thread(target=commit, name="second-voter")


def _vote(storage: Storage, oid: Oid) -> None:
    record, tid = storage.load(oid)
    storage.begin(TransactionMeta(description="first"))
    storage.store(oid, tid, record)
    storage.vote()


@pytest.mark.parametrize("end", ["finish", "abort"])
@pytest.mark.parametrize("same", [False, True], ids=["other-object", "same-object"])
def test_a_vote_waits_for_another_storages_vote_and_then_goes_on(uri: str, end: str, same: bool) -> None:
    a, b = _objects(uri, "a", "b")
    first, second = open_storage(uri), open_storage(uri)
    try:
        outcome: list[Any] = []
        thread = _second_commit(second, a if same else b, outcome)
        _vote(first, a)  # voted, not finished: it holds the commit lock
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and outcome == [], "the second vote did not wait for the first"
        released = time.monotonic()
        first_tid = None
        if end == "finish":
            first_tid = first.finish()
        else:
            first.abort()
        thread.join(20)
        assert not thread.is_alive(), "the second vote never got the lock"
        if same and end == "finish":
            # It waited, then found the first commit: a conflict, not a deadlock or a lost update.
            assert len(outcome) == 1 and isinstance(outcome[0], VoteConflictError), outcome
            return
        assert outcome[0][0] == "voted" and outcome[0][1] >= released, outcome
        second_tid = outcome[1]
        assert isinstance(second_tid, bytes), outcome
        if end == "finish":
            assert isinstance(first_tid, bytes) and second_tid > first_tid
        first.poll_invalidations(first.last_tid())
        assert first.load(a if same else b)[1] == second_tid
    finally:
        first.close()
        second.close()


def test_a_vote_waiting_past_lock_timeout_gets_a_transient_error(uri: str) -> None:
    a, b = _objects(uri, "a", "b")
    first, second = open_storage(uri), open_storage(_with(uri, lock_timeout=0.5))
    try:
        _vote(first, a)
        outcome: list[Any] = []
        thread = _second_commit(second, b, outcome)
        started = time.monotonic()
        thread.start()
        thread.join(20)
        waited = time.monotonic() - started
        assert len(outcome) == 1 and isinstance(outcome[0], TransientStorageError), outcome
        assert 0.4 <= waited < 10, waited
        assert isinstance(first.finish(), bytes)  # the holder was not disturbed
        _wait_for_sqlite_lock_helpers()
    finally:
        first.close()
        second.close()


def _wait_for_sqlite_lock_helpers() -> None:
    """Let SQLiteStorage's helper thread of a wait given up (it takes the lock, then lets it go)
    end before its storage is closed: see the next test."""
    wait_for(
        lambda: not [t for t in threading.enumerate() if t.name == "amberdb-sqlite-commit-lock"],
        10,
        "the SQLite commit-lock helper threads to end",
    )


def test_a_sqlite_storage_closed_after_a_lock_timeout_leaves_nothing_failing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite://{tmp_path / 'db.sqlite'}"
    a, b = _objects(uri, "a", "b")
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    first, second = open_storage(uri), open_storage(_with(uri, lock_timeout=0.3))
    try:
        _vote(first, a)
        outcome: list[Any] = []
        thread = _second_commit(second, b, outcome)
        thread.start()
        thread.join(20)
        assert isinstance(outcome[0], TransientStorageError), outcome
        second.close()  # an application giving up on this storage
        first.finish()
        _wait_for_sqlite_lock_helpers()
    finally:
        first.close()
        second.close()
    if errors:
        raise BugReproducedError(f"a thread of the closed storage failed: {errors}")


@pytest.mark.parametrize(
    "kind",
    [
        "sqlite",
        "postgresql",
    ],
)
def test_after_a_lock_timeout_the_waiter_commits_once_the_lock_is_free(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    uri = _make_uri(kind, request, tmp_path)
    a, b = _objects(uri, "a", "b")
    first, second = open_storage(uri), open_storage(_with(uri, lock_timeout=0.5))
    try:
        _vote(first, a)
        outcome: list[Any] = []
        thread = _second_commit(second, b, outcome)
        thread.start()
        thread.join(20)
        assert isinstance(outcome[0], TransientStorageError), outcome
        first.finish()
        # What attempts() does after a TransientError: the same commit again.
        outcome = []
        thread = _second_commit(second, b, outcome)
        thread.start()
        thread.join(20)
        if len(outcome) != 2:
            raise BugReproducedError(f"the retry failed: {outcome}")
        assert isinstance(outcome[1], bytes), outcome
        _wait_for_sqlite_lock_helpers()
    finally:
        first.close()
        second.close()


# -- conflicts merged by _p_resolveConflict ------------------------------------------------------


def test_conflicting_commits_from_threads_of_separate_storages_are_merged(
    uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads, hits = 4, 20
    setup = amberdb.DB(uri)
    with setup.transaction() as conn:
        conn.root()["hits"] = Length()
        conn.root()["logs"] = PersistentList(PersistentList() for _ in range(threads))
    setup.close()
    resolved: list[int] = []
    merge = Length._p_resolveConflict

    def counted(self: Length, old: Any, saved: Any, new: Any) -> Any:
        resolved.append(1)
        return merge(self, old, saved, new)

    monkeypatch.setattr(Length, "_p_resolveConflict", counted)
    start = threading.Barrier(threads, timeout=30)
    failures: list[BaseException] = []

    def hit(number: int) -> None:
        db = amberdb.DB(uri)  # a storage instance of its own, as another process has
        try:
            manager = TransactionManager()
            conn = db.open(manager)
            start.wait()
            for n in range(hits):
                for attempt in manager.attempts(10):
                    with attempt:
                        conn.root()["hits"].change(1)
                        conn.root()["logs"][number].append(n)
            conn.close()
        except BaseException as error:
            failures.append(error)
        finally:
            db.close()

    workers = [threading.Thread(target=hit, args=(number,)) for number in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not any(worker.is_alive() for worker in workers)
    assert not failures, failures
    check = amberdb.DB(uri)
    try:
        with check.transaction() as conn:
            assert conn.root()["hits"].value == threads * hits
            assert [list(log) for log in conn.root()["logs"]] == [list(range(hits))] * threads
    finally:
        check.close()
    assert resolved, "no commit ever conflicted: the test proved little"


@pytest.fixture(autouse=True)
def _no_stray_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    stray = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    assert not stray, f"threads left running: {stray}"
