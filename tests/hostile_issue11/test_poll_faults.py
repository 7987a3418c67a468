"""A storage whose poll fails: what the user sees, and that the snapshot stays consistent."""

from __future__ import annotations

import logging

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import PersistentMapping
from amberdb.storage.memory import MemoryStorage
from tests.hostile_issue11.doubles import Faulty


def _two_dbs() -> tuple[Faulty, amberdb.DB, amberdb.DB]:
    """A database on a faulty wrapper and a second, healthy one on the same MemoryStorage."""
    memory = MemoryStorage()
    faulty = Faulty(memory)
    return faulty, amberdb.DB(faulty), amberdb.DB(memory)


def test_a_poll_failing_after_a_durable_commit_leaves_no_stale_object_in_the_next_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Defect: tpc_finish moved the connection's snapshot to its commit's tid but left the
    # objects others changed before it to be invalidated by the next boundary's poll.  When
    # that poll failed (logged, the commit being durable), the next transaction read those
    # objects stale from the cache and the rest fresh: x=0 beside y=1, a state no
    # transaction ever committed.
    faulty, db_a, db_b = _two_dbs()
    tm_a, tm_b = transaction.TransactionManager(), transaction.TransactionManager()
    a, b = db_a.open(tm_a), db_b.open(tm_b)
    root = a.root()
    root["x"], root["y"], root["z"] = PersistentMapping(v=0), PersistentMapping(v=0), PersistentMapping(v=0)
    tm_a.commit()
    tm_a.begin()
    x, y = root["x"], root["y"]
    assert (x["v"], y["v"]) == (0, 0)  # both cached by a

    tm_b.begin()
    b.root()["x"]["v"] = b.root()["y"]["v"] = 1  # every committed state has x == y
    tm_b.commit()

    root["z"]["v"] = 5  # a commits something else; the poll after its finish fails
    faulty.fail_poll_after_finish = True
    with caplog.at_level(logging.ERROR):
        tm_a.commit()  # durable: not reported as failed
    assert "afterCompletion" in caplog.text
    faulty.fail_poll = faulty.fail_poll_after_finish = False

    # The next transaction (implicit, as after every commit) reads one committed state.
    y._p_deactivate()
    assert x["v"] == y["v"] == 1
    db_a.close()
    db_b.close()


def test_a_poll_failing_at_begin_raises_there_and_keeps_the_old_snapshot_whole() -> None:
    faulty, db_a, db_b = _two_dbs()
    tm_a, tm_b = transaction.TransactionManager(), transaction.TransactionManager()
    a, b = db_a.open(tm_a), db_b.open(tm_b)
    a.root()["x"], a.root()["y"] = PersistentMapping(v=0), PersistentMapping(v=0)
    tm_a.commit()
    x, y = a.root()["x"], a.root()["y"]
    assert x["v"] == 0
    tm_b.begin()
    b.root()["x"]["v"] = b.root()["y"]["v"] = 1
    tm_b.commit()
    faulty.fail_poll = True
    with pytest.raises(OSError, match="went away"):
        tm_a.begin()
    # Still the old snapshot, whole: y loads as of it, not the newer committed state.
    assert (x["v"], y["v"]) == (0, 0)
    faulty.fail_poll = False
    tm_a.begin()
    assert (x["v"], y["v"]) == (1, 1)
    db_a.close()
    db_b.close()


def test_db_open_whose_poll_fails_keeps_the_pooled_connection() -> None:
    # Defect: DB.open() popped a pooled connection and opened it; when its poll raised, the
    # caller got the error but the connection stayed open, registered with the thread's
    # transaction manager, and out of the pool: its warm cache was lost, and until garbage
    # collection it took part in (and polled at) every transaction of the thread.
    faulty = Faulty(MemoryStorage())
    db = amberdb.DB(faulty, pool_size=1)
    first = db.open()
    first.root()["a"] = 1
    transaction.commit()
    first.close()
    faulty.fail_poll = True
    with pytest.raises(OSError, match="went away"):
        db.open()
    assert not first.opened
    faulty.fail_poll = False
    polls = faulty.polls
    transaction.begin()  # no connection of this thread is open: nothing polls
    assert faulty.polls == polls
    again = db.open()
    assert again is first  # back from the pool, warm cache and all
    assert again.root()["a"] == 1
    again.close()
    db.close()
