"""A model of FileStorage's commit protocol, driven with invalid stores, I/O errors and crashes.

Hypothesis runs random programs of begin / store / vote / finish / abort / reopen / crash,
with stores of invalid arguments mixed in and one-shot I/O errors injected into the system
calls of store, vote, finish and abort.  The model is a list of committed transactions; at
every step what the storage returns must be exactly what the model says.  An outcome the
protocol leaves open (abort failing after vote: the transaction may stay committed, I5) is
settled at the next open, which must pick one of the two.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from amberdb.exceptions import ConflictError, POSKeyError, StorageError, StorageTransactionError
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage, verify
from amberdb.storage.file import storage as storage_module
from amberdb.utils import Oid, Tid, p64, z64

OIDS = st.integers(0, 5).map(p64)
RECORDS = st.one_of(st.binary(max_size=30), st.integers(150, 400).map(lambda n: b"big" * n))
INVALID_STORES: list[tuple[Any, Any, Any]] = [
    (p64(2**63), z64, b"x"),
    (b"\0" * 7, z64, b"x"),
    (p64(1), b"\0" * 9, b"x"),
    (p64(1), z64, "a str"),
    (p64(1), z64, None),
]


class FaultyOS:
    """One-shot OSError in a chosen os function, armed around one storage call."""

    NAMES = ("pwrite", "fdatasync", "fsync", "ftruncate")

    def __init__(self) -> None:
        self.armed: str | None = None
        self.fired = False
        self.real: dict[str, Callable[..., Any]] = {name: getattr(os, name) for name in self.NAMES}
        for name in self.NAMES:
            setattr(os, name, self._wrapper(name))

    def _wrapper(self, name: str) -> Callable[..., Any]:
        real = self.real[name]

        def wrapper(*args: Any) -> Any:
            if self.armed == name:
                self.armed = None
                self.fired = True
                raise OSError(5, f"injected failure of {name}")
            return real(*args)

        return wrapper

    def arm(self, name: str) -> None:
        self.armed, self.fired = name, False

    def disarm(self) -> bool:
        fired, self.armed, self.fired = self.fired, None, False
        return fired

    def restore(self) -> None:
        for name, real in self.real.items():
            setattr(os, name, real)


def abandon(fs: FileStorage) -> None:
    """What a SIGKILL does: the file stays as it is now, the kernel drops descriptors and lock."""
    fs._release_files()
    fs._closed = True


class FaultMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="amberdb-faults-")
        self.path = Path(self.directory) / "data.fs"
        self.flush_size = storage_module.FLUSH_SIZE
        storage_module.FLUSH_SIZE = 256  # records of the "big" kind are streamed before vote
        self.os = FaultyOS()
        self.fs = FileStorage(self.path)
        self.committed: list[tuple[Tid, dict[Oid, bytes]]] = []
        self.pending: dict[Oid, bytes] | None = None  # the open transaction's stores
        self.voted = False
        self.poisoned = False
        self.broken = False
        # A transaction whose fate the protocol leaves open until the next open settles it:
        # a vote that raised (it may have been written whole), an abort that raised after vote.
        self.uncertain: dict[Oid, bytes] | None = None
        self.must_survive = False  # voted and never aborted when the process died

    def teardown(self) -> None:
        self.os.restore()
        storage_module.FLUSH_SIZE = self.flush_size
        try:
            self.fs.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- the model ----------------------------------------------------------------------------

    def newest(self, oid: Oid) -> tuple[bytes, Tid] | None:
        for tid, writes in reversed(self.committed):
            if oid in writes:
                return writes[oid], tid
        return None

    def idle(self) -> bool:
        return self.pending is None

    def end_transaction(self) -> None:
        self.pending, self.voted, self.poisoned = None, False, False

    # -- rules --------------------------------------------------------------------------------

    @precondition(lambda self: self.idle() and not self.broken)
    @rule()
    def begin(self) -> None:
        self.fs.begin(TransactionMeta(description="machine"))
        self.pending = {}

    @precondition(lambda self: self.idle() and self.broken)
    @rule()
    def begin_refused_when_broken(self) -> None:
        with pytest.raises(StorageError, match="failed an I/O operation"):
            self.fs.begin(TransactionMeta())

    @precondition(lambda self: self.pending is not None and not self.voted and not self.poisoned)
    @rule(oid=OIDS, record=RECORDS, fault=st.sampled_from([None, "pwrite"]))
    def store(self, oid: Oid, record: bytes, fault: str | None) -> None:
        assert self.pending is not None
        newest = self.newest(oid)
        base = newest[1] if newest else z64
        if fault:
            self.os.arm(fault)
        try:
            self.fs.store(oid, base, record)
        except OSError:
            assert self.os.disarm()
            self.poisoned = True
            return
        self.os.disarm()
        self.pending[oid] = record

    @precondition(lambda self: self.pending is not None and not self.voted and not self.poisoned)
    @rule(oid=OIDS)
    def store_stale(self, oid: Oid) -> None:
        newest = self.newest(oid)
        stale = z64 if newest else p64(12345)
        with pytest.raises(ConflictError):
            self.fs.store(oid, stale, b"stale")

    @precondition(lambda self: self.pending is not None and not self.voted and not self.poisoned)
    @rule(args=st.sampled_from(INVALID_STORES))
    def store_invalid(self, args: tuple[Any, Any, Any]) -> None:
        """Refused before anything is buffered: the transaction goes on as if it never happened."""
        with pytest.raises((ValueError, TypeError)):
            self.fs.store(*args)

    @precondition(lambda self: self.pending is not None and not self.voted)
    @rule(fault=st.sampled_from([None, "pwrite", "fdatasync"]))
    def vote(self, fault: str | None) -> None:
        if self.poisoned:
            with pytest.raises(StorageTransactionError, match="failed write"):
                self.fs.vote()
            return
        if fault:
            self.os.arm(fault)
        try:
            self.fs.vote()
        except OSError:
            assert self.os.disarm()
            self.poisoned = True
            self.broken = self.broken or fault == "fdatasync"
            assert self.pending is not None
            self.uncertain = dict(self.pending)  # a crash before abort: either outcome (base I3)
            return
        self.os.disarm()
        self.voted = True

    @precondition(lambda self: self.voted)
    @rule(fault=st.sampled_from([None, "pwrite"]))
    def finish(self, fault: str | None) -> None:
        assert self.pending is not None
        if fault:
            self.os.arm(fault)
        tid = self.fs.finish()  # a failed one-byte flip does not undo a durable commit (I4)
        if self.os.disarm():
            self.broken = True
        assert not self.committed or tid > self.committed[-1][0]
        self.committed.append((tid, dict(self.pending)))
        self.end_transaction()

    @precondition(lambda self: self.pending is not None)
    @rule(fault=st.sampled_from([None, "ftruncate", "fsync"]))
    def abort(self, fault: str | None) -> None:
        assert self.pending is not None
        if fault:
            self.os.arm(fault)
        try:
            self.fs.abort()
        except OSError:
            assert self.os.disarm()
            self.broken = True
            if self.voted:
                self.uncertain = dict(self.pending)  # I5: abort did not return, as voted
        else:
            self.os.disarm()
            self.uncertain = None  # whatever vote left, abort removed it durably
        self.end_transaction()

    @rule()
    def reopen(self) -> None:
        """A clean close aborts the open transaction: nothing of it stays."""
        if self.pending is not None:
            self.uncertain = None
        self.fs.close()
        self.end_transaction()
        self.open_again()

    @rule()
    def crash(self) -> None:
        """SIGKILL now: finished and voted transactions survive, an unvoted one never does."""
        abandon(self.fs)
        if self.voted and self.pending is not None:
            self.uncertain = dict(self.pending)
            self.must_survive = True
        self.end_transaction()
        self.open_again()

    def open_again(self) -> None:
        self.fs = FileStorage(self.path)
        self.broken = False
        if self.uncertain is not None:
            newest_tid = self.committed[-1][0] if self.committed else z64
            if self.fs.last_tid() > newest_tid:
                self.committed.append((self.fs.last_tid(), self.uncertain))
            else:
                assert not self.must_survive, "a voted transaction was lost"
        self.uncertain = None
        self.must_survive = False

    # -- checks ---------------------------------------------------------------------------

    @invariant()
    def loads_match_the_model(self) -> None:
        if self.uncertain is not None:
            return  # settled at the next open
        assert self.fs.last_tid() == (self.committed[-1][0] if self.committed else z64)
        oids = {oid for _, writes in self.committed for oid in writes}
        assert len(self.fs) == len(oids)
        for oid in map(p64, range(6)):
            expected = self.newest(oid)
            if expected is None:
                with pytest.raises(POSKeyError):
                    self.fs.load(oid)
            else:
                assert self.fs.load(oid) == expected
        for tid, writes in self.committed[-3:]:
            for oid, record in writes.items():
                assert self.fs.load(oid, p64(int.from_bytes(tid, "big") + 1)) == (record, tid)

    @precondition(lambda self: self.idle() and self.uncertain is None)
    @rule()
    def iterate_and_verify(self) -> None:
        seen = [(t.tid, {r.oid: r.record for r in t.records}) for t in self.fs.iterator()]
        assert seen == self.committed
        if not self.broken:
            report = verify(self.path)
            assert not report.problems, str(report)


TestFaultMachine = FaultMachine.TestCase
TestFaultMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
