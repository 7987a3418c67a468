"""The object half of the conformance suite: databases, connections and transactions on a storage.

The checks that matter for many processes use two independent :class:`~amberdb.DB` objects,
one on the storage the factory created and one on its second instance (a follower, another
client, or the same in-process storage): every transaction of either sees one committed
state, whoever committed it.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from amberdb import transaction as txn
from amberdb.btrees import Length, OOBTree
from amberdb.connection import Connection
from amberdb.containers import PersistentMapping
from amberdb.db import DB
from amberdb.exceptions import ConflictError, ReadConflictError
from amberdb.testing.factories import StorageFactory
from amberdb.testing.objects import Account, MergingCounter
from amberdb.testing.storage_suite import needs_history, run_machine

__all__ = ["ObjectSuite", "TwoDatabases"]

ACCOUNTS = 5
OPENING_BALANCE = 100
ALLOWED = (Account, MergingCounter)


class TwoDatabases:
    """A writable database on a new storage, and a second one on its second instance."""

    def __init__(self, factory: StorageFactory) -> None:
        self.factory = factory
        self.first_storage = factory.create()
        self.first = DB(self.first_storage, allowed_classes=ALLOWED)
        self._second: DB | None = None

    @property
    def second(self) -> DB:
        """The database on the second instance, opened on first use (after the first has data)."""
        if self._second is None:
            storage = self.factory.open_second(self.first_storage)
            self._second = DB(storage, allowed_classes=ALLOWED)
        return self._second

    def connect(self, db: DB) -> tuple[Connection, txn.TransactionManager]:
        """A connection with a transaction manager of its own."""
        manager = txn.TransactionManager()
        return db.open(manager), manager

    def close(self) -> None:
        """Close both databases (the second first: it may share the first's storage)."""
        if self._second is not None:
            self._second.close()
        self.first.close()


class ObjectSuite:
    """Object-level conformance tests; :func:`amberdb.testing.conformance_suite` binds a factory."""

    factory_class: ClassVar[type[StorageFactory]]

    @pytest.fixture
    def dbs(self, tmp_path: Any) -> Iterator[TwoDatabases]:
        """Two databases on one set of data."""
        factory = self.factory_class(tmp_path)
        both = TwoDatabases(factory)
        try:
            yield both
        finally:
            both.close()
            factory.cleanup()

    def test_objects_round_trip(self, dbs: TwoDatabases) -> None:
        with dbs.first.transaction() as conn:
            conn.root.tree = tree = OOBTree()
            for i in range(500):
                tree[f"k{i:04d}"] = Account(i)
            conn.root.length = Length(500)
        conn, manager = dbs.connect(dbs.second)
        manager.begin()
        assert conn.root.length() == 500
        assert [a.balance for a in conn.root.tree.values()] == list(range(500))
        manager.abort()
        conn.close()

    def test_other_database_sees_commit_at_its_next_transaction(self, dbs: TwoDatabases) -> None:
        with dbs.first.transaction() as conn:
            conn.root.account = Account(1)
        reader, manager = dbs.connect(dbs.second)
        manager.begin()
        account = reader.root.account
        assert account.balance == 1
        with dbs.first.transaction() as conn:
            conn.root.account.balance = 2
            conn.root.other = Account(3)
        # Within its transaction the reader keeps its snapshot, loaded or not.
        assert account.balance == 1
        assert "other" not in reader.root()
        manager.begin()
        assert account.balance == 2 and reader.root.other.balance == 3
        manager.abort()
        reader.close()

    def test_conflict_between_databases_names_oid_and_class(self, dbs: TwoDatabases) -> None:
        with dbs.first.transaction() as conn:
            conn.root.account = Account(10)
        if dbs.second.read_only:
            pytest.skip("the second instance is read-only")
        a, manager_a = dbs.connect(dbs.first)
        b, manager_b = dbs.connect(dbs.second)
        manager_a.begin()
        manager_b.begin()
        a.root.account.balance += 1
        b.root.account.balance += 2
        manager_a.commit()
        with pytest.raises(ConflictError) as info:
            manager_b.commit()
        manager_b.abort()
        assert info.value.oid == a.root.account._p_oid
        assert "Account" in str(info.value)
        manager_b.begin()
        assert b.root.account.balance == 11
        manager_a.abort()
        manager_b.abort()
        a.close()
        b.close()

    def test_read_current_refuses_a_commit_whose_reads_changed(self, dbs: TwoDatabases) -> None:
        with dbs.first.transaction() as conn:
            conn.root.x = Account(10)
            conn.root.y = Account(10)
        writer_db = dbs.first if dbs.second.read_only else dbs.second
        a, manager_a = dbs.connect(dbs.first)
        b, manager_b = dbs.connect(writer_db)
        manager_a.begin()
        manager_b.begin()
        # Each sees x + y = 20 and withdraws 15 from one account, having read the other:
        # without readCurrent both would commit (write skew) and leave x + y = -10.
        a.readCurrent(a.root.y)
        a.root.x.balance -= 15
        b.readCurrent(b.root.x)
        b.root.y.balance -= 15
        manager_a.commit()
        with pytest.raises(ConflictError) as info:
            manager_b.commit()
        manager_b.abort()
        if hasattr(dbs.first_storage, "check_current"):
            assert isinstance(info.value, ReadConflictError)
            assert info.value.oid == a.root.x._p_oid
        # (Without check_current, a's commit stored y again to check it, so b's write of y
        # conflicts instead: b cannot commit either way.)
        manager_b.begin()
        assert (b.root.x.balance, b.root.y.balance) == (-5, 10)
        manager_b.abort()
        # A readCurrent object that did not change lets the commit through.
        manager_b.begin()
        b.readCurrent(b.root.x)
        b.root.y.balance += 1
        manager_b.commit()
        with dbs.first.transaction() as conn:
            assert (conn.root.x.balance, conn.root.y.balance) == (-5, 11)
        a.close()
        b.close()

    def test_read_current_keeps_an_invariant_across_racing_writers(self, dbs: TwoDatabases) -> None:
        with dbs.first.transaction() as conn:
            conn.root.x = Account(10)
            conn.root.y = Account(10)
        writer_db = dbs.first if dbs.second.read_only else dbs.second
        errors: list[BaseException] = []

        def worker(db: DB, seed: int) -> None:
            rng = random.Random(seed)

            @db.transaction(attempts=50)
            def step(conn: Connection) -> None:
                take, keep = ("x", "y") if rng.random() < 0.5 else ("y", "x")
                taken, kept = getattr(conn.root, take), getattr(conn.root, keep)
                if taken.balance + kept.balance >= 10:
                    conn.readCurrent(kept)
                    taken.balance -= 10
                else:
                    taken.balance += 7

            try:
                for _ in range(15):
                    step()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [
            threading.Thread(target=worker, args=(db, seed))
            for seed, db in enumerate((dbs.first, writer_db, dbs.first))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads), "a committer hung (deadlock?)"
        assert not errors, errors
        with dbs.first.transaction() as conn:
            assert conn.root.x.balance + conn.root.y.balance >= 0

    def test_concurrent_changes_are_resolved(self, dbs: TwoDatabases) -> None:
        with dbs.first.transaction() as conn:
            conn.root.counter = MergingCounter()
            conn.root.length = Length(0)
            # Not empty: the first insert into an empty tree changes the tree itself.
            conn.root.tree = OOBTree({"0": 0})
        writer_db = dbs.first if dbs.second.read_only else dbs.second
        a, manager_a = dbs.connect(dbs.first)
        b, manager_b = dbs.connect(writer_db)
        for round_ in range(3):
            manager_a.begin()
            manager_b.begin()
            for conn, step in ((a, 1), (b, 10)):
                conn.root.counter.count += step
                conn.root.length.change(step)
                conn.root.tree[f"{round_}-{step}"] = step
            manager_a.commit()
            manager_b.commit()  # every change conflicts; each one resolves
        with dbs.first.transaction() as conn:
            assert conn.root.counter.count == 33
            assert conn.root.length() == 33
            expected = sorted(["0", *(f"{r}-{s}" for r in range(3) for s in (1, 10))])
            assert sorted(conn.root.tree.keys()) == expected
        a.close()
        b.close()

    def test_two_database_state_machine(self, tmp_path: Any) -> None:
        # History-free: a reader whose snapshot is older than a change gets ReadConflictError
        # (a retry reads the new state), which the machine's readers do not expect.
        needs_history(self.factory_class)
        run_machine(tmp_path, self.factory_class, BalancesMachine, examples=15, steps=25)


class BalancesMachine(RuleBasedStateMachine):
    """Transfers between accounts, committed through either database; readers on both check
    that every transaction of theirs sees one committed state: the newest when it began."""

    def __init__(self, factory: StorageFactory) -> None:
        super().__init__()
        self.factory = factory
        self.dbs = TwoDatabases(factory)
        with self.dbs.first.transaction() as conn:
            conn.root.accounts = PersistentMapping({i: Account(OPENING_BALANCE) for i in range(ACCOUNTS)})
        self.history: list[list[int]] = [[OPENING_BALANCE] * ACCOUNTS]
        self.writers = [self.dbs.connect(self.dbs.first)]
        if not self.dbs.second.read_only:
            self.writers.append(self.dbs.connect(self.dbs.second))
        # Readers: one on each database; each remembers the state its transaction began at.
        self.readers = [self.dbs.connect(self.dbs.first), self.dbs.connect(self.dbs.second)]
        self.reader_state = [-1, -1]
        for i in range(2):
            self.begin_reader(i)

    def teardown(self) -> None:
        for conn, manager in self.writers + self.readers:
            manager.abort()
            conn.close()
        self.dbs.close()
        self.factory.cleanup()

    @rule(
        writer=st.integers(0, 1),
        source=st.integers(0, ACCOUNTS - 1),
        to=st.integers(0, ACCOUNTS - 1),  # not "target": rule() reserves that name
        amount=st.integers(1, 30),
    )
    def transfer(self, writer: int, source: int, to: int, amount: int) -> None:
        conn, manager = self.writers[writer % len(self.writers)]
        manager.begin()
        accounts = conn.root.accounts
        accounts[source].balance -= amount
        accounts[to].balance += amount
        manager.commit()
        state = list(self.history[-1])
        state[source] -= amount
        state[to] += amount
        self.history.append(state)

    @precondition(lambda self: len(self.writers) == 2)
    @rule(source=st.integers(0, ACCOUNTS - 1))
    def racing_transfers_one_loses(self, source: int) -> None:
        (a, manager_a), (b, manager_b) = self.writers
        target = (source + 1) % ACCOUNTS
        manager_a.begin()
        manager_b.begin()
        for conn in (a, b):
            conn.root.accounts[source].balance -= 1
            conn.root.accounts[target].balance += 1
        manager_a.commit()
        with pytest.raises(ConflictError):
            manager_b.commit()
        manager_b.abort()
        state = list(self.history[-1])
        state[source] -= 1
        state[target] += 1
        self.history.append(state)

    @rule(reader=st.integers(0, 1))
    def begin_reader(self, reader: int) -> None:
        _conn, manager = self.readers[reader]
        manager.begin()
        self.reader_state[reader] = len(self.history) - 1

    @rule(reader=st.integers(0, 1), account=st.integers(0, ACCOUNTS - 1))
    def read_one(self, reader: int, account: int) -> None:
        conn, _ = self.readers[reader]
        expected = self.history[self.reader_state[reader]][account]
        assert conn.root.accounts[account].balance == expected

    @rule(reader=st.integers(0, 1))
    def minimize_reader(self, reader: int) -> None:
        self.readers[reader][0].cache_minimize()

    @invariant()
    def readers_see_their_snapshot(self) -> None:
        for reader, (conn, _) in enumerate(self.readers):
            balances = [conn.root.accounts[i].balance for i in range(ACCOUNTS)]
            assert balances == self.history[self.reader_state[reader]]
            assert sum(balances) == OPENING_BALANCE * ACCOUNTS
