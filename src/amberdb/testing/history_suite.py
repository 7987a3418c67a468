"""The history part of the conformance suite: invariants 8 and 9 of :mod:`amberdb.storage.base`.

The transaction log (``iterator``, ``undo_log``), each object's ``history``, ``undo`` with
and without merging, restores and ``copy_transactions_from``, ``get_size`` -- and ``pack``:
garbage collected through record headers, revisions a later snapshot needs kept, commits
from other threads during a pack kept.  Records are built with :func:`amberdb.record.encode_record`
around opaque states, since a storage never unpickles.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from amberdb.exceptions import ConflictError, POSKeyError, StorageTransactionError, UndoError
from amberdb.record import decode_header, encode_record
from amberdb.storage.base import Storage, TransactionMeta
from amberdb.storage.memory import MemoryStorage
from amberdb.testing.factories import StorageFactory
from amberdb.testing.storage_suite import FactoryFixtures, commit, run_machine
from amberdb.utils import Oid, Tid, p64, time_from_tid, u64, z64

__all__ = ["HistoryMachine", "HistorySuite", "PackSuite", "node"]

_CLASS = "amberdb.testing:Node"


def node(state: bytes, *refs: Oid) -> bytes:
    """A record of class ``amberdb.testing:Node`` referring to ``refs``, with ``state`` as its
    (never unpickled) state."""
    return encode_record(_CLASS, [(oid, _CLASS) for oid in refs], state)


def _meta(i: int | str) -> TransactionMeta:
    return TransactionMeta(user=f"user {i}", description=f"transaction {i}", extension=b'{"n": 1}')


class HistorySuite(FactoryFixtures):
    """The transaction log, object histories, undo and copies."""

    def test_undo_log_is_newest_first_with_metadata(self, storage: Storage) -> None:
        tids = []
        base = z64
        for i in range(30):
            base = commit(storage, {z64: (base, node(b"%d" % i))}, _meta(i))
            tids.append(base)
        log = storage.undo_log()
        assert [info.tid for info in log] == tids[::-1][:20]
        assert log[0].meta == _meta(29)
        assert [info.tid for info in storage.undo_log(5, -3)] == tids[::-1][5:8]
        assert [info.tid for info in storage.undo_log(25, 40)] == tids[::-1][25:30]
        assert storage.undo_log(30) == []
        # The log agrees with the iterator.
        by_tid = {txn.tid: txn.meta for txn in storage.iterator()}
        assert all(by_tid[info.tid] == info.meta for info in storage.undo_log(0, 100))

    def test_history_lists_revisions_newest_first(self, storage: Storage) -> None:
        oid = storage.new_oid()
        tids = []
        base = z64
        for i in range(5):
            base = commit(
                storage,
                {oid: (base, node(b"x" * i)), p64(99): (z64, b"")}
                if i == 2
                else {oid: (base, node(b"x" * i))},
                _meta(i),
            )
            tids.append(base)
        history = storage.history(oid, size=10)
        assert [r.tid for r in history] == tids[::-1]
        assert [r.meta for r in history] == [_meta(i) for i in reversed(range(5))]
        assert [r.size for r in history] == [len(node(b"x" * i)) for i in reversed(range(5))]
        assert [r.tid for r in storage.history(oid)] == [tids[-1]]
        assert [r.tid for r in storage.history(oid, 2)] == tids[:-3:-1]
        with pytest.raises(POSKeyError):
            storage.history(p64(12345))
        # Each revision is what load(before=...) finds.
        for newer, older in zip(history, history[1:]):  # noqa: RUF007 - pairwise is 3.10+ only in name
            assert storage.load(oid, before=newer.tid)[1] == older.tid

    def test_entries_read_as_zodb_dicts_too(self, storage: Storage) -> None:
        oid = storage.new_oid()
        tid = commit(storage, {oid: (z64, node(b"x"))}, _meta("z"))
        revision = storage.history(oid)[0]
        assert (revision["tid"], revision["serial"], revision["size"]) == (tid, tid, len(node(b"x")))
        assert (revision["user_name"], revision["description"]) == ("user z", "transaction z")
        assert revision["time"] == time_from_tid(tid)
        entry = storage.undo_log()[0]
        assert entry["id"] == tid and entry.get("size") is None and "size" not in entry and "id" in entry
        with pytest.raises(KeyError):
            entry["nonsense"]

    def test_undo_last_transaction(self, storage: Storage) -> None:
        a, b = storage.new_oid(), storage.new_oid()
        t1 = commit(storage, {a: (z64, node(b"a1")), b: (z64, node(b"b1"))})
        t2 = commit(storage, {a: (t1, node(b"a2")), b: (t1, node(b"b2"))}, _meta("bad"))
        t3 = storage.undo(t2, TransactionMeta(description="undo"))
        assert t3 > t2 and storage.last_tid() == t3
        assert storage.load(a) == (node(b"a1"), t3)
        assert storage.load(b) == (node(b"b1"), t3)
        assert storage.undo_log()[0].tid == t3
        newest, changed = storage.poll_invalidations(t2)
        assert newest == t3 and changed is not None and set(changed) == {a, b}

    def test_undo_older_transaction_touching_other_objects(self, storage: Storage) -> None:
        a, b = storage.new_oid(), storage.new_oid()
        t1 = commit(storage, {a: (z64, node(b"a1")), b: (z64, node(b"b1"))})
        t2 = commit(storage, {a: (t1, node(b"a2"))})
        t3 = commit(storage, {b: (t1, node(b"b2"))})
        t4 = storage.undo(t2, TransactionMeta())
        assert storage.load(a) == (node(b"a1"), t4)
        assert storage.load(b) == (node(b"b2"), t3)

    def test_refused_undo_names_the_oids_and_commits_nothing(self, storage: Storage) -> None:
        a, b, c = storage.new_oid(), storage.new_oid(), storage.new_oid()
        t1 = commit(storage, {a: (z64, node(b"a1")), b: (z64, node(b"b1")), c: (z64, node(b"c1"))})
        t2 = commit(storage, {a: (t1, node(b"a2")), b: (t1, node(b"b2")), c: (t1, node(b"c2"))})
        t3 = commit(storage, {a: (t2, node(b"a3")), c: (t2, node(b"c3"))})
        with pytest.raises(UndoError) as info:
            storage.undo(t2, TransactionMeta())
        assert set(info.value.oids) == {a, c}
        assert hex(u64(a)) in str(info.value) and hex(u64(c)) in str(info.value)
        assert storage.last_tid() == t3
        assert storage.load(b) == (node(b"b2"), t2)
        # The storage is usable afterwards.
        commit(storage, {b: (t2, node(b"b3"))})

    def test_undo_merges_through_the_resolver(self, storage: Storage) -> None:
        a = storage.new_oid()
        t1 = commit(storage, {a: (z64, node(b"1"))})
        t2 = commit(storage, {a: (t1, node(b"2"))})
        t3 = commit(storage, {a: (t2, node(b"3"))})
        seen = []

        def resolve(oid: Oid, undone: bytes, committed: bytes, restored: bytes) -> bytes:
            seen.append((oid, undone, committed, restored))
            return node(b"merged")

        t4 = storage.undo(t2, TransactionMeta(), resolve)
        assert seen == [(a, node(b"2"), node(b"3"), node(b"1"))]
        assert storage.load(a) == (node(b"merged"), t4)
        assert t3 < t4

        def refuse(oid: Oid, undone: bytes, committed: bytes, restored: bytes) -> bytes:
            raise ConflictError(oid=oid)

        with pytest.raises(UndoError) as info:
            storage.undo(t3, TransactionMeta(), refuse)
        assert info.value.oids == (a,)

    def test_undo_of_an_undo_redoes(self, storage: Storage) -> None:
        a = storage.new_oid()
        t1 = commit(storage, {a: (z64, node(b"before"))})
        t2 = commit(storage, {a: (t1, node(b"after"))})
        t3 = storage.undo(t2, TransactionMeta())
        assert storage.load(a)[0] == node(b"before")
        t4 = storage.undo(t3, TransactionMeta())
        assert storage.load(a) == (node(b"after"), t4)

    def test_undo_leaves_created_objects_alone(self, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, node(b"root"))})
        new = storage.new_oid()
        t2 = commit(storage, {z64: (t1, node(b"root", new)), new: (z64, node(b"new"))})
        t3 = storage.undo(t2, TransactionMeta())
        assert storage.load(z64) == (node(b"root"), t3)
        assert storage.load(new) == (node(b"new"), t2)

    def test_undo_of_unknown_transaction_and_bad_ids(self, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, node(b"r"))})
        with pytest.raises(UndoError):
            storage.undo(p64(u64(t1) + 1), TransactionMeta())
        with pytest.raises(TypeError):
            storage.undo(b"short", TransactionMeta())
        assert storage.last_tid() == t1

    def test_undo_while_own_transaction_is_open_refuses(self, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, node(b"r"))})
        t2 = commit(storage, {z64: (t1, node(b"s"))})
        storage.begin(TransactionMeta())
        try:
            with pytest.raises(StorageTransactionError):
                storage.undo(t2, TransactionMeta())
        finally:
            storage.abort()

    def test_restore_keeps_the_tid_and_skips_conflict_checks(self, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, node(b"r"))})
        wanted = p64(u64(t1) + 1000)
        storage.begin(_meta("restored"), tid=wanted)
        storage.store(z64, p64(7), node(b"restored"))  # base tid ignored
        storage.vote()
        assert storage.finish() == wanted
        assert storage.load(z64) == (node(b"restored"), wanted)
        with pytest.raises(StorageTransactionError):  # from begin, or at the latest from vote
            try:
                storage.begin(TransactionMeta(), tid=wanted)
                storage.store(z64, wanted, node(b"again"))
                storage.vote()
            finally:
                storage.abort()
        commit(storage, {z64: (wanted, node(b"after"))})  # usable afterwards

    def test_copy_transactions_from(self, factory: StorageFactory, storage: Storage) -> None:
        source = MemoryStorage()
        base, other = z64, p64(5)
        for i in range(5):
            items = {z64: (base, node(b"%d" % i, other))}
            if i == 0:
                items[other] = (z64, node(b"other"))
            base = commit(source, items, _meta(i))
        assert storage.copy_transactions_from(source) == 5
        self._same_transactions(source, storage)
        for i in range(3):
            base = commit(source, {z64: (base, node(b"more %d" % i))}, _meta(f"more {i}"))
        assert storage.copy_transactions_from(source) == 3
        assert storage.copy_transactions_from(source) == 0
        self._same_transactions(source, storage)
        assert storage.load(z64) == source.load(z64)
        # The copy is a storage like any other: it commits on top.
        commit(storage, {z64: (base, node(b"own"))})
        if factory.durable:
            storage.close()
            storage = factory.reopen()
            assert storage.load(z64)[0] == node(b"own")
            assert storage.undo_log(0, 100)[1:] == source.undo_log(0, 100)

    @staticmethod
    def _same_transactions(source: Storage, copy: Storage) -> None:
        def shape(storage: Storage) -> list[Any]:
            return [
                (t.tid, t.meta, sorted((r.oid, r.tid, r.record) for r in t.records))
                for t in storage.iterator()
            ]

        assert shape(copy) == shape(source)

    def test_history_state_machine(self, tmp_path: Any) -> None:
        run_machine(
            tmp_path, self.factory_class, lambda f: HistoryMachine(f, packs=False), examples=20, steps=25
        )

    def test_get_size_grows(self, storage: Storage) -> None:
        empty = storage.get_size()
        commit(storage, {z64: (z64, node(b"x" * 1000))})
        assert storage.get_size() >= empty + 1000


class PackSuite(FactoryFixtures):
    """``pack``: invariant 8."""

    @staticmethod
    def _pack_now(storage: Storage) -> None:
        storage.pack(p64(u64(storage.last_tid())))

    def test_pack_removes_old_revisions_and_garbage(self, factory: StorageFactory, storage: Storage) -> None:
        a, b, garbage = storage.new_oid(), storage.new_oid(), storage.new_oid()
        t1 = commit(
            storage,
            {
                z64: (z64, node(b"r", a, garbage)),
                a: (z64, node(b"a1", b)),
                b: (z64, node(b"b1")),
                garbage: (z64, node(b"g", b)),
            },
        )
        t2 = commit(storage, {a: (t1, node(b"a2", b)), z64: (t1, node(b"r2", a))})
        t3 = commit(storage, {a: (t2, node(b"a3", b))})
        before = storage.get_size()
        self._pack_now(storage)
        assert storage.load(z64) == (node(b"r2", a), t2)
        assert storage.load(a) == (node(b"a3", b), t3)
        assert storage.load(b) == (node(b"b1"), t1)
        with pytest.raises(POSKeyError):
            storage.load(garbage)
        with pytest.raises(POSKeyError):
            storage.load(a, before=t3)  # an older revision: no snapshot at the pack time sees it
        assert len(storage) == 3
        assert storage.get_size() < before
        assert [r.tid for r in storage.history(a, 10)] == [t3]
        # Packed transactions cannot be undone, and leave the undo log.
        with pytest.raises(UndoError):
            storage.undo(t3, TransactionMeta())
        assert storage.undo_log() == []
        t4 = commit(storage, {a: (t3, node(b"a4"))})
        assert [info.tid for info in storage.undo_log()] == [t4]
        if factory.durable:
            storage.close()
            storage = factory.reopen()
            assert storage.load(a) == (node(b"a4"), t4)
            with pytest.raises(POSKeyError):
                storage.load(garbage)
            with pytest.raises(UndoError):
                storage.undo(t3, TransactionMeta())

    def test_pack_keeps_what_later_snapshots_see(self, storage: Storage) -> None:
        a, b = storage.new_oid(), storage.new_oid()
        t1 = commit(storage, {z64: (z64, node(b"r", a)), a: (z64, node(b"a1")), b: (z64, node(b"b1"))})
        t2 = commit(storage, {a: (t1, node(b"a2"))})
        # b is unreachable at t2, but the transaction after the pack time refers to it again.
        t3 = commit(storage, {a: (t2, node(b"a3", b))})
        t4 = commit(storage, {a: (t3, node(b"a4"))})
        storage.pack(t2)
        assert storage.load(a, before=t3) == (node(b"a2"), t2)
        assert storage.load(a, before=t4) == (node(b"a3", b), t3)
        assert storage.load(b) == (node(b"b1"), t1)
        with pytest.raises(POSKeyError):
            storage.load(a, before=t2)
        # Undo after the pack time still works.
        t5 = storage.undo(t4, TransactionMeta())
        assert storage.load(a) == (node(b"a3", b), t5)

    def test_pack_in_the_future_packs_now(self, storage: Storage) -> None:
        a = storage.new_oid()
        t1 = commit(storage, {z64: (z64, node(b"r", a)), a: (z64, node(b"a1"))})
        t2 = commit(storage, {a: (t1, node(b"a2"))})
        storage.pack(p64(u64(t2) + 10**12))
        t3 = commit(storage, {a: (t2, node(b"a3"))})
        assert storage.load(a, before=t3) == (node(b"a2"), t2)
        assert t3 > t2

    def test_pack_takes_a_posix_time_as_zodb_does(self, storage: Storage) -> None:
        a = storage.new_oid()
        t1 = commit(storage, {z64: (z64, node(b"r", a)), a: (z64, node(b"a1"))})
        t2 = commit(storage, {a: (t1, node(b"a2"))})
        storage.pack(0.0, None)  # before everything: nothing goes
        assert storage.load(a, before=t2) == (node(b"a1"), t1)
        storage.pack(time.time() + 3600, None)  # ZODB's pack(t, referencesf)
        with pytest.raises(POSKeyError):
            storage.load(a, before=t2)
        with pytest.raises(TypeError):
            storage.pack("yesterday")  # type: ignore[arg-type]

    def test_pack_of_empty_storage(self, storage: Storage) -> None:
        storage.pack(p64(1))
        assert len(storage) == 0
        commit(storage, {z64: (z64, node(b"r"))})

    def test_polls_across_a_pack(self, storage: Storage) -> None:
        a = storage.new_oid()
        t1 = commit(storage, {z64: (z64, node(b"r", a)), a: (z64, node(b"a1"))})
        t2 = commit(storage, {a: (t1, node(b"a2"))})
        t3 = commit(storage, {a: (t2, node(b"a3"))})
        storage.pack(t2)
        newest, changed = storage.poll_invalidations(t1)
        assert newest == t3
        assert changed is None or a in changed  # never a poll that hides a change
        newest, changed = storage.poll_invalidations(t2)
        assert newest == t3 and (changed is None or a in changed)

    def test_commits_during_a_pack_survive(self, factory: StorageFactory, storage: Storage) -> None:
        root_refs = []
        base = z64
        items: dict[Oid, tuple[Tid, bytes]] = {}
        for _ in range(300):
            oid = storage.new_oid()
            root_refs.append(oid)
            items[oid] = (z64, node(b"v0" * 50))
        t = commit(storage, {z64: (z64, node(b"r", *root_refs)), **items})
        tids = dict.fromkeys(root_refs, t)
        for round_ in range(3):
            tids.update(
                dict.fromkeys(
                    root_refs,
                    commit(
                        storage, {oid: (tids[oid], node(b"v%d" % (round_ + 1) * 50)) for oid in root_refs}
                    ),
                )
            )
        del base
        done = threading.Event()
        acknowledged: dict[Oid, tuple[bytes, Tid]] = {}
        errors: list[BaseException] = []

        def writer() -> None:
            i = 0
            try:
                while not done.is_set() or i < 5:
                    oid = root_refs[i % len(root_refs)]
                    record = node(b"w%d" % i)
                    tid = commit(storage, {oid: (tids[oid], record)})
                    tids[oid] = tid
                    acknowledged[oid] = (record, tid)
                    i += 1
                    time.sleep(0.001)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            self._pack_now(storage)
        finally:
            done.set()
            thread.join(60)
        assert not errors, errors
        for oid, value in acknowledged.items():
            assert storage.load(oid) == value
        if factory.durable:
            storage.close()
            storage = factory.reopen()
            for oid, value in acknowledged.items():
                assert storage.load(oid) == value

    def test_history_state_machine_with_packs(self, tmp_path: Any) -> None:
        run_machine(
            tmp_path, self.factory_class, lambda f: HistoryMachine(f, packs=True), examples=25, steps=30
        )

    def test_progress_is_reported(self, storage: Storage) -> None:
        oids = [storage.new_oid() for _ in range(50)]
        commit(storage, {z64: (z64, node(b"r", *oids)), **{oid: (z64, node(b"x")) for oid in oids}})
        reports: list[tuple[int, int]] = []
        storage.pack(storage.last_tid(), progress=lambda done, total: reports.append((done, total)))
        assert reports
        assert all(0 <= done <= total for done, total in reports)
        assert reports[-1][0] == reports[-1][1]
        assert [done for done, _ in reports] == sorted(done for done, _ in reports)


class HistoryMachine(RuleBasedStateMachine):
    """Commits, undos, packs (when ``packs``) and reopens against a model of the whole history.

    After every step the storage's ``iterator``, ``undo_log``, ``history`` and loads must
    tell exactly the model's story: a systematic check that the four views of one history
    agree, and that an undo restores exactly what invariant 8 says or refuses naming exactly
    the oids in the way.
    """

    OIDS = 6

    def __init__(self, factory: StorageFactory, packs: bool) -> None:
        super().__init__()
        self.factory = factory
        self.packs = packs
        self.storage = factory.create()
        # The model: transactions oldest first as (tid, meta, {oid: record}).
        self.txns: list[tuple[Tid, TransactionMeta, dict[Oid, bytes]]] = []
        self.packed: Tid | None = None

    def teardown(self) -> None:
        self.factory.cleanup()

    def _revisions(self, oid: Oid) -> list[tuple[Tid, TransactionMeta, bytes]]:
        return [(tid, meta, records[oid]) for tid, meta, records in self.txns if oid in records]

    def _current(self, oid: Oid) -> tuple[Tid, bytes] | None:
        revisions = self._revisions(oid)
        return (revisions[-1][0], revisions[-1][2]) if revisions else None

    @rule(
        changes=st.dictionaries(
            st.integers(0, OIDS - 1), st.lists(st.integers(0, OIDS - 1), max_size=3), min_size=1, max_size=4
        ),
        text=st.text(max_size=8),
    )
    def commit(self, changes: dict[int, list[int]], text: str) -> None:
        meta = TransactionMeta(user=text, description=f"c {len(self.txns)} {text}")
        records = {
            p64(oid): node(text.encode() + b"%d" % len(self.txns), *map(p64, refs))
            for oid, refs in changes.items()
        }
        items = {}
        for oid, record in records.items():
            current = self._current(oid)
            items[oid] = (current[0] if current else z64, record)
        tid = commit(self.storage, items, meta)
        self.txns.append((tid, meta, records))

    @precondition(lambda self: bool(self.txns))
    @rule(data=st.data())
    def undo(self, data: st.DataObject) -> None:
        tid, _, records = data.draw(st.sampled_from(self.txns))
        meta = TransactionMeta(description="undo")
        if self.packed is not None and tid <= self.packed:
            with pytest.raises(UndoError):
                self.storage.undo(tid, meta)
            return
        restored: dict[Oid, bytes] = {}
        refused = set()
        for oid in records:
            older = [rev for rev in self._revisions(oid) if rev[0] < tid]
            if not older:
                continue
            current = self._current(oid)
            assert current is not None
            if current[0] == tid or current[1] == records[oid]:
                restored[oid] = older[-1][2]
            else:
                refused.add(oid)
        if refused:
            last = self.storage.last_tid()
            with pytest.raises(UndoError) as info:
                self.storage.undo(tid, meta)
            assert set(info.value.oids) == refused
            assert self.storage.last_tid() == last
            return
        new_tid = self.storage.undo(tid, meta)
        assert new_tid > self.txns[-1][0]
        self.txns.append((new_tid, meta, restored))

    @precondition(lambda self: self.packs and bool(self.txns))
    @rule(data=st.data())
    def pack(self, data: st.DataObject) -> None:
        pack_tid = data.draw(st.sampled_from([tid for tid, _, _ in self.txns]))
        self.storage.pack(pack_tid)
        live: set[Oid] = set()
        cut: dict[Oid, int] = {}
        for oid in {oid for _, _, records in self.txns for oid in records}:
            revisions = self._revisions(oid)
            cut[oid] = max(0, len([rev for rev in revisions if rev[0] <= pack_tid]) - 1)
        stack = [z64, *(oid for oid in cut if self._revisions(oid)[-1][0] > pack_tid)]
        while stack:
            oid = stack.pop()
            if oid in live or oid not in cut:
                continue
            live.add(oid)
            for _, _, record in self._revisions(oid)[cut[oid] :]:
                stack.extend(ref for ref, _ in decode_header(record).refs)
        kept_revisions = {(oid, rev[0]) for oid in live for rev in self._revisions(oid)[cut[oid] :]}
        txns = []
        newest = self.txns[-1][0]
        for tid, meta, records in self.txns:
            kept = {oid: record for oid, record in records.items() if (oid, tid) in kept_revisions}
            if kept or tid > pack_tid or tid == newest:  # the newest stays, maybe emptied
                txns.append((tid, meta, kept))
        self.txns = txns
        self.packed = pack_tid if self.packed is None else max(self.packed, pack_tid)

    @precondition(lambda self: self.factory.durable)
    @rule()
    def reopen(self) -> None:
        self.storage.close()
        self.storage = self.factory.reopen()

    @precondition(lambda self: bool(self.txns))
    @rule(data=st.data())
    def load_before(self, data: st.DataObject) -> None:
        oid = p64(data.draw(st.integers(0, self.OIDS - 1)))
        before = data.draw(st.sampled_from([tid for tid, _, _ in self.txns]))
        older = [rev for rev in self._revisions(oid) if rev[0] < before]
        if older:
            assert self.storage.load(oid, before) == (older[-1][2], older[-1][0])
        else:
            with pytest.raises(POSKeyError):
                self.storage.load(oid, before)

    @rule()
    def copy(self) -> None:
        copy = MemoryStorage()
        assert copy.copy_transactions_from(self.storage) == len(self.txns)
        assert [(t.tid, t.meta) for t in copy.iterator()] == [(tid, meta) for tid, meta, _ in self.txns]

    @invariant()
    def views_agree_with_the_model(self) -> None:
        storage = self.storage
        assert [
            (t.tid, t.meta, {r.oid: r.record for r in t.records}) for t in storage.iterator()
        ] == self.txns
        undoable = [(tid, meta) for tid, meta, _ in self.txns if self.packed is None or tid > self.packed]
        assert [(info.tid, info.meta) for info in storage.undo_log(0, 10_000)] == undoable[::-1]
        oids = {oid for _, _, records in self.txns for oid in records}
        assert len(storage) == len(oids)
        for oid in oids:
            revisions = self._revisions(oid)
            assert storage.load(oid) == (revisions[-1][2], revisions[-1][0])
            expected = [(tid, meta, len(record)) for tid, meta, record in reversed(revisions)]
            assert [(r.tid, r.meta, r.size) for r in storage.history(oid, 100)] == expected


class HistoryFreeSuite(FactoryFixtures):
    """What a history-free storage (``keeps_history = False``) promises instead of invariant 8:
    current states only, no undo, older snapshots refused clearly, pack collects garbage."""

    def test_undo_is_refused_and_the_log_is_empty(self, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, node(b"r1"))})
        commit(storage, {z64: (t1, node(b"r2"))})
        assert storage.undo_log() == []
        with pytest.raises(UndoError, match="history"):
            storage.undo(t1, TransactionMeta())

    def test_history_lists_only_the_current_revision(self, storage: Storage) -> None:
        t1 = commit(storage, {z64: (z64, node(b"r1"))})
        t2 = commit(storage, {z64: (t1, node(b"r2"))})
        assert [r.tid for r in storage.history(z64, 10)] == [t2]

    def test_an_older_snapshot_fails_with_a_transient_error(
        self, factory: StorageFactory, storage: Storage
    ) -> None:
        a = storage.new_oid()
        t1 = commit(storage, {a: (z64, node(b"a1")), z64: (z64, node(b"r", a))})
        t2 = commit(storage, {a: (t1, node(b"a2"))})
        assert storage.load(a, before=p64(u64(t2) + 1)) == (node(b"a2"), t2)
        # A fresh instance has nothing cached: the replaced revision is gone for good.
        second = factory.open_second(storage)
        try:
            with pytest.raises(ConflictError, match="history"):
                second.load(a, before=t2)
            assert second.load(z64, before=t2) == (node(b"r", a), t1)  # current then and now
        finally:
            if second is not storage:
                second.close()

    def test_iterator_lists_the_current_records(self, storage: Storage) -> None:
        a = storage.new_oid()
        t1 = commit(storage, {a: (z64, node(b"a1")), z64: (z64, node(b"r", a))})
        t2 = commit(storage, {a: (t1, node(b"a2"))})
        listed = [(t.tid, sorted((r.oid, r.record) for r in t.records)) for t in storage.iterator()]
        assert listed[-1] == (t2, [(a, node(b"a2"))])
        assert (t1, [(z64, node(b"r", a))]) in listed

    def test_pack_collects_garbage_and_keeps_current_states(
        self, factory: StorageFactory, storage: Storage
    ) -> None:
        a, b, garbage = storage.new_oid(), storage.new_oid(), storage.new_oid()
        t1 = commit(
            storage,
            {
                z64: (z64, node(b"r", a, garbage)),
                a: (z64, node(b"a1", b)),
                b: (z64, node(b"b1")),
                garbage: (z64, node(b"g", b)),
            },
        )
        t2 = commit(storage, {z64: (t1, node(b"r2", a))})
        storage.pack(t1)  # history-free: pack always collects up to now
        assert storage.load(z64) == (node(b"r2", a), t2)
        assert storage.load(a) == (node(b"a1", b), t1)
        assert storage.load(b) == (node(b"b1"), t1)
        with pytest.raises(POSKeyError):
            storage.load(garbage)
        assert len(storage) == 3
        if factory.durable:
            storage.close()
            storage = factory.reopen()
            with pytest.raises(POSKeyError):
                storage.load(garbage)
            assert storage.load(a) == (node(b"a1", b), t1)

    def test_copy_from_a_history_keeps_the_current_states(self, storage: Storage) -> None:
        source = MemoryStorage()
        a = p64(1)
        t1 = commit(source, {a: (z64, node(b"a1")), z64: (z64, node(b"r", a))})
        t2 = commit(source, {a: (t1, node(b"a2"))})
        assert storage.copy_transactions_from(source) == 2
        assert storage.last_tid() == t2
        assert storage.load(a) == (node(b"a2"), t2)
        assert storage.load(z64) == (node(b"r", a), t1)
        t3 = commit(source, {a: (t2, node(b"a3"))})
        assert storage.copy_transactions_from(source) == 1
        assert storage.load(a) == (node(b"a3"), t3)
