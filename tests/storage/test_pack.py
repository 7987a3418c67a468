"""I13: FileStorage.pack -- garbage collection, history, concurrency, crashes, followers.

The expected result of every pack comes from :func:`packed`, a direct transcription of the
rule (base invariant 8) over a list of committed transactions; :func:`check` compares a
storage with such a list revision by revision.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from amberdb.exceptions import POSKeyError, ReadOnlyError, StorageError, StorageTransactionError
from amberdb.record import encode_record, references
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.file import storage as storage_module
from amberdb.storage.file.format import FILE_HEADER, file_header_packed_tid
from amberdb.storage.file.verify import verify
from amberdb.utils import Tid, p64, u64, z64

from .pack_child import COMMIT_BASE, commit_record

CHILD = Path(__file__).with_name("pack_child.py")
pytestmark = pytest.mark.timeout(120)


def rec(refs: list[int], tag: bytes) -> bytes:
    return encode_record("t:Obj", [(p64(r), "t:Obj") for r in refs], tag)


@dataclass
class Txn:
    tid: Tid
    meta: TransactionMeta
    records: dict[int, bytes] = field(default_factory=dict)


class Model:
    """Committed transactions, oldest first, as the rule says the storage must hold them."""

    def __init__(self) -> None:
        self.txns: list[Txn] = []

    def current(self, oid: int) -> tuple[bytes, Tid] | None:
        for txn in reversed(self.txns):
            if oid in txn.records:
                return txn.records[oid], txn.tid
        return None

    def commit(self, fs: FileStorage, stores: dict[int, bytes], description: str = "") -> Tid:
        meta = TransactionMeta(user="tester", description=description, extension=b"{}")
        fs.begin(meta)
        for oid, record in stores.items():
            now = self.current(oid)
            fs.store(p64(oid), z64 if now is None else now[1], record)
        fs.vote()
        tid = fs.finish()
        self.txns.append(Txn(tid, meta, dict(stores)))
        return tid

    def oids(self) -> set[int]:
        return {oid for txn in self.txns for oid in txn.records}


def packed(txns: list[Txn], pack_tid: Tid) -> list[Txn]:
    """The rule of base invariant 8, applied to ``txns``.

    One addition: the newest transaction stays, emptied, when nothing of it is kept (a
    file must keep saying what its last tid is).
    """
    if not txns:
        return []
    pack_tid = min(pack_tid, txns[-1].tid)
    newest: dict[int, tuple[Tid, bytes]] = {}
    roots = {0}
    for txn in txns:
        for oid, record in txn.records.items():
            if txn.tid <= pack_tid:
                newest[oid] = (txn.tid, record)
            else:
                roots.add(oid)
                roots.update(u64(r) for r in references(record))
    live: set[int] = set()
    stack = list(roots)
    while stack:
        oid = stack.pop()
        if oid in live:
            continue
        live.add(oid)
        if oid in newest:
            stack.extend(u64(r) for r in references(newest[oid][1]))
    out = []
    for txn in txns:
        if txn.tid > pack_tid:
            out.append(txn)
            continue
        kept = {o: r for o, r in txn.records.items() if o in live and newest[o][0] == txn.tid}
        if kept or txn is txns[-1]:  # the newest stays, to keep the last tid (I8)
            out.append(Txn(txn.tid, txn.meta, kept))
    return out


def check(fs: FileStorage, txns: list[Txn], gone: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """``fs`` holds exactly the revisions of ``txns``; every oid of ``gone`` not among them
    raises POSKeyError."""
    revisions: dict[int, list[tuple[Tid, bytes]]] = {}
    for txn in txns:
        for oid, record in txn.records.items():
            revisions.setdefault(oid, []).append((txn.tid, record))
    assert len(fs) == len(revisions)
    for oid, revs in revisions.items():
        assert fs.load(p64(oid)) == (revs[-1][1], revs[-1][0])
        for tid, record in revs:
            assert fs.load(p64(oid), before=p64(u64(tid) + 1)) == (record, tid)
        with pytest.raises(POSKeyError):
            fs.load(p64(oid), before=revs[0][0])
    for oid in gone - revisions.keys():
        with pytest.raises(POSKeyError):
            fs.load(p64(oid))
    listed = [(t.tid, t.meta, {u64(r.oid): r.record for r in t.records}) for t in fs.iterator()]
    assert listed == [(t.tid, t.meta, t.records) for t in txns]


def build(fs: FileStorage, model: Model) -> dict[str, Tid]:
    """A small history: garbage, old revisions, a cycle, a sparse huge oid, an empty commit."""
    huge = 1 << 62
    tids = {}
    tids["t1"] = model.commit(
        fs,
        {
            0: rec([1, 2, huge], b"root1"),
            1: rec([], b"a1"),
            2: rec([3], b"b1"),
            3: rec([2], b"c1"),
            huge: rec([], b"h1"),
        },
        "first",
    )
    tids["t2"] = model.commit(fs, {1: rec([], b"a2"), 4: rec([], b"orphan")}, "second")
    tids["t3"] = model.commit(fs, {0: rec([1, huge], b"root3")}, "third")  # 2, 3 (a cycle), 4: garbage
    tids["t4"] = model.commit(fs, {}, "empty")
    tids["t5"] = model.commit(fs, {1: rec([5], b"a5"), 5: rec([], b"new5")}, "fifth")
    tids["t6"] = model.commit(fs, {1: rec([], b"a6")}, "sixth")
    return tids


def test_pack_drops_garbage_and_old_revisions(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        tids = build(fs, model)
        before_size, before_len = fs.size(), len(fs)
        check(fs, model.txns)
        calls: list[tuple[int, int]] = []
        fs.pack(tids["t4"], progress=lambda done, total: calls.append((done, total)))
        expected = packed(model.txns, tids["t4"])
        check(fs, expected, model.oids())
        assert len(fs) < before_len and fs.size() < before_size
        for gone in (2, 3, 4):
            with pytest.raises(POSKeyError):
                fs.load(p64(gone))
        # Older revisions are gone; everything after the pack time stays.
        with pytest.raises(POSKeyError):
            fs.load(p64(1), before=tids["t2"])
        assert fs.load(p64(1), before=tids["t5"]) == (rec([], b"a2"), tids["t2"])
        assert fs.packed_tid == tids["t4"]
        assert calls and calls[-1][0] == calls[-1][1]
        assert all(a[0] <= b[0] for a, b in pairwise(calls))
        # Commits go on, into the new file.
        model.txns = expected
        model.commit(fs, {6: rec([], b"after")})
        assert os.path.getsize(path) == fs.size()
    assert verify(str(path)).problems == []
    with FileStorage(path) as fs:
        check(fs, model.txns, model.oids() | {2, 3, 4})
        assert fs.packed_tid == tids["t4"]
    with FileStorage(path, read_only=True) as ro:
        check(ro, model.txns)


def test_pack_above_last_tid_and_newest_pack_time_wins(tmp_path: Path) -> None:
    model = Model()
    with FileStorage(tmp_path / "data.fs") as fs:
        assert fs.packed_tid is None
        fs.pack(p64(1 << 60))  # nothing committed: nothing to do
        assert fs.packed_tid is None
        tids = build(fs, model)
        fs.pack(p64((1 << 64) - 1))
        model.txns = packed(model.txns, tids["t6"])
        check(fs, model.txns)
        assert fs.packed_tid == tids["t6"]
        fs.pack(tids["t1"])  # an older time: nothing more to drop, the newer time stays
        check(fs, model.txns)
        assert fs.packed_tid == tids["t6"]
    header = (tmp_path / "data.fs").read_bytes()[: FILE_HEADER.size]
    assert file_header_packed_tid(header) == tids["t6"]


def test_pack_refusals(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        build(fs, model)
        with pytest.raises(TypeError):
            fs.pack(b"short")  # type: ignore[arg-type]
        fs.begin(TransactionMeta())
        with pytest.raises(StorageTransactionError):
            fs.pack(model.txns[-1].tid)
        fs.abort()
    with FileStorage(path, read_only=True) as ro, pytest.raises(ReadOnlyError):
        ro.pack(model.txns[-1].tid)
    with pytest.raises(StorageError):
        fs.pack(model.txns[-1].tid)


def test_stale_temp_file_is_never_the_data_file(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        build(fs, model)
    stale = tmp_path / "data.fs.pack"
    stale.write_bytes(b"half a pack")
    with FileStorage(path, read_only=True) as ro:
        check(ro, model.txns)
        assert stale.exists()  # a reader changes nothing
    with FileStorage(path) as fs:
        assert not stale.exists()
        check(fs, model.txns)


def _hook(monkeypatch: pytest.MonkeyPatch, at: str, action: Callable[[], None]) -> None:
    def hook(name: str) -> None:
        if name == at:
            action()

    monkeypatch.setattr(storage_module, "_pack_point", hook)


def test_keyboard_interrupt_from_progress_leaves_storage_as_before(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        build(fs, model)
        for i in range(300):  # enough bytes for a progress call before the end
            model.commit(fs, {100 + i: rec([], b"x" * 10_000)})

        def interrupt(done: int, total: int) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            fs.pack(model.txns[-1].tid, progress=interrupt)
        assert not (tmp_path / "data.fs.pack").exists()
        check(fs, model.txns)
        assert fs.packed_tid is None
        model.commit(fs, {1: rec([], b"still works")})
        check(fs, model.txns)
    with FileStorage(path) as fs:
        check(fs, model.txns)


@pytest.mark.parametrize("at", ["scanned", "marked", "written", "copied", "synced"])
def test_error_before_the_rename_leaves_storage_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        build(fs, model)

        def fail() -> None:
            raise OSError(5, "injected")

        _hook(monkeypatch, at, fail)
        with pytest.raises(OSError, match="injected"):
            fs.pack(model.txns[-1].tid)
        assert not (tmp_path / "data.fs.pack").exists()
        check(fs, model.txns)
        model.commit(fs, {1: rec([], b"goes on")})
    with FileStorage(path) as fs:
        check(fs, model.txns)


def test_error_after_the_rename_breaks_the_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        build(fs, model)

        def fail() -> None:
            raise OSError(5, "injected")

        _hook(monkeypatch, "replaced", fail)
        with pytest.raises(OSError, match="injected"):
            fs.pack(model.txns[-1].tid)
        with pytest.raises(StorageError):
            fs.begin(TransactionMeta())  # never into the unlinked old inode
    with FileStorage(path) as fs:
        check(fs, packed(model.txns, model.txns[-1].tid), model.oids())


def test_commits_and_loads_during_a_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        build(fs, model)
        for i in range(200):
            model.commit(fs, {0: rec([1, 100 + i], b"root%d" % i), 100 + i: rec([], b"v%d" % i)})
        pack_tid = model.txns[-1].tid
        expected = packed(model.txns, pack_tid)
        acked: list[tuple[int, bytes, Tid]] = []
        stop = threading.Event()
        errors: list[BaseException] = []

        def commits() -> None:
            other = Model()
            other.txns = list(model.txns)
            i = 0
            try:
                while not stop.is_set():
                    oid = COMMIT_BASE + i
                    tid = other.commit(fs, {oid: commit_record(i)})
                    acked.append((oid, commit_record(i), tid))
                    i += 1
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def loads() -> None:
            try:
                while not stop.is_set():
                    assert fs.load(p64(1))[0] == rec([], b"a6")
                    assert fs.load(p64(0))[0] == rec([1, 299], b"root199")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def wait_for_commits(n: int) -> Callable[[], None]:
            def action() -> None:
                goal = len(acked) + n
                deadline = time.monotonic() + 10
                while len(acked) < goal and time.monotonic() < deadline:
                    time.sleep(0.001)

            return action

        # Commits land while each phase runs: before the copy, and between the bulk's sync
        # and the switch-over (so both the lock-free catch-up and the locked tail copy run).
        waits = {"marked": wait_for_commits(20), "copied": wait_for_commits(20)}
        monkeypatch.setattr(storage_module, "_pack_point", lambda name: waits.get(name, lambda: None)())
        threads = [threading.Thread(target=commits), threading.Thread(target=loads)]
        for t in threads:
            t.start()
        try:
            fs.pack(pack_tid)
            wait_for_commits(10)()
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors
        assert len(acked) >= 50
        for oid, record, tid in acked:
            assert fs.load(p64(oid)) == (record, tid)
        txns = expected + [Txn(tid, TransactionMeta("tester", "", b"{}"), {oid: r}) for oid, r, tid in acked]
        check(fs, txns)
    assert verify(str(path)).problems == []
    with FileStorage(path) as fs:
        check(fs, txns)


def test_commit_relinking_garbage_makes_the_pack_start_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        tids = build(fs, model)
        pack_tid = tids["t6"]
        marks: list[str] = []

        def interfere(name: str) -> None:
            marks.append(name)
            if name == "marked" and marks.count("marked") == 1:
                # A snapshot older than the pack still held 2 (garbage now) and links it
                # back from the root; 2 refers to 3 in turn.
                model.commit(fs, {0: rec([1, 2], b"relinked")})

        monkeypatch.setattr(storage_module, "_pack_point", interfere)
        fs.pack(pack_tid)
        assert marks.count("marked") == 2 and marks.count("done") == 1
        expected = packed(model.txns, pack_tid)
        assert {2, 3} <= {oid for txn in expected for oid in txn.records}
        check(fs, expected, model.oids())
        assert fs.load(p64(3))[0] == rec([2], b"c1")
        with pytest.raises(POSKeyError):
            fs.load(p64(4))
    assert verify(str(path)).problems == []


def test_commit_writing_garbage_makes_the_pack_start_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Model()
    with FileStorage(tmp_path / "data.fs") as fs:
        tids = build(fs, model)
        seen = []

        def interfere(name: str) -> None:
            if name == "copied" and not seen:
                seen.append(name)
                model.commit(fs, {4: rec([], b"orphan again")})  # writes a garbage object

        monkeypatch.setattr(storage_module, "_pack_point", interfere)
        fs.pack(tids["t6"])
        expected = packed(model.txns, tids["t6"])
        check(fs, expected, model.oids())
        assert fs.load(p64(4), before=model.txns[-1].tid) == (rec([], b"orphan"), tids["t2"])


def test_pack_gives_up_when_commits_keep_relinking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        tids = build(fs, model)
        # Many garbage objects, each linked back by a commit made while one attempt runs.
        garbage = list(range(1000, 1010))
        model.commit(fs, {g: rec([], b"g") for g in garbage})
        model.commit(fs, {0: rec([1], b"root again")})
        attempts = iter(garbage)
        monkeypatch.setattr(
            storage_module,
            "_pack_point",
            lambda name: model.commit(fs, {0: rec([1, next(attempts)], b"r")}) if name == "marked" else None,
        )
        with pytest.raises(StorageError, match="re-linking"):
            fs.pack(model.txns[-1].tid)
        assert not (tmp_path / "data.fs.pack").exists()
        monkeypatch.setattr(storage_module, "_pack_point", lambda name: None)
        check(fs, model.txns)
        assert fs.packed_tid is None and tids
        model.commit(fs, {1: rec([], b"fine")})
    with FileStorage(path) as fs:
        check(fs, model.txns)


# -- crashes -------------------------------------------------------------------------------


def _prepare(path: Path, objects: int = 300) -> tuple[Model, Tid]:
    model = Model()
    with FileStorage(path) as fs:
        build(fs, model)
        rng = random.Random(7)
        for i in range(objects):
            refs = [rng.randrange(100, 100 + objects) for _ in range(2)]
            model.commit(fs, {100 + i: rec(refs, b"o%d" % i + b"." * 2000)})
            if i % 3 == 0:
                model.commit(fs, {0: rec([1, 100 + i], b"root%d" % i)})
    return model, model.txns[-1].tid


def _run_child(args: list[str], kill_after: float | None = None) -> tuple[list[str], int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    head = []
    if kill_after is not None:
        assert proc.stdout is not None
        # From the moment the pack begins (the child's start-up time varies too much).
        while (line := proc.stdout.readline()) and line.strip() != "packing":
            head.append(line.rstrip("\n"))
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err
    return head + out.splitlines(), proc.returncode


def _check_after_crash(path: Path, model: Model, pack_tid: Tid, lines: list[str]) -> str:
    """The file is as before the pack or as after it, with every acknowledged commit."""
    assert verify(str(path)).problems == []
    acked = []
    for line in lines:
        words = line.split()
        if len(words) == 3 and words[0] == "ok":  # a line the kill cut short is left out
            oid = int(words[2])
            acked.append(
                Txn(
                    bytes.fromhex(words[1]),
                    TransactionMeta("", f"during pack {oid - COMMIT_BASE}"),
                    {oid: commit_record(oid - COMMIT_BASE)},
                )
            )
    with FileStorage(path) as fs:
        state = "before" if fs.packed_tid is None else "after"
        base = model.txns if state == "before" else packed(model.txns, pack_tid)
        listed = {t.tid for t in fs.iterator()}
        # A commit the child made but had not yet acknowledged may be there too.
        extra = [
            Txn(t.tid, t.meta, {u64(r.oid): r.record for r in t.records})
            for t in fs.iterator()
            if t.tid > model.txns[-1].tid and t.tid not in {a.tid for a in acked}
        ]
        assert {a.tid for a in acked} <= listed
        if state == "after" and model.txns[-1].tid not in listed:
            # The newest transaction stays emptied only while it is the newest when the pack
            # begins: commits the child made before that let it go.
            base = [t for t in base if t.records or t.tid != model.txns[-1].tid]
        check(fs, base + sorted(acked + extra, key=lambda t: t.tid), model.oids())
    assert not Path(str(path) + ".pack").exists()
    return state


@pytest.mark.parametrize(
    ("point", "state"),
    [
        ("scanned", "before"),
        ("marked", "before"),
        ("written", "before"),
        ("copied", "before"),
        ("synced", "before"),
        ("replaced", "after"),
        ("switched", "after"),
        ("done", "after"),
    ],
)
def test_sigkill_at_each_step_of_a_pack(tmp_path: Path, point: str, state: str) -> None:
    path = tmp_path / "data.fs"
    model, pack_tid = _prepare(path)
    lines, code = _run_child(["kill", str(path), pack_tid.hex(), point])
    assert code == -signal.SIGKILL and "packed" not in lines
    assert _check_after_crash(path, model, pack_tid, lines) == state


def test_sigkill_at_random_moments_of_a_pack(tmp_path: Path) -> None:
    rng = random.Random(11)
    states = set()
    for round_ in range(8):
        path = tmp_path / f"data{round_}.fs"
        model, pack_tid = _prepare(path, 600)
        lines, _ = _run_child(["delay", str(path), pack_tid.hex()], kill_after=rng.uniform(0, 0.12))
        states.add(_check_after_crash(path, model, pack_tid, lines))
    assert states <= {"before", "after"}


# -- followers -----------------------------------------------------------------------------


def test_follower_sees_a_pack_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    model, pack_tid = _prepare(path, 100)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), "serve", str(path), pack_tid.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def send(command: str, wanted: str) -> list[str]:
        assert proc.stdin is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        while True:
            words = lines.get(timeout=30).split()
            if words[0] == wanted:
                return words

    try:
        assert lines.get(timeout=30) == "ready"
        with FileStorage(path, read_only=True) as follower:
            check(follower, model.txns)
            newest = follower.last_tid()
            errors: list[BaseException] = []
            stop = threading.Event()

            def poll() -> None:  # polls and loads all through the pack
                try:
                    while not stop.is_set():
                        follower.poll_invalidations(follower.last_tid())
                        follower.load(p64(0))
                        follower.load(p64(1))
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            poller = threading.Thread(target=poll)
            poller.start()
            try:
                send("pack", "packed")
                words = send("commit 1", "ok")
            finally:
                stop.set()
                poller.join()
            assert not errors
            tid = bytes.fromhex(words[1])
            newest_now, changed = follower.poll_invalidations(newest)
            assert newest_now in (tid, newest)
            if changed is not None:  # the poller thread saw the replacement first
                assert follower.packed_tid == pack_tid
            assert follower.poll_invalidations(follower.last_tid())[0] == tid
            assert follower.packed_tid == pack_tid
            after = [
                *packed(model.txns, pack_tid),
                Txn(tid, TransactionMeta("", "during pack 1"), {COMMIT_BASE + 1: commit_record(1)}),
            ]
            check(follower, after, model.oids())
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)
        reader.join(timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_follower_poll_reports_the_replacement(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    model = Model()
    with FileStorage(path) as fs:
        build(fs, model)
        with FileStorage(path, read_only=True) as follower:
            newest = follower.last_tid()
            assert follower.poll_invalidations(newest) == (newest, ())
            fs.pack(newest)
            assert follower.poll_invalidations(newest) == (newest, None)
            assert follower.poll_invalidations(newest) == (newest, ())
            check(follower, packed(model.txns, newest), model.oids())
            model.txns = packed(model.txns, newest)
            tid = model.commit(fs, {7: rec([], b"seven")})
            assert follower.poll_invalidations(newest) == (tid, set())
            check(follower, model.txns)


# -- the rule, at random -------------------------------------------------------------------


class PackMachine(RuleBasedStateMachine):
    """Random commits with references, packs at random times, reads, reopens."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="amberdb-pack-")
        self.path = os.path.join(self.dir, "data.fs")
        self.fs = FileStorage(self.path)
        self.model = Model()
        self.ever: set[int] = set()
        self.counter = 0

    @rule(
        data=st.lists(
            st.tuples(st.integers(0, 12), st.lists(st.integers(0, 12), max_size=3)), min_size=0, max_size=4
        )
    )
    def commit(self, data: list[tuple[int, list[int]]]) -> None:
        self.counter += 1
        stores = {oid: rec(refs, b"%d" % self.counter) for oid, refs in data}
        self.model.commit(self.fs, stores)
        self.ever |= stores.keys()

    @precondition(lambda self: bool(self.model.txns))
    @rule(which=st.integers(0, 1000), above=st.booleans())
    def pack(self, which: int, above: bool) -> None:
        txns = self.model.txns
        tid = p64(u64(txns[-1].tid) + 1000) if above else txns[which % len(txns)].tid
        calls: list[tuple[int, int]] = []
        self.fs.pack(tid, progress=lambda d, t: calls.append((d, t)))
        self.model.txns = packed(txns, tid)
        check(self.fs, self.model.txns, self.ever)
        assert calls[-1][0] == calls[-1][1]
        assert all(a[0] <= b[0] for a, b in pairwise(calls))

    @rule()
    def reopen(self) -> None:
        self.fs.close()
        self.fs = FileStorage(self.path)

    @invariant()
    def agrees(self) -> None:
        check(self.fs, self.model.txns, self.ever)

    def teardown(self) -> None:
        self.fs.close()
        assert verify(self.path).problems == []
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


PackMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
)
test_pack_machine = PackMachine.TestCase
