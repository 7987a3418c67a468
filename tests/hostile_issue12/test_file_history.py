"""FileStorage's history walks (undo_log, history, iterator(start, stop)) on files with many,
big, streamed and empty transactions, and for a follower while another process writes."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from amberdb.exceptions import POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.utils import p64, u64, z64


def _commit(storage: FileStorage, writes: dict[bytes, bytes], meta: TransactionMeta | None = None) -> bytes:
    storage.begin(meta or TransactionMeta())
    for oid, record in writes.items():
        try:
            base = storage.load(oid)[1]
        except POSKeyError:
            base = z64
        storage.store(oid, base, record)
    storage.vote()
    return storage.finish()


def test_iterator_ranges_on_many_transactions(tmp_path: Path) -> None:
    rng = random.Random(12)
    with FileStorage(tmp_path / "data.fs") as storage:
        tids = []
        for i in range(300):
            writes = {
                p64(1 + rng.randrange(20)): b"r" * rng.randrange(1, 50) for _ in range(rng.randrange(0, 4))
            }
            tids.append(_commit(storage, writes, TransactionMeta(description=str(i))))
            if i % 37 == 0:
                time.sleep(0.002)  # uneven tid spacing: the "nearer end" guess must not matter
        every = [txn.tid for txn in storage.iterator()]
        assert every == tids
        ints = [u64(t) for t in tids]
        probes = [z64, p64(ints[0] - 1), p64(ints[-1] + 1), b"\xff" * 8]
        probes += [tids[rng.randrange(300)] for _ in range(40)]
        probes += [p64(rng.randrange(ints[0], ints[-1])) for _ in range(40)]
        for start in [*probes, None]:
            for stop in [None, *rng.sample(probes, 5)]:
                want = [t for t in tids if (start is None or t >= start) and (stop is None or t <= stop)]
                got = [txn.tid for txn in storage.iterator(start, stop)]
                assert got == want, (start, stop)
        log = storage.undo_log(0, 1000)
        assert [info.tid for info in log] == tids[::-1]
        assert [info.meta.description for info in storage.undo_log(10, -5)] == [
            str(i) for i in range(289, 284, -1)
        ]


def test_empty_transactions(tmp_path: Path) -> None:
    with FileStorage(tmp_path / "data.fs") as storage:
        t0 = _commit(storage, {p64(1): b"a"})
        empty = _commit(storage, {}, TransactionMeta(user="ü", description="nothing"))
        t2 = _commit(storage, {p64(1): b"b"})
        assert [txn.tid for txn in storage.iterator()] == [t0, empty, t2]
        [txn] = list(storage.iterator(empty, empty))
        assert txn.records == [] and txn.meta.description == "nothing"
        assert [info.tid for info in storage.undo_log()] == [t2, empty, t0]
        undo = storage.undo(empty, TransactionMeta(description="undo nothing"))
        assert storage.load(p64(1)) == (b"b", t2)
        assert [h.tid for h in storage.history(p64(1), 10)] == [t2, t0]
        assert storage.undo_log(0, 1)[0].tid == undo


def test_big_transaction_over_64k_records(tmp_path: Path) -> None:
    count = (1 << 16) + 500
    path = tmp_path / "data.fs"
    with FileStorage(path) as storage:
        t0 = _commit(storage, {p64(1): b"before"})
        storage.begin(TransactionMeta(description="big"))
        storage.store(p64(1), t0, b"changed by big")
        for i in range(2, count + 2):
            storage.store(p64(i), z64, b"%d" % i)
        storage.vote()
        big = storage.finish()
        assert storage.load(p64(count + 1)) == (b"%d" % (count + 1), big)
        for oid in (1, 2, count // 2, count + 1):
            [rev, *_older] = storage.history(p64(oid), 5)
            assert rev.tid == big and rev.meta.description == "big"
        assert [h.tid for h in storage.history(p64(1), 5)] == [t0, big][::-1]
        [txn] = list(storage.iterator(start=big))
        assert len(txn.records) == count + 1
        undo = storage.undo(big, TransactionMeta())
        assert storage.load(p64(1)) == (b"before", undo)
        assert storage.load(p64(count))[1] == big  # created by big: left alone
        log = storage.undo_log()
        assert [info.tid for info in log] == [undo, big, t0]
    with FileStorage(path, read_only=True) as again:
        assert [info.tid for info in again.undo_log()] == [undo, big, t0]
        assert again.history(p64(1), 5)[0].tid == undo


def test_streamed_transaction_over_one_mib(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    big_record = bytes(range(256)) * (6 << 10)  # 1.5 MiB
    with FileStorage(path) as storage:
        t0 = _commit(storage, {p64(1): b"small", p64(2): b"two"})
        t1 = _commit(
            storage,
            {p64(2): b"x" * 10, p64(1): big_record, p64(3): big_record[:1000]},
            TransactionMeta(description="streamed"),
        )
        t2 = _commit(storage, {p64(3): b"later"})
        history = storage.history(p64(1), 10)
        assert [(h.tid, h.size) for h in history] == [(t1, len(big_record)), (t0, 5)]
        assert history[0].meta.description == "streamed"
        assert [h.tid for h in storage.history(p64(3), 10)] == [t2, t1]
        [txn] = list(storage.iterator(t1, t1))
        assert {r.oid: r.record for r in txn.records}[p64(1)] == big_record
        undo = storage.undo(t1, TransactionMeta())
        assert storage.load(p64(1)) == (b"small", undo)
        assert storage.load(p64(2)) == (b"two", undo)
        assert storage.load(p64(3)) == (b"later", t2)  # created by t1, changed later: left alone


_WRITER = textwrap.dedent(
    """
    import sys
    from amberdb.storage.file import FileStorage
    from amberdb.storage.base import TransactionMeta
    from amberdb.exceptions import POSKeyError
    from amberdb.utils import p64, z64
    s = FileStorage(sys.argv[1])
    for i in range(int(sys.argv[2])):
        s.begin(TransactionMeta(user="w", description="txn %d" % i))
        oid = p64(1 + i % 7)
        try:
            base = s.load(oid)[1]
        except POSKeyError:
            base = z64
        s.store(oid, base, b"rev %d " % i * (1 + i % 50))
        if i % 25 == 0:
            s.store(p64(100 + i), z64, b"y" * (1 << 20 if i % 100 == 0 else 10))
        s.vote()
        s.finish()
    s.close()
    """
)


def test_follower_history_while_another_process_writes(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    FileStorage(path).close()
    reader = FileStorage(path, read_only=True)
    total = 400
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(total)])
    try:
        seen = z64
        deadline = time.time() + 120
        while time.time() < deadline:
            newest, _ = reader.poll_invalidations(seen)
            seen = newest
            log = reader.undo_log(0, 10**6)
            tids = [txn.tid for txn in reader.iterator()]
            assert [info.tid for info in log] == tids[::-1]
            assert (tids[-1] if tids else z64) == reader.last_tid()
            if tids:
                mid = tids[len(tids) // 2]
                assert [t.tid for t in reader.iterator(start=mid)] == tids[len(tids) // 2 :]
                for oid in range(1, 8):
                    try:
                        history = reader.history(p64(oid), 10**6)
                    except POSKeyError:
                        continue
                    revs = [h.tid for h in history]
                    assert revs == sorted(revs, reverse=True) and set(revs) <= set(tids)
            if proc.poll() is not None and len(tids) == total:
                break
        assert proc.wait(60) == 0
        assert len(list(reader.iterator())) == total
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.close()


@pytest.mark.parametrize("first,last", [(0, 0), (0, -1), (2, 1), (0, 10**12), (10**12, -1), (1, -(10**12))])
def test_undo_log_extreme_arguments(tmp_path: Path, first: int, last: int) -> None:
    with FileStorage(tmp_path / "data.fs") as storage:
        tids = [_commit(storage, {p64(1 + i): b"x"}) for i in range(5)]
        newest_first = tids[::-1]
        stop = first - last if last < 0 else last
        want = newest_first[first : max(first, stop)]
        assert [info.tid for info in storage.undo_log(first, last)] == want
