"""Every byte: damage or cut each byte of a small database; nothing wrong ever comes out.

For each byte of the data file (flipped whole, and one bit of it) and each place it could
be cut, with its index file and without: open writable, open read-only, load every oid
(newest, and before every tid), iterate.  Each either returns exactly what was committed or
raises a FileFormatError naming the file; a file is never changed except by cutting a
proven torn tail (I3); nothing hangs.  Then the same for each byte of the index file, and
for the spill file of a transaction with savepoints.

fsync is stubbed out here: durability is not the question, and thousands of opens must
stay fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.exceptions import CorruptedDataError, FileFormatError, POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.file import format as fmt
from amberdb.storage.file import storage as storage_module
from amberdb.storage.spill import SpillFile
from amberdb.utils import Oid, Tid, p64, u64, z64

from .layout import transactions

pytestmark = pytest.mark.timeout(300)


@dataclass
class History:
    """What was committed: transactions in order, each {oid: record}, with its meta."""

    tids: list[Tid] = field(default_factory=list)
    writes: list[dict[Oid, bytes]] = field(default_factory=list)
    metas: list[TransactionMeta] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # file offset just past each transaction

    def commit(self, fs: FileStorage, meta: TransactionMeta, stores: list[tuple[Oid, bytes]]) -> None:
        fs.begin(meta)
        for oid, record in stores:
            fs.store(oid, self.newest_tid(oid, len(self.tids)), record)
        fs.vote()
        self.tids.append(fs.finish())
        self.writes.append(dict(stores))  # the last store of an oid counts
        self.metas.append(meta)
        self.ends.append(os.fstat(fs._fd).st_size)

    def newest_tid(self, oid: Oid, upto: int) -> Tid:
        for i in range(upto - 1, -1, -1):
            if oid in self.writes[i]:
                return self.tids[i]
        return z64

    def oids(self) -> list[Oid]:
        return sorted({oid for w in self.writes for oid in w} | {p64(999)})

    def expected_load(self, oid: Oid, before: Tid | None, committed: int) -> tuple[bytes, Tid] | None:
        """The revision a load must return when the first ``committed`` transactions exist."""
        for i in range(committed - 1, -1, -1):
            if (before is None or self.tids[i] < before) and oid in self.writes[i]:
                return self.writes[i][oid], self.tids[i]
        return None


@pytest.fixture(autouse=True)
def _no_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A directory in memory (tmpfs) where there is one: thousands of small files go faster."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="amberdb-every-byte-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def build(path: Path, monkeypatch: pytest.MonkeyPatch) -> History:
    """Seven transactions: several oids with several revisions, metadata, an oid stored twice,
    an empty transaction, and one streamed out before its vote (a big transaction in small)."""
    history = History()
    with FileStorage(path) as fs:
        history.commit(fs, TransactionMeta(), [(z64, b"root 1"), (p64(1), b"one 1"), (p64(2), b"two 1")])
        history.commit(
            fs, TransactionMeta("ann", "second", b'{"k": 1}'), [(p64(1), b"one 2"), (p64(3), b"3")]
        )
        history.commit(fs, TransactionMeta(), [(z64, b"root 2"), (p64(2), b"two 2")])
        with monkeypatch.context() as m:
            m.setattr(storage_module, "FLUSH_SIZE", 64)
            history.commit(fs, TransactionMeta("bob"), [(p64(4), b"four" * 20), (p64(1), b"one 3" * 9)])
        history.commit(fs, TransactionMeta(), [(p64(5), b"first"), (p64(5), b"five"), (p64(2), b"two 3")])
        history.commit(fs, TransactionMeta("", "nothing"), [])
        history.commit(fs, TransactionMeta(), [(z64, b"root 3")])
    return history


@pytest.fixture
def database(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, History, bytes, bytes]:
    source = workdir / "source.fs"
    history = build(source, monkeypatch)
    data = source.read_bytes()
    index = Path(str(source) + ".index").read_bytes()
    assert [end for end in history.ends] == [pos + h.length for pos, h in transactions(data)]
    assert 800 < len(data) < 2000 and 100 < len(index) < 10_000, (len(data), len(index))
    return workdir / "victim.fs", history, data, index


def committed_prefix(history: History, size: int) -> int:
    """How many transactions a file cut to ``size`` bytes still holds whole."""
    return sum(1 for end in history.ends if end <= size)


def is_about(error: BaseException, path: Path) -> bool:
    return str(path) in str(error)


def check_storage(fs: FileStorage, path: Path, history: History, committed: int) -> None:
    """Every load and the iteration give exactly the first ``committed`` transactions, or an error."""
    assert fs.last_tid() == (history.tids[committed - 1] if committed else z64)
    befores: list[Tid | None] = [None, *history.tids, p64(u64(history.tids[-1]) + 1)]
    for oid in history.oids():
        for before in befores:
            expected = history.expected_load(oid, before, committed)
            try:
                got = fs.load(oid, before)
            except POSKeyError:
                assert expected is None, (oid, before)
                continue
            except CorruptedDataError as exc:
                assert is_about(exc, path), exc
                continue
            assert got == expected, (oid, before)
    seen = 0
    try:
        for txn in fs.iterator():
            assert txn.tid == history.tids[seen]
            assert txn.meta == history.metas[seen]
            assert {r.oid: r.record for r in txn.records} == history.writes[seen]
            assert all(r.tid == txn.tid for r in txn.records)
            seen += 1
    except CorruptedDataError as exc:
        assert is_about(exc, path), exc
    else:
        assert seen == committed


def try_every_open(
    path: Path, history: History, damaged: bytes, index: bytes | None, expect_all: bool
) -> str:
    """Open read-only then writable; returns 'refused', 'opened' (and checks the contents)."""
    outcome = "opened"
    for read_only in (True, False):
        index_path = Path(str(path) + ".index")
        if index is None:
            index_path.unlink(missing_ok=True)
        else:
            index_path.write_bytes(index)
        try:
            fs = FileStorage(path, read_only=read_only)
        except FileFormatError as exc:
            assert is_about(exc, path), exc
            assert path.read_bytes() == damaged  # refused: not a byte changed
            outcome = "refused"
            continue
        try:
            size = path.stat().st_size
            committed = committed_prefix(history, size)
            if expect_all:
                assert committed == len(history.tids) and size == len(damaged)
            check_storage(fs, path, history, committed)
        finally:
            fs.close()
        after = path.read_bytes()
        if after != damaged:
            # Only a writable open changes the file: it cuts a proven torn tail, or starts afresh a
            # file shorter than its header (a crash during creation; nothing was committed).
            assert not read_only and not expect_all
            if len(damaged) < fmt.FILE_HEADER.size:
                assert len(after) == fmt.FILE_HEADER.size and after[:8] == fmt.FILE_MAGIC
            else:
                assert after == damaged[: history.ends[committed - 1] if committed else fmt.FILE_HEADER.size]
        damaged = after
    return outcome


def flips(data: bytes, single_bit: bool) -> Iterator[tuple[int, bytes]]:
    for pos in range(len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= (1 << (pos % 8)) if single_bit else 0xFF
        yield pos, bytes(damaged)


@pytest.mark.parametrize("single_bit", [False, True], ids=["byte", "bit"])
@pytest.mark.parametrize("with_index", [True, False], ids=["index", "no-index"])
def test_every_flipped_byte_of_the_data_file(
    database: tuple[Path, History, bytes, bytes], with_index: bool, single_bit: bool
) -> None:
    path, history, data, index = database
    outcomes = {"opened": 0, "refused": 0}
    for _, damaged in flips(data, single_bit):
        path.write_bytes(damaged)
        outcomes[try_every_open(path, history, damaged, index if with_index else None, expect_all=True)] += 1
    assert sum(outcomes.values()) == len(data)
    if not with_index:
        assert outcomes["opened"] == 0  # a scan checks every checksum: every flip is found at open
    else:
        assert outcomes["opened"] > len(data) // 2  # the index is trusted; loads catch the rest


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "no-index"])
def test_cut_at_every_byte_of_the_data_file(
    database: tuple[Path, History, bytes, bytes], with_index: bool
) -> None:
    path, history, data, index = database
    for cut in range(len(data)):
        damaged = data[:cut]
        path.write_bytes(damaged)
        outcome = try_every_open(path, history, damaged, index if with_index else None, expect_all=False)
        if with_index and cut >= fmt.FILE_HEADER.size:
            assert outcome == "refused"  # the index proves more was committed (I6)
        elif cut >= fmt.FILE_HEADER.size:
            assert outcome == "opened"
            # A writable open cut the torn tail back to the last whole transaction.
            assert path.stat().st_size == max([fmt.FILE_HEADER.size] + [e for e in history.ends if e <= cut])


def index_positions(index: bytes) -> list[int]:
    """Every byte of the index file: header, OffsetIndex header, the offsets of oids 0..5.

    The saved array ends at the largest oid, so no byte is padding.
    """
    assert len(index) == fmt.INDEX_HEADER.size + 32 + 6 * 8
    return list(range(len(index)))


@pytest.mark.parametrize("single_bit", [False, True], ids=["byte", "bit"])
def test_every_flipped_byte_of_the_index_file(
    database: tuple[Path, History, bytes, bytes], single_bit: bool
) -> None:
    """I6: an index that fails its own checks is ignored; the scan finds everything."""
    path, history, data, index = database
    positions = index_positions(index)
    for pos in positions:
        damaged_index = bytearray(index)
        damaged_index[pos] ^= (1 << (pos % 8)) if single_bit else 0xFF
        path.write_bytes(data)
        assert try_every_open(path, history, data, bytes(damaged_index), expect_all=True) == "opened"


def test_cut_at_every_byte_of_the_index_file(database: tuple[Path, History, bytes, bytes]) -> None:
    path, history, data, index = database
    for cut in index_positions(index):
        path.write_bytes(data)
        assert try_every_open(path, history, data, index[:cut], expect_all=True) == "opened"


# -- the spill file of a transaction with savepoints -------------------------------------------


class Box(amberdb.Persistent):
    def __init__(self, value: object) -> None:
        self.value = value


def intended_state() -> dict[str, object]:
    return {f"box{i}": [i, "x" * (i * 7)] for i in range(6)} | {"box2": "changed after the first savepoint"}


def read_state(path: Path) -> dict[str, object]:
    db = amberdb.DB(str(path))
    try:
        with db.transaction() as conn:
            root = conn.root()
            return {key: root[key].value for key in root if key.startswith("box")}
    finally:
        db.close()


def test_every_flipped_byte_of_the_spill_file(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged spill makes the commit fail clearly, or commits exactly what was intended."""
    monkeypatch.setattr("amberdb.storage.spill._FLUSH_AT", 1)  # every entry in the file at once
    spills: list[SpillFile] = []
    real_init = SpillFile.__init__

    def recording_init(self: SpillFile, directory: str | None = None) -> None:
        real_init(self, directory)
        spills.append(self)

    monkeypatch.setattr(SpillFile, "__init__", recording_init)
    template = workdir / "template.fs"
    db = amberdb.DB(str(template))
    with db.transaction() as conn:
        conn.root()["box0"] = Box("before")
    db.close()
    before = read_state(template)
    path = workdir / "spilled.fs"

    def run(flip_at: int | None) -> tuple[str, int]:
        shutil.copy(template, path)
        shutil.copy(str(template) + ".index", str(path) + ".index")
        spills.clear()
        database = amberdb.DB(str(path))
        try:
            manager = transaction.TransactionManager()
            conn = database.open(transaction_manager=manager)
            root = conn.root()
            for i in range(6):
                root[f"box{i}"] = Box([i, "x" * (i * 7)])
            manager.savepoint()
            root["box2"].value = "changed after the first savepoint"
            manager.savepoint()
            (spill,) = spills
            size = spill.position
            if flip_at is not None and flip_at < size:
                byte = os.pread(spill._fd, 1, flip_at)
                os.pwrite(spill._fd, bytes([byte[0] ^ 0xFF]), flip_at)
            try:
                manager.commit()
                outcome = "committed"
            except CorruptedDataError as exc:
                assert "spill file" in str(exc), exc
                manager.abort()
                outcome = "refused"
            conn.close()
        finally:
            database.close()
        return outcome, size

    outcome, size = run(None)
    assert outcome == "committed" and read_state(path) == intended_state()
    assert 300 < size < 3000, size
    counts = {"committed": 0, "refused": 0}
    for pos in range(size):
        outcome, _ = run(pos)
        counts[outcome] += 1
        assert read_state(path) == (intended_state() if outcome == "committed" else before), pos
    assert counts["refused"] > size // 2, counts
