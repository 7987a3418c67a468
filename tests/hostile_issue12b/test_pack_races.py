"""FileStorage.pack (I13) against hostile records, suspended readers, closes and streams."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from amberdb.exceptions import POSKeyError, StorageError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.file import storage as storage_module
from amberdb.storage.file.verify import verify
from amberdb.utils import p64, z64
from tests.storage.test_pack import Model, build, check, packed, rec

pytestmark = pytest.mark.timeout(120)

POINTS = ["scanned", "marked", "written", "copied", "synced", "replaced", "switched", "done"]


def snapshot(fs: FileStorage) -> list[tuple[bytes, TransactionMeta, dict[bytes, bytes]]]:
    return [(t.tid, t.meta, {r.oid: r.record for r in t.records}) for t in fs.iterator()]


@pytest.mark.parametrize(
    "refs",
    [
        [2**64 - 1],  # beyond MAX_OID: can never exist
        [2**63 - 1],
        [0, 0, 0],  # the root, from an object it refers to
        [7] * 500,  # itself, many times
    ],
    ids=["u64-max", "max-oid", "root-thrice", "self-500"],
)
def test_pack_with_hostile_reference_tables(tmp_path: Path, refs: list[int]) -> None:
    model = Model()
    with FileStorage(tmp_path / "data.fs") as fs:
        model.commit(fs, {0: rec([7], b"root"), 7: rec(refs, b"seven"), 8: rec([], b"garbage")})
        model.commit(fs, {7: rec(refs, b"seven2")})
        pack_tid = model.txns[-1].tid
        fs.pack(pack_tid)
        check(fs, packed(model.txns, pack_tid), gone={8})
    assert verify(str(tmp_path / "data.fs")).problems == []


def test_pack_at_z64_and_before_the_first_transaction_keeps_everything(tmp_path: Path) -> None:
    model = Model()
    with FileStorage(tmp_path / "data.fs") as fs:
        build(fs, model)
        before = snapshot(fs)
        fs.pack(z64)
        assert snapshot(fs) == before
        fs.pack(p64(int.from_bytes(model.txns[0].tid, "big") - 1))
        assert snapshot(fs) == before
        check(fs, model.txns)


def test_pack_twice_then_reopen_with_and_without_the_index(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        tids = build(fs, model)
        fs.pack(tids["t3"])
        fs.pack(tids["t3"])
        fs.pack(tids["t5"])
        expected = packed(packed(model.txns, tids["t3"]), tids["t5"])
        check(fs, expected)
        next_oid = fs.new_oid()
    assert os.path.exists(str(path) + ".index")
    with FileStorage(path) as fs:
        check(fs, expected)
        assert fs.new_oid() > next_oid  # oids handed out before are not handed out again
    os.unlink(str(path) + ".index")
    with FileStorage(path, read_only=True) as fs:
        check(fs, expected)


def test_an_iterator_suspended_across_a_pack_goes_on_with_the_history_it_began(tmp_path: Path) -> None:
    model = Model()
    with FileStorage(tmp_path / "data.fs") as fs:
        build(fs, model)
        for i in range(50):
            model.commit(fs, {0: rec([1], b"r%d" % i)})
        before = snapshot(fs)
        it = fs.iterator()
        first = [next(it) for _ in range(3)]
        log_it = iter(fs.undo_log(0, 1000))
        fs.pack(fs.last_tid())
        rest = list(it)
        seen = [(t.tid, t.meta, {r.oid: r.record for r in t.records}) for t in first + rest]
        assert seen == before
        assert [e.tid for e in log_it] == [t[0] for t in reversed(before)]


@pytest.mark.parametrize("reader", ["history", "undo_log", "iterator", "load_before"])
def test_history_readers_blocked_by_the_swap_see_one_whole_file(
    tmp_path: Path, reader: str, monkeypatch
) -> None:
    """A reader that starts while the pack holds ``_lock`` for the swap reads after it: the
    packed file, all of it -- never the old end with the new descriptor."""
    model = Model()
    with FileStorage(tmp_path / "data.fs") as fs:
        tids = build(fs, model)
        for i in range(30):
            model.commit(fs, {0: rec([1, 9], b"r%d" % i), 9: rec([], b"n%d" % i)})
        pack_tid = tids["t5"]
        expected = packed(model.txns, pack_tid)
        results: list[object] = []
        errors: list[BaseException] = []

        def read() -> None:
            try:
                if reader == "history":
                    results.append([r.tid for r in fs.history(p64(9), 100)])
                elif reader == "undo_log":
                    results.append([e.tid for e in fs.undo_log(0, 1000)])
                elif reader == "iterator":
                    results.append([t.tid for t in fs.iterator()])
                else:
                    results.append([fs.load(p64(9), before=t.tid)[1] for t in expected[-29:]])
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=read)

        def point(name: str) -> None:
            if name == "replaced":
                thread.start()  # blocks on _lock until the swap is done

        monkeypatch.setattr(storage_module, "_pack_point", point)
        fs.pack(pack_tid)
        thread.join(30)
        assert not errors, errors
        (got,) = results
        nines = [t.tid for t in expected if 9 in t.records]
        if reader == "history":
            assert got == list(reversed(nines))
        elif reader == "undo_log":
            assert got == [t.tid for t in reversed(expected) if t.tid > pack_tid]
        elif reader == "iterator":
            assert got == [t.tid for t in expected]
        else:
            assert got == nines[:-1] and len(got) == 29


@pytest.mark.parametrize("point", POINTS)
def test_loads_from_another_thread_at_every_step_of_a_pack(tmp_path: Path, point: str, monkeypatch) -> None:
    model = Model()
    with FileStorage(tmp_path / "data.fs") as fs:
        tids = build(fs, model)
        pack_tid = tids["t5"]
        expected = packed(model.txns, pack_tid)
        errors: list[BaseException] = []

        def loads() -> None:
            try:
                live = {oid for txn in expected for oid in txn.records}
                for txn in model.txns:
                    for oid in txn.records:
                        if oid not in live:
                            continue  # garbage: gone once the pack swaps the file
                        data, tid = fs.load(p64(oid))
                        assert (data, tid) == model.current(oid)
                        try:
                            old = fs.load(p64(oid), before=txn.tid)
                        except POSKeyError:
                            continue  # packed away, or created there
                        assert old[1] < txn.tid
            except BaseException as exc:
                errors.append(exc)

        def at(name: str) -> None:
            if name == point:
                thread = threading.Thread(target=loads)
                thread.start()
                if name != "replaced":  # _lock is held there: the loads wait for the swap
                    thread.join(30)
                else:
                    threads.append(thread)

        threads: list[threading.Thread] = []
        monkeypatch.setattr(storage_module, "_pack_point", at)
        fs.pack(pack_tid)
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        check(fs, expected)


@pytest.mark.parametrize("point", ["scanned", "copied", "synced", "switched", "done"])
def test_close_from_another_thread_during_a_pack_loses_nothing(
    tmp_path: Path, point: str, monkeypatch
) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    fs = FileStorage(path)
    tids = build(fs, model)
    pack_tid = tids["t5"]

    def at(name: str) -> None:
        if name == point:
            closer = threading.Thread(target=fs.close)
            closer.start()
            closer.join(30)
            assert not closer.is_alive()

    monkeypatch.setattr(storage_module, "_pack_point", at)
    try:
        fs.pack(pack_tid)
    except StorageError:
        pass  # closed under it: refused, or done -- both fine
    fs.close()
    assert not os.path.exists(str(path) + ".pack")
    assert verify(str(path)).problems == []
    with FileStorage(path) as again:
        try:
            check(again, model.txns)
        except AssertionError:
            check(again, packed(model.txns, pack_tid))
        again.begin(TransactionMeta())
        again.store(p64(1), again.load(p64(1))[1], rec([], b"after"))
        again.vote()
        again.finish()


def test_a_streamed_transaction_in_progress_during_the_pack_is_kept(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        tids = build(fs, model)
        pack_tid = tids["t6"]
        expected = packed(model.txns, pack_tid)
        big = rec([], b"B" * (3 * storage_module.FLUSH_SIZE))
        streaming = threading.Event()
        go_on = threading.Event()
        done: list[bytes] = []
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                fs.begin(TransactionMeta(description="big"))
                fs.store(p64(50), z64, big)
                fs.store(p64(0), model.current(0)[1], rec([1, 50], b"root-big"))
                streaming.set()
                go_on.wait(30)
                fs.vote()
                done.append(fs.finish())
            except BaseException as exc:
                errors.append(exc)
                streaming.set()

        def at(name: str) -> None:
            if name == "copied":
                go_on.set()  # the pack takes the commit lock next: the stream finishes first

        monkeypatch.setattr(storage_module, "_pack_point", at)
        thread = threading.Thread(target=stream)
        thread.start()
        assert streaming.wait(30)
        assert os.path.getsize(path) > fs.get_size()  # streamed past the committed end
        fs.pack(pack_tid)
        thread.join(30)
        assert not errors, errors
        (tid,) = done
        assert fs.load(p64(50)) == (big, tid)
        assert fs.load(p64(0))[0] == rec([1, 50], b"root-big")
        assert [t.tid for t in fs.iterator()] == [t.tid for t in expected] + [tid]
    assert verify(str(path)).problems == []


def test_a_symlink_at_the_temporary_name_is_never_written_through(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"precious data\n")
    model = Model()
    with FileStorage(path) as fs:
        tids = build(fs, model)
        os.symlink(victim, str(path) + ".pack")
        try:
            fs.pack(tids["t6"])
        except OSError:
            pass
        assert victim.read_bytes() == b"precious data\n"
        assert os.path.isfile(path) and not os.path.islink(path)
        check(fs, packed(model.txns, tids["t6"]))


def _is_pack_file(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(".fs.pack")
    except OSError:
        return False


@pytest.mark.parametrize("where", ["pwrite", "fdatasync", "fsync"])
def test_disk_full_during_a_pack_loses_nothing_and_the_storage_goes_on(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    path = tmp_path / "data.fs"
    model = Model()
    fs = FileStorage(path)
    build(fs, model)
    for i in range(40):
        model.commit(fs, {0: rec([1, 9], b"r%d" % i), 9: rec([], b"x" * 20000)})
    real = getattr(os, where)
    calls = {"n": 0}

    def full(fd: int, *args: object) -> object:
        if _is_pack_file(fd):
            calls["n"] += 1
            if calls["n"] >= 2 or where != "pwrite":
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, *args)

    monkeypatch.setattr(os, where, full)
    with pytest.raises(OSError):
        fs.pack(fs.last_tid())
    monkeypatch.setattr(os, where, real)
    assert calls["n"] >= 1
    assert not os.path.exists(str(path) + ".pack")
    check(fs, model.txns)
    model.commit(fs, {9: rec([], b"after")})
    check(fs, model.txns)
    fs.pack(fs.last_tid())
    expected = packed(model.txns, fs.last_tid())
    check(fs, expected)
    fs.close()
    assert verify(str(path)).problems == []
    with FileStorage(path) as again:
        check(again, expected)
