"""Transaction managers: current transaction, synchronizers, context managers, threads."""

from __future__ import annotations

import functools
import gc
import threading
from typing import Any

import pytest

import amberdb.transaction as transaction
from amberdb.exceptions import ConflictError
from amberdb.transaction import (
    AlreadyInTransactionError,
    NoTransactionError,
    ThreadTransactionManager,
    Transaction,
    TransactionFailedError,
    TransactionManager,
)

from .fakes import FakeError, ListDM, RecordingDM, RecordingSynch


@pytest.fixture(autouse=True)
def clean_default_manager() -> Any:
    """Leave this thread's default manager as the test found it: no transaction, no synchs."""
    yield
    transaction.abort()
    transaction.manager.clearSynchs()


def test_get_creates_one_transaction_and_keeps_it() -> None:
    tm = TransactionManager()
    txn = tm.get()
    assert isinstance(txn, Transaction)
    assert tm.get() is txn


@pytest.mark.parametrize("end", ["commit", "abort"])
def test_after_commit_or_abort_the_manager_starts_a_fresh_transaction(end: str) -> None:
    tm = TransactionManager()
    synch = RecordingSynch()
    tm.registerSynch(synch)
    txn = tm.get()
    getattr(tm, end)()
    # An implicit get() does not call newTransaction: it happens inside a data manager's
    # first join, where moving the data manager's snapshot would be wrong.
    assert synch.names() == ["beforeCompletion", "afterCompletion"]
    fresh = tm.get()
    assert fresh is not txn and fresh.status == "Active"
    assert synch.names() == ["beforeCompletion", "afterCompletion"]
    began = tm.begin()
    assert synch.events[-1] == ("newTransaction", began)


def test_begin_aborts_the_current_transaction() -> None:
    tm = TransactionManager()
    dm = RecordingDM("a")
    old = tm.get()
    old.join(dm)
    new = tm.begin()
    assert new is not old and tm.get() is new
    assert dm.calls() == ["abort"]


def test_manager_operations_act_on_the_current_transaction() -> None:
    tm = TransactionManager()
    assert not tm.isDoomed()
    tm.doom()
    assert tm.isDoomed() and tm.get().isDoomed()
    tm.abort()
    assert not tm.isDoomed()
    tm.get().join(RecordingDM("a"))
    with pytest.raises(TypeError, match="does not support savepoints"):
        tm.savepoint()
    assert tm.savepoint(optimistic=True).valid


def test_failed_transaction_stays_current_until_aborted() -> None:
    tm = TransactionManager()
    txn = tm.get()
    txn.join(RecordingDM("a", fail_on="tpc_vote"))
    with pytest.raises(FakeError):
        tm.commit()
    assert tm.get() is txn
    with pytest.raises(TransactionFailedError, match="must be aborted"):
        tm.commit()
    tm.abort()
    assert tm.get() is not txn


def test_a_late_finishing_old_transaction_does_not_unseat_the_current_one() -> None:
    tm = TransactionManager()
    old = tm.get()
    old._manager = tm  # still linked, as if it finished after begin() moved on
    tm._txn = None
    current = tm.get()
    old.abort()
    assert tm.get() is current


# -- synchronizers --------------------------------------------------------------------------


def test_synchronizers_told_on_begin_and_can_be_unregistered() -> None:
    tm = TransactionManager()
    one, two = RecordingSynch(name="one"), RecordingSynch(name="two")
    tm.registerSynch(one)
    tm.registerSynch(two)
    txn = tm.begin()
    assert one.events == two.events == [("newTransaction", txn)]
    tm.unregisterSynch(two)
    tm.unregisterSynch(two)  # unknown: ignored
    tm.begin()
    assert len(one.events) == 4 and len(two.events) == 1
    tm.clearSynchs()
    tm.begin()
    assert len(one.events) == 4


def test_synchronizer_registered_mid_transaction_hears_of_it_and_its_completion() -> None:
    tm = TransactionManager()
    txn = tm.get()
    synch = RecordingSynch()
    tm.registerSynch(synch)
    # As in the transaction package: registering during a transaction tells of it at once.
    assert synch.events == [("newTransaction", txn)]
    txn.commit()
    assert synch.names() == ["newTransaction", "beforeCompletion", "afterCompletion"]
    idle = RecordingSynch()
    tm.registerSynch(idle)  # no transaction in progress: nothing to tell
    assert idle.events == []


def test_synchronizers_are_held_weakly() -> None:
    tm = TransactionManager()
    synch = RecordingSynch()
    tm.registerSynch(synch)
    del synch
    gc.collect()
    assert list(tm._synchs) == []


def test_new_transaction_failure_is_raised_after_telling_everyone() -> None:
    tm = TransactionManager()
    bad, good = RecordingSynch(name="bad"), RecordingSynch(name="good")
    bad.fail_on = "newTransaction"
    tm.registerSynch(bad)
    tm.registerSynch(good)
    with pytest.raises(FakeError, match=r"bad\.newTransaction failed"):
        tm.begin()
    assert good.names() == ["newTransaction"]


# -- explicit managers ----------------------------------------------------------------------


def test_explicit_manager_needs_begin() -> None:
    tm = TransactionManager(explicit=True)
    assert tm.explicit
    for call in (tm.get, tm.commit, tm.abort, tm.doom, tm.isDoomed, tm.savepoint):
        with pytest.raises(NoTransactionError) as info:
            call()
        assert "no transaction in progress: call begin() first" in str(info.value)
    txn = tm.begin()
    assert tm.get() is txn
    with pytest.raises(
        AlreadyInTransactionError, match=r"begin\(\) called while a transaction is in progress"
    ):
        tm.begin()
    tm.commit()
    with pytest.raises(NoTransactionError):
        tm.get()
    tm.explicit = False
    assert tm.get().status == "Active"


# -- context managers -----------------------------------------------------------------------


def test_with_commits_on_normal_exit() -> None:
    tm = TransactionManager()
    dm = RecordingDM("a")
    with tm as txn:
        assert tm.get() is txn
        txn.join(dm)
    assert txn.status == "Committed"
    assert dm.calls() == ["tpc_begin", "commit", "tpc_vote", "tpc_finish"]
    assert tm.get() is not txn


def test_with_aborts_and_reraises_when_the_block_raises() -> None:
    tm = TransactionManager()
    dm = RecordingDM("a")
    with pytest.raises(FakeError, match="in the block"), tm as txn:
        txn.join(dm)
        raise FakeError("in the block")
    assert dm.calls() == ["abort"]
    assert tm.get() is not txn


def test_with_aborts_a_commit_that_failed_and_raises_its_error() -> None:
    tm = TransactionManager()
    dm = RecordingDM("a", fail_on="tpc_vote")
    with pytest.raises(FakeError, match=r"a\.tpc_vote failed"), tm as txn:
        txn.join(dm)
    assert dm.calls() == ["tpc_begin", "commit", "tpc_vote", "tpc_abort", "abort"]
    assert tm.get() is not txn and tm.get().status == "Active"


def test_with_keeps_the_block_error_when_abort_also_fails(caplog: pytest.LogCaptureFixture) -> None:
    tm = TransactionManager()
    with pytest.raises(FakeError, match="in the block"), tm as txn:
        txn.join(RecordingDM("a", fail_on="abort"))
        raise FakeError("in the block")
    assert any("abort after a failed transaction block raised" in r.getMessage() for r in caplog.records)


def test_with_block_that_finished_its_own_transaction() -> None:
    tm = TransactionManager(explicit=True)
    with tm as txn:
        txn.commit()
    assert txn.status == "Committed"


def test_thread_manager_is_a_context_manager() -> None:
    dm = RecordingDM("a")
    with transaction.manager as txn:
        assert transaction.get() is txn
        txn.join(dm)
    assert txn.status == "Committed"
    with pytest.raises(FakeError), transaction.manager as txn2:
        txn2.join(dm)
        raise FakeError("boom")
    assert dm.calls()[-1] == "abort"


# -- retrying -------------------------------------------------------------------------------


def test_run_retries_transient_errors_then_commits() -> None:
    tm = TransactionManager()
    dm = ListDM("a", tm)
    attempts: list[int] = []

    def work() -> str:
        attempts.append(1)
        dm.append(len(attempts))
        if len(attempts) < 3:
            raise ConflictError("try again")
        return "done"

    assert tm.run(work) == "done"
    assert dm.committed == [3]
    assert tm.isRetryableError(ConflictError()) and not tm.isRetryableError(FakeError())


def test_run_gives_up_after_tries_and_on_other_errors() -> None:
    tm = TransactionManager()
    calls: list[int] = []

    def conflict() -> None:
        calls.append(1)
        raise ConflictError("always")

    with pytest.raises(ConflictError, match="always"):
        tm.run(conflict, tries=2)
    assert len(calls) == 2

    def broken() -> None:
        calls.append(2)
        raise FakeError("not transient")

    with pytest.raises(FakeError):
        tm.run(broken)
    assert calls[-1] == 2 and calls.count(2) == 1
    with pytest.raises(ValueError, match="tries >= 1, got 0"):
        tm.run(broken, tries=0)


def test_run_notes_the_function_name() -> None:
    tm = TransactionManager()
    notes: list[str] = []

    def named_work() -> None:
        notes.append(tm.get().description)

    tm.run(named_work)
    assert notes == ["named_work"]


def test_run_notes_of_unusual_callables() -> None:
    tm = TransactionManager()

    class BytesNamed:
        __name__ = b"bytes name"
        __doc__ = b"bytes doc"

        def __call__(self) -> str:
            return tm.get().description

    assert tm.run(BytesNamed()) == "bytes name\n\nbytes doc"
    # A nameless callable (a partial) gets no note: its __doc__ is its class's.
    assert tm.run(functools.partial(lambda: tm.get().description)) == ""


def test_run_refuses_bad_tries_at_once() -> None:
    tm = TransactionManager()
    with pytest.raises(ValueError, match="tries >= 1, got 0"):
        tm.run(0)
    with pytest.raises(ValueError, match="tries >= 1, got 0"):
        tm.run(tries=0)


def test_thread_manager_run_forms() -> None:
    ttm = ThreadTransactionManager()
    tries: list[int] = []

    @ttm.run(2)
    def _() -> int:
        tries.append(1)
        if len(tries) < 2:
            raise ConflictError("again")
        return len(tries)

    assert _ == 2

    @ttm.run
    def answer() -> int:
        return 42

    assert answer == 42
    assert ttm.run()(lambda: 7) == 7


def test_is_retryable_error_without_a_transaction_knows_only_transient_errors() -> None:
    tm = TransactionManager(explicit=True)
    assert tm.isRetryableError(ConflictError()) and not tm.isRetryableError(FakeError())


def test_attempt_asks_data_managers_before_aborting() -> None:
    asked: list[str] = []

    class Asked(ListDM):
        def should_retry(self, error: BaseException) -> bool:
            asked.append("joined" if self.joined is not None else "already aborted")
            return True

    tm = TransactionManager()
    dm = Asked("a", tm)
    for attempt in tm.attempts(2):
        with attempt:
            dm.append(len(asked))
            if not asked:
                raise FakeError("retry me")
    assert asked == ["joined"] and dm.committed == [1]


def test_registered_synchs_ignores_collected_ones() -> None:
    ttm = ThreadTransactionManager()
    synch = RecordingSynch()
    ttm.registerSynch(synch)
    assert ttm.registeredSynchs()
    del synch
    gc.collect()
    assert not ttm.registeredSynchs()


# -- the module API and threads -------------------------------------------------------------


def test_module_functions_use_the_default_thread_manager() -> None:
    assert isinstance(transaction.manager, ThreadTransactionManager)
    txn = transaction.begin()
    assert transaction.get() is txn is transaction.manager.get()
    dm = ListDM("a", transaction.manager)
    dm.append(1)
    transaction.commit(True)
    dm.append(2)
    transaction.abort(True)
    sp = transaction.savepoint()
    dm.append(3)
    sp.rollback()
    transaction.commit()
    assert dm.committed == [1]
    transaction.doom()
    assert transaction.isDoomed()
    with pytest.raises(transaction.DoomedTransactionError, match="doomed"):
        transaction.commit()
    transaction.abort()
    assert not transaction.isDoomed()


def test_module_synchronizers() -> None:
    synch = RecordingSynch()
    transaction.manager.registerSynch(synch)
    txn = transaction.begin()
    transaction.manager.unregisterSynch(synch)
    transaction.begin()
    # Unregistered before begin() aborted txn: it hears nothing more.
    assert synch.events == [("newTransaction", txn)]


def test_thread_manager_explicit_and_retry_delegate() -> None:
    ttm = ThreadTransactionManager(explicit=True)
    assert ttm.explicit
    with pytest.raises(NoTransactionError):
        ttm.get()
    ttm.explicit = False
    assert not ttm.manager.explicit
    assert ttm.run(lambda: 5) == 5
    assert ttm.isRetryableError(ConflictError())


def test_each_thread_has_its_own_transaction() -> None:
    threads = 6
    barrier = threading.Barrier(threads)
    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            synch = RecordingSynch(name=f"synch{n}")
            transaction.manager.registerSynch(synch)
            txn = transaction.begin()
            dm = ListDM(f"dm{n}", transaction.manager)
            dm.append(n)
            barrier.wait()  # every thread has a transaction in progress at once
            same = transaction.get() is txn
            if n % 2:
                transaction.abort()
            else:
                transaction.commit()
            barrier.wait()
            results[n] = {
                "txn": txn,
                "same": same,
                "committed": dm.committed,
                "events": synch.names(),
                "status": txn.status,
            }
            transaction.manager.clearSynchs()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=30)
    assert errors == []
    assert len({id(r["txn"]) for r in results.values()}) == threads
    for n, result in results.items():
        assert result["same"]
        assert result["committed"] == ([] if n % 2 else [n])
        assert result["events"] == ["newTransaction", "beforeCompletion", "afterCompletion"]
        assert result["status"] == ("Active" if n % 2 else "Committed")
    # The main thread's transaction was untouched by all that.
    assert transaction.get().status == "Active"


class _FlakyStart(RecordingSynch):
    """A synchronizer whose newTransaction fails with ``error`` the first ``failures`` times,
    as a connection's poll fails while its storage's server restarts."""

    def __init__(self, failures: int, error: Exception) -> None:
        super().__init__()
        self.failures = failures
        self.error = error

    def newTransaction(self, txn: Any) -> None:
        super().newTransaction(txn)
        if self.failures:
            self.failures -= 1
            raise self.error


def test_attempts_begin_again_after_a_retryable_error_from_the_begin() -> None:
    tm = TransactionManager()
    flaky = _FlakyStart(2, ConflictError("the storage's server is restarting"))
    tm.registerSynch(flaky)
    dm = ListDM("a", tm)
    runs = 0
    for attempt in tm.attempts(3):
        with attempt:
            runs += 1
            dm.append(runs)
    assert runs == 1 and dm.committed == [1]
    assert flaky.names().count("newTransaction") >= 3


def test_attempts_give_up_on_a_begin_that_keeps_failing_or_is_not_retryable() -> None:
    tm = TransactionManager()
    down = _FlakyStart(100, ConflictError("down"))  # synchronizers are held weakly
    tm.registerSynch(down)
    with pytest.raises(ConflictError):
        for attempt in tm.attempts(3):
            with attempt:
                raise AssertionError("the block must not run")
    other = TransactionManager()
    broken = _FlakyStart(1, FakeError("not retryable"))
    other.registerSynch(broken)
    with pytest.raises(FakeError):
        for attempt in other.attempts(3):
            with attempt:
                raise AssertionError("the block must not run")
