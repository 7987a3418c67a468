"""Read-only openers next to a writer (I9): they see finished transactions only, and nothing of an abort."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amberdb.exceptions import CorruptedDataError, POSKeyError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage, verify
from amberdb.storage.file import format as fmt
from amberdb.utils import p64, z64

from .conftest import commit
from .layout import transactions

META = TransactionMeta()


def test_reader_leaves_out_a_live_writers_voted_transaction(tmp_path: Path) -> None:
    """Defect 5: a reader opening during a vote that is then aborted never sees its data."""
    path = tmp_path / "data.fs"
    with FileStorage(path) as writer:
        t1 = commit(writer, {z64: (z64, b"committed")})
        writer.begin(META)
        writer.store(z64, t1, b"voted, then aborted")
        writer.store(p64(7), z64, os.urandom(3 * fmt.DATA_HEADER.size * 1000))
        writer.vote()
        with FileStorage(path, read_only=True) as reader:  # the writer's lock is held: it is alive
            assert reader.last_tid() == t1
            assert reader.load(z64) == (b"committed", t1)
            with pytest.raises(POSKeyError):
                reader.load(p64(7))
            writer.abort()  # truncate, sync
            assert reader.load(z64) == (b"committed", t1)
            assert [t.tid for t in reader.iterator()] == [t1]
        t2 = commit(writer, {z64: (t1, b"finished")})
        with FileStorage(path, read_only=True) as reader:
            assert reader.load(z64) == (b"finished", t2)


def test_reader_sees_a_finished_transaction_of_a_live_writer(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    with FileStorage(path) as writer:
        t1 = commit(writer, {z64: (z64, b"one")})
        writer.begin(META)
        writer.store(z64, t1, b"two")
        writer.vote()
        t2 = writer.finish()  # `c` is in the page cache, synced or not
        with FileStorage(path, read_only=True) as reader:
            assert reader.load(z64) == (b"two", t2)


def crash_image_after_vote(path: Path) -> tuple[bytes, bytes, int]:
    """The file as a crash right after vote leaves it: (bytes, tid of the committed one, voted offset)."""
    with FileStorage(path) as writer:
        t1 = commit(writer, {z64: (z64, b"one")})
        writer.begin(META)
        writer.store(z64, t1, b"two")
        writer.vote()
        image = path.read_bytes()
        writer.abort()
    os.unlink(str(path) + ".index")
    voted_at = transactions(image)[-1][0]
    assert image[voted_at + fmt.STATUS_OFFSET : voted_at + fmt.STATUS_OFFSET + 1] == fmt.STATUS_VOTED
    return image, t1, voted_at


def test_voted_tail_without_a_writer_is_committed(tmp_path: Path) -> None:
    """I4: nobody can abort a voted transaction once its writer is gone."""
    path = tmp_path / "data.fs"
    image, t1, voted_at = crash_image_after_vote(path)
    path.write_bytes(image)
    with FileStorage(path, read_only=True) as reader:
        record, tid = reader.load(z64)
        assert record == b"two" and tid > t1
    assert path.read_bytes() == image  # a reader changes nothing
    with FileStorage(path) as writer:  # marks it finished, and syncs
        assert writer.load(z64) == (b"two", tid)
    assert path.read_bytes()[voted_at + fmt.STATUS_OFFSET] == ord("c")


def test_reader_without_lock_file_treats_voted_tail_as_committed(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    image, _, _ = crash_image_after_vote(path)
    path.write_bytes(image)
    os.unlink(str(path) + ".lock")
    with FileStorage(path, read_only=True) as reader:
        assert reader.load(z64)[0] == b"two"
    assert not Path(str(path) + ".lock").exists()  # a reader never creates it


def test_reader_leaves_out_damage_at_the_end_while_a_writer_is_alive(tmp_path: Path) -> None:
    """I9: bytes at the end that fail a check may be the live writer's transaction in flight."""
    path = tmp_path / "data.fs"
    with FileStorage(path) as writer:
        t1 = commit(writer, {z64: (z64, b"one")})
        good = path.stat().st_size
        # What a reader may see while vote's write is still copying: a header, then garbage.
        header = fmt.encode_txn_header(b"\x7f" * 8, 200, fmt.STATUS_VOTED, 0, 0, 0, 1)
        in_flight = header + b"\x01" * 168
        with open(path, "r+b") as f:
            f.seek(good)
            f.write(in_flight)
        with FileStorage(path, read_only=True) as reader:
            assert reader.load(z64) == (b"one", t1)
        report = verify(path)
        assert report.ok and any("live writer" in note for note in report.notes), str(report)
        os.ftruncate(writer._fd, good)  # keep the writer's own file tidy before it closes
    with open(path, "ab") as f:
        f.write(in_flight)
    with pytest.raises(CorruptedDataError, match=rf"offset {good}\b"):  # no writer: it is damage
        FileStorage(path, read_only=True)
    assert [p.offset for p in verify(path).problems] == [good]


def test_damage_below_a_live_writers_committed_end_is_an_error(tmp_path: Path) -> None:
    """I9: a live writer never writes below its published end, so damage there is damage.

    A reader used to take any damage as the writer's transaction in flight, and silently
    served the snapshot before it.
    """
    path = tmp_path / "data.fs"
    with FileStorage(path) as writer:
        tids = [commit(writer, {z64: (tid, b"value %d" % i)}) for i, tid in enumerate([z64])]
        for i in range(1, 10):
            tids.append(commit(writer, {z64: (tids[-1], b"value %d" % i)}))
        middle = transactions(path.read_bytes())[5][0]
        with open(path, "r+b") as f:
            f.seek(middle + 40)
            byte = f.read(1)
            f.seek(middle + 40)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(CorruptedDataError, match=f"offset {middle}"):
            FileStorage(path, read_only=True)
