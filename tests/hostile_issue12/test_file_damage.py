"""Bytes flipped under an open FileStorage: undo_log, history and iterator(start=...) must
raise CorruptedDataError (naming the file and an offset) or give exactly the original answers.

The damage is made after the open (bit rot, another program), so the open's scan does not
see it: only the verification of the history calls stands between the flip and the user.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from amberdb.exceptions import CorruptedDataError, POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.utils import p64, z64


def _commit(storage: FileStorage, writes: dict[bytes, bytes], meta: TransactionMeta) -> bytes:
    storage.begin(meta)
    for oid, record in writes.items():
        try:
            base = storage.load(oid)[1]
        except POSKeyError:
            base = z64
        storage.store(oid, base, record)
    storage.vote()
    return storage.finish()


def _build(path: Path) -> tuple[list[bytes], list[int]]:
    """A small file: 8 transactions over 3 oids, with unicode metadata; the offsets where
    each transaction starts (and the file's end last)."""
    storage = FileStorage(path)
    tids, offsets = [], []
    for i in range(8):
        offsets.append(storage.get_size())
        writes = {p64(1 + (i % 3)): f"rec {i} ".encode() * (i + 1)}
        if i % 2:
            writes[p64(1 + ((i + 1) % 3))] = b"x" * i
        meta = TransactionMeta(user=f"usér{i}", description=f"désc ✓ {i}", extension=b'{"n": %d}' % i)
        tids.append(_commit(storage, writes, meta))
    offsets.append(storage.get_size())
    storage.close()
    return tids, offsets


def _answers(storage: FileStorage, tids: list[bytes]) -> dict[str, Any]:
    return {
        "log": storage.undo_log(0, 100),
        "log_mid": storage.undo_log(2, -3),
        "history": [storage.history(p64(oid), 100) for oid in (1, 2, 3)],
        "iter": list(storage.iterator()),
        "iter_start": [list(storage.iterator(start=tid)) for tid in tids[3:]],
        "iter_range": list(storage.iterator(tids[2], tids[5])),
    }


_CALLS = {
    "log": lambda s, tids: s.undo_log(0, 100),
    "log_mid": lambda s, tids: s.undo_log(2, -3),
    "history": lambda s, tids: [s.history(p64(oid), 100) for oid in (1, 2, 3)],
    "iter": lambda s, tids: list(s.iterator()),
    "iter_start": lambda s, tids: [list(s.iterator(start=tid)) for tid in tids[3:]],
    "iter_range": lambda s, tids: list(s.iterator(tids[2], tids[5])),
}


@pytest.mark.parametrize("mask", [0x01, 0xFF])  # 0x01 always lowers the 0x6b.. top tid byte
def test_every_flipped_byte_is_caught_or_harmless(tmp_path: Path, mask: int) -> None:
    path = tmp_path / "data.fs"
    tids, offsets = _build(path)
    storage = FileStorage(path, read_only=True)
    try:
        original = _answers(storage, tids)
        fd = os.open(path, os.O_RDWR)
        wrong: list[str] = []
        try:
            for pos in range(offsets[0], offsets[-1]):
                (byte,) = os.pread(fd, 1, pos)
                os.pwrite(fd, bytes([byte ^ mask]), pos)
                try:
                    for name, call in _CALLS.items():
                        try:
                            got = call(storage, tids)
                        except CorruptedDataError as exc:
                            assert exc.path == str(path), exc
                            assert exc.offset is not None, exc
                            assert str(path) in str(exc)
                            continue
                        if got != original[name]:
                            wrong.append(f"byte {pos} ^ {mask:#x}: {name} answered differently")
                finally:
                    os.pwrite(fd, bytes([byte]), pos)
        finally:
            os.close(fd)
        assert wrong == []
        assert _answers(storage, tids) == original
    finally:
        storage.close()


def test_history_and_log_of_a_file_reopened_from_its_index_agree(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    tids, _ = _build(path)
    with FileStorage(path, read_only=True) as storage:
        first = _answers(storage, tids)
    assert (tmp_path / "data.fs.index").exists()
    with FileStorage(path) as storage:
        assert _answers(storage, tids) == first
    os.unlink(tmp_path / "data.fs.index")
    with FileStorage(path) as storage:
        assert _answers(storage, tids) == first
    assert [info.meta.user for info in first["log"]] == [f"usér{i}" for i in range(7, -1, -1)]
    assert first["log"][0].meta.description == "désc ✓ 7"


def test_damaged_trailer_length_of_the_newest_transaction(tmp_path: Path) -> None:
    """The trailer length of the last transaction points at an earlier, valid transaction
    start: the walk back must not silently skip the transactions in between (a call that
    never reads that trailer may answer, but only with the original answer)."""
    path = tmp_path / "data.fs"
    tids, offsets = _build(path)
    storage = FileStorage(path, read_only=True)
    try:
        original = _answers(storage, tids)
        fd = os.open(path, os.O_RDWR)
        try:
            end = offsets[-1]
            # Make the trailer claim the last transaction starts where the 3rd-last does.
            fake = (end - offsets[-4]).to_bytes(8, "big")
            os.pwrite(fd, fake, end - 16)
        finally:
            os.close(fd)
        for name, call in _CALLS.items():
            try:
                got = call(storage, tids)
            except CorruptedDataError:
                continue
            assert got == original[name], f"{name} answered differently"
        with pytest.raises(CorruptedDataError):
            storage.undo_log()
    finally:
        storage.close()


def test_history_names_an_offset_inside_the_file_when_a_later_record_length_is_damaged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data.fs"
    storage = FileStorage(path)
    _commit(storage, {p64(1): b"one", p64(2): b"two"}, TransactionMeta(description="both"))
    size = storage.get_size()
    storage.close()
    # The layout: file header (32), transaction header (32), metadata ("both"), the durable
    # mark (8, format version 3), then the data record of oid 1 (32-byte header + 3 bytes),
    # then oid 2's header: its length field is at bytes 24..28 of that header.
    second = 32 + 32 + len("both") + 8 + 32 + 3
    with open(path, "r+b") as f:
        f.seek(second)
        assert f.read(8) == p64(2)
    storage = FileStorage(path, read_only=True)
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"\x01", second + 25)  # length 3 becomes 0x010003
        finally:
            os.close(fd)
        with pytest.raises(CorruptedDataError) as caught:
            storage.history(p64(1))
        assert caught.value.path == str(path)
        assert caught.value.offset is not None and 32 <= caught.value.offset < size, caught.value
    finally:
        storage.close()


@pytest.mark.parametrize("k", [2, 6], ids=["forward-walk", "backward-walk"])
def test_iterator_start_never_silently_skips_the_transaction_at_start(tmp_path: Path, k: int) -> None:
    path = tmp_path / "data.fs"
    tids, offsets = _build(path)
    storage = FileStorage(path, read_only=True)
    try:
        expected = list(storage.iterator(start=tids[k]))
        assert expected[0].tid == tids[k]
        # Lower transaction k's tid to just above its predecessor's: still in order, but its
        # checksum no longer matches.
        lowered = (int.from_bytes(tids[k - 1], "big") + 1).to_bytes(8, "big")
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, lowered, offsets[k])
        finally:
            os.close(fd)
        try:
            got = list(storage.iterator(start=tids[k]))
        except CorruptedDataError:
            return
        assert [txn.tid for txn in got] == [txn.tid for txn in expected], (
            f"transaction {k} was skipped silently"
        )
    finally:
        storage.close()
