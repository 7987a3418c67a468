"""The storage contract (amberdb.storage.base), checked against every storage implementation."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from amberdb.exceptions import (
    ConflictError,
    POSKeyError,
    ReadOnlyError,
    StorageError,
    StorageTransactionError,
)
from amberdb.storage.base import IterableStorage, Storage, TransactionMeta
from amberdb.storage.file import FileStorage, verify
from amberdb.storage.memory import MemoryStorage
from amberdb.utils import Oid, Tid, p64, u64, z64

from .conftest import StorageMaker, commit

META = TransactionMeta()


def test_implements_protocol(storage: IterableStorage) -> None:
    assert isinstance(storage, Storage)
    assert isinstance(storage, IterableStorage)
    assert storage.read_only is False
    assert storage.name


def test_empty_storage(storage: IterableStorage) -> None:
    assert storage.last_tid() == z64
    assert len(storage) == 0
    assert list(storage.iterator()) == []
    with pytest.raises(POSKeyError) as info:
        storage.load(z64)
    assert isinstance(info.value, KeyError)
    assert "0x0" in str(info.value)


def test_store_and_load(storage: IterableStorage) -> None:
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


def test_empty_record_and_empty_transaction(storage: IterableStorage) -> None:
    tid = commit(storage, {z64: (z64, b"")})
    assert storage.load(z64) == (b"", tid)
    tid2 = commit(storage, {})
    assert tid2 > tid
    assert storage.last_tid() == tid2
    assert [t.tid for t in storage.iterator()] == [tid, tid2]


def test_load_before(storage: IterableStorage) -> None:
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


def test_conflict_keeps_transaction_open(storage: IterableStorage) -> None:
    t1 = commit(storage, {z64: (z64, b"a")})
    t2 = commit(storage, {z64: (t1, b"b")})
    storage.begin(META)
    with pytest.raises(ConflictError) as info:
        storage.store(z64, t1, b"stale")
    assert info.value.oid == z64
    assert info.value.serials == (t2, t1)
    # The transaction stays open: store the resolved record and commit.
    storage.store(z64, t2, b"resolved")
    storage.vote()
    t3 = storage.finish()
    assert storage.load(z64) == (b"resolved", t3)


def test_conflict_on_new_and_missing_objects(storage: IterableStorage) -> None:
    t1 = commit(storage, {p64(1): (z64, b"a")})
    storage.begin(META)
    with pytest.raises(ConflictError) as info:
        storage.store(p64(1), z64, b"also new")
    assert info.value.serials == (t1, z64)
    with pytest.raises(ConflictError) as info:
        storage.store(p64(2), t1, b"never committed")
    assert info.value.serials == (z64, t1)
    storage.abort()
    assert storage.load(p64(1)) == (b"a", t1)


def test_abort_before_and_after_vote(maker: StorageMaker) -> None:
    storage = maker.open()
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
    assert [t.tid for t in storage.iterator()] == [t1]
    storage.abort()  # no-op when idle
    t2 = commit(storage, {z64: (t1, b"after")})
    if maker.persistent:
        storage.close()
        storage = maker.open()
    assert storage.load(z64) == (b"after", t2)
    assert [t.tid for t in storage.iterator()] == [t1, t2]


def test_uncommitted_data_is_invisible(storage: IterableStorage) -> None:
    t1 = commit(storage, {z64: (z64, b"v1")})
    storage.begin(META)
    storage.store(z64, t1, b"v2")
    storage.store(p64(3), z64, b"new")
    assert storage.load(z64) == (b"v1", t1)
    storage.vote()
    assert storage.load(z64) == (b"v1", t1)
    assert storage.last_tid() == t1
    with pytest.raises(POSKeyError):
        storage.load(p64(3))
    assert len(storage) == 1
    t2 = storage.finish()
    assert storage.load(z64) == (b"v2", t2)
    assert storage.load(p64(3)) == (b"new", t2)


def test_store_twice_keeps_last(maker: StorageMaker) -> None:
    storage = maker.open()
    storage.begin(META)
    storage.store(z64, z64, b"first")
    storage.store(z64, z64, b"second")
    storage.vote()
    tid = storage.finish()
    assert storage.load(z64) == (b"second", tid)
    (txn,) = storage.iterator()
    assert [(r.oid, r.record) for r in txn.records] == [(z64, b"second")]
    if maker.persistent:
        storage.close()
        storage = maker.open()
        assert storage.load(z64) == (b"second", tid)
        assert len(storage) == 1


def test_protocol_errors(storage: IterableStorage) -> None:
    with pytest.raises(StorageTransactionError):
        storage.store(z64, z64, b"x")
    with pytest.raises(StorageTransactionError):
        storage.vote()
    with pytest.raises(StorageTransactionError):
        storage.finish()
    storage.begin(META)
    with pytest.raises(StorageTransactionError):
        storage.finish()
    with pytest.raises(StorageTransactionError):
        storage.begin(META)
    storage.store(z64, z64, b"x")
    storage.vote()
    with pytest.raises(StorageTransactionError):
        storage.store(p64(1), z64, b"y")
    with pytest.raises(StorageTransactionError):
        storage.vote()
    storage.finish()


def test_tids_increase_strictly(storage: IterableStorage) -> None:
    tids = [commit(storage, {p64(i): (z64, b"r")}) for i in range(50)]
    assert tids == sorted(set(tids))
    assert [t.tid for t in storage.iterator()] == tids


def test_new_oid(maker: StorageMaker) -> None:
    storage = maker.open()
    oids = {storage.new_oid() for _ in range(100)}
    assert len(oids) == 100
    assert z64 not in oids
    assert p64(1) in oids
    commit(storage, {p64(500): (z64, b"x")})
    fresh = storage.new_oid()
    assert u64(fresh) > 500
    if maker.persistent:
        storage.close()
        storage = maker.open()
        assert u64(storage.new_oid()) > u64(fresh)


def test_iterator_range_and_meta(storage: IterableStorage) -> None:
    metas = [
        TransactionMeta(user=f"user{i}", description=f"déscr {i}", extension=b"{}" * i) for i in range(4)
    ]
    tids = []
    base = z64
    for i, meta in enumerate(metas):
        base = commit(storage, {z64: (base, b"%d" % i), p64(i + 1): (z64, b"o")}, meta)
        tids.append(base)
    txns = list(storage.iterator())
    assert [t.meta for t in txns] == metas
    assert [sorted((r.oid, r.tid, r.record) for r in t.records) for t in txns] == [
        sorted([(z64, tids[i], b"%d" % i), (p64(i + 1), tids[i], b"o")]) for i in range(4)
    ]
    assert [t.tid for t in storage.iterator(start=tids[1])] == tids[1:]
    assert [t.tid for t in storage.iterator(stop=tids[2])] == tids[:3]
    assert [t.tid for t in storage.iterator(tids[1], tids[2])] == tids[1:3]
    assert [t.tid for t in storage.iterator(p64(u64(tids[3]) + 1))] == []


def test_close(storage: IterableStorage) -> None:
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


def test_close_aborts_open_transaction(maker: StorageMaker) -> None:
    storage = maker.open()
    t1 = commit(storage, {z64: (z64, b"x")})
    storage.begin(META)
    storage.store(z64, t1, b"voted at close")
    storage.vote()
    storage.close()
    if maker.persistent:
        storage = maker.open()
        assert storage.load(z64) == (b"x", t1)
        assert storage.last_tid() == t1


def test_reopen_keeps_everything(maker: StorageMaker) -> None:
    if not maker.persistent:
        pytest.skip("memory storage does not persist")
    storage = maker.open()
    expected: dict[Oid, tuple[bytes, Tid]] = {}
    for i in range(20):
        oid = storage.new_oid()
        tid = commit(storage, {oid: (z64, b"r%d" % i)})
        expected[oid] = (b"r%d" % i, tid)
    storage.close()
    storage = maker.open()
    assert len(storage) == 20
    for oid, value in expected.items():
        assert storage.load(oid) == value


def test_threads_commit_concurrently(storage: IterableStorage) -> None:
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
    tids = [t.tid for t in storage.iterator()]
    assert tids == sorted(set(tids))


def test_readers_see_finished_transactions_atomically(storage: IterableStorage) -> None:
    # Two objects always written together with the same value: a reader that sees the
    # newer one and then loads the other must never get an older value (invariant 1).
    commit(storage, {p64(1): (z64, b"0"), p64(2): (z64, b"0")})
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            a, ta = storage.load(p64(1))
            b, tb = storage.load(p64(2))
            if tb < ta:
                bad.append(f"{a!r}@{ta!r} then {b!r}@{tb!r}")
            if storage.last_tid() < tb:
                bad.append("last_tid behind a loaded tid")

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for i in range(1, 40):
            t1 = storage.load(p64(1))[1]
            commit(storage, {p64(1): (t1, b"%d" % i), p64(2): (t1, b"%d" % i)})
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    assert not bad


def test_begin_waits_for_other_committer(storage: IterableStorage) -> None:
    storage.begin(META)
    entered = threading.Event()

    def other() -> None:
        storage.begin(META)
        entered.set()
        storage.abort()

    thread = threading.Thread(target=other)
    thread.start()
    assert not entered.wait(0.2)
    storage.abort()
    assert entered.wait(5)
    thread.join(5)


# -- a model-based state machine ---------------------------------------------------------------


class StorageMachine(RuleBasedStateMachine):
    """Drive a storage and a trivial model (oid -> list of (tid, record)) side by side."""

    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="amberdb-sm-")
        self.storage: IterableStorage = self._open()
        self.model: dict[Oid, list[tuple[Tid, bytes]]] = {}
        self.txns: list[Tid] = []
        self.pending: dict[Oid, bytes] | None = None
        self.voted = False

    def _open(self) -> IterableStorage:
        if self.kind == "memory":
            return MemoryStorage()
        return FileStorage(Path(self.directory) / "data.fs")

    def teardown(self) -> None:
        self.storage.close()
        path = Path(self.directory) / "data.fs"
        if self.kind == "file" and path.exists():
            report = verify(path)
            assert report.ok and not report.notes, str(report)
        shutil.rmtree(self.directory, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        assert self.storage.last_tid() == z64

    def _committed(self, oid: Oid) -> Tid:
        revs = self.model.get(oid)
        return revs[-1][0] if revs else z64

    @precondition(lambda self: self.pending is None)
    @rule()
    def begin(self) -> None:
        self.storage.begin(TransactionMeta(description="sm"))
        self.pending = {}
        self.voted = False

    @precondition(lambda self: self.pending is not None and not self.voted)
    @rule(oid=st.integers(0, 6), record=st.binary(max_size=40), stale=st.booleans())
    def store(self, oid: int, record: bytes, stale: bool) -> None:
        assert self.pending is not None
        key = p64(oid)
        committed = self._committed(key)
        base = committed
        if stale:
            base = p64(u64(committed) + 1) if committed == z64 else z64
        if base != committed:
            with pytest.raises(ConflictError) as info:
                self.storage.store(key, base, record)
            assert info.value.serials == (committed, base)
        else:
            self.storage.store(key, base, record)
            self.pending[key] = record

    @precondition(lambda self: self.pending is not None and not self.voted)
    @rule()
    def vote(self) -> None:
        self.storage.vote()
        self.voted = True

    @precondition(lambda self: self.voted)
    @rule()
    def finish(self) -> None:
        assert self.pending is not None
        tid = self.storage.finish()
        assert not self.txns or tid > self.txns[-1]
        self.txns.append(tid)
        for oid, record in self.pending.items():
            self.model.setdefault(oid, []).append((tid, record))
        self.pending = None
        self.voted = False

    @precondition(lambda self: self.pending is not None)
    @rule()
    def abort(self) -> None:
        self.storage.abort()
        self.pending = None
        self.voted = False

    @rule()
    def reopen(self) -> None:
        if self.kind == "memory":
            return
        self.storage.close()
        self.storage = self._open()
        self.pending = None
        self.voted = False

    @precondition(lambda self: bool(self.txns))
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

    @invariant()
    def matches_model(self) -> None:
        assert self.storage.last_tid() == (self.txns[-1] if self.txns else z64)
        assert len(self.storage) == len(self.model)
        for oid, revs in self.model.items():
            tid, record = revs[-1]
            assert self.storage.load(oid) == (record, tid)

    @precondition(lambda self: self.pending is None)
    @rule()
    def iterate(self) -> None:
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


class FileStorageMachine(StorageMachine):
    kind = "file"


_SM_SETTINGS = settings(
    max_examples=25, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestMemoryStorageMachine = StorageMachine.TestCase
TestMemoryStorageMachine.settings = _SM_SETTINGS
TestFileStorageMachine = FileStorageMachine.TestCase
TestFileStorageMachine.settings = _SM_SETTINGS


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.fs"
    with FileStorage(path) as writer:
        tid = commit(writer, {z64: (z64, b"x")})
    reader = FileStorage(path, read_only=True)
    try:
        assert reader.read_only
        assert reader.load(z64) == (b"x", tid)
        with pytest.raises(ReadOnlyError):
            reader.new_oid()
        with pytest.raises(ReadOnlyError):
            reader.begin(META)
    finally:
        reader.close()
