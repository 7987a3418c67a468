"""Savepoints, their validity, and ZODB's old subtransaction API."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amberdb.transaction import (
    InvalidSavepointRollbackError,
    Savepoint,
    Transaction,
    TransactionError,
    TransactionFailedError,
    TransactionManager,
)

from .fakes import FakeError, ListDM, RecordingDM, SavepointDM


def test_savepoint_asks_each_data_manager_and_rollback_rolls_each_back() -> None:
    log: list[tuple[str, str]] = []
    a, b = SavepointDM("a", log), SavepointDM("b", log)
    txn = Transaction()
    txn.join(a)
    txn.join(b)
    sp = txn.savepoint()
    assert isinstance(sp, Savepoint)
    assert sp.valid and sp.transaction is txn
    sp.rollback()
    sp.rollback()  # a rolled-back savepoint stays valid
    assert log == [("a", "savepoint"), ("b", "savepoint")] + [("a", "rollback1"), ("b", "rollback1")] * 2
    assert sp.valid


def test_data_managers_joining_after_the_savepoint_are_aborted_and_unjoined() -> None:
    a, late = SavepointDM("a"), SavepointDM("late")
    txn = Transaction()
    txn.join(a)
    sp = txn.savepoint()
    txn.join(late)
    sp.rollback()
    assert late.calls() == ["abort"]
    txn.commit()
    assert late.calls() == ["abort"]  # no longer joined: not committed
    assert a.calls()[-4:] == ["tpc_begin", "commit", "tpc_vote", "tpc_finish"]


def test_rollback_invalidates_later_savepoints_only() -> None:
    txn = Transaction()
    txn.join(SavepointDM("a"))
    first = txn.savepoint()
    second = txn.savepoint()
    third = txn.savepoint()
    second.rollback()
    assert first.valid and second.valid and not third.valid
    assert third.transaction is None
    with pytest.raises(InvalidSavepointRollbackError) as info:
        third.rollback()
    assert "no longer valid" in str(info.value)
    assert "a rollback to an earlier savepoint invalidated it" in str(info.value)
    first.rollback()
    assert not second.valid


@pytest.mark.parametrize("end", ["commit", "abort"])
def test_commit_and_abort_invalidate_all_savepoints(end: str) -> None:
    txn = Transaction()
    txn.join(SavepointDM("a"))
    sps = [txn.savepoint(), txn.savepoint()]
    getattr(txn, end)()
    assert not any(sp.valid for sp in sps)
    with pytest.raises(
        InvalidSavepointRollbackError, match=f"no longer valid \\({end}\\(\\) of the transaction"
    ):
        sps[0].rollback()
    assert "invalid" in repr(sps[0])


def test_savepoint_refused_for_a_data_manager_without_savepoints() -> None:
    txn = Transaction()
    plain = RecordingDM("plain")
    txn.join(SavepointDM("a"))
    txn.join(plain)
    with pytest.raises(TypeError) as info:
        txn.savepoint()
    assert "<RecordingDM plain> does not support savepoints" in str(info.value)
    assert txn.status == "Active"  # a refusal, not a failure
    txn.commit()


def test_optimistic_savepoint_cannot_roll_back_a_data_manager_without_savepoints() -> None:
    txn = Transaction()
    a = SavepointDM("a")
    txn.join(a)
    txn.join(RecordingDM("plain"))
    sp = txn.savepoint(optimistic=True)
    with pytest.raises(TypeError) as info:  # as in the transaction package
        sp.rollback()
    assert "<RecordingDM plain> does not support savepoints" in str(info.value)
    assert a.calls() == ["savepoint"]  # nothing rolled back half-way
    assert txn.status == "Active"
    txn.commit()


def test_savepoint_with_no_data_managers_rolls_back_to_nothing() -> None:
    txn = Transaction()
    sp = txn.savepoint()
    late = RecordingDM("late")  # no savepoint support needed: it joined after
    txn.join(late)
    sp.rollback()
    assert late.calls() == ["abort"]


def test_failing_rollback_fails_the_transaction() -> None:
    a = SavepointDM("a", fail_on="rollback1")
    txn = Transaction()
    txn.join(a)
    sp = txn.savepoint()
    with pytest.raises(FakeError, match=r"a\.rollback1 failed"):
        sp.rollback()
    assert txn.status == "Commit failed"
    with pytest.raises(TransactionFailedError) as info:
        txn.commit()
    assert "an earlier savepoint rollback of this transaction failed" in str(info.value)
    assert "call abort()" in str(info.value)
    with pytest.raises(TransactionFailedError, match="cannot roll back to a savepoint"):
        sp.rollback()
    txn.abort()
    assert a.calls()[-1] == "abort"


def test_failing_savepoint_fails_the_transaction() -> None:
    a = SavepointDM("a", fail_on="savepoint")
    txn = Transaction()
    txn.join(a)
    with pytest.raises(FakeError, match=r"a\.savepoint failed"):
        txn.savepoint()
    with pytest.raises(TransactionFailedError, match="an earlier savepoint of this transaction failed"):
        txn.commit()


def test_savepoints_nobody_holds_are_forgotten() -> None:
    txn = Transaction()
    txn.join(SavepointDM("a"))
    for _ in range(5):
        txn.savepoint()
    kept = txn.savepoint()
    assert list(txn._savepoints.keys()) == [kept]


# -- subtransactions ------------------------------------------------------------------------


def test_subtransaction_commit_and_abort() -> None:
    tm = TransactionManager()
    dm = ListDM("a", tm)
    dm.append(1)
    tm.commit(True)
    dm.append(2)
    tm.abort(True)
    assert dm.working == [1]
    dm.append(3)
    tm.commit(1)
    dm.append(4)
    tm.abort(1)
    tm.abort(True)  # again: back to the same subtransaction
    assert dm.working == [1, 3]
    assert tm.get().status == "Active"
    tm.commit()
    assert dm.committed == [1, 3]


def test_subtransaction_abort_without_a_subtransaction_aborts_the_changes_and_goes_on() -> None:
    tm = TransactionManager()
    dm = ListDM("a", tm)
    txn = tm.get()
    sp = txn.savepoint()
    dm.append(1)
    tm.abort(True)
    assert dm.working == []
    assert tm.get() is txn and txn.status == "Active"
    with pytest.raises(InvalidSavepointRollbackError, match=r"abort\(subtransaction=True\) discarded"):
        sp.rollback()
    dm.append(2)  # joins again
    tm.commit()
    assert dm.committed == [2]


def test_subtransaction_commit_accepts_data_managers_without_savepoints() -> None:
    tm = TransactionManager()
    plain = RecordingDM("plain")
    tm.get().join(plain)
    tm.commit(True)
    with pytest.raises(TypeError, match="does not support savepoints"):
        tm.abort(True)
    tm.commit()
    assert plain.calls() == ["tpc_begin", "commit", "tpc_vote", "tpc_finish"]


def test_subtransaction_abort_after_rollback_past_it_is_refused() -> None:
    tm = TransactionManager()
    dm = ListDM("a", tm)
    sp = tm.savepoint()
    dm.append(1)
    tm.commit(True)
    sp.rollback()
    with pytest.raises(InvalidSavepointRollbackError) as info:
        tm.abort(True)
    assert "commit(subtransaction=True) is no longer valid" in str(info.value)


def test_subtransaction_on_a_failed_transaction_is_refused() -> None:
    tm = TransactionManager()
    tm.get().join(RecordingDM("a", fail_on="tpc_vote"))
    with pytest.raises(FakeError):
        tm.commit()
    with pytest.raises(TransactionFailedError, match="cannot take a savepoint"):
        tm.commit(True)
    with pytest.raises(TransactionFailedError, match="cannot abort a subtransaction"):
        tm.abort(True)
    tm.abort()


def test_subtransaction_abort_error_fails_the_transaction() -> None:
    tm = TransactionManager()
    tm.get().join(RecordingDM("a", fail_on="abort"))
    with pytest.raises(FakeError, match=r"a\.abort failed"):
        tm.abort(True)
    with pytest.raises(TransactionFailedError, match="earlier subtransaction abort"):
        tm.commit()


def test_savepoint_during_commit_is_refused() -> None:
    txn = Transaction()
    errors: list[Exception] = []

    class Peeking(SavepointDM):
        def commit(self, t: Transaction) -> None:
            super().commit(t)
            for call in (t.savepoint, lambda: t.join(RecordingDM("x"))):
                try:
                    call()
                except TransactionError as exc:
                    errors.append(exc)

    txn.join(Peeking("p"))
    txn.commit()
    assert [str(e) for e in errors] == [
        "cannot take a savepoint: the transaction is committing",
        "cannot join <RecordingDM x>: the transaction is committing",
    ]


# -- a model check --------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from("ab"), st.integers(0, 9)),
        st.tuples(st.just("savepoint")),
        st.tuples(st.just("rollback"), st.integers(0, 20)),
        st.tuples(st.just("subcommit")),
        st.tuples(st.just("subabort")),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.booleans())
def test_savepoints_behave_like_snapshots(ops: list[tuple[Any, ...]], finish_with_commit: bool) -> None:
    """Every valid savepoint returns the data managers to the state it saw.

    The model keeps, per savepoint, the snapshot it was taken at and whether it is valid:
    a rollback invalidates every later savepoint, abort(True) with no subtransaction
    invalidates them all.
    """
    tm = TransactionManager()
    dms = {name: ListDM(name, tm) for name in "ab"}
    model: dict[str, list[int]] = {"a": [], "b": []}
    taken: list[tuple[Savepoint, dict[str, list[int]]]] = []
    valid: list[bool] = []
    sub: int | None = None  # index in ``taken`` of the last subtransaction savepoint

    def snapshot() -> dict[str, list[int]]:
        return {name: list(values) for name, values in model.items()}

    def roll_back_model(index: int) -> None:
        for later in range(index + 1, len(valid)):
            valid[later] = False
        model.update(snapshot_of(index))

    def snapshot_of(index: int) -> dict[str, list[int]]:
        return {name: list(values) for name, values in taken[index][1].items()}

    for op in ops:
        kind = op[0]
        if kind == "append":
            dms[op[1]].append(op[2])
            model[op[1]].append(op[2])
        elif kind == "savepoint":
            taken.append((tm.savepoint(), snapshot()))
            valid.append(True)
        elif kind == "subcommit":
            tm.commit(True)
            taken.append((tm.get()._subtransaction_savepoint, snapshot()))  # type: ignore[arg-type]
            valid.append(True)
            sub = len(taken) - 1
        elif kind == "rollback" and taken:
            index = op[1] % len(taken)
            if valid[index]:
                taken[index][0].rollback()
                roll_back_model(index)
            else:
                with pytest.raises(InvalidSavepointRollbackError):
                    taken[index][0].rollback()
        elif kind == "subabort":
            if sub is None:
                tm.abort(True)
                model = {"a": [], "b": []}
                valid = [False] * len(valid)
            elif valid[sub]:
                tm.abort(True)
                roll_back_model(sub)
            else:
                with pytest.raises(InvalidSavepointRollbackError):
                    tm.abort(True)
        assert {name: dm.working for name, dm in dms.items()} == model
        assert [sp.valid for sp, _ in taken] == valid

    if finish_with_commit:
        tm.commit()
        assert {name: dm.committed for name, dm in dms.items()} == model
    else:
        tm.abort()
        assert all(dm.committed == [] and dm.working == [] for dm in dms.values())
    assert not any(sp.valid for sp, _ in taken)
