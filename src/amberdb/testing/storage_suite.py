"""The storage half of the conformance suite: the contract of :mod:`amberdb.storage.base`.

Every check works through the protocol only, so it holds a storage to the invariants its
docstring numbers, whether it reports conflicts at ``store`` or at ``vote`` and whether it
locks at ``begin`` or at ``vote``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Collection, Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from amberdb.exceptions import (
    ConflictError,
    POSKeyError,
    ReadConflictError,
    ReadOnlyError,
    StorageError,
    StorageTransactionError,
    VoteConflictError,
)
from amberdb.record import encode_record
from amberdb.storage.base import IterableStorage, Storage, TransactionMeta
from amberdb.storage.history import iter_current_records
from amberdb.testing.factories import StorageFactory
from amberdb.utils import Oid, Tid, oid_repr, p64, u64, z64

__all__ = [
    "FactoryFixtures",
    "StorageSuite",
    "all_current_records",
    "commit",
    "run_machine",
    "store_expecting_conflict",
]

META = TransactionMeta()


def commit(storage: Storage, items: dict[Oid, tuple[Tid, bytes]], meta: TransactionMeta | None = None) -> Tid:
    """Run one whole commit of ``{oid: (base_tid, record)}`` and return its tid."""
    storage.begin(meta or META)
    try:
        for oid, (base, record) in items.items():
            storage.store(oid, base, record)
        storage.vote()
    except BaseException:
        storage.abort()
        raise
    return storage.finish()


def store_expecting_conflict(storage: Storage, oid: Oid, base: Tid, record: bytes, committed: Tid) -> None:
    """Store a stale revision into the open transaction and check the conflict is reported
    (invariant 2), at the store or at the vote, naming ``(committed, base)``; the transaction
    is left open, without the stale record."""
    try:
        storage.store(oid, base, record)
    except VoteConflictError:  # pragma: no cover - a storage bug: store() has no votes to report
        raise AssertionError("store() raised VoteConflictError; it raises ConflictError") from None
    except ConflictError as conflict:
        assert conflict.oid == oid and conflict.serials == (committed, base), conflict
        return
    with pytest.raises(VoteConflictError) as info:
        storage.vote()
    assert info.value.conflicts.get(oid) == (committed, base), info.value.conflicts


def _returns_soon(factory: StorageFactory, call: Callable[[], object], what: Callable[[], str]) -> None:
    """Run ``call()`` in a thread; fail saying ``what()`` if it blocks longer than the factory allows."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # raised again in the test's thread
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True, name="amberdb-conformance-call")
    thread.start()
    thread.join(factory.blocking_timeout)
    if thread.is_alive():
        raise AssertionError(f"{what()}; it blocked for {factory.blocking_timeout} s instead")
    if outcome[0] is not None:
        raise outcome[0]


def _oids(oids: Collection[Oid] | None) -> str:
    return "None" if oids is None else "{" + ", ".join(sorted(map(oid_repr, oids))) + "}"


def synced_poll(storage: Storage, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
    """``poll_invalidations`` after the storage's optional ``sync()`` (storage/base.py), as a
    connection polls at an explicit transaction start: what another instance committed
    before this call must be reported."""
    sync = getattr(storage, "sync", None)
    if sync is not None:
        sync()
    return storage.poll_invalidations(since)


def _nothing_new_since(storage: Storage, tid: Tid) -> None:
    newest, changed = storage.poll_invalidations(tid)
    assert newest == tid and changed is not None and not changed, (newest, changed)


def _iterable(storage: Storage) -> IterableStorage:
    if not isinstance(storage, IterableStorage):
        pytest.skip(f"{storage!r} cannot list its transactions")
    return storage


CurrentRecords = Callable[[Oid | None, int], list[tuple[Oid, Tid, bytes]]]


def _lister(storage: Storage) -> CurrentRecords:
    lister: CurrentRecords | None = getattr(storage, "current_records", None)
    if lister is None:
        pytest.skip(f"{storage!r} has no current_records")
    return lister


def all_current_records(
    storage: Storage, batch: int, after: Oid | None = None
) -> list[tuple[Oid, Tid, bytes]]:
    """Every current record above ``after``, paged by hand through ``current_records`` with
    pages of ``batch``, each page checked: at most ``batch`` long, in increasing oid order,
    above the oid it was asked to start after."""
    lister = _lister(storage)
    found: list[tuple[Oid, Tid, bytes]] = []
    for _ in range(1_000_000):
        page = lister(after, batch)
        if not page:
            return found
        assert len(page) <= batch, (len(page), batch)
        for oid, _tid, _record in page:
            assert after is None or oid > after, (oid_repr(oid), after and oid_repr(after))
            after = oid
        found.extend(page)
    raise AssertionError("current_records never came to an end")


def _loaded(storage: Storage, oids: Collection[Oid]) -> list[tuple[Oid, Tid, bytes]]:
    """``(oid, tid, record)`` by ``load`` for each of ``oids`` that exists, in oid order."""
    found = []
    for oid in sorted(oids):
        try:
            record, tid = storage.load(oid)
        except POSKeyError:
            continue
        found.append((oid, tid, record))
    return found


def _node(state: bytes, *refs: Oid) -> bytes:
    """A record whose header refers to ``refs`` (what pack follows)."""
    return encode_record("amberdb.testing:Node", [(oid, "amberdb.testing:Node") for oid in refs], state)


class FactoryFixtures:
    """The ``factory`` and ``storage`` fixtures of the suites, from the bound factory class."""

    factory_class: ClassVar[type[StorageFactory]]

    @pytest.fixture
    def factory(self, tmp_path: Any) -> Iterator[StorageFactory]:
        """A fresh factory in a directory of its own; closes and checks what it made."""
        made = self.factory_class(tmp_path)
        yield made
        made.cleanup()

    @pytest.fixture
    def storage(self, factory: StorageFactory) -> Storage:
        """A new, empty, writable storage."""
        return factory.create()


def needs_history(factory_class: type[StorageFactory]) -> None:
    """Skip the running test for a history-free storage (it keeps only current states)."""
    if not factory_class.keeps_history:
        pytest.skip("the storage is history-free: it keeps no older revisions to read")


class StorageSuite(FactoryFixtures):
    """Storage-level conformance tests; :func:`amberdb.testing.conformance_suite` binds a factory."""

    # -- basics -------------------------------------------------------------------------------

    def test_implements_protocol(self, storage: Storage) -> None:
        assert isinstance(storage, Storage)
        assert storage.read_only is False
        assert storage.name

    def test_empty_storage(self, storage: Storage) -> None:
        assert storage.last_tid() == z64
        assert len(storage) == 0
        newest, changed = storage.poll_invalidations(z64)
        assert newest == z64 and changed is not None and not changed
        with pytest.raises(POSKeyError) as info:
            storage.load(z64)
        assert isinstance(info.value, KeyError)
        assert "0x0" in str(info.value)

    def test_store_and_load(self, storage: Storage) -> None:
        tid = commit(storage, {z64: (z64, b"root")})
        assert storage.load(z64) == (b"root", tid)
        assert storage.last_tid() == tid
        assert len(storage) == 1
        oid = storage.new_oid()
        tid2 = commit(storage, {z64: (tid, b"root2"), oid: (z64, b"x" * 100_000)})
        assert tid2 > tid
        assert storage.load(z64) == (b"root2", tid2)
        assert storage.load(oid) == (b"x" * 100_000, tid2)
        assert len(storage) == 2

    def test_empty_record_and_empty_transaction(self, storage: Storage) -> None:
        tid = commit(storage, {z64: (z64, b"")})
        assert storage.load(z64) == (b"", tid)
        tid2 = commit(storage, {})
        assert tid2 > tid
        assert storage.last_tid() == tid2

    def test_load_before(self, storage: Storage) -> None:
        needs_history(self.factory_class)
        tids = []
        base = z64
        for i in range(5):
            base = commit(storage, {z64: (base, b"rev%d" % i)})
            tids.append(base)
        for i, tid in enumerate(tids):
            assert storage.load(z64, before=p64(u64(tid) + 1)) == (b"rev%d" % i, tid)
            if i:
                assert storage.load(z64, before=tid) == (b"rev%d" % (i - 1), tids[i - 1])
        with pytest.raises(POSKeyError):
            storage.load(z64, before=tids[0])
        with pytest.raises(POSKeyError):
            storage.load(p64(99), before=tids[-1])

    # -- conflicts (invariant 2) -------------------------------------------------------------

    def test_conflict_keeps_transaction_open(self, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, b"a")})
        t2 = commit(storage, {z64: (t1, b"b")})
        storage.begin(META)
        store_expecting_conflict(storage, z64, t1, b"stale", committed=t2)
        # The transaction stays open: store the resolved record and commit.
        storage.store(z64, t2, b"resolved")
        storage.vote()
        t3 = storage.finish()
        assert storage.load(z64) == (b"resolved", t3)

    def test_conflict_on_new_and_missing_objects(self, storage: Storage) -> None:
        t1 = commit(storage, {p64(1): (z64, b"a")})
        storage.begin(META)
        store_expecting_conflict(storage, p64(1), z64, b"also new", committed=t1)
        storage.abort()
        storage.begin(META)
        store_expecting_conflict(storage, p64(2), t1, b"never committed", committed=z64)
        storage.abort()
        assert storage.load(p64(1)) == (b"a", t1)
        with pytest.raises(POSKeyError):
            storage.load(p64(2))

    def test_every_conflict_is_reported_and_none_is_written(self, storage: Storage) -> None:
        oids = [storage.new_oid() for _ in range(5)]
        t1 = commit(storage, {oid: (z64, b"v1") for oid in oids})
        t2 = commit(storage, {oid: (t1, b"v2") for oid in oids[:3]})
        storage.begin(META)
        reported: dict[Oid, tuple[Tid, Tid]] = {}
        for oid in oids:
            try:
                storage.store(oid, t1, b"mine")
            except ConflictError as conflict:
                assert conflict.oid is not None and conflict.serials is not None
                reported[conflict.oid] = conflict.serials
        if len(reported) < 3:
            with pytest.raises(VoteConflictError) as info:
                storage.vote()
            reported.update(info.value.conflicts)
        assert reported == {oid: (t2, t1) for oid in oids[:3]}
        storage.abort()
        assert [storage.load(oid) for oid in oids] == [(b"v2", t2)] * 3 + [(b"v1", t1)] * 2

    # -- transaction lifecycle ---------------------------------------------------------------

    def test_abort_before_and_after_vote(self, factory: StorageFactory, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, b"kept")})
        storage.begin(META)
        storage.store(z64, t1, b"aborted-open")
        storage.abort()
        storage.begin(META)
        storage.store(z64, t1, b"aborted-voted")
        storage.store(p64(7), z64, b"new")
        storage.vote()
        storage.abort()
        assert storage.load(z64) == (b"kept", t1)
        assert storage.last_tid() == t1
        with pytest.raises(POSKeyError):
            storage.load(p64(7))
        storage.abort()  # no-op when idle
        t2 = commit(storage, {z64: (t1, b"after")})
        if factory.durable:
            storage.close()
            storage = factory.reopen()
        assert storage.load(z64) == (b"after", t2)
        if isinstance(storage, IterableStorage):
            assert [t.tid for t in storage.iterator()] == [t1, t2]

    def test_uncommitted_data_is_invisible(self, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, b"v1")})
        storage.begin(META)
        storage.store(z64, t1, b"v2")
        storage.store(p64(3), z64, b"new")
        assert storage.load(z64) == (b"v1", t1)
        storage.vote()
        assert storage.load(z64) == (b"v1", t1)
        assert storage.last_tid() == t1
        _nothing_new_since(storage, t1)
        with pytest.raises(POSKeyError):
            storage.load(p64(3))
        assert len(storage) == 1
        t2 = storage.finish()
        assert storage.load(z64) == (b"v2", t2)
        assert storage.load(p64(3)) == (b"new", t2)

    def test_check_current(self, storage: Storage) -> None:
        check = getattr(storage, "check_current", None)
        if check is None:
            pytest.skip("the storage has no check_current (connections store the record again)")
        a, b = storage.new_oid(), storage.new_oid()
        t1 = commit(storage, {a: (z64, b"a1")})
        storage.begin(META)
        check(a, t1)
        storage.store(b, z64, b"b1")
        storage.vote()
        t2 = storage.finish()
        t3 = commit(storage, {a: (t1, b"a2")})
        storage.begin(META)
        with pytest.raises(ReadConflictError) as info:
            check(a, t1)
            storage.store(b, t2, b"b2")
            storage.vote()
        storage.abort()
        assert info.value.oid == a and info.value.serials == (t3, t1)
        assert storage.load(b) == (b"b1", t2)
        assert storage.last_tid() == t3

    # -- current_records (optional) ---------------------------------------------------------

    def test_current_records_pages_are_the_loads(self, storage: Storage) -> None:
        _lister(storage)
        assert all_current_records(storage, 1) == []
        oids = [storage.new_oid() for _ in range(12)]
        far = [p64(1 << 40), p64((1 << 62) + 3), p64(1 << 20)]  # beyond any dense range
        t1 = commit(storage, {oid: (z64, b"first %d" % i) for i, oid in enumerate(oids[::2] + far)})
        t2 = commit(storage, {z64: (z64, b"root"), **{oid: (z64, b"second") for oid in oids[1::2]}})
        commit(storage, {oids[0]: (t1, b"changed"), oids[1]: (t2, b""), far[1]: (t1, b"x" * 70_000)})
        committed = {z64, *oids, *far}
        expected = _loaded(storage, committed)
        assert len(expected) == len(committed) == len(storage)
        for batch in (1, 2, 3, 7, len(expected) - 1, len(expected), 1000):
            assert all_current_records(storage, batch) == expected, batch
        assert list(iter_current_records(storage, batch=4)) == expected
        assert list(iter_current_records(storage, after=oids[5], batch=3)) == [
            entry for entry in expected if entry[0] > oids[5]
        ]

    def test_current_records_bounds_and_limit(self, storage: Storage) -> None:
        lister = _lister(storage)
        oids = [p64(n) for n in (1, 2, 5, 9, 10, 300)]
        tid = commit(storage, {oid: (z64, oid) for oid in oids})
        assert lister(None, 2) == [(p64(1), tid, p64(1)), (p64(2), tid, p64(2))]
        assert [oid for oid, _, _ in lister(p64(2), 2)] == [p64(5), p64(9)]
        assert [oid for oid, _, _ in lister(p64(3), 100)] == [p64(5), p64(9), p64(10), p64(300)]
        assert [oid for oid, _, _ in lister(z64, 1)] == [p64(1)]
        assert [oid for oid, _, _ in lister(p64(299), 5)] == [p64(300)]
        assert lister(p64(300), 5) == []
        assert lister(p64(10**6), 5) == []
        assert lister(p64((1 << 63) - 1), 5) == []
        for bad in (0, -1):
            with pytest.raises(ValueError):
                lister(None, bad)
        with pytest.raises(ValueError):
            list(iter_current_records(storage, batch=0))

    def test_current_records_see_only_finished_transactions(self, storage: Storage) -> None:
        _lister(storage)
        a, b = storage.new_oid(), storage.new_oid()
        t1 = commit(storage, {a: (z64, b"a1")})
        storage.begin(META)
        storage.store(a, t1, b"a2")
        storage.store(b, z64, b"b1")
        assert all_current_records(storage, 10) == [(a, t1, b"a1")]
        storage.vote()
        assert all_current_records(storage, 10) == [(a, t1, b"a1")]
        t2 = storage.finish()
        assert all_current_records(storage, 10) == [(a, t2, b"a2"), (b, t2, b"b1")]
        storage.begin(META)
        storage.store(b, t2, b"b2")
        storage.vote()
        storage.abort()
        assert all_current_records(storage, 1) == [(a, t2, b"a2"), (b, t2, b"b1")]

    def test_current_records_after_a_pack(self, factory: StorageFactory, storage: Storage) -> None:
        _lister(storage)
        a, b, garbage = storage.new_oid(), storage.new_oid(), storage.new_oid()
        t1 = commit(
            storage,
            {
                z64: (z64, _node(b"r", a, garbage)),
                a: (z64, _node(b"a1", b)),
                b: (z64, _node(b"b1")),
                garbage: (z64, _node(b"g", b)),
            },
        )
        t2 = commit(storage, {z64: (t1, _node(b"r2", a)), a: (t1, _node(b"a2", b))})
        storage.pack(t2)
        expected = [(z64, t2, _node(b"r2", a)), (a, t2, _node(b"a2", b)), (b, t1, _node(b"b1"))]
        for batch in (1, 2, 100):
            assert all_current_records(storage, batch) == expected
        t3 = commit(storage, {b: (t1, _node(b"b2"))})
        expected[2] = (b, t3, _node(b"b2"))
        assert all_current_records(storage, 2) == expected
        if factory.durable:
            storage.close()
            storage = factory.reopen()
            assert all_current_records(storage, 2) == expected

    def test_current_records_of_a_second_instance_agree_with_its_loads(
        self, factory: StorageFactory, storage: Storage
    ) -> None:
        _lister(storage)
        a, b = storage.new_oid(), storage.new_oid()
        t1 = commit(storage, {a: (z64, b"a1"), b: (z64, b"b1")})
        second = factory.open_second(storage)
        _lister(second)
        synced_poll(second, z64)
        assert all_current_records(second, 1) == [(a, t1, b"a1"), (b, t1, b"b1")]
        c = storage.new_oid()
        t2 = commit(storage, {a: (t1, b"a2"), c: (z64, b"c1")})
        # Before its next poll a second instance may or may not see t2 (a follower does not),
        # but its pages agree with its own loads, all as of one moment.
        seen = all_current_records(second, 2)
        assert seen in (
            [(a, t1, b"a1"), (b, t1, b"b1")],
            [(a, t2, b"a2"), (b, t1, b"b1"), (c, t2, b"c1")],
        ), seen
        synced_poll(second, t1)
        assert all_current_records(second, 2) == [(a, t2, b"a2"), (b, t1, b"b1"), (c, t2, b"c1")]
        assert all_current_records(second, 3) == _loaded(second, {a, b, c})

    def test_current_records_match_a_model(self, tmp_path: Any) -> None:
        # Hypothesis runs inside: the decorated function belongs to this one test class
        # (the suite's methods are shared by every bound factory's class).
        factory_class = self.factory_class
        examples = iter(range(1_000_000))

        @settings(
            max_examples=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(
            transactions=st.lists(
                st.dictionaries(st.integers(0, 40), st.binary(max_size=12), min_size=1, max_size=8),
                min_size=1,
                max_size=6,
            ),
            pages=st.lists(st.integers(1, 12), min_size=1, max_size=6),
            start=st.none() | st.integers(0, 41),
        )
        def check(transactions: list[dict[int, bytes]], pages: list[int], start: int | None) -> None:
            directory = tmp_path / f"example-{next(examples)}"
            os.mkdir(directory)
            factory = factory_class(directory)
            try:
                storage = factory.create()
                _lister(storage)
                model: dict[Oid, tuple[Tid, bytes]] = {}
                after = None if start is None else p64(start)
                for i, writes in enumerate(transactions):
                    items = {p64(n): (model.get(p64(n), (z64, b""))[0], data) for n, data in writes.items()}
                    tid = commit(storage, items)
                    model.update({oid: (tid, data) for oid, (_, data) in items.items()})
                    expected = [(oid, *model[oid]) for oid in sorted(model) if after is None or oid > after]
                    assert all_current_records(storage, pages[i % len(pages)], after) == expected
            finally:
                factory.cleanup()

        check()

    def test_store_twice_keeps_last(self, factory: StorageFactory, storage: Storage) -> None:
        storage.begin(META)
        storage.store(z64, z64, b"first")
        storage.store(z64, z64, b"second")
        storage.vote()
        tid = storage.finish()
        assert storage.load(z64) == (b"second", tid)
        if isinstance(storage, IterableStorage):
            (txn,) = storage.iterator()
            assert [(r.oid, r.record) for r in txn.records] == [(z64, b"second")]
        if factory.durable:
            storage.close()
            storage = factory.reopen()
            assert storage.load(z64) == (b"second", tid)
            assert len(storage) == 1

    def test_protocol_errors(self, factory: StorageFactory, storage: Storage) -> None:
        doing = ["the first calls"]

        def calls() -> None:
            with pytest.raises(StorageTransactionError):
                storage.store(z64, z64, b"x")
            with pytest.raises(StorageTransactionError):
                storage.vote()
            with pytest.raises(StorageTransactionError):
                storage.finish()
            storage.begin(META)
            with pytest.raises(StorageTransactionError):
                storage.finish()
            doing[0] = "begin() called again by the thread whose transaction is open"
            with pytest.raises(StorageTransactionError):
                storage.begin(META)
            doing[0] = "the calls after it"
            storage.store(z64, z64, b"x")
            storage.vote()
            with pytest.raises(StorageTransactionError):
                storage.store(p64(1), z64, b"y")
            with pytest.raises(StorageTransactionError):
                storage.vote()
            storage.finish()

        # A storage that locks in begin() and waits there for itself would hang the run: the
        # calls run in a thread of their own, watched.
        _returns_soon(factory, calls, lambda: f"{doing[0]} must raise StorageTransactionError at once")

    def test_tids_increase_strictly(self, storage: Storage) -> None:
        tids = [commit(storage, {p64(i): (z64, b"r")}) for i in range(50)]
        assert tids == sorted(set(tids))
        if isinstance(storage, IterableStorage):
            assert [t.tid for t in storage.iterator()] == tids

    def test_new_oid(self, factory: StorageFactory, storage: Storage) -> None:
        oids = {storage.new_oid() for _ in range(100)}
        assert len(oids) == 100
        assert z64 not in oids
        commit(storage, {p64(500): (z64, b"x")})
        fresh = storage.new_oid()
        assert fresh not in oids and u64(fresh) != 500
        if factory.durable:
            storage.close()
            storage = factory.reopen()
            again = storage.new_oid()
            assert again not in oids and again != fresh and u64(again) != 500

    def test_iterator_range_and_meta(self, storage: Storage) -> None:
        needs_history(self.factory_class)
        iterable = _iterable(storage)
        metas = [
            TransactionMeta(user=f"user{i}", description=f"déscr {i}", extension=b"{}" * i) for i in range(4)
        ]
        tids = []
        base = z64
        for i, meta in enumerate(metas):
            base = commit(storage, {z64: (base, b"%d" % i), p64(i + 1): (z64, b"o")}, meta)
            tids.append(base)
        txns = list(iterable.iterator())
        assert [t.meta for t in txns] == metas
        assert [sorted((r.oid, r.tid, r.record) for r in t.records) for t in txns] == [
            sorted([(z64, tids[i], b"%d" % i), (p64(i + 1), tids[i], b"o")]) for i in range(4)
        ]
        assert [t.tid for t in iterable.iterator(start=tids[1])] == tids[1:]
        assert [t.tid for t in iterable.iterator(stop=tids[2])] == tids[:3]
        assert [t.tid for t in iterable.iterator(tids[1], tids[2])] == tids[1:3]
        assert [t.tid for t in iterable.iterator(p64(u64(tids[3]) + 1))] == []

    def test_close(self, storage: Storage) -> None:
        commit(storage, {z64: (z64, b"x")})
        storage.begin(META)
        storage.store(p64(1), z64, b"open at close")
        storage.close()
        storage.close()
        with pytest.raises(StorageError):
            storage.load(z64)
        with pytest.raises(StorageError):
            storage.begin(META)
        with pytest.raises(StorageError):
            storage.new_oid()
        with pytest.raises(StorageError):
            storage.last_tid()
        with pytest.raises(StorageError):
            storage.poll_invalidations(z64)

    def test_close_aborts_voted_transaction(self, factory: StorageFactory, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, b"x")})
        storage.begin(META)
        storage.store(z64, t1, b"voted at close")
        storage.vote()
        storage.close()
        if factory.durable:
            storage = factory.reopen()
            assert storage.load(z64) == (b"x", t1)
            assert storage.last_tid() == t1

    def test_reopen_keeps_everything(self, factory: StorageFactory, storage: Storage) -> None:
        if not factory.durable:
            pytest.skip(f"{storage.name} does not persist")
        expected: dict[Oid, tuple[bytes, Tid]] = {}
        for i in range(20):
            oid = storage.new_oid()
            tid = commit(storage, {oid: (z64, b"r%d" % i)})
            expected[oid] = (b"r%d" % i, tid)
        storage.close()
        storage = factory.reopen()
        assert len(storage) == 20
        for oid, value in expected.items():
            assert storage.load(oid) == value

    # -- invalidations (invariant 7) -----------------------------------------------------------

    def test_poll_names_changed_objects(self, storage: Storage) -> None:
        a, b, c = (storage.new_oid() for _ in range(3))
        t1 = commit(storage, {a: (z64, b"a"), b: (z64, b"b")})
        _nothing_new_since(storage, t1)
        t2 = commit(storage, {a: (t1, b"a2"), c: (z64, b"c")})
        t3 = commit(storage, {b: (t1, b"b2")})
        rule = (
            "invariant 7: poll_invalidations(since) names the oids changed by transactions with"
            " since < tid <= newest"
        )
        a_, b_, c_ = map(oid_repr, (a, b, c))
        newest, changed = storage.poll_invalidations(t1)
        assert newest == t3 == storage.last_tid(), f"{rule}; newest must be the last tid, got {newest!r}"
        assert changed is not None and {a, b} <= set(changed) <= {a, b, c}, (
            f"{rule}; since t1, {a_} and {b_} changed and {c_} is new, got {_oids(changed)}"
        )
        newest, changed = storage.poll_invalidations(t2)
        assert newest == t3 and changed is not None and b in set(changed) and a not in set(changed), (
            f"{rule}; since t2, {b_} changed ({a_} changed at t2 itself), got {_oids(changed)}"
        )
        _nothing_new_since(storage, t3)

    def test_poll_beyond_the_newest_tid_forgets_everything(self, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, b"x")})
        assert storage.poll_invalidations(p64(u64(t1) + 1)) == (t1, None)

    def test_second_instance_sees_commits_at_its_next_poll(
        self, factory: StorageFactory, storage: Storage
    ) -> None:
        needs_history(self.factory_class)
        a = storage.new_oid()
        t1 = commit(storage, {a: (z64, b"1"), z64: (z64, b"root")})
        second = factory.open_second(storage)
        newest, _ = synced_poll(second, z64)
        assert newest == t1 and second.load(a) == (b"1", t1)
        t2 = commit(storage, {a: (t1, b"2")})
        newest, changed = synced_poll(second, t1)
        assert newest == t2
        assert changed is None or a in set(changed)
        assert second.load(a) == (b"2", t2)
        assert second.load(a, before=t2) == (b"1", t1)

    def test_polls_are_consistent_with_loads_while_others_commit(self, storage: Storage) -> None:
        needs_history(self.factory_class)
        # Two objects always written together: after any poll, loads before its newest tid+1
        # give one transaction's pair (invariant 7 is one atomic observation).
        a, b = storage.new_oid(), storage.new_oid()
        tid = commit(storage, {a: (z64, b"0"), b: (z64, b"0")})
        stop = threading.Event()
        bad: list[str] = []

        def reader() -> None:
            seen = z64
            while not stop.is_set():
                newest, _ = storage.poll_invalidations(seen)
                if newest < seen:
                    bad.append("poll went back in time")
                seen = newest
                before = p64(u64(newest) + 1)
                ra, ta = storage.load(a, before)
                rb, tb = storage.load(b, before)
                if (ra, ta) != (rb, tb) or ta != newest:
                    bad.append(f"{ra!r}@{ta.hex()} and {rb!r}@{tb.hex()} at poll {newest.hex()}")

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for i in range(1, 40):
                tid = commit(storage, {a: (tid, b"%d" % i), b: (tid, b"%d" % i)})
        finally:
            stop.set()
            thread.join(10)
        assert not bad, bad[:3]

    # -- finish in tid order (invariant 6) ----------------------------------------------------

    def test_a_later_commit_does_not_finish_before_a_voted_one(self, storage: Storage) -> None:
        a, b = storage.new_oid(), storage.new_oid()
        t1 = commit(storage, {a: (z64, b"a"), b: (z64, b"b")})
        storage.begin(META)
        storage.store(a, t1, b"a2")
        storage.vote()
        finished = threading.Event()
        other_tid: list[Tid] = []

        def other() -> None:
            other_tid.append(commit(storage, {b: (t1, b"b2")}))
            finished.set()

        thread = threading.Thread(target=other)
        thread.start()
        assert not finished.wait(0.2), "a later transaction finished while an earlier one was voted"
        _nothing_new_since(storage, t1)
        mine = storage.finish()
        assert finished.wait(10)
        thread.join(10)
        assert other_tid[0] > mine

    def test_poll_after_finish_names_every_lower_commit(self, storage: Storage) -> None:
        """Invariant 6: after ``finish``, a poll from the snapshot the transaction began at
        names every oid that another transaction with a tid up to ours changed."""
        n_threads, n_commits = 4, 10
        oids = [storage.new_oid() for _ in range(n_threads)]
        first = commit(storage, {oid: (z64, b"0") for oid in oids})
        log: list[tuple[Tid, Oid]] = []  # (tid, oid changed), every commit
        seen: list[tuple[Tid, Tid, Tid, frozenset[Oid] | None]] = []  # (since, mine, newest, oids)
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker(n: int) -> None:
            try:
                oid, base = oids[n], first
                for i in range(n_commits):
                    since = storage.last_tid()
                    base = commit(storage, {oid: (base, b"%d" % i)})
                    newest, changed = storage.poll_invalidations(since)
                    with lock:
                        log.append((base, oid))
                        seen.append((since, base, newest, None if changed is None else frozenset(changed)))
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        for since, mine, newest, changed in seen:
            assert newest >= mine
            if changed is None:
                continue  # the storage could not tell: allowed (invariant 7)
            wanted = {oid for tid, oid in log if since < tid <= mine}
            assert wanted <= changed, (
                f"a poll after finish of {_oids([mine])} misses {_oids(wanted - changed)}"
            )

    def test_threads_commit_concurrently(self, storage: Storage) -> None:
        commit(storage, {z64: (z64, b"0")})
        n_threads, n_commits = 4, 15
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(n_commits):
                    own = storage.new_oid()
                    while True:
                        record, tid = storage.load(z64)
                        storage.begin(META)
                        try:
                            storage.store(own, z64, b"mine")
                            storage.store(z64, tid, b"%d" % (int(record) + 1))
                            storage.vote()
                        except ConflictError:
                            storage.abort()
                            continue
                        except BaseException:
                            storage.abort()
                            raise
                        storage.finish()
                        break
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert storage.load(z64)[0] == b"%d" % (n_threads * n_commits)
        assert len(storage) == 1 + n_threads * n_commits

    # -- crashes (invariant 3), for durable storages another process can open ----------------

    def test_killed_committer_loses_no_acknowledged_transaction(self, factory: StorageFactory) -> None:
        uri = factory.uri()
        if not factory.durable or uri is None:
            pytest.skip("the storage is not durable, or another process cannot open it")
        factory.create().close()
        rng = random.Random(11)
        acknowledged: list[str] = []
        for round_ in range(4):
            child = subprocess.Popen(
                [sys.executable, "-c", _CRASH_CHILD, uri, str(round_)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None
            try:
                for _ in range(rng.randint(1, 12)):
                    line = child.stdout.readline()
                    if not line:
                        break
                    acknowledged.append(line.strip())
            finally:
                child.send_signal(signal.SIGKILL)
                child.communicate(timeout=30)
            assert acknowledged, "the committing child acknowledged nothing"
            storage = factory.reopen()
            try:
                newest = storage.last_tid()
                assert newest.hex() >= acknowledged[-1]
                pair = [storage.load(p64(1)), storage.load(p64(2))]
                assert pair[0] == pair[1], "a transaction was half written"
                assert pair[0][1] == newest
                for tid_hex in acknowledged if factory.keeps_history else ():
                    before = p64(int(tid_hex, 16) + 1)
                    assert storage.load(p64(1), before)[1].hex() == tid_hex
            finally:
                storage.close()


# The child of the crash test: commits pairs of records (sometimes big) as fast as it can and
# prints each tid once finish() returned.  Its parent kills it at a random moment.
_CRASH_CHILD = """
import sys
from amberdb import open_storage
from amberdb.exceptions import POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.utils import p64, z64
storage = open_storage(sys.argv[1])
try:
    base = storage.load(p64(1))[1]
except POSKeyError:
    base = z64
n = 0
while True:
    n += 1
    size = 2_000_000 if n % 5 == 0 else 100
    record = (b"%s-%d:" % (sys.argv[2].encode(), n)).ljust(size, b".")
    storage.begin(TransactionMeta())
    storage.store(p64(1), base, record)
    storage.store(p64(2), base, record)
    storage.vote()
    base = storage.finish()
    print(base.hex(), flush=True)
"""


class StorageMachine(RuleBasedStateMachine):
    """Drive a storage and a trivial model (oid -> list of (tid, record)) side by side."""

    def __init__(self, factory: StorageFactory) -> None:
        super().__init__()
        self.factory = factory
        self.storage = factory.create()
        self.model: dict[Oid, list[tuple[Tid, bytes]]] = {}
        self.txns: list[Tid] = []
        self.pending: dict[Oid, bytes] | None = None
        self.stale: dict[Oid, tuple[Tid, Tid]] = {}  # stores whose conflict is reported at vote
        self.voted = False

    def teardown(self) -> None:
        self.factory.cleanup()

    def _committed(self, oid: Oid) -> Tid:
        revs = self.model.get(oid)
        return revs[-1][0] if revs else z64

    @precondition(lambda self: self.pending is None)
    @rule()
    def begin(self) -> None:
        self.storage.begin(TransactionMeta(description="sm"))
        self.pending, self.stale, self.voted = {}, {}, False

    @precondition(lambda self: self.pending is not None and not self.voted)
    @rule(oid=st.integers(0, 6), record=st.binary(max_size=40), stale=st.booleans())
    def store(self, oid: int, record: bytes, stale: bool) -> None:
        assert self.pending is not None
        key = p64(oid)
        committed = self._committed(key)
        base = (p64(u64(committed) + 1) if committed == z64 else z64) if stale else committed
        try:
            self.storage.store(key, base, record)
        except ConflictError as conflict:
            assert base != committed and conflict.serials == (committed, base)
            return
        if base != committed:
            self.stale[key] = (committed, base)
            self.pending.pop(key, None)
        else:
            self.stale.pop(key, None)
            self.pending[key] = record

    @precondition(lambda self: self.pending is not None and not self.voted)
    @rule()
    def vote(self) -> None:
        if self.stale:
            with pytest.raises(VoteConflictError) as info:
                self.storage.vote()
            assert info.value.conflicts == self.stale
            return
        self.storage.vote()
        self.voted = True

    @precondition(lambda self: self.voted)
    @rule()
    def finish(self) -> None:
        assert self.pending is not None
        tid = self.storage.finish()
        assert not self.txns or tid > self.txns[-1]
        previous = self.txns[-1] if self.txns else z64
        self.txns.append(tid)
        existed = {oid for oid in self.pending if oid in self.model}
        for oid, record in self.pending.items():
            self.model.setdefault(oid, []).append((tid, record))
        newest, changed = self.storage.poll_invalidations(previous)
        assert newest == tid
        assert changed is None or existed <= set(changed) <= set(self.pending)
        self.pending, self.stale, self.voted = None, {}, False

    @precondition(lambda self: self.pending is not None)
    @rule()
    def abort(self) -> None:
        self.storage.abort()
        self.pending, self.stale, self.voted = None, {}, False

    @precondition(lambda self: self.factory.durable)
    @rule()
    def reopen(self) -> None:
        self.storage.close()
        self.storage = self.factory.reopen()
        self.pending, self.stale, self.voted = None, {}, False

    @precondition(lambda self: bool(self.txns) and self.factory.keeps_history)
    @rule(data=st.data())
    def load_before(self, data: st.DataObject) -> None:
        oid = p64(data.draw(st.integers(0, 6)))
        before = data.draw(st.sampled_from(self.txns))
        older = [rev for rev in self.model.get(oid, []) if rev[0] < before]
        if older:
            tid, record = older[-1]
            assert self.storage.load(oid, before) == (record, tid)
        else:
            with pytest.raises(POSKeyError):
                self.storage.load(oid, before)

    @precondition(lambda self: bool(self.txns))
    @rule(data=st.data())
    def poll(self, data: st.DataObject) -> None:
        since = data.draw(st.sampled_from([z64, *self.txns]))
        newest, changed = self.storage.poll_invalidations(since)
        assert newest == self.txns[-1]
        if changed is not None:
            expected = {oid for oid, revs in self.model.items() for tid, _ in revs if tid > since}
            existed = {oid for oid in expected if self.model[oid][0][0] <= since}
            assert existed <= set(changed) <= expected

    @invariant()
    def matches_model(self) -> None:
        assert self.storage.last_tid() == (self.txns[-1] if self.txns else z64)
        assert len(self.storage) == len(self.model)
        for oid, revs in self.model.items():
            tid, record = revs[-1]
            assert self.storage.load(oid) == (record, tid)

    @precondition(lambda self: self.pending is None and isinstance(self.storage, IterableStorage))
    @rule()
    def iterate(self) -> None:
        assert isinstance(self.storage, IterableStorage)
        seen = [(t.tid, {r.oid: r.record for r in t.records}) for t in self.storage.iterator()]
        expected: dict[Tid, dict[Oid, bytes]] = {tid: {} for tid in self.txns}
        for oid, revs in self.model.items():
            for tid, record in revs:
                expected[tid][oid] = record
        assert seen == list(expected.items())

    @precondition(lambda self: self.pending is None)
    @rule()
    def new_oid_is_fresh(self) -> None:
        oid = self.storage.new_oid()
        assert oid != z64
        assert oid not in self.model


class StorageMachineSuite:
    """The model-based state machine, run against the bound factory."""

    factory_class: ClassVar[type[StorageFactory]]

    def test_state_machine(self, tmp_path: Any) -> None:
        run_machine(tmp_path, self.factory_class, StorageMachine, examples=25, steps=30)


def run_machine(
    tmp_path: Any,
    factory_class: type[StorageFactory],
    build: Callable[[StorageFactory], RuleBasedStateMachine],
    *,
    examples: int,
    steps: int,
) -> None:
    """Run the state machine ``build`` makes, each example on data of its own (a fresh directory)."""
    count = iter(range(1_000_000))

    def machine() -> RuleBasedStateMachine:
        directory = tmp_path / f"example-{next(count)}"
        os.mkdir(directory)
        return build(factory_class(directory))

    run_state_machine_as_test(
        machine,  # type: ignore[arg-type]  # any callable returning a machine works
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )


class ReadOnlySuite:
    """What a read-only second instance (a follower) must refuse."""

    factory_class: ClassVar[type[StorageFactory]]

    def test_read_only_second_instance_refuses_writes(self, tmp_path: Any) -> None:
        factory = self.factory_class(tmp_path)
        try:
            first = factory.create()
            commit(first, {z64: (z64, b"x")})
            second = factory.open_second(first)
            if not second.read_only:
                pytest.skip("the second instance is writable")
            with pytest.raises(ReadOnlyError):
                second.new_oid()
            with pytest.raises(ReadOnlyError):
                second.begin(META)
        finally:
            factory.cleanup()
