"""evolve.each on a live database: a concurrent writer's commits and the migration both survive."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import amberdb
import amberdb.transaction as transaction
from amberdb import evolve
from amberdb.btrees import IOBTree


class Counted(amberdb.Persistent):
    """An object both a migration and an application change."""

    def __init__(self) -> None:
        self.migrated = 0
        self.touched = 0


def test_each_and_a_concurrent_writer_lose_nothing(tmp_path: Path) -> None:
    db = amberdb.DB(str(tmp_path / "data.fs"))
    manager = transaction.TransactionManager()
    conn = db.open(manager)
    tree = conn.root()["tree"] = IOBTree()
    for key in range(3000):
        tree[key] = Counted()
    manager.commit()
    conn.close()

    stop = threading.Event()
    acked: list[int] = []

    def writer() -> None:
        own = transaction.TransactionManager()
        wconn = db.open(own)
        rng = random.Random(7)
        while not stop.is_set():
            key = rng.randrange(3000)
            try:
                own.begin()
                wconn.root()["tree"][key].touched += 1
                own.commit()
                acked.append(key)
            except amberdb.ConflictError:
                own.abort()
        wconn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:

        def migrate(obj: Counted) -> None:
            obj.migrated += 1

        while not acked and thread.is_alive():  # the writer is committing before the migration starts
            stop.wait(0.01)
        result = evolve.each(db, Counted, migrate, batch_size=200)
    finally:
        stop.set()
        thread.join(30)
    assert int(result) == 3000
    assert acked, "the writer committed nothing while the migration ran"
    check = db.open(transaction.TransactionManager())
    tree = check.root()["tree"]
    assert all(tree[key].migrated == 1 for key in range(3000))
    expected = {key: acked.count(key) for key in set(acked)}
    assert all(tree[key].touched == count for key, count in expected.items())
    assert sum(tree[key].touched for key in range(3000)) == len(acked)
    check.close()
    db.close()
