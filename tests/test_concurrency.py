"""Concurrency: snapshot isolation, write conflicts, _p_resolveConflict, retries, threads."""

from __future__ import annotations

import importlib
import random
import threading
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import DB, ConflictError, Persistent, PersistentMapping
from amberdb.exceptions import ConnectionStateError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.memory import MemoryStorage
from amberdb.testing import VoteConflictStorage
from amberdb.utils import z64
from tests.models import Book

connection_module = importlib.import_module("amberdb.connection")  # amberdb.connection is also a function

THREADS = 4


class Counter(Persistent):
    """The seed's Counter, its resolver returning a full state."""

    def __init__(self) -> None:
        self.count = 0

    def hit(self) -> None:
        self.count = self.count + 1

    def _p_resolveConflict(self, oldState: Any, savedState: Any, newState: Any) -> Any:
        saved_diff = savedState["count"] - oldState["count"]
        new_diff = newState["count"] - oldState["count"]
        return {**newState, "count": oldState["count"] + saved_diff + new_diff}


class PlainCounter(Persistent):
    def __init__(self) -> None:
        self.count = 0

    def hit(self) -> None:
        self.count += 1


class BareNumberCounter(Counter):
    """The seed's Counter exactly as printed: its resolver returns a bare number."""

    def _p_resolveConflict(self, oldState: Any, savedState: Any, newState: Any) -> Any:
        return (
            oldState["count"]
            + (savedState["count"] - oldState["count"])
            + (newState["count"] - oldState["count"])
        )


class RaisingCounter(Counter):
    def _p_resolveConflict(self, oldState: Any, savedState: Any, newState: Any) -> Any:
        raise ValueError("cannot merge these")


class LinkedCounter(Counter):
    """Keeps a reference to another object; the resolver must pass it through."""

    def __init__(self, owner: Any) -> None:
        super().__init__()
        self.owner = owner


class Account(Persistent):
    def __init__(self, balance: int) -> None:
        self.balance = balance


def _two_connections(db: DB) -> tuple[amberdb.Connection, amberdb.Connection]:
    return db.open(transaction.TransactionManager()), db.open(transaction.TransactionManager())


def _conflicting_hits(db: DB, counter_class: type) -> tuple[amberdb.Connection, amberdb.Connection]:
    c1, c2 = _two_connections(db)
    c1.root.counter = counter_class()
    c1.transaction_manager.commit()
    c2.transaction_manager.begin()
    c2.root.counter.hit()
    c1.root.counter.hit()
    c1.transaction_manager.commit()
    return c1, c2


def test_resolvable_counter_merges_concurrent_hits(db: DB) -> None:
    c1, c2 = _conflicting_hits(db, Counter)
    c2.transaction_manager.commit()
    assert c2.root.counter.count == 2  # the merged state is what c2 now sees
    c1.transaction_manager.begin()
    assert c1.root.counter.count == 2
    c1.close()
    c2.close()


def test_resolver_keeps_references_to_other_objects(db: DB) -> None:
    c1, c2 = _two_connections(db)
    c1.root.counter = LinkedCounter(Book("owner"))
    c1.transaction_manager.commit()
    c2.transaction_manager.begin()
    c2.root.counter.hit()
    c1.root.counter.hit()
    c1.transaction_manager.commit()
    c2.transaction_manager.commit()
    c3 = db.open(transaction.TransactionManager())
    assert c3.root.counter.count == 2
    assert c3.root.counter.owner.title == "owner"
    for conn in (c1, c2, c3):
        conn.close()


@pytest.mark.parametrize(
    ("counter_class", "reason"),
    [
        (BareNumberCounter, "__setstate__ refuses: 2"),
        (RaisingCounter, "raised ValueError\\('cannot merge these'\\)"),
        (PlainCounter, "committed tid"),
    ],
)
def test_failed_resolution_is_a_conflict_and_writes_nothing(db: DB, counter_class: type, reason: str) -> None:
    c1, c2 = _conflicting_hits(db, counter_class)
    last = db.storage.last_tid()
    with pytest.raises(ConflictError, match=rf"oid 0x1, class tests\.test_concurrency:\w*Counter.*{reason}"):
        c2.transaction_manager.commit()
    c2.transaction_manager.abort()
    assert db.storage.last_tid() == last
    assert c2.root.counter.count == 1
    c1.close()
    c2.close()


def test_attempts_retry_conflicts_and_reraise_other_errors(db: DB) -> None:
    c1, c2 = _two_connections(db)
    c1.root.counter = PlainCounter()
    c1.transaction_manager.commit()
    tries = 0
    for attempt in c2.transaction_manager.attempts(3):
        with attempt:
            tries += 1
            c2.root.counter.count += 1
            if tries == 1:  # someone else commits meanwhile: the first try conflicts
                c1.transaction_manager.begin()
                c1.root.counter.count += 10
                c1.transaction_manager.commit()
    assert tries == 2
    assert c2.root.counter.count == 11
    with pytest.raises(KeyError):
        for attempt in c2.transaction_manager.attempts(3):
            with attempt:
                tries += 1
                raise KeyError("not transient")
    assert tries == 3
    c1.close()
    c2.close()


def test_last_attempt_raises_the_conflict(db: DB) -> None:
    tm = transaction.TransactionManager()
    calls = 0
    with pytest.raises(ConflictError):
        for attempt in tm.attempts(2):
            with attempt:
                calls += 1
                raise ConflictError("always")
    assert calls == 2
    with pytest.raises(ValueError, match="attempts\\(\\) needs a number >= 1"):
        list(tm.attempts(0))


def test_db_transaction_decorator_retries(db: DB) -> None:
    with db.transaction() as conn:
        conn.root.counter = PlainCounter()
    interfering = db.open(transaction.TransactionManager())
    calls = []

    @db.transaction(attempts=3)
    def bump(conn: amberdb.Connection, amount: int) -> int:
        calls.append(amount)
        conn.root.counter.count += amount
        if len(calls) == 1:
            interfering.transaction_manager.begin()
            interfering.root.counter.count += 100
            interfering.transaction_manager.commit()
        return int(conn.root.counter.count)

    assert bump(5) == 105
    assert calls == [5, 5]
    with pytest.raises(TypeError, match="retries only as a decorator"), db.transaction(attempts=2):
        pass
    interfering.close()


def _run_threads(target: Any) -> None:
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            target(n)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a worker thread hung"
    assert errors == [], errors


def test_threads_hitting_a_resolvable_counter_end_at_the_exact_sum(db_path: str) -> None:
    db = DB(db_path)
    with db.transaction() as conn:
        conn.root.counter = Counter()
    hits = 40

    def worker(n: int) -> None:
        conn = db.open()
        for _ in range(hits):
            for attempt in transaction.manager.attempts(5):
                with attempt:
                    conn.root.counter.hit()
        conn.close()

    _run_threads(worker)
    with db.transaction() as conn:
        assert conn.root.counter.count == THREADS * hits
    db.close()


def test_threads_hitting_a_plain_counter_with_retries_end_exact(db: DB) -> None:
    with db.transaction() as conn:
        conn.root.counter = PlainCounter()
    hits = 30
    conflicts = []

    def worker(n: int) -> None:
        conn = db.open()
        for _ in range(hits):
            for attempt in transaction.manager.attempts(200):
                with attempt:
                    conn.root.counter.count += 1
                    if attempt.number > 1:
                        conflicts.append(1)
        conn.close()

    _run_threads(worker)
    with db.transaction() as conn:
        assert conn.root.counter.count == THREADS * hits


def test_threads_transferring_money_keep_the_total_and_lose_no_transfer(db_path: str) -> None:
    db = DB(db_path)
    accounts = 8
    with db.transaction() as conn:
        conn.root.accounts = PersistentMapping({i: Account(1_000) for i in range(accounts)})
    transfers_each = 40
    done: list[tuple[int, int, int]] = []

    def worker(n: int) -> None:
        rng = random.Random(1000 + n)
        conn = db.open()
        for _ in range(transfers_each):
            source, target = rng.sample(range(accounts), 2)
            amount = rng.randint(1, 50)
            for attempt in transaction.manager.attempts(200):
                with attempt:
                    book = conn.root.accounts
                    book[source].balance -= amount
                    book[target].balance += amount
            done.append((source, target, amount))
        conn.close()

    _run_threads(worker)
    expected = [1_000] * accounts
    for source, target, amount in done:
        expected[source] -= amount
        expected[target] += amount
    assert len(done) == THREADS * transfers_each
    with db.transaction() as conn:
        balances = [conn.root.accounts[i].balance for i in range(accounts)]
    assert balances == expected
    assert sum(balances) == 1_000 * accounts
    db.close()


def test_threads_writing_disjoint_btree_keys_in_different_buckets_never_conflict(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from amberdb.btrees import IIBTree, IIBucket

    # Not even a resolved conflict: each commit changes a bucket no other thread touches.
    resolutions: list[int] = []
    resolve = IIBucket._p_resolveConflict

    def counting_resolve(self: Any, old: Any, saved: Any, new: Any) -> Any:
        resolutions.append(1)
        return resolve(self, old, saved, new)

    monkeypatch.setattr(IIBucket, "_p_resolveConflict", counting_resolve)
    db = DB(db_path)
    keys = list(range(0, 20_000, 2))
    random.Random(7).shuffle(keys)
    with db.transaction() as conn:
        conn.root.tree = tree = IIBTree((k, k) for k in keys)
        # Each thread owns the key range of one bucket with room to grow (no split).
        buckets = [b for b in tree._buckets() if len(b) < tree.max_leaf_size - 40][:THREADS]
        ranges = [(b.minKey(), b.maxKey()) for b in buckets]
    assert len(ranges) == THREADS
    writes_each = 30
    conflicts: list[BaseException] = []

    def worker(n: int) -> None:
        low, high = ranges[n]
        rng = random.Random(n)
        conn = db.open()
        for _ in range(writes_each):
            tree = conn.root.tree
            new_key = rng.randrange(low, high) | 1  # odd: a key the tree does not have yet
            tree[new_key] = -n
            existing = rng.randrange(low, high + 1) & ~1
            tree[existing] = tree[existing] + 1
            try:
                transaction.commit()
            except ConflictError as exc:
                conflicts.append(exc)
                transaction.abort()
        conn.close()

    _run_threads(worker)
    assert conflicts == []
    assert resolutions == []
    with db.transaction() as conn:
        tree = conn.root.tree
        tree._check()
        for n, (low, high) in enumerate(ranges):
            assert any(v == -n for v in tree.values(low, high))
    db.close()


def test_reader_sees_consistent_snapshots_while_writer_commits(db: DB) -> None:
    with db.transaction() as conn:
        conn.root.a = Account(500)
        conn.root.b = Account(500)
    stop = threading.Event()
    seen: list[int] = []

    def writer() -> None:
        conn = db.open()
        rng = random.Random(7)
        while not stop.is_set():
            amount = rng.randint(1, 20)
            conn.root.a.balance -= amount
            conn.root.b.balance += amount
            transaction.commit()
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        reader = db.open(transaction.TransactionManager())
        for _ in range(200):
            reader.transaction_manager.begin()
            a, b = reader.root.a, reader.root.b
            a._p_deactivate()
            b._p_deactivate()
            seen.append(a.balance + b.balance)
        reader.close()
    finally:
        stop.set()
        thread.join(timeout=30)
    assert set(seen) == {1000}


class SlowToLoad(Persistent):
    """Holds up loading until told to go on, so another thread can try the connection meanwhile."""

    loading = threading.Event()
    proceed = threading.Event()

    def __setstate__(self, state: Any) -> None:
        type(self).loading.set()
        type(self).proceed.wait(10)
        super().__setstate__(state)


def test_connection_used_from_two_threads_at_once_is_refused(db: DB) -> None:
    SlowToLoad.loading.clear()  # set by the run on another storage
    SlowToLoad.proceed.clear()
    with db.transaction() as conn:
        conn.root.slow = SlowToLoad()
    conn = db.open()
    conn.root.slow._p_deactivate()
    loader = threading.Thread(target=lambda: conn.root.slow._p_activate())
    loader.start()
    try:
        assert SlowToLoad.loading.wait(10)
        with pytest.raises(ConnectionStateError, match="in use by another thread"):
            conn.get(amberdb.utils.z64)
    finally:
        SlowToLoad.proceed.set()
        loader.join(timeout=10)
    assert conn.root.slow._p_status == "saved"  # the loading thread finished normally
    conn.close()


def test_changing_an_object_of_a_closed_connection_is_refused(db: DB) -> None:
    conn = db.open()
    conn.root.book = book = Book("x")
    transaction.commit()
    conn.close()
    with pytest.raises(
        ConnectionStateError, match=r"cannot change tests\.models:Book oid 0x1: its connection is closed"
    ):
        book.title = "y"


def test_connections_are_pooled_and_reused(db: DB) -> None:
    first = db.open()
    first.close()
    second = db.open()
    assert second is first
    third = db.open()
    assert third is not second
    second.close()
    third.close()


def test_threads_inserting_into_one_btree_with_splits_and_retries_lose_nothing(db_path: str) -> None:
    from amberdb.btrees import IIBTree, Length, check

    db = DB(db_path)
    with db.transaction() as conn:
        conn.root.tree = IIBTree()
        conn.root.count = Length()
    per_thread, batch = 1_500, 50
    retried: list[int] = []

    def worker(n: int) -> None:
        rng = random.Random(500 + n)
        keys = rng.sample(range(n, 4_000_000, THREADS), per_thread)  # disjoint between threads
        conn = db.open()
        for start in range(0, per_thread, batch):
            for attempt in transaction.manager.attempts(100):
                with attempt:
                    tree = conn.root.tree
                    for key in keys[start : start + batch]:
                        tree[key] = n
                    conn.root.count.change(batch)
                    if attempt.number > 1:
                        retried.append(n)
        conn.close()

    _run_threads(worker)
    with db.transaction() as conn:
        tree = conn.root.tree
        check(tree)
        assert len(tree) == THREADS * per_thread == conn.root.count()
        for n in range(THREADS):
            assert sum(1 for key, value in tree.items() if value == n and key % THREADS == n) == per_thread
    db.close()


@pytest.mark.parametrize("spilled", [False, True])
def test_other_connections_are_told_only_about_changed_objects(db: DB, spilled: bool) -> None:
    with db.transaction() as conn:
        conn.root.account = Account(100)
    tm = transaction.TransactionManager()
    other = db.open(transaction_manager=tm)
    seen = other.root()["account"]
    assert seen.balance == 100
    with db.transaction() as conn:
        conn.root.account.balance = 50
        conn.root.items = PersistentMapping({i: Book(f"b{i}") for i in range(300)})
        if spilled:
            conn.transaction_manager.commit(True)  # the records go through the spill file
    # New objects cannot be in the other connection's cache: only the root and the account
    # are worth invalidating.
    assert set(db.storage.poll_invalidations(other._snapshot)[1] or ()) == {z64, seen._p_oid}
    tm.begin()
    assert seen.balance == 50
    assert len(other.root()["items"]) == 300
    other.close()


def test_connection_too_far_behind_its_storage_forgets_its_whole_cache(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import amberdb.storage.file.storage as file_storage

    monkeypatch.setattr(file_storage, "_POLL_WINDOW", 8)
    db = DB(db_path)
    with db.transaction() as conn:
        conn.root.books = [Book(f"b{i}") for i in range(5)]
    reader = db.open(transaction.TransactionManager())
    books = reader.root.books
    assert [book.title for book in books] == [f"b{i}" for i in range(5)]
    for round_ in range(10):  # more changes than the storage remembers
        with db.transaction() as conn:
            conn.root.books[round_ % 5].title = f"round {round_}"
    assert db.storage.poll_invalidations(reader._snapshot)[1] is None
    reader.transaction_manager.begin()
    assert all(book._p_status == "ghost" for book in books)
    assert [book.title for book in books] == [f"round {i}" for i in range(5, 10)]
    reader.close()
    db.close()


class _CommitsBeforeEveryVote(VoteConflictStorage):
    """Another client commits ``oid`` again just before each of this client's votes."""

    oid = z64
    votes = 0

    def vote(self) -> None:
        if self.oid != z64:
            self.votes += 1
            record, tid = self.inner.load(self.oid)
            self.inner.begin(TransactionMeta(description="the other client"))
            self.inner.store(self.oid, tid, record)
            self.inner.vote()
            self.inner.finish()
        super().vote()


def test_conflicts_at_every_vote_end_in_a_conflict_error_naming_the_class() -> None:
    storage = _CommitsBeforeEveryVote(MemoryStorage())
    db = DB(storage)
    with db.transaction() as conn:
        conn.root.counter = Counter()
    conn = db.open(transaction.TransactionManager())
    counter = conn.root.counter
    counter.hit()
    storage.oid = counter._p_oid
    with pytest.raises(ConflictError, match="Counter") as info:
        conn.transaction_manager.commit()
    assert info.value.oid == counter._p_oid
    assert storage.votes == connection_module.MAX_REVOTES + 1  # it resolved and voted again each time
    conn.transaction_manager.abort()
    storage.oid = z64
    counter.hit()  # the retry passes once the other client stops
    conn.transaction_manager.commit()
    assert counter.count == 1
    conn.close()
    db.close()
