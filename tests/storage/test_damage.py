"""Damaged data files: every open refuses or every load checks; nothing is cut, nothing wrong is returned.

Each test names the storage.py invariant it checks (I3: only proven torn tails are cut,
I6: index and data file agree, I10: loads verify).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amberdb.exceptions import CorruptedDataError, FileFormatError, POSKeyError, ReadOnlyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage, verify
from amberdb.storage.file import format as fmt
from amberdb.storage.offsets import OffsetIndex
from amberdb.utils import p64, z64

from .conftest import commit
from .layout import records, reseal_transaction, rewrite_record_header, transactions

META = TransactionMeta()


def build(path: Path) -> list[bytes]:
    """Five transactions; oid 1 has a revision in each, oid 2 in the first, oid k+2 in the k-th."""
    tids: list[bytes] = []
    with FileStorage(path) as fs:
        base = z64
        for i in range(5):
            items = {p64(1): (base, b"one, revision %d" % i), p64(i + 2): (z64, b"object %d" % (i + 2))}
            base = commit(fs, items, TransactionMeta("user", f"txn {i}"))
            tids.append(base)
    return tids


def check_all(fs: FileStorage, tids: list[bytes]) -> None:
    for i, tid in enumerate(tids):
        assert fs.load(p64(i + 2)) == (b"object %d" % (i + 2), tid)
        assert fs.load(p64(1), p64(int.from_bytes(tid, "big") + 1)) == (b"one, revision %d" % i, tid)
    assert fs.load(p64(1)) == (b"one, revision 4", tids[-1])
    assert [t.tid for t in fs.iterator()] == tids


def test_flipped_header_bit_is_an_error_in_every_mode(tmp_path: Path) -> None:
    """I3 (defect 1): any bit of the file header flipped: no open recreates or truncates anything."""
    path = tmp_path / "data.fs"
    build(path)
    good = path.read_bytes()
    index = Path(str(path) + ".index")
    for _ in ("with its index", "without"):
        for pos in range(fmt.FILE_HEADER.size):
            for bit in range(8):
                damaged = bytearray(good)
                damaged[pos] ^= 1 << bit
                path.write_bytes(damaged)
                for read_only in (False, True):
                    with pytest.raises(FileFormatError, match=r"data\.fs"):
                        FileStorage(path, read_only=read_only)
                assert path.read_bytes() == damaged
        index.unlink(missing_ok=True)


def test_flipped_file_id_says_where_and_how_to_recover(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    build(path)
    damaged = bytearray(path.read_bytes())
    damaged[9] ^= 4
    path.write_bytes(damaged)
    with pytest.raises(CorruptedDataError) as info:
        FileStorage(path)
    error = info.value
    assert (error.path, error.offset) == (str(path), 0)
    message = str(error)
    assert "data.fs is damaged at offset 0: file header checksum mismatch" in message
    assert "salvage=True" in message and "verify(path)" in message and "backup" in message
    with FileStorage(path, read_only=True, salvage=True) as salvaged:
        # Salvage trusts the stored file id; it is what changed, so no transaction verifies.
        assert salvaged.damage is not None and salvaged.damage.offset == 0
        assert len(salvaged) == 0


def test_unsupported_format_version_is_named(tmp_path: Path) -> None:
    path = tmp_path / "old.fs"
    path.write_bytes(b"AMBERFS\x01" + os.urandom(8) + bytes(16) + bytes(200))
    for read_only in (False, True):
        with pytest.raises(FileFormatError, match=r"old\.fs is an AmberDB file storage of format version 1"):
            FileStorage(path, read_only=read_only)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.fs"]


@pytest.mark.parametrize("with_index", [True, False])
def test_flipped_tid_of_last_transaction_is_an_error(tmp_path: Path, with_index: bool) -> None:
    """I3, I6 (defect 2): a committed last transaction that fails a check is never truncated."""
    path = tmp_path / "data.fs"
    build(path)
    if not with_index:
        os.unlink(str(path) + ".index")
    last, _ = transactions(path.read_bytes())[-1]
    for bit in range(64):
        damaged = bytearray(path.read_bytes())
        damaged[last + bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(damaged)
        for read_only in (False, True):
            with pytest.raises(CorruptedDataError, match=rf"data\.fs .*offset {last}\b"):
                FileStorage(path, read_only=read_only)
        assert path.read_bytes() == damaged
        damaged[last + bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(damaged)


def test_changed_record_byte_fails_the_load(tmp_path: Path) -> None:
    """I10 (defect 3): with the index trusted, a damaged record is caught by its checksum."""
    path = tmp_path / "data.fs"
    tids = build(path)
    good = path.read_bytes()
    target = next(r for r in records(good) if r.oid == p64(3))  # in the second transaction
    for pos in range(target.offset, target.record_start + target.length):
        damaged = bytearray(good)
        damaged[pos] ^= 0xFF
        path.write_bytes(damaged)
        with FileStorage(path) as fs:  # the index is valid: the open trusts the prefix
            with pytest.raises(CorruptedDataError) as info:
                fs.load(p64(3))
            assert (info.value.offset, info.value.oid) == (target.offset, p64(3))
            assert f"data.fs is damaged at offset {target.offset} (oid 0x3)" in str(info.value)
            assert fs.load(p64(2)) == (b"object 2", tids[0])  # the rest reads on
            with pytest.raises(CorruptedDataError, match=rf"offset {target.txn}\b"):
                list(fs.iterator())  # the transaction checksum covers the record too
        assert path.read_bytes() == damaged


@pytest.mark.timeout(30)
def test_back_pointer_cycle_is_an_error_not_a_loop(tmp_path: Path) -> None:
    """I10 (defect 6): back pointers must strictly decrease, even with checksums patched to match."""
    path = tmp_path / "data.fs"
    tids = build(path)
    good = path.read_bytes()
    revisions = [r for r in records(good) if r.oid == p64(1)]
    newest, older = revisions[-1], revisions[1]
    for at, back in [(newest, newest.offset), (older, newest.offset), (newest, revisions[-2].offset + 1)]:
        damaged = bytearray(good)
        rewrite_record_header(damaged, at, back=back)
        path.write_bytes(damaged)
        with (
            FileStorage(path, read_only=True) as fs,  # the index is trusted, loads check
            pytest.raises(CorruptedDataError, match=r"data\.fs is damaged .*oid 0x1"),
        ):
            for tid in tids:
                fs.load(p64(1), tid)


@pytest.mark.parametrize(("oid", "back"), [(p64(2**63), None), (None, 10**9)])
def test_checksummed_records_that_cannot_be_are_refused(
    tmp_path: Path, oid: bytes | None, back: int | None
) -> None:
    """A transaction whose checksums match but whose records are impossible: refused, salvaged before."""
    path = tmp_path / "data.fs"
    tids = build(path)
    os.unlink(str(path) + ".index")
    data = bytearray(path.read_bytes())
    target = records(bytes(data))[4]  # in the third transaction
    rewrite_record_header(data, target, back=target.back if back is None else back, oid=oid)
    reseal_transaction(data, target.txn)
    path.write_bytes(data)
    with pytest.raises(CorruptedDataError, match=rf"offset {target.txn}\b: its data record at offset"):
        FileStorage(path)
    with FileStorage(path, read_only=True, salvage=True) as salvaged:
        assert salvaged.damage is not None and salvaged.damage.offset == target.txn
        assert salvaged.last_tid() == tids[1]
    assert not verify(path).ok


def test_load_stays_below_the_committed_end(tmp_path: Path) -> None:
    """I9, I10: an index entry pointing past the end (index checksum intact) is an error."""
    path = tmp_path / "data.fs"
    build(path)
    data = path.read_bytes()
    index_path = Path(str(path) + ".index")
    raw = index_path.read_bytes()
    h = fmt.decode_index_header(raw[: fmt.INDEX_HEADER.size], raw[fmt.INDEX_HEADER.size :])
    for bogus in (len(data) - 10, len(data) + 4096, 5, fmt.FILE_HEADER.size):
        entries = OffsetIndex.from_bytes(raw[fmt.INDEX_HEADER.size :])
        entries[2] = bogus
        payload = entries.to_bytes()
        index_path.write_bytes(
            fmt.encode_index_header(h.file_id, h.position, h.last_tid, h.next_oid, payload) + payload
        )
        with FileStorage(path, read_only=True) as fs, pytest.raises(CorruptedDataError, match=r"oid 0x2"):
            fs.load(p64(2))


def test_salvage_reads_the_transactions_before_the_damage(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    tids = build(path)
    os.unlink(str(path) + ".index")
    damaged = bytearray(path.read_bytes())
    third, _ = transactions(bytes(damaged))[2]
    damaged[third + 40] ^= 0x10
    path.write_bytes(damaged)
    with pytest.raises(CorruptedDataError, match=rf"offset {third}\b.*followed by a valid transaction"):
        FileStorage(path)
    with pytest.raises(ValueError, match="read_only"):
        FileStorage(path, salvage=True)
    with FileStorage(path, read_only=True, salvage=True) as salvaged:
        assert salvaged.damage is not None and salvaged.damage.offset == third
        assert f"offset {third}" in repr(salvaged)
        assert salvaged.last_tid() == tids[1]
        assert salvaged.load(p64(1)) == (b"one, revision 1", tids[1])
        with pytest.raises(POSKeyError):
            salvaged.load(p64(4))
        assert [t.tid for t in salvaged.iterator()] == tids[:2]
        with pytest.raises(ReadOnlyError):
            salvaged.begin(META)
    assert path.read_bytes() == damaged


def test_salvage_of_an_intact_file_reports_no_damage(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    tids = build(path)
    with FileStorage(path, read_only=True, salvage=True) as fs:
        assert fs.damage is None
        check_all(fs, tids)


def test_verify_an_intact_file(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    build(path)
    report = verify(path)
    assert report.ok, str(report)
    assert (report.transactions, report.records, report.end) == (5, 10, path.stat().st_size)
    assert report.notes == []
    assert "OK; 5 transactions, 10 data records" in str(report)


def test_verify_lists_every_problem_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    build(path)
    data = bytearray(path.read_bytes())
    all_records = records(bytes(data))
    first = all_records[1]
    data[first.record_start] ^= 1  # a record byte: its checksum and its transaction's fail
    last = all_records[-1]
    rewrite_record_header(data, last, back=all_records[2].offset)  # a wrong but checksummed pointer
    reseal_transaction(data, last.txn)
    path.write_bytes(data)
    index_before = Path(str(path) + ".index").read_bytes()
    report = verify(path)
    assert not report.ok
    problems = [(p.file, p.offset) for p in report.problems]
    txns = [pos for pos, _ in transactions(bytes(data))]
    assert ("data", txns[0]) in problems  # the damaged transaction, followed by valid ones
    assert ("data", last.offset) in problems  # the back pointer that skips revisions
    assert any("points back at" in p.what for p in report.problems)
    assert path.read_bytes() == data
    assert Path(str(path) + ".index").read_bytes() == index_before


def test_verify_notes_a_torn_tail_and_a_bad_index(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    build(path)
    index = Path(str(path) + ".index")
    index.write_bytes(index.read_bytes()[:-3])
    with open(path, "ab") as f:
        f.write(b"\x07" * 40)
    report = verify(path)
    assert report.ok, str(report)
    assert any("torn tail of 40 bytes" in note for note in report.notes)
    assert any("index file" in note and "invalid" in note for note in report.notes)


def test_verify_finds_an_index_that_contradicts_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    build(path)
    backup = path.read_bytes()
    with FileStorage(path) as fs:
        commit(fs, {p64(50): (z64, b"later")})
    path.write_bytes(backup)
    report = verify(path)
    assert [p.file for p in report.problems] == ["index"]


@pytest.mark.parametrize("size", [0, 1, 8, 31])
def test_data_file_cut_below_its_header_beside_an_intact_index_is_an_error(tmp_path: Path, size: int) -> None:
    """I6: an index is written at a clean close; a data file shorter than a header beside it was cut.

    Such a file used to be taken for one whose creation a crash cut short: it started afresh,
    and closing it replaced the index, the last evidence.
    """
    path = tmp_path / "data.fs"
    build(path)
    index = Path(str(path) + ".index").read_bytes()
    os.truncate(path, size)
    for read_only in (False, True):
        with pytest.raises(CorruptedDataError, match="shorter than its header"):
            FileStorage(path, read_only=read_only)
    assert path.stat().st_size == size
    assert Path(str(path) + ".index").read_bytes() == index
    report = verify(path)
    assert not report.ok and "shorter than its header" in report.problems[0].what


@pytest.mark.parametrize("offset", range(7))
def test_damaged_magic_is_damage_not_a_foreign_file(tmp_path: Path, offset: int) -> None:
    """A flipped byte of the magic: the rest of the header still checks out, so it is ours."""
    path = tmp_path / "data.fs"
    tids = build(path)
    os.unlink(str(path) + ".index")
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CorruptedDataError, match="magic is damaged"):
        FileStorage(path)
    with FileStorage(path, read_only=True, salvage=True) as salvaged:
        check_all(salvaged, tids)  # every transaction behind the header is still there
        assert salvaged.damage is not None and salvaged.damage.offset == 0
    report = verify(path)
    assert not report.ok and report.transactions == len(tids)
