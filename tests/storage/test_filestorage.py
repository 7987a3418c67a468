"""FileStorage specifics: on-disk format, index file, lock, read-only, foreign files, fsync."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from amberdb.exceptions import (
    CorruptedDataError,
    FileFormatError,
    ReadOnlyError,
    StorageError,
    StorageLockedError,
)
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.file import format as fmt
from amberdb.storage.file import storage as storage_module
from amberdb.utils import p64, z64

from .conftest import commit

META = TransactionMeta()


def fill(path: Path, n: int = 5, **kwargs: object) -> list[bytes]:
    """Commit ``n`` transactions of two objects each; return their tids."""
    tids = []
    with FileStorage(path, **kwargs) as fs:  # type: ignore[arg-type]
        for i in range(n):
            tids.append(commit(fs, {p64(2 * i + 1): (z64, b"a%d" % i), p64(2 * i + 2): (z64, b"b%d" % i)}))
    return tids


def check_filled(fs: FileStorage, tids: list[bytes]) -> None:
    for i, tid in enumerate(tids):
        assert fs.load(p64(2 * i + 1)) == (b"a%d" % i, tid)
        assert fs.load(p64(2 * i + 2)) == (b"b%d" % i, tid)
    assert fs.last_tid() == tids[-1]
    assert len(fs) == 2 * len(tids)


# -- the format table ----------------------------------------------------------------------------


def _struct_fields(st: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of each field of a big-endian struct; '8s' and '16x' count as one field."""
    fields = []
    offset = 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", st.format.lstrip("<>!=@")):
        n = int(count or 1)
        if code in "sx":
            fields.append((offset, n))
            offset += n
        else:
            size = struct.calcsize(">" + code)
            for _ in range(n):
                fields.append((offset, size))
                offset += size
    assert offset == st.size
    return fields


def _doc_tables() -> dict[str, tuple[int, list[tuple[int, int]]]]:
    """The byte tables of format.py's docstring: name -> (stated size, [(offset, size)])."""
    tables: dict[str, tuple[int, list[tuple[int, int]]]] = {}
    current: list[tuple[int, int]] | None = None
    assert fmt.__doc__
    for line in fmt.__doc__.splitlines():
        title = re.search(r"\(``(\w+)``, (\d+) bytes\)", line)
        if title:
            current = []
            tables[title.group(1)] = (int(title.group(2)), current)
            continue
        row = re.match(r"\s+(\d+)\s+(\d+)\s+\S", line)
        if row and current is not None:
            current.append((int(row.group(1)), int(row.group(2))))
    return tables


def test_format_constants_match_docstring_tables() -> None:
    tables = _doc_tables()
    assert set(tables) == {"FILE_HEADER", "TXN_HEADER", "DATA_HEADER", "TXN_TRAILER", "INDEX_HEADER"}
    for name, (size, rows) in tables.items():
        st = getattr(fmt, name)
        assert st.size == size, name
        assert _struct_fields(st) == rows, name
    assert fmt.DATA_HEADER_INTS.size == fmt.DATA_HEADER.size == fmt.DATA_HEADER_FIELDS.size + 4
    assert fmt.STATUS_OFFSET == 16
    assert len(fmt.FILE_MAGIC) == len(fmt.INDEX_MAGIC) == 8


def test_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    with FileStorage(path) as fs:
        tid = commit(fs, {z64: (z64, b"root")}, TransactionMeta("me", "why", b"{}"))
    data = path.read_bytes()
    assert data[:8] == fmt.FILE_MAGIC == b"AMBERFS\x03"
    magic, file_id, packed_tid, header_crc = fmt.FILE_HEADER.unpack_from(data)
    assert packed_tid == z64  # never packed
    assert header_crc == zlib.crc32(data[:28])
    h = fmt.decode_txn_header(data, fmt.FILE_HEADER.size)
    assert (h.tid, h.status, h.user_len, h.desc_len, h.ext_len, h.records) == (tid, b"c", 2, 3, 2, 1)
    assert h.flags == fmt.FLAG_DURABLE_MARK and h.meta_len == 7 + 8
    assert fmt.FILE_HEADER.size + h.length == len(data)
    pos = fmt.FILE_HEADER.size + fmt.TXN_HEADER.size
    assert data[pos : pos + 7] == b"mewhy{}"
    # The durable mark (I3): the file was synced up to its first transaction when it was appended.
    assert fmt.DURABLE_MARK.unpack_from(data, pos + 7) == (fmt.FILE_HEADER.size,)
    pos += 8
    oid, rtid, back, rlen, rcrc = fmt.DATA_HEADER.unpack_from(data, pos + 7)
    assert (oid, rtid, back, rlen) == (z64, tid, 0, 4)
    record_at = pos + 7 + fmt.DATA_HEADER.size
    assert data[record_at : record_at + 4] == b"root"
    assert rcrc == zlib.crc32(b"root", zlib.crc32(data[pos + 7 : pos + 7 + 28], zlib.crc32(file_id)))
    length, crc, magic = fmt.TXN_TRAILER.unpack_from(data, len(data) - fmt.TXN_TRAILER.size)
    assert (length, magic) == (h.length, fmt.TRAILER_MAGIC)
    header = data[fmt.FILE_HEADER.size : fmt.FILE_HEADER.size + fmt.TXN_HEADER.size]
    body = data[fmt.FILE_HEADER.size + fmt.TXN_HEADER.size : len(data) - fmt.TXN_TRAILER.size]
    assert crc == fmt.txn_checksum(zlib.crc32(file_id), body, header)
    # The status byte is left out of the checksum: finish turns v into c without a sync.
    without_status = header[:16] + header[17:]
    assert crc == zlib.crc32(without_status, zlib.crc32(body, zlib.crc32(file_id)))


def test_back_pointers_chain_revisions(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    with FileStorage(path) as fs:
        t1 = commit(fs, {z64: (z64, b"one")})
        t2 = commit(fs, {z64: (t1, b"two")})
        t3 = commit(fs, {z64: (t2, b"three")})
        assert fs.load(z64, before=t3) == (b"two", t2)
        assert fs.load(z64, before=t2) == (b"one", t1)


# -- opening: new, foreign, empty ---------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.fs"
    with pytest.raises(StorageError, match="nope.fs"):
        FileStorage(path, read_only=True)
    with pytest.raises(StorageError, match="nope.fs"):
        FileStorage(path, create=False)
    assert list(tmp_path.iterdir()) == []
    with FileStorage(path) as fs:
        assert fs.name == str(path)
        assert len(fs) == 0
    assert path.read_bytes()[:8] == fmt.FILE_MAGIC


@pytest.mark.parametrize(
    "content", [b"hello", b"not an amberdb file at all" * 100, b"AMBERFS\x02" + bytes(100)]
)
@pytest.mark.parametrize("read_only", [False, True])
def test_foreign_file_untouched(tmp_path: Path, content: bytes, read_only: bool) -> None:
    path = tmp_path / "foreign.fs"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match="foreign.fs"):
        FileStorage(path, read_only=read_only)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.fs"]


def test_zero_length_file_is_new(tmp_path: Path) -> None:
    path = tmp_path / "empty.fs"
    path.write_bytes(b"")
    with FileStorage(path, read_only=True) as ro:
        assert len(ro) == 0
        assert list(ro.iterator()) == []
    with FileStorage(path) as fs:
        tid = commit(fs, {z64: (z64, b"x")})
    with FileStorage(path) as fs:
        assert fs.load(z64) == (b"x", tid)


def test_half_written_header_is_new(tmp_path: Path) -> None:
    path = tmp_path / "half.fs"
    path.write_bytes(fmt.FILE_MAGIC[:5])
    with FileStorage(path) as fs:
        commit(fs, {z64: (z64, b"x")})
    assert path.read_bytes()[:8] == fmt.FILE_MAGIC


# -- the index file ------------------------------------------------------------------------------


@pytest.fixture
def scan_starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record where each open starts scanning (FILE_HEADER.size means a full rebuild)."""
    starts: list[int] = []
    real = storage_module.scan  # type: ignore[attr-defined]

    def spy(fd: int, name: str, crc: int, start: int, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        starts.append(start)
        return real(fd, name, crc, start, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(storage_module, "scan", spy)
    return starts


def test_index_saved_and_used(tmp_path: Path, scan_starts: list[int]) -> None:
    path = tmp_path / "data.fs"
    tids = fill(path)
    assert Path(str(path) + ".index").exists()
    assert not Path(str(path) + ".index.tmp").exists()
    with FileStorage(path) as fs:
        check_filled(fs, tids)
        assert fs.new_oid() == p64(11)
    assert scan_starts[-1] == path.stat().st_size  # nothing left to scan


def test_new_oid_counter_survives_clean_close(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    with FileStorage(path) as fs:
        for _ in range(10):
            fs.new_oid()
    with FileStorage(path) as fs:
        assert fs.new_oid() == p64(11)


def test_stale_index_scans_forward(tmp_path: Path, scan_starts: list[int]) -> None:
    path = tmp_path / "data.fs"
    index = Path(str(path) + ".index")
    tids = fill(path, 3)
    old = index.read_bytes()
    covered = path.stat().st_size
    with FileStorage(path) as fs:
        for i in range(3, 6):
            tids.append(commit(fs, {p64(2 * i + 1): (z64, b"a%d" % i), p64(2 * i + 2): (z64, b"b%d" % i)}))
    index.write_bytes(old)
    with FileStorage(path) as fs:
        check_filled(fs, tids)
    assert scan_starts[-1] == covered


@pytest.mark.parametrize(
    "damage", ["missing", "garbage", "flipped", "truncated", "other_file", "old_version"]
)
def test_bad_index_rebuilt(tmp_path: Path, scan_starts: list[int], damage: str) -> None:
    """I6: an index that fails its own checks, or belongs to another file, is ignored."""
    path = tmp_path / "data.fs"
    index = Path(str(path) + ".index")
    tids = fill(path)
    data = bytearray(index.read_bytes())
    if damage == "missing":
        index.unlink()
    elif damage == "garbage":
        index.write_bytes(b"garbage" * 20)
    elif damage == "flipped":
        data[len(data) // 2] ^= 0xFF
        index.write_bytes(data)
    elif damage == "truncated":
        index.write_bytes(data[:-8])
    elif damage == "other_file":
        # A valid index of a different file with the same history length.
        other = tmp_path / "other.fs"
        fill(other)
        shutil.copy(str(other) + ".index", index)
    elif damage == "old_version":
        data[7] = 1
        index.write_bytes(data)
    with FileStorage(path) as fs:
        check_filled(fs, tids)
    assert scan_starts[-1] == fmt.FILE_HEADER.size


@pytest.mark.parametrize(
    "forgery", ["huge_array", "overflow_in_array", "impossible_count", "extra_byte", "no_entries", "empty"]
)
def test_index_with_a_valid_crc_but_bad_entries_is_ignored(
    tmp_path: Path, scan_starts: list[int], forgery: str
) -> None:
    """I6: entries that make no sense are refused even under a matching CRC (a forged index)."""
    path = tmp_path / "data.fs"
    index = Path(str(path) + ".index")
    tids = fill(path)
    raw = index.read_bytes()
    h = fmt.decode_index_header(raw[: fmt.INDEX_HEADER.size], raw[fmt.INDEX_HEADER.size :])
    payload = bytearray(raw[fmt.INDEX_HEADER.size :])
    magic, dense_len, overflow_len, count = struct.unpack_from("<8sQQQ", payload)
    if forgery == "huge_array":  # would allocate 8 TB if believed
        struct.pack_into("<8sQQQ", payload, 0, magic, 1 << 40, overflow_len, count)
    elif forgery == "overflow_in_array":
        struct.pack_into("<8sQQQ", payload, 0, magic, dense_len, 1, count + 1)
        payload += struct.pack("<qq", 0, 1234)
    elif forgery == "impossible_count":
        struct.pack_into("<8sQQQ", payload, 0, magic, dense_len, overflow_len, dense_len + 1)
    elif forgery == "extra_byte":
        payload += b"\0"
    elif forgery == "no_entries":
        payload = bytearray()
    if forgery == "empty":
        index.write_bytes(b"")
    else:
        header = fmt.encode_index_header(h.file_id, h.position, h.last_tid, h.next_oid, bytes(payload))
        index.write_bytes(header + payload)
    with FileStorage(path) as fs:
        check_filled(fs, tids)
    assert scan_starts[-1] == fmt.FILE_HEADER.size


def test_index_reserved_bytes_are_checked(tmp_path: Path, scan_starts: list[int]) -> None:
    """I6: the index CRC covers every header byte, the reserved ones too."""
    path = tmp_path / "data.fs"
    index = Path(str(path) + ".index")
    tids = fill(path)
    data = bytearray(index.read_bytes())
    data[41] ^= 1
    index.write_bytes(data)
    with FileStorage(path) as fs:
        check_filled(fs, tids)
    assert scan_starts[-1] == fmt.FILE_HEADER.size


@pytest.mark.parametrize("read_only", [False, True])
def test_data_file_older_than_its_index_is_an_error(tmp_path: Path, read_only: bool) -> None:
    """I6: a valid index of this file describing more than the file holds: refuse, change nothing."""
    path = tmp_path / "data.fs"
    fill(path)
    backup = path.read_bytes()
    with FileStorage(path) as fs:
        commit(fs, {z64: (z64, b"later")})
    path.write_bytes(backup)  # the data file restored from a backup, its newer index left
    index_bytes = Path(str(path) + ".index").read_bytes()
    expected = r"data\.fs disagrees with its index file .*data\.fs\.index"
    with pytest.raises(CorruptedDataError, match=expected) as info:
        FileStorage(path, read_only=read_only)
    message = str(info.value)
    assert f"data file is {len(backup)} bytes long" in message
    assert "deleting the index file is right only" in message and "salvage=True" in message
    assert path.read_bytes() == backup
    assert Path(str(path) + ".index").read_bytes() == index_bytes
    with FileStorage(path, read_only=True, salvage=True) as salvaged:  # salvage ignores the index
        assert salvaged.damage is None
        assert len(salvaged) == 10


def test_index_naming_another_transaction_is_an_error(tmp_path: Path) -> None:
    """I6: same file id and position, but another transaction ends there: the file was replaced."""
    path = tmp_path / "data.fs"
    tids = fill(path, 2)
    base = path.read_bytes()
    index = Path(str(path) + ".index")
    with FileStorage(path) as fs:
        commit(fs, {z64: (z64, b"first")})
    first_index = index.read_bytes()
    path.write_bytes(base)
    index.unlink()
    with FileStorage(path) as fs:
        tids.append(commit(fs, {z64: (z64, b"other")}))
    index.write_bytes(first_index)
    with pytest.raises(CorruptedDataError, match=r"the transaction at offset \d+ ending there has tid"):
        FileStorage(path)
    index.unlink()  # what the message says to do when the data file was replaced on purpose
    with FileStorage(path) as fs:
        assert fs.load(z64) == (b"other", tids[-1])


# -- lock ----------------------------------------------------------------------------------------


def test_second_writer_locked_out(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    fs = FileStorage(path)
    try:
        pid_line, end_line = Path(str(path) + ".lock").read_text().splitlines()
        assert pid_line.strip() == str(os.getpid())
        assert int(end_line[:16], 16) == 32  # the committed end readers may rely on
        with pytest.raises(StorageLockedError, match=rf"data\.fs.*pid {os.getpid()}"):
            FileStorage(path)
        with FileStorage(path, read_only=True) as ro:
            assert len(ro) == 0
    finally:
        fs.close()
    FileStorage(path).close()


def test_new_writer_hides_the_previous_writers_end(tmp_path: Path) -> None:
    """I9: until a new writer publishes its own end, readers find none (not a stale one)."""
    from amberdb.storage.file import locking

    path = str(tmp_path / "data.fs")
    fd = locking.acquire_writer_lock(path)
    locking.publish_end(fd, 1 << 40)  # what a writer that died after a big commit left
    os.close(fd)
    with open(path + ".lock", "ab") as f:
        f.write(b"trailing junk a reader never looks at\n")
    assert locking.published_end(path) == 1 << 40
    fd = locking.acquire_writer_lock(path)
    try:
        assert locking.published_end(path) is None
        assert Path(path + ".lock").read_bytes().split(b"\n")[0].strip() == str(os.getpid()).encode()
        locking.publish_end(fd, 32)
        assert locking.published_end(path) == 32
    finally:
        os.close(fd)


def test_lock_held_by_other_process(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    code = textwrap.dedent(
        f"""
        import sys
        from amberdb.storage.file import FileStorage
        fs = FileStorage({str(path)!r})
        print("ready", flush=True)
        sys.stdin.readline()
        fs.close()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with pytest.raises(StorageLockedError, match=rf"pid {proc.pid}"):
            FileStorage(path)
    finally:
        proc.communicate("\n", timeout=30)
    FileStorage(path).close()


# -- read-only -----------------------------------------------------------------------------------


def test_read_only_sees_file_as_of_open(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    tids = fill(path, 2)
    index_before = Path(str(path) + ".index").read_bytes()
    with FileStorage(path) as writer:
        ro = FileStorage(path, read_only=True)
        try:
            later = commit(writer, {z64: (z64, b"later")})
            check_filled(ro, tids)
            assert ro.last_tid() == tids[-1]
            assert [t.tid for t in ro.iterator()] == tids
            with pytest.raises(ReadOnlyError):
                ro.begin(META)
            with pytest.raises(ReadOnlyError):
                ro.new_oid()
        finally:
            ro.close()
        # A read-only close must not have written the index.
        assert Path(str(path) + ".index").read_bytes() == index_before
    with FileStorage(path, read_only=True) as ro:
        assert ro.load(z64) == (b"later", later)


def test_read_only_does_not_truncate_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    tids = fill(path, 2)
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x01" * 50)
    with FileStorage(path, read_only=True) as ro:
        check_filled(ro, tids)
    assert path.stat().st_size == good + 50
    with FileStorage(path) as fs:
        check_filled(fs, tids)
    assert path.stat().st_size == good


# -- writing: syscalls, durability, big transactions --------------------------------------------


class Counter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls = 0
        real = getattr(os, name)

        def wrapper(*args: object) -> object:
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(os, name, wrapper)


def test_small_commit_is_one_write_one_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FileStorage(tmp_path / "data.fs") as fs:
        t1 = commit(fs, {z64: (z64, b"x")})
        writes = Counter(monkeypatch, "pwrite")
        syncs = Counter(monkeypatch, "fdatasync")
        reads = Counter(monkeypatch, "pread")
        commit(fs, {z64: (t1, b"y" * 200), p64(1): (z64, b"z")})
        # vote writes the transaction as voted and syncs; finish writes one byte, unsynced
        # (I4), and the new committed end into the lock file for readers (I9)
        assert (writes.calls, syncs.calls) == (3, 1)
        assert reads.calls == 1  # the conflict check of the one existing object
        reads.calls = 0
        fs.load(z64)
        fs.load(z64)
        assert reads.calls == 0  # loads read through the memory map: no system call


def test_fsync_false_skips_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.fs"
    syncs = Counter(monkeypatch, "fdatasync")
    with FileStorage(path, fsync=False) as fs:
        tids = [
            commit(fs, {p64(2 * i + 1): (z64, b"a%d" % i), p64(2 * i + 2): (z64, b"b%d" % i)})
            for i in range(3)
        ]
        assert syncs.calls == 0
    with FileStorage(path) as fs:
        check_filled(fs, tids)
    assert syncs.calls == 0  # fsync=True only syncs in vote (and abort after vote)


def test_large_transaction_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.fs"
    big = os.urandom(3 << 20)
    records = {p64(i + 1): os.urandom(50_000) for i in range(60)}
    with FileStorage(path) as fs:
        t1 = commit(fs, {z64: (z64, b"root")})
        size = path.stat().st_size
        fs.begin(META)
        for oid, record in records.items():
            fs.store(oid, z64, record)
        fs.store(p64(100), z64, big)
        # Written out already, but invisible: the header is still the zero placeholder.
        assert path.stat().st_size > size + (3 << 20)
        assert fs.load(z64) == (b"root", t1)
        fs.abort()
        assert path.stat().st_size == size
        fs.begin(META)
        for oid, record in records.items():
            fs.store(oid, z64, record)
        fs.store(p64(100), z64, big)
        fs.store(z64, t1, b"root2")
        fs.vote()
        t2 = fs.finish()
        assert fs.load(p64(100)) == (big, t2)
    for index in (True, False):
        if not index:
            os.unlink(str(path) + ".index")
        with FileStorage(path) as fs:
            assert fs.load(p64(100)) == (big, t2)
            assert fs.load(z64) == (b"root2", t2)
            for oid, record in records.items():
                assert fs.load(oid) == (record, t2)
            (_, txn) = list(fs.iterator())
            assert len(txn.records) == 62


def test_large_transaction_torn_before_vote_ignored(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    with FileStorage(path) as fs:
        t1 = commit(fs, {z64: (z64, b"root")})
        size = path.stat().st_size
    fs = FileStorage(path)
    fs.begin(META)
    fs.store(p64(1), z64, os.urandom(2 << 20))
    # Simulate a crash: copy the file while the streamed, unvoted bytes are in it.
    crashed = path.read_bytes()
    fs.abort()
    fs.close()
    assert len(crashed) > size + (2 << 20)
    path.write_bytes(crashed)
    os.unlink(str(path) + ".index")
    with FileStorage(path) as fs:
        assert fs.load(z64) == (b"root", t1)
        assert len(fs) == 1
    assert path.stat().st_size == size


def test_unicode_meta_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    meta = TransactionMeta(user="ünï", description="日本語 description", extension=b'{"a": 1}')
    with FileStorage(path) as fs:
        commit(fs, {z64: (z64, b"x")}, meta)
    with FileStorage(path) as fs:
        assert next(iter(fs.iterator())).meta == meta


def test_loads_stay_correct_after_the_map_releases_its_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading far more than the release threshold drops mapped pages from the resident
    # set again and again; every load must still return exactly what was stored.
    monkeypatch.setattr(storage_module, "_RELEASE_AFTER", 256 << 10)
    releases: list[int] = []
    release = FileStorage._release_pages

    def counting(self: FileStorage) -> None:
        releases.append(1)
        release(self)

    monkeypatch.setattr(FileStorage, "_release_pages", counting)
    records = {p64(i): bytes([i % 251]) * (20_000 + i) for i in range(1, 101)}
    with FileStorage(tmp_path / "big.fs") as fs:
        commit(fs, {oid: (z64, record) for oid, record in records.items()})
        for _ in range(3):
            for oid, record in records.items():
                assert fs.load(oid)[0] == record
    assert len(releases) >= 10


def test_a_big_transaction_is_indexed_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Past the limit, finish() reads the records' headers back instead of keeping them.
    monkeypatch.setattr(storage_module, "_PENDING_LIMIT", 7)
    monkeypatch.setattr(storage_module, "_RELEASE_AFTER", 1 << 30)
    path = tmp_path / "big.fs"
    records = {p64(i): (z64, b"r%d-" % i + b"x" * (i * 37 % 5000)) for i in range(1, 400)}
    with FileStorage(path) as fs:
        first = commit(fs, records)
        second = commit(fs, {p64(5): (first, b"five again"), p64(400): (z64, b"new")})
        assert len(fs) == 400
        for oid, (_, record) in records.items():
            if oid != p64(5):
                assert fs.load(oid) == (record, first)
        assert fs.load(p64(5)) == (b"five again", second)
        assert fs.load(p64(5), second) == (records[p64(5)][1], first)
    with FileStorage(path) as fs:  # the saved index agrees with the file
        assert fs.load(p64(399)) == (records[p64(399)][1], first)


def test_failing_to_index_a_durable_transaction_stops_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "_PENDING_LIMIT", 1)

    def unreadable(*args: object, **kwargs: object) -> None:
        raise OSError("disk went away")

    path = tmp_path / "broken.fs"
    fs = FileStorage(path)
    monkeypatch.setattr(storage_module, "index_transaction", unreadable)
    with pytest.raises(OSError, match="disk went away"):
        commit(fs, {p64(1): (z64, b"one"), p64(2): (z64, b"two")})
    with pytest.raises(StorageError, match="failed an I/O operation"):
        fs.begin(TransactionMeta())
    fs.close()
    monkeypatch.undo()
    with FileStorage(path) as reopened:  # the durable transaction is there
        assert reopened.load(p64(2))[0] == b"two"


def test_writer_stops_when_another_process_wrote_to_its_file(tmp_path: Path) -> None:
    """I7/I9: a deleted lock file lets a second writer in; the first must not overwrite its commit."""
    path = tmp_path / "data.fs"
    first = FileStorage(path)
    try:
        t1 = commit(first, {z64: (z64, b"first writer")})
        os.unlink(str(path) + ".lock")
        script = (
            "import sys; from amberdb.storage.file import FileStorage; from amberdb.storage.base import"
            " TransactionMeta; from amberdb.utils import p64, z64\n"
            "fs = FileStorage(sys.argv[1]); fs.begin(TransactionMeta()); fs.store(p64(9), z64, b'second');"
            " fs.vote(); fs.finish(); fs.close()"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60, env=env)
        with pytest.raises(StorageError, match="changed under its writer"):
            commit(first, {z64: (t1, b"would overwrite the second writer's commit")})
    finally:
        first.close()
    os.unlink(str(path) + ".index")  # the second writer's; the first saved none, being broken
    with FileStorage(path, read_only=True) as fs:
        assert fs.load(p64(9))[0] == b"second"
