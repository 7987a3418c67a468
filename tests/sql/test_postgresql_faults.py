"""PostgreSQLStorage when the database fails under it: an immediate restart during a stream of
commits, sessions terminated between begin and vote or between vote and finish, and the reply
to a COMMIT lost on the way (tests/sql/faulttools.py's proxy).

What must hold: an acknowledged commit is never lost, nothing is half-committed or committed
twice, the failure reaches the application as a TransientError that ``attempts()`` retries,
and the storage goes on working without being reopened.  The session cluster is restarted
here; each test leaves it running (pg_database's teardown starts it if a test stopped it).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import amberdb
from amberdb import PersistentMapping
from amberdb.exceptions import TransientError, TransientStorageError
from amberdb.testing.pgcluster import PostgreSQLCluster
from amberdb.transaction import TransactionManager
from tests.sql.faulttools import BugReproducedError, CommitCutProxy, backends, pg_uri, terminate, wait_for
from tests.sql.transfers import TOTAL, apply, check_ledger, draw, seed, total_seen


@pytest.fixture
def retried(caplog: pytest.LogCaptureFixture) -> Iterator[list[BaseException]]:
    """The errors ``attempts()`` retried during the test (it logs each one)."""
    caplog.set_level(logging.INFO, logger="amberdb.transaction")
    errors: list[BaseException] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("retrying the transaction") and record.args:
                errors.append(record.args[0])  # type: ignore[index,arg-type]

    handler = Collect()
    logger = logging.getLogger("amberdb.transaction")
    logger.addHandler(handler)
    try:
        yield errors
    finally:
        logger.removeHandler(handler)


def _counter_db(uri_or_storage: Any) -> amberdb.DB:
    db = amberdb.DB(uri_or_storage)
    with db.transaction() as conn:
        conn.root()["counter"] = PersistentMapping(value=0)
    return db


def _committed_value(cluster: PostgreSQLCluster, database: str) -> int:
    """The counter as a storage opened now reads it (not through any proxy)."""
    db = amberdb.DB(pg_uri(cluster, database))
    try:
        with db.transaction() as conn:
            value: int = conn.root()["counter"]["value"]
            return value
    finally:
        db.close()


def _increment(db: amberdb.DB, attempts: int, before_commit: Any = None) -> list[int]:
    """Add one to the counter in a retried transaction; the attempt numbers it took."""
    manager = TransactionManager()
    conn = db.open(manager)
    numbers: list[int] = []
    try:
        for attempt in manager.attempts(attempts):
            with attempt:
                numbers.append(attempt.number)
                if attempt.number > 1:
                    time.sleep(0.1 * attempt.number)  # the database may be coming back
                conn.root()["counter"]["value"] += 1
                if before_commit is not None and attempt.number == 1:
                    before_commit()
    finally:
        conn.close()
    return numbers


# -- an immediate restart during a stream of commits --------------------------------------------


class _Committer(threading.Thread):
    """Transfers committed one after another with ``attempts()``, until told to stop.

    ``attempts()`` retries what fails inside its block or its commit; the begin of the next
    attempt polls the database, and while the server is down that raises out of the loop
    (as in the ``transaction`` package).  So a transfer whose attempts gave up is tried again
    after a pause, as an application's request handler is: the same transfer, so a try that
    failed but committed anyway would be logged twice.
    """

    def __init__(self, uri: str) -> None:
        super().__init__(name="committer", daemon=True)
        self.uri = uri
        self.acked: list[list[Any]] = []
        self.maybe: list[list[Any]] = []
        self.errors: list[BaseException] = []
        self.failures: list[BaseException] = []
        self.reopened = 0
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(3)
        deadline = time.monotonic() + 60
        db = amberdb.DB(self.uri)
        try:
            manager = TransactionManager()
            conn = db.open(manager)
            for n in range(100_000):
                if self.stop.is_set() or time.monotonic() > deadline:
                    break
                entry = draw(rng, 0, n)
                failing_since = None
                while time.monotonic() < deadline:
                    try:
                        for attempt in manager.attempts(5):
                            with attempt:
                                apply(conn, 0, entry)
                    except TransientError as error:
                        self.errors.append(error)
                        now = time.monotonic()
                        failing_since = failing_since or now
                        if now - failing_since > 5:
                            # The server is back since long ago, yet this storage still fails:
                            # see test_a_storage_commits_again_after_its_idle_session_was_dropped.
                            # Reopen it, so that the rest of this test still checks the data.
                            conn.close()
                            db.close()
                            db = amberdb.DB(self.uri)
                            conn = db.open(manager)
                            self.reopened += 1
                            failing_since = None
                        time.sleep(0.2)
                        continue
                    self.acked.append(entry)
                    break
                else:
                    self.maybe.append(entry)
            conn.close()
        except BaseException as error:
            self.failures.append(error)
        finally:
            db.close()


def test_acknowledged_commits_survive_an_immediate_restart(
    pg_cluster: PostgreSQLCluster, pg_database: str, retried: list[BaseException]
) -> None:
    uri = pg_uri(pg_cluster, pg_database)
    db = amberdb.DB(uri)
    watcher = amberdb.DB(uri)  # opened before the restart, used after it
    committer = _Committer(uri)
    try:
        seed(db, 1)
        with watcher.transaction() as conn:
            assert total_seen(conn) == TOTAL
        committer.start()
        wait_for(lambda: len(committer.acked) >= 10 or committer.failures, 30, "ten commits")
        before = len(committer.acked)
        pg_cluster.restart(mode="immediate")
        wait_for(
            lambda: len(committer.acked) >= before + 10 or committer.failures or not committer.is_alive(),
            45,
            "ten commits after the restart",
        )
        committer.stop.set()
        committer.join(30)
        assert not committer.is_alive()
        assert not committer.failures, committer.failures
        assert len(committer.acked) >= before + 10
        # The restart reached the committer as transient errors only, which it retried.  (It
        # may see none: a COMMIT cut by the restart is looked up, and found, once the server
        # is back, and the sessions it lost are replaced.)
        errors = retried + committer.errors
        assert all(isinstance(error, TransientError) for error in errors), errors
        # Reads through a storage opened before the restart: no reopen needed.
        with watcher.transaction() as conn:
            assert total_seen(conn, minimize=True) == TOTAL
        check_ledger(db, committer.acked, committer.maybe)
    finally:
        committer.stop.set()
        committer.join(30)
        watcher.close()
        db.close()


# -- sessions dropped in the middle of a transaction --------------------------------------------


def test_a_session_dropped_between_vote_and_finish_fails_transiently_and_the_retry_commits_once(
    pg_cluster: PostgreSQLCluster, pg_database: str, retried: list[BaseException]
) -> None:
    db = _counter_db(pg_uri(pg_cluster, pg_database))
    storage = db.storage
    vote = storage.vote
    dropped: list[int] = []

    def vote_then_drop() -> None:
        vote()
        if not dropped:
            # The voted session is the one in a transaction (it holds the commit lock).
            dropped.append(terminate(pg_cluster, pg_database, "state = 'idle in transaction'"))

    storage.vote = vote_then_drop  # type: ignore[method-assign]
    try:
        assert _increment(db, attempts=3) == [1, 2]
        assert dropped == [1]
        assert len(retried) == 1 and isinstance(retried[0], TransientStorageError), retried
        assert "did not commit" in str(retried[0])
        assert _committed_value(pg_cluster, pg_database) == 1  # once: the dropped one rolled back
        # The same storage goes on committing.
        assert _increment(db, attempts=1) == [1]
        assert _committed_value(pg_cluster, pg_database) == 2
    finally:
        del storage.vote
        db.close()


@pytest.mark.parametrize("drop", ["terminate", "restart"])
def test_a_storage_commits_again_after_its_idle_session_was_dropped(
    drop: str, pg_cluster: PostgreSQLCluster, pg_database: str
) -> None:
    db = _counter_db(pg_uri(pg_cluster, pg_database))  # its writer session exists, idle

    def drop_sessions() -> None:  # between the transaction's begin and its vote
        if drop == "terminate":
            assert terminate(pg_cluster, pg_database) >= 2  # the writer and a reader
        else:
            pg_cluster.restart(mode="immediate")

    try:
        assert _increment(db, attempts=5, before_commit=drop_sessions) == [1, 2]
        assert _committed_value(pg_cluster, pg_database) == 1
    finally:
        db.close()


def test_reads_after_a_restart_need_no_reopen_however_many_sessions_were_pooled(
    pg_cluster: PostgreSQLCluster, pg_database: str
) -> None:
    db = _counter_db(pg_uri(pg_cluster, pg_database))
    storage = db.storage
    try:
        # Three reads at once (held up by a table lock until all three wait), as threads of an
        # application do: the storage pools the three sessions they used.
        with psycopg.connect(pg_cluster.dsn(pg_database)) as locker:
            locker.execute("LOCK TABLE amberdb_object IN ACCESS EXCLUSIVE MODE")
            counts: list[int] = []
            readers = [threading.Thread(target=lambda: counts.append(len(storage))) for _ in range(3)]
            for reader in readers:
                reader.start()
            wait_for(
                lambda: len(backends(pg_cluster, pg_database, "wait_event_type = 'Lock'")) == 3,
                10,
                "three reads waiting",
            )
            locker.commit()
        for reader in readers:
            reader.join(10)
        assert counts == [2, 2, 2]
        pg_cluster.restart(mode="immediate")
        assert len(storage) == 2  # one plain read, right after the restart
    finally:
        db.close()


# -- the reply to a COMMIT lost ------------------------------------------------------------------


def test_a_lost_commit_reply_is_looked_up_and_the_commit_counts_once(
    pg_cluster: PostgreSQLCluster, pg_database: str, retried: list[BaseException]
) -> None:
    with CommitCutProxy(pg_cluster.host, pg_cluster.port) as proxy:
        db = _counter_db(amberdb.PostgreSQLStorage(proxy.dsn(pg_cluster, pg_database)))
        try:
            proxy.cut_next_commit(after_reply=True)
            # The commit went through; only its answer was lost: finish finds its tid, so the
            # transaction succeeds at the first attempt.
            assert _increment(db, attempts=3) == [1]
            assert proxy.cut.is_set()
            assert retried == []
            assert _committed_value(pg_cluster, pg_database) == 1
            # The storage replaced the cut session and goes on committing.
            assert _increment(db, attempts=1) == [1]
            assert _committed_value(pg_cluster, pg_database) == 2
        finally:
            db.close()


def test_a_commit_still_completing_when_its_connection_drops_is_not_reported_as_failed(
    pg_cluster: PostgreSQLCluster, pg_database: str, retried: list[BaseException]
) -> None:
    def set_standby_names(value: str | None) -> None:
        if value is None:
            pg_cluster.psql("ALTER SYSTEM RESET synchronous_standby_names")
        else:
            pg_cluster.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{value}'")
        pg_cluster.psql("SELECT pg_reload_conf()")

    with CommitCutProxy(pg_cluster.host, pg_cluster.port) as proxy:
        db = _counter_db(amberdb.PostgreSQLStorage(proxy.dsn(pg_cluster, pg_database), lock_timeout=20))
        outcome: list[Any] = []

        def increment() -> None:
            try:
                outcome.append(_increment(db, attempts=5))
            except BaseException as error:
                outcome.append(error)

        thread = threading.Thread(target=increment)
        try:
            # A standby that never answers: a COMMIT is flushed locally, then waits for it,
            # invisible to other sessions, until the setting is taken back.
            set_standby_names("amberdb_nowhere")
            time.sleep(0.5)  # the sessions take the new setting in
            proxy.cut_next_commit(after_reply=False)
            thread.start()
            assert proxy.cut.wait(20)
            wait_for(
                lambda: (
                    pg_cluster.psql(
                        "SELECT count(*) FROM pg_stat_activity"
                        f" WHERE datname = '{pg_database}' AND wait_event = 'SyncRep'"
                    )
                    == "1"
                ),
                10,
                "the COMMIT to wait for the standby",
            )
            time.sleep(1.0)  # the storage has seen its connection drop and decided meanwhile
        finally:
            set_standby_names(None)  # the COMMIT completes now
            thread.join(60)
            db.close()
    assert not thread.is_alive()
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    # One increment was asked for: either it was reported committed at the first attempt, or
    # it was reported failed and then really was not there when retried.
    value = _committed_value(pg_cluster, pg_database)
    if value != 1:
        raise BugReproducedError(f"one increment applied {value} times; retried after {retried}")
