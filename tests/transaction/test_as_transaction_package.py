"""The same scenarios run on the real ``transaction`` package and on ours: outcomes must match.

Each test takes ``impl``, once the ``transaction`` package (5.x, a test dependency through
ZODB) and once ``amberdb.transaction``, and asserts the same thing of both, so a failure on
"transaction" means the test misreads the package and a failure on "amberdb" is a
difference to fix or to write down in "Coming from ZODB".
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import pytest

from .fakes import FakeError, ListDM, RecordingDM, RecordingSynch, SavepointDM


@pytest.fixture(params=["transaction", "amberdb"])
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    """The names a test needs, from the real package or from AmberDB."""
    if request.param == "transaction":
        pytest.importorskip("transaction")
        interfaces = importlib.import_module("transaction.interfaces")
        package = importlib.import_module("transaction")
        return SimpleNamespace(
            name="transaction",
            TransactionManager=package.TransactionManager,
            Transaction=importlib.import_module("transaction._transaction").Transaction,
            TransactionError=interfaces.TransactionError,
            TransientError=interfaces.TransientError,
            AlreadyInTransaction=interfaces.AlreadyInTransaction,
            NoTransaction=interfaces.NoTransaction,
        )
    import amberdb.transaction as ours
    from amberdb import exceptions

    return SimpleNamespace(
        name="amberdb",
        TransactionManager=ours.TransactionManager,
        Transaction=ours.Transaction,
        TransactionError=exceptions.TransactionError,
        TransientError=exceptions.TransientError,
        AlreadyInTransaction=exceptions.AlreadyInTransaction,
        NoTransaction=exceptions.NoTransaction,
    )


class RetryDM(ListDM):
    """A data manager that knows some errors of its own are worth a retry (zope.sqlalchemy)."""

    def should_retry(self, error: BaseException) -> bool:
        return "serialization failure" in str(error)


def first_aborts(log: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``log`` without repeated aborts of a data manager.

    transaction 5.1 aborts every data manager a second time after running after-abort hooks;
    AmberDB aborts again only the data managers the hooks joined (a documented difference).
    """
    seen: set[tuple[str, str]] = set()
    kept = []
    for entry in log:
        if entry[1] == "abort":
            if entry in seen:
                continue
            seen.add(entry)
        kept.append(entry)
    return kept


# -- 10: should_retry -----------------------------------------------------------------------


def test_attempts_retry_an_error_a_data_manager_says_to_retry(impl: Any) -> None:
    tm = impl.TransactionManager()
    dm = RetryDM("sql", tm)
    tries = 0
    for attempt in tm.attempts(3):
        with attempt:
            tries += 1
            dm.append(tries)
            if tries < 3:
                raise FakeError("serialization failure")
    assert tries == 3 and dm.committed == [3]


def test_attempts_do_not_retry_what_no_data_manager_accepts(impl: Any) -> None:
    tm = impl.TransactionManager()
    dm = RetryDM("sql", tm)
    tries = 0
    with pytest.raises(FakeError, match="disk full"):
        for attempt in tm.attempts(3):
            with attempt:
                tries += 1
                dm.append(tries)
                raise FakeError("disk full")
    assert tries == 1 and dm.committed == []


class VoteFailsDM(RetryDM):
    """Fails its vote with a retryable error the first ``failures`` times."""

    failures = 2

    def tpc_vote(self, txn: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise FakeError("serialization failure at commit")


def test_a_commit_failure_the_data_manager_accepts_is_retried(impl: Any) -> None:
    tm = impl.TransactionManager()
    dm = VoteFailsDM("sql", tm)
    tries = 0
    for attempt in tm.attempts(3):
        with attempt:
            tries += 1
            dm.append(tries)
    assert tries == 3 and dm.committed == [3]


def test_run_retries_what_a_data_manager_accepts(impl: Any) -> None:
    tm = impl.TransactionManager()
    dm = RetryDM("sql", tm)
    tries = []

    def work() -> int:
        tries.append(1)
        dm.append(len(tries))
        if len(tries) < 3:
            raise FakeError("serialization failure")
        return len(tries)

    assert tm.run(work) == 3
    assert dm.committed == [3]


def test_transaction_is_retryable_error_asks_its_data_managers(impl: Any) -> None:
    tm = impl.TransactionManager()
    txn = tm.get()
    assert txn.isRetryableError(impl.TransientError())
    assert not txn.isRetryableError(FakeError("serialization failure"))
    RetryDM("sql", tm).append(1)
    assert txn.isRetryableError(FakeError("serialization failure"))
    assert not txn.isRetryableError(FakeError("disk full"))
    tm.abort()


# -- 11: run's forms, tries and note ------------------------------------------------------


def test_run_as_a_decorator_in_every_form(impl: Any) -> None:
    tm = impl.TransactionManager()
    seen: list[tuple[str, str]] = []

    def record(form: str) -> str:
        seen.append((form, tm.get().description))
        return form

    @tm.run
    def bare() -> str:
        """Bare decorator."""
        return record("bare")

    @tm.run()
    def called() -> str:
        return record("called")

    @tm.run(4)
    def _() -> str:
        """Only the doc, for a function named _."""
        return record("tries")

    assert (bare, called, _) == ("bare", "called", "tries")
    assert tm.run(lambda: record("plain")) == "plain"
    assert seen == [
        ("bare", "bare\n\nBare decorator."),
        ("called", "called"),
        ("tries", "Only the doc, for a function named _."),
        ("plain", "<lambda>"),
    ]


def test_run_tries_count_and_other_errors(impl: Any) -> None:
    tm = impl.TransactionManager()
    calls: list[str] = []

    with pytest.raises(impl.TransientError):

        @tm.run(4)
        def _() -> None:
            calls.append("transient")
            raise impl.TransientError()

    assert calls.count("transient") == 4

    def two() -> None:
        calls.append("two")
        raise impl.TransientError()

    with pytest.raises(impl.TransientError):
        tm.run(two, tries=2)
    assert calls.count("two") == 2

    with pytest.raises(FakeError):

        @tm.run
        def _() -> None:
            calls.append("other")
            raise FakeError("not retryable")

    assert calls.count("other") == 1


@pytest.mark.parametrize("tries", [0, -1])
def test_run_needs_a_positive_number_of_tries(impl: Any, tries: int) -> None:
    tm = impl.TransactionManager()
    with pytest.raises(ValueError):
        tm.run(tries)(lambda: None)
    with pytest.raises(ValueError):
        tm.run(lambda: None, tries=tries)


def test_run_never_retries_an_interrupt(impl: Any) -> None:
    tm = impl.TransactionManager()
    dm = RetryDM("sql", tm)
    calls = []

    def work() -> None:
        calls.append(1)
        dm.append(1)
        raise KeyboardInterrupt("serialization failure")

    with pytest.raises(KeyboardInterrupt):
        tm.run(work)
    assert calls == [1] and dm.working == []


# -- 12: an interrupt from a synchronizer during abort ------------------------------------


class InterruptingSynch(RecordingSynch):
    def __init__(self, log: list[tuple[str, str]], event: str) -> None:
        super().__init__(log)
        self.interrupt_on = event

    def _event(self, event: str, txn: Any) -> None:
        super()._event(event, txn)
        if event == self.interrupt_on:
            raise KeyboardInterrupt(event)


def test_interrupt_in_before_completion_still_aborts_everything(impl: Any) -> None:
    log: list[tuple[str, str]] = []
    tm = impl.TransactionManager()
    synch = InterruptingSynch(log, "beforeCompletion")
    tm.registerSynch(synch)
    txn = tm.get()
    txn.join(RecordingDM("dm", log))
    txn.addAfterAbortHook(lambda: log.append(("hook", "after-abort")))
    with pytest.raises(KeyboardInterrupt):
        tm.abort()
    assert first_aborts(log) == [
        ("synch", "beforeCompletion"),
        ("dm", "abort"),
        ("hook", "after-abort"),
        ("synch", "afterCompletion"),
    ]
    assert tm.get() is not txn


# -- 13: the exception tree -----------------------------------------------------------------


def test_transient_errors_are_transaction_errors(impl: Any) -> None:
    assert issubclass(impl.TransientError, impl.TransactionError)
    assert issubclass(impl.AlreadyInTransaction, impl.TransactionError)
    assert issubclass(impl.NoTransaction, impl.TransactionError)


# -- 14: registering during a transaction -------------------------------------------------


def test_register_synch_during_a_transaction_announces_it(impl: Any) -> None:
    tm = impl.TransactionManager()
    before = RecordingSynch(name="before")
    tm.registerSynch(before)
    assert before.events == []
    txn = tm.get()
    during = RecordingSynch(name="during")
    tm.registerSynch(during)
    assert during.events == [("newTransaction", txn)]
    assert before.events == []


# -- 15: afterCompletion, then after-commit hooks ------------------------------------------


@pytest.mark.parametrize("fail", [False, True])
def test_after_completion_comes_before_after_commit_hooks(impl: Any, fail: bool) -> None:
    log: list[tuple[str, str]] = []
    tm = impl.TransactionManager()
    synch = RecordingSynch(log)
    tm.registerSynch(synch)
    txn = tm.get()
    txn.join(RecordingDM("dm", log, fail_on="tpc_vote" if fail else None))
    txn.addAfterCommitHook(lambda ok: log.append(("hook", f"after-commit {ok}")))
    if fail:
        with pytest.raises(FakeError):
            tm.commit()
        tm.abort()
    else:
        tm.commit()
    events = [entry for entry in log if entry[0] != "dm"]
    assert events[:3] == [
        ("synch", "beforeCompletion"),
        ("synch", "afterCompletion"),
        ("hook", f"after-commit {not fail}"),
    ]


# -- 16: optimistic savepoints ------------------------------------------------------------


def test_rolling_back_an_optimistic_savepoint_without_support_is_a_type_error(impl: Any) -> None:
    tm = impl.TransactionManager()
    txn = tm.get()
    txn.join(SavepointDM("sp"))
    txn.join(RecordingDM("plain"))
    savepoint = txn.savepoint(optimistic=True)
    with pytest.raises(TypeError):
        savepoint.rollback()
    tm.abort()


# -- 17: API the package has ----------------------------------------------------------------


def test_registered_synchs(impl: Any) -> None:
    tm = impl.TransactionManager()
    assert tm.registeredSynchs() is False
    one, two = RecordingSynch(), RecordingSynch()
    tm.registerSynch(one)
    tm.registerSynch(two)
    assert tm.registeredSynchs() is True
    tm.unregisterSynch(one)
    assert tm.registeredSynchs() is True
    tm.unregisterSynch(two)
    assert tm.registeredSynchs() is False


def test_before_abort_hooks(impl: Any) -> None:
    log: list[tuple[str, str]] = []
    tm = impl.TransactionManager()
    synch = RecordingSynch(log)
    tm.registerSynch(synch)
    txn = tm.get()
    txn.join(RecordingDM("dm", log))

    def failing() -> None:
        log.append(("hook", "failing before-abort"))
        raise FakeError("logged, not raised")

    txn.addBeforeAbortHook(lambda *a, **k: log.append(("hook", f"before-abort {a} {k}")), ("x",), {"y": 1})
    txn.addBeforeAbortHook(failing)
    txn.addAfterAbortHook(lambda: log.append(("hook", "after-abort")))
    hooks = list(txn.getBeforeAbortHooks())
    assert [(args, kws) for _, args, kws in hooks] == [(("x",), {"y": 1}), ((), {})]
    tm.abort()
    assert first_aborts(log) == [
        ("hook", "before-abort ('x',) {'y': 1}"),
        ("hook", "failing before-abort"),
        ("synch", "beforeCompletion"),
        ("dm", "abort"),
        ("hook", "after-abort"),
        ("synch", "afterCompletion"),
    ]
    assert list(txn.getBeforeAbortHooks()) == []


def test_before_abort_hooks_do_not_run_on_commit_and_are_dropped(impl: Any) -> None:
    ran: list[str] = []
    tm = impl.TransactionManager()
    txn = tm.get()
    txn.addBeforeAbortHook(lambda: ran.append("before-abort"))
    tm.commit()
    assert ran == [] and list(txn.getBeforeAbortHooks()) == []


def test_set_user_and_no_op_metadata(impl: Any) -> None:
    txn = impl.TransactionManager().get()
    txn.setUser("bob")
    assert txn.user == "/ bob"
    txn.setUser("alice", "/site")
    assert txn.user == "/site alice"
    txn.note("first")
    txn.note(None)
    txn.description = None
    assert txn.description == "first"


def test_begin_twice_on_an_explicit_manager(impl: Any) -> None:
    tm = impl.TransactionManager(explicit=True)
    with pytest.raises(impl.NoTransaction):
        tm.get()
    txn = tm.begin()
    with pytest.raises(impl.AlreadyInTransaction):
        tm.begin()
    assert tm.get() is txn
    tm.abort()
