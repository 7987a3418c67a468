"""Power loss during a group's sync, durable marks and format version 3 (storage invariant I3).

A power loss while a group of transactions is being synced may persist a later transaction of
the group and not an earlier one.  None of them was acknowledged, and every one of them says
(its durable mark) that the damaged offset was not known durable when it was appended: an
open cuts the file there by itself.  Damage at an offset a later transaction knew durable is
corruption, refused as before.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest

from amberdb.exceptions import CorruptedDataError, POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage, verify
from amberdb.storage.file import format as fmt
from amberdb.utils import Oid, p64, z64

from .layout import transactions

META = TransactionMeta("tester", "power loss")


def _commit(fs: FileStorage, oid: Oid, record: bytes, base: bytes = z64) -> bytes:
    fs.begin(META)
    fs.store(oid, base, record)
    fs.vote()
    return fs.finish()


def _group_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, list[Oid]]:
    """The file as it is while the sync of a group of three transactions runs: a root
    committed before, then the three, all still ``v``."""
    path = tmp_path / "group.fs"
    fs = FileStorage(path)
    _commit(fs, z64, b"root")
    oids = [fs.new_oid() for _ in range(3)]
    real = os.fdatasync
    entered, release = threading.Event(), threading.Event()

    def held(fd: int) -> None:
        entered.set()
        release.wait(30)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    threads = []
    for n, oid in enumerate(oids):
        before = fs._append_end
        thread = threading.Thread(target=_commit, args=(fs, oid, b"rec%d" % n))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 30
        while fs._append_end == before and time.monotonic() < deadline:
            time.sleep(0.001)
        if n == 0:
            assert entered.wait(30)  # the first leads a sync that does not end yet
    image = path.read_bytes()
    release.set()
    for thread in threads:
        thread.join(30)
    fs.close()
    return image, oids


def _damage(data: bytearray, pos: int, h: fmt.TxnHeader) -> None:
    """Zeros over the body of the transaction at ``pos`` (pages that never reached the disk)."""
    start = pos + fmt.TXN_HEADER.size
    data[start : pos + h.length - fmt.TXN_TRAILER.size] = bytes(
        h.length - fmt.TXN_HEADER.size - fmt.TXN_TRAILER.size
    )


def test_group_shares_one_durable_mark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image, _ = _group_image(tmp_path, monkeypatch)
    txns = transactions(image)
    root_pos, group = txns[0][0], txns[1:]
    assert [h.status for _, h in group] == [b"v"] * 3
    first = group[0][0]
    for pos, h in txns:
        assert h.flags == fmt.FLAG_DURABLE_MARK
        (mark,) = fmt.DURABLE_MARK.unpack_from(image, pos + fmt.TXN_HEADER.size + h.info_len)
        # Appended while the first one's sync ran: durable only below the group.
        assert mark == (fmt.FILE_HEADER.size if pos == root_pos else first)


@pytest.mark.parametrize("damaged", [0, 1])
def test_power_loss_inside_a_group_cuts_its_unacknowledged_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damaged: int
) -> None:
    """I3: damage inside a group followed by valid members of it opens by itself, cut exactly there."""
    image, oids = _group_image(tmp_path, monkeypatch)
    monkeypatch.undo()
    group = transactions(image)[1:]
    cut, h = group[damaged]
    data = bytearray(image)
    _damage(data, cut, h)
    path = tmp_path / "lost.fs"
    path.write_bytes(data)
    report = verify(path)
    assert report.ok and any("torn tail" in note and f"offset {cut}" in note for note in report.notes), str(
        report
    )
    with FileStorage(path, read_only=True) as reader:  # no writer alive: the tail is left out
        assert reader.get_size() == cut
    assert path.read_bytes() == bytes(data)
    with FileStorage(path) as fs:
        assert fs.load(z64)[0] == b"root"
        for n, oid in enumerate(oids):
            if n < damaged:
                assert fs.load(oid)[0] == b"rec%d" % n  # the earlier `v` one is committed
            else:
                with pytest.raises(POSKeyError):
                    fs.load(oid)
        assert fs.get_size() == cut
        _commit(fs, oids[-1], b"again")
    assert os.path.getsize(path) > cut
    with FileStorage(path) as fs:
        assert fs.load(oids[-1])[0] == b"again"
    assert verify(path).ok


def test_a_finished_member_proves_the_group_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """I3: a later member marked ``c`` ran its finish, so its vote returned after a sync
    covering the damage: corruption, refused."""
    image, _ = _group_image(tmp_path, monkeypatch)
    monkeypatch.undo()
    group = transactions(image)[1:]
    data = bytearray(image)
    _damage(data, *group[1])
    data[group[2][0] + fmt.STATUS_OFFSET] = ord("c")
    path = tmp_path / "corrupt.fs"
    path.write_bytes(data)
    with pytest.raises(CorruptedDataError) as caught:
        FileStorage(path)
    assert caught.value.offset == group[1][0] and caught.value.path == str(path)
    assert path.read_bytes() == bytes(data)


def test_damage_known_durable_by_a_later_transaction_is_refused(tmp_path: Path) -> None:
    """I3: one commit after the other, each later one knew the earlier durable: damage in the
    middle is corruption (CorruptedDataError naming file and offset), nothing is cut."""
    path = tmp_path / "data.fs"
    with FileStorage(path) as fs:
        _commit(fs, z64, b"root")
        oid = fs.new_oid()
        _commit(fs, oid, b"one")
        _commit(fs, fs.new_oid(), b"two")
    os.unlink(str(path) + ".index")  # as after a crash: the open scans everything
    data = bytearray(path.read_bytes())
    pos, h = transactions(bytes(data))[1]
    _damage(data, pos, h)
    path.write_bytes(data)
    for read_only in (False, True):
        with pytest.raises(CorruptedDataError, match=f"{path} is damaged at offset {pos}") as caught:
            FileStorage(path, read_only=read_only)
        assert caught.value.offset == pos and "followed by a valid transaction" in str(caught.value)
    assert path.read_bytes() == bytes(data)


def _version2_file(path: Path, items: list[tuple[bytes, Oid, bytes]]) -> None:
    """A data file as AmberDB wrote it before format version 3: no durable marks."""
    file_id = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    crc0 = zlib.crc32(file_id)
    out = bytearray(fmt.encode_file_header(file_id, version=2))
    for tid, oid, record in items:
        checked = fmt.DATA_HEADER_FIELDS.pack(oid, tid, 0, len(record))
        body = b"ud" + checked + struct.pack(">I", fmt.record_checksum(crc0, checked, record)) + record
        length = fmt.TXN_HEADER.size + len(body) + fmt.TXN_TRAILER.size
        header = fmt.encode_txn_header(tid, length, fmt.STATUS_COMMITTED, 1, 1, 0, 1)
        trailer = fmt.TXN_TRAILER.pack(length, fmt.txn_checksum(crc0, body, header), fmt.TRAILER_MAGIC)
        out += header + body + trailer
    path.write_bytes(out)


def test_version2_files_open_and_are_upgraded_on_the_first_writable_open(tmp_path: Path) -> None:
    path = tmp_path / "old.fs"
    _version2_file(path, [(p64(1), z64, b"root"), (p64(2), p64(1), b"one")])
    original = path.read_bytes()
    assert verify(path).ok
    with FileStorage(path, read_only=True) as reader:
        assert reader.load(p64(1)) == (b"one", p64(2))
        assert [t.tid for t in reader.iterator()] == [p64(1), p64(2)]
    assert path.read_bytes() == original  # a reader changes nothing
    with FileStorage(path) as fs:
        assert path.read_bytes()[:8] == fmt.FILE_MAGIC  # upgraded before anything is written
        assert fmt.file_header_crc_ok(path.read_bytes()[:32])
        tid = _commit(fs, p64(1), b"two", base=p64(2))
    data = path.read_bytes()
    assert data[32 : len(original)] == original[32:]  # the old transactions stay as they are
    with FileStorage(path) as fs:
        assert fs.load(p64(1)) == (b"two", tid)
        assert fs.load(p64(1), before=tid) == (b"one", p64(2))
        assert fs.load(z64)[0] == b"root"
    assert verify(path).ok


def test_version2_damage_followed_by_a_valid_transaction_is_refused(tmp_path: Path) -> None:
    """Transactions without a durable mark prove nothing: refused as before version 3."""
    path = tmp_path / "old.fs"
    _version2_file(path, [(p64(1), z64, b"root"), (p64(2), p64(1), b"one"), (p64(3), p64(2), b"two")])
    data = bytearray(path.read_bytes())
    pos, h = transactions(bytes(data))[1]
    _damage(data, pos, h)
    path.write_bytes(data)
    with pytest.raises(CorruptedDataError) as caught:
        FileStorage(path)
    assert caught.value.offset == pos
    assert path.read_bytes() == bytes(data)  # not even upgraded
