"""Bad arguments and failing writes during a FileStorage commit: nothing half-written is ever committed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amberdb.exceptions import StorageError, StorageTransactionError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage, verify
from amberdb.storage.file import format as fmt
from amberdb.storage.file import storage as storage_module
from amberdb.utils import p64, z64

from .conftest import commit

META = TransactionMeta()


def reopen_without_index(path: Path) -> FileStorage:
    os.unlink(str(path) + ".index")
    return FileStorage(path)


@pytest.mark.parametrize(
    ("oid", "base", "record", "error"),
    [
        (p64(2**63), z64, b"x", ValueError),  # defect 4: beyond what the index can hold
        (p64(2**64 - 1), z64, b"x", ValueError),
        (b"\0" * 7, z64, b"x", ValueError),
        ("12345678", z64, b"x", ValueError),
        (p64(1), b"short", b"x", ValueError),
        (p64(1), z64, "not bytes", TypeError),
        (p64(1), z64, 12345, TypeError),
    ],
)
def test_invalid_store_leaves_the_transaction_usable(
    tmp_path: Path, oid: bytes, base: bytes, record: bytes, error: type[Exception]
) -> None:
    path = tmp_path / "data.fs"
    with FileStorage(path) as fs:
        t1 = commit(fs, {z64: (z64, b"root")})
        fs.begin(META)
        fs.store(p64(5), z64, b"before")
        with pytest.raises(error):
            fs.store(oid, base, record)
        fs.store(p64(6), z64, b"after")
        fs.vote()
        t2 = fs.finish()
    with reopen_without_index(path) as fs:
        assert fs.load(z64) == (b"root", t1)
        assert fs.load(p64(5)) == (b"before", t2)
        assert fs.load(p64(6)) == (b"after", t2)
        assert len(fs) == 3
    assert verify(path).ok


def test_largest_oid_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    with FileStorage(path) as fs:
        tid = commit(fs, {p64(2**63 - 1): (z64, b"top")})
    for _ in range(2):  # with its index, then without
        with FileStorage(path) as fs:
            assert fs.load(p64(2**63 - 1)) == (b"top", tid)
        os.unlink(str(path) + ".index")


def test_bytes_like_records_are_copied(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    with FileStorage(path) as fs:
        buffer = bytearray(b"mutable")
        fs.begin(META)
        fs.store(p64(1), z64, buffer)  # type: ignore[arg-type]
        fs.store(p64(2), z64, memoryview(b"view"))  # type: ignore[arg-type]
        buffer[:] = b"changed"
        fs.vote()
        tid = fs.finish()
        assert fs.load(p64(1)) == (b"mutable", tid)
        assert fs.load(p64(2)) == (b"view", tid)


def test_write_error_during_store_poisons_the_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after buffering began: vote refuses, abort cleans up, the next commit works."""
    monkeypatch.setattr(storage_module, "FLUSH_SIZE", 100)
    path = tmp_path / "data.fs"
    fs = FileStorage(path)
    t1 = commit(fs, {z64: (z64, b"root")})
    size = path.stat().st_size
    fs.begin(META)
    fs.store(p64(1), z64, b"a" * 150)  # streamed out
    real_pwrite = os.pwrite

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space"):
        fs.store(p64(2), z64, b"b" * 150)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    with pytest.raises(StorageTransactionError, match=r"vote\(\) after a failed write .*abort it"):
        fs.vote()
    with pytest.raises(StorageTransactionError, match="failed write"):
        fs.store(p64(3), z64, b"c")
    fs.abort()
    assert path.stat().st_size == size
    t2 = commit(fs, {p64(4): (z64, b"after")})
    fs.close()
    with reopen_without_index(path) as fs:
        assert fs.load(z64) == (b"root", t1)
        assert fs.load(p64(4)) == (b"after", t2)
        assert len(fs) == 2


def test_failed_sync_in_vote_breaks_the_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No retry after fdatasync failed: the kernel may have dropped the pages."""
    path = tmp_path / "data.fs"
    fs = FileStorage(path)
    t1 = commit(fs, {z64: (z64, b"root")})
    fs.begin(META)
    fs.store(p64(1), z64, b"never acknowledged")
    real = os.fdatasync
    calls: list[int] = []

    def failing(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError, match="Input/output"):
        fs.vote()
    fs.abort()  # truncates and syncs (that sync succeeds here)
    with pytest.raises(StorageError, match="failed an I/O operation; reopen it"):
        fs.begin(META)
    fs.close()
    monkeypatch.undo()
    with FileStorage(path) as reopened:  # no index was written for the broken storage
        assert reopened.load(z64) == (b"root", t1)
        assert len(reopened) == 1


def test_failed_finish_flip_keeps_the_durable_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """I4: the transaction is durable once voted; a failed one-byte flip only stops further writes."""
    path = tmp_path / "data.fs"
    fs = FileStorage(path)
    fs.begin(META)
    fs.store(p64(1), z64, b"durable")
    fs.vote()

    def failing(fd: int, data: bytes, offset: int) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pwrite", failing)
    tid = fs.finish()
    monkeypatch.undo()
    assert fs.load(p64(1)) == (b"durable", tid)
    with pytest.raises(StorageError, match="failed an I/O operation"):
        fs.begin(META)
    fs.close()
    with FileStorage(path, read_only=True) as ro:  # still `v` on disk, and no writer alive
        assert ro.load(p64(1)) == (b"durable", tid)
    with FileStorage(path) as rw:  # marks it finished
        assert rw.load(p64(1)) == (b"durable", tid)
    assert not any("voted" in note for note in verify(path).notes)


def test_new_oid_refuses_past_the_largest_oid(tmp_path: Path) -> None:
    """After oid 2**63-1 was stored there is no oid left: a StorageError, not an unusable one."""
    with FileStorage(tmp_path / "data.fs") as fs:
        fs.begin(TransactionMeta())
        fs.store(p64(fmt.MAX_OID), z64, b"the last oid")
        fs.vote()
        fs.finish()
        with pytest.raises(StorageError, match="used up its oids"):
            fs.new_oid()
