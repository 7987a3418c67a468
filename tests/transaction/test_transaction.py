"""The commit protocol, failures, doom, hooks and metadata of a single Transaction."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

import amberdb.transaction as transaction
from amberdb.exceptions import DatabaseError
from amberdb.transaction import (
    DoomedTransactionError,
    Status,
    Transaction,
    TransactionError,
    TransactionFailedError,
    TransactionManager,
)

from .fakes import FakeError, RecordingDM, RecordingSynch, SavepointDM

PHASES = ["tpc_begin", "commit", "tpc_vote", "tpc_finish"]


def make_dms(*names: str, **kwargs: Any) -> tuple[list[tuple[str, str]], list[RecordingDM]]:
    log: list[tuple[str, str]] = []
    return log, [RecordingDM(name, log, **kwargs) for name in names]


# -- the two-phase commit -------------------------------------------------------------------


def test_commit_runs_each_phase_on_all_data_managers_in_sort_key_order() -> None:
    log: list[tuple[str, str]] = []
    txn = Transaction()
    # Joined out of order; sortKey decides.
    for name, key in [("c", "3"), ("a", "1"), ("b", "2")]:
        txn.join(RecordingDM(name, log, sort_key=key))
    txn.commit()
    assert log == [(name, phase) for phase in PHASES for name in "abc"]
    assert txn.status == "Committed" == Status.COMMITTED


def test_every_call_gets_the_transaction() -> None:
    dm = RecordingDM("a")
    txn = Transaction()
    txn.join(dm)
    txn.commit()
    assert dm.txns == [txn] * 4


def test_commit_without_data_managers_is_trivial_but_runs_hooks() -> None:
    seen: list[Any] = []
    txn = Transaction()
    txn.addBeforeCommitHook(seen.append, ("before",))
    txn.addAfterCommitHook(lambda ok: seen.append(("after", ok)))
    txn.commit()
    assert seen == ["before", ("after", True)]
    assert txn.status == "Committed"


def test_joining_twice_commits_once() -> None:
    dm = RecordingDM("a")
    txn = Transaction()
    txn.join(dm)
    txn.join(dm)
    txn.commit()
    assert dm.calls() == PHASES


def test_join_rejects_an_object_that_is_not_a_data_manager() -> None:
    class Half:
        def abort(self, txn: Transaction) -> None:
            pass

    with pytest.raises(TypeError, match=r"cannot join .*Half.*tpc_begin, commit, tpc_vote.*sortKey"):
        Transaction().join(Half())  # type: ignore[arg-type]


def test_a_finished_transaction_refuses_further_use() -> None:
    txn = Transaction()
    txn.commit()
    with pytest.raises(TransactionError, match="already committed"):
        txn.commit()
    with pytest.raises(TransactionError, match="cannot join: the transaction was already committed"):
        txn.join(RecordingDM("a"))
    with pytest.raises(TransactionError, match=r"cannot take a savepoint: .*already committed"):
        txn.savepoint()
    txn.abort()  # harmless: nothing left to abort
    assert txn.status == "Committed"

    aborted = Transaction()
    aborted.abort()
    with pytest.raises(TransactionError, match="already aborted; use the transaction manager's get"):
        aborted.commit()


@pytest.mark.parametrize("phase", PHASES[:3])
def test_failure_before_tpc_finish_cleans_up_and_fails_the_transaction(phase: str) -> None:
    _, (a, b, c) = make_dms("a", "b", "c")
    b.fail_on = phase
    txn = Transaction()
    for dm in (c, b, a):
        txn.join(dm)
    outcomes: list[bool] = []
    txn.addAfterCommitHook(outcomes.append)

    with pytest.raises(FakeError, match=f"b.{phase} failed"):
        txn.commit()

    assert txn.status == "Commit failed" == Status.COMMIT_FAILED
    assert outcomes == [False]
    if phase == "tpc_begin":
        # a and b got tpc_begin (b's raised half-way); c never did and is aborted.
        assert a.calls() == ["tpc_begin", "tpc_abort"]
        assert b.calls() == ["tpc_begin", "tpc_abort"]
        assert c.calls() == ["abort"]
    else:
        done = PHASES[: PHASES.index(phase) + 1]
        assert b.calls() == [*done, "tpc_abort"]
        for dm in (a, c):
            assert dm.calls()[-1] == "tpc_abort"
            assert "abort" not in dm.calls()


@pytest.mark.parametrize("phase", PHASES[:3])
def test_a_failed_transaction_must_be_aborted(phase: str) -> None:
    dm = RecordingDM("a", fail_on=phase)
    txn = Transaction()
    txn.join(dm)
    with pytest.raises(FakeError):
        txn.commit()

    checks: list[tuple[Callable[[], object], str]] = [
        (txn.commit, "commit"),
        (lambda: txn.join(RecordingDM("b")), "join"),
        (txn.savepoint, "take a savepoint"),
    ]
    for call, action in checks:
        with pytest.raises(TransactionFailedError) as info:
            call()
        message = str(info.value)
        assert f"cannot {action}: an earlier commit of this transaction failed" in message
        assert "must be aborted first (call abort())" in message
        assert f"FakeError: a.{phase} failed" in message

    txn.abort()
    assert dm.calls()[-1] == "abort"
    with pytest.raises(TransactionError, match="already aborted"):
        txn.commit()


def test_failure_in_tpc_finish_is_logged_critically_and_raised(caplog: pytest.LogCaptureFixture) -> None:
    _, (a, b, c) = make_dms("a", "b", "c")
    b.fail_on = "tpc_finish"
    txn = Transaction()
    for dm in (a, b, c):
        txn.join(dm)
    with caplog.at_level(logging.CRITICAL, logger="amberdb.transaction"), pytest.raises(FakeError):
        txn.commit()
    assert any(
        r.levelno == logging.CRITICAL
        and "failed in tpc_finish" in r.getMessage()
        and "inconsistent" in r.getMessage()
        for r in caplog.records
    )
    assert txn.status == "Commit failed"
    assert a.calls() == PHASES  # finished before the failure: nothing to undo
    assert b.calls() == [*PHASES, "tpc_abort"]
    assert c.calls() == [*PHASES[:3], "tpc_abort"]


def test_errors_during_cleanup_are_logged_and_the_original_error_propagates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, (a, b) = make_dms("a", "b")
    a.fail_on = "tpc_abort"
    b.fail_on = "tpc_vote"
    txn = Transaction()
    txn.join(a)
    txn.join(b)
    with (
        caplog.at_level(logging.ERROR, logger="amberdb.transaction"),
        pytest.raises(FakeError, match=r"b\.tpc_vote"),
    ):
        txn.commit()
    assert b.calls()[-1] == "tpc_abort"  # still cleaned up after a's tpc_abort raised
    assert any("tpc_abort on <RecordingDM a> raised" in r.getMessage() for r in caplog.records)


def test_before_commit_hook_failure_fails_the_commit_and_aborts_data_managers() -> None:
    dm = RecordingDM("a")
    txn = Transaction()
    txn.join(dm)

    def hook() -> None:
        raise FakeError("hook refused")

    txn.addBeforeCommitHook(hook)
    with pytest.raises(FakeError, match="hook refused"):
        txn.commit()
    assert dm.calls() == ["abort"]
    assert txn.status == "Commit failed"
    with pytest.raises(TransactionFailedError, match="hook refused"):
        txn.commit()


# -- doom -----------------------------------------------------------------------------------


def test_doomed_transaction_cannot_commit_but_can_abort() -> None:
    dm = RecordingDM("a")
    txn = Transaction()
    txn.join(dm)
    assert not txn.isDoomed()
    txn.doom()
    txn.doom()  # twice is fine
    assert txn.isDoomed()
    assert txn.status == "Doomed" == Status.DOOMED
    with pytest.raises(DoomedTransactionError) as info:
        txn.commit()
    assert "doomed" in str(info.value) and "can only be aborted" in str(info.value)
    assert dm.calls() == []
    assert txn.status == "Doomed"
    txn.join(RecordingDM("b"))  # a doomed transaction still accepts work
    txn.abort()
    assert dm.calls() == ["abort"]


def test_doom_of_a_committed_transaction_is_refused() -> None:
    txn = Transaction()
    txn.commit()
    with pytest.raises(TransactionError, match="cannot doom the transaction: it is already finished"):
        txn.doom()


def test_doom_during_commit_is_refused() -> None:
    txn = Transaction()
    errors: list[Exception] = []

    def hook() -> None:
        try:
            txn.doom()
        except TransactionError as exc:
            errors.append(exc)

    txn.addBeforeCommitHook(hook)
    txn.commit()
    assert [str(e) for e in errors] == ["cannot doom the transaction: it is committing"]


def test_doom_failed_transaction_is_refused() -> None:
    txn = Transaction()
    txn.join(RecordingDM("a", fail_on="commit"))
    with pytest.raises(FakeError):
        txn.commit()
    with pytest.raises(TransactionError, match="it is in status 'Commit failed'"):
        txn.doom()


# -- abort ----------------------------------------------------------------------------------


def test_abort_calls_every_data_manager_and_raises_the_first_error(caplog: pytest.LogCaptureFixture) -> None:
    log, (a, b, c) = make_dms("a", "b", "c")
    a.fail_on = b.fail_on = "abort"
    txn = Transaction()
    for dm in (a, b, c):
        txn.join(dm)
    ran: list[str] = []
    txn.addAfterAbortHook(ran.append, ["hook"])
    with (
        caplog.at_level(logging.ERROR, logger="amberdb.transaction"),
        pytest.raises(FakeError, match=r"a\.abort"),
    ):
        txn.abort()
    assert log == [("a", "abort"), ("b", "abort"), ("c", "abort")]
    assert ran == ["hook"]
    with pytest.raises(TransactionError, match="already aborted"):
        txn.commit()


def test_abort_during_commit_is_refused() -> None:
    txn = Transaction()
    errors: list[Exception] = []

    def hook() -> None:
        try:
            txn.abort()
        except TransactionError as exc:
            errors.append(exc)

    txn.addBeforeCommitHook(hook)
    txn.commit()
    assert [str(e) for e in errors] == ["cannot abort: the transaction is committing"]


def test_commit_from_a_before_commit_hook_is_refused() -> None:
    txn = Transaction()
    errors: list[Exception] = []

    def hook() -> None:
        try:
            txn.commit()
        except TransactionError as exc:
            errors.append(exc)

    txn.addBeforeCommitHook(hook)
    txn.commit()
    assert [str(e) for e in errors] == ["cannot commit: the transaction is already committing"]


# -- hooks ----------------------------------------------------------------------------------


def test_hooks_get_their_arguments_and_are_listed() -> None:
    txn = Transaction()
    calls: list[tuple[Any, ...]] = []

    def before(*args: Any, **kws: Any) -> None:
        calls.append(("before", args, kws))

    def after(ok: bool, *args: Any, **kws: Any) -> None:
        calls.append(("after", ok, args, kws))

    txn.addBeforeCommitHook(before, (1, 2), {"x": 3})
    txn.addAfterCommitHook(after, [4], {"y": 5})
    txn.addAfterAbortHook(before)
    assert list(txn.getBeforeCommitHooks()) == [(before, (1, 2), {"x": 3})]
    assert list(txn.getAfterCommitHooks()) == [(after, (4,), {"y": 5})]
    assert list(txn.getAfterAbortHooks()) == [(before, (), {})]
    txn.commit()
    assert calls == [("before", (1, 2), {"x": 3}), ("after", True, (4,), {"y": 5})]
    assert list(txn.getBeforeCommitHooks()) == []
    assert list(txn.getAfterCommitHooks()) == []


def test_before_commit_hooks_may_add_hooks_and_join_data_managers() -> None:
    txn = Transaction()
    order: list[str] = []
    dm = RecordingDM("late")

    def second() -> None:
        order.append("second")
        txn.join(dm)

    def first() -> None:
        order.append("first")
        txn.addBeforeCommitHook(second)

    txn.addBeforeCommitHook(first)
    txn.commit()
    assert order == ["first", "second"]
    assert dm.calls() == PHASES


def test_after_commit_hook_errors_are_logged_and_do_not_stop_other_hooks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    txn = Transaction()
    seen: list[Any] = []

    def bad(ok: bool) -> None:
        raise FakeError("bad hook")

    txn.addAfterCommitHook(bad)
    txn.addAfterCommitHook(lambda ok, tag: seen.append((ok, tag)), ("good",))
    with caplog.at_level(logging.ERROR, logger="amberdb.transaction"):
        txn.commit()
    assert seen == [(True, "good")]
    assert txn.status == "Committed"
    record = next(r for r in caplog.records if "after-commit hook" in r.getMessage())
    assert record.exc_info is not None and "bad hook" in str(record.exc_info[1])


def test_after_abort_hook_errors_are_raised_after_all_hooks_ran() -> None:
    txn = Transaction()
    seen: list[str] = []

    def bad() -> None:
        raise FakeError("abort hook failed")

    txn.addAfterAbortHook(bad)
    txn.addAfterAbortHook(seen.append, ("second",))
    with pytest.raises(FakeError, match="abort hook failed"):
        txn.abort()
    assert seen == ["second"]


def test_after_abort_hooks_do_not_run_on_commit() -> None:
    txn = Transaction()
    seen: list[str] = []
    txn.addAfterAbortHook(seen.append, ("abort",))
    txn.commit()
    assert seen == []


# -- synchronizers around completion --------------------------------------------------------


def test_synchronizers_bracket_the_commit() -> None:
    log: list[tuple[str, str]] = []
    tm = TransactionManager()
    synch = RecordingSynch(log)
    tm.registerSynch(synch)
    txn = tm.begin()
    txn.join(RecordingDM("a", log))
    txn.addBeforeCommitHook(lambda: log.append(("hook", "before")))
    txn.addAfterCommitHook(lambda ok: log.append(("hook", f"after {ok}")))
    txn.commit()
    assert log == [
        ("synch", "newTransaction"),
        ("hook", "before"),
        ("synch", "beforeCompletion"),
        *[("a", phase) for phase in PHASES],
        ("synch", "afterCompletion"),
        ("hook", "after True"),
    ]


def test_synchronizer_failure_in_before_completion_fails_the_commit() -> None:
    tm = TransactionManager()
    synch = RecordingSynch()
    synch.fail_on = "beforeCompletion"
    tm.registerSynch(synch)
    txn = tm.get()
    dm = RecordingDM("a")
    txn.join(dm)
    with pytest.raises(FakeError, match=r"synch\.beforeCompletion failed"):
        txn.commit()
    assert txn.status == "Commit failed"
    assert dm.calls() == ["abort"]
    assert synch.names()[-1] == "afterCompletion"
    assert tm.get() is txn  # still current until aborted


def test_synchronizer_failure_after_a_successful_commit_is_logged_and_the_commit_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tm = TransactionManager()
    synch, other = RecordingSynch(name="one"), RecordingSynch(name="two")
    synch.fail_on = "afterCompletion"
    tm.registerSynch(synch)
    tm.registerSynch(other)
    txn = tm.get()
    calls: list[bool] = []
    txn.addAfterCommitHook(calls.append)
    with caplog.at_level(logging.ERROR, logger="amberdb.transaction"):
        txn.commit()  # durable: reported as committed
    assert "one.afterCompletion failed" in caplog.text
    assert calls == [True]
    assert txn.status == "Committed"
    assert other.names()[-1] == "afterCompletion"
    assert tm.get() is not txn


def test_abort_tells_synchronizers() -> None:
    tm = TransactionManager()
    synch = RecordingSynch()
    tm.registerSynch(synch)
    txn = tm.begin()
    txn.abort()
    assert synch.names() == ["newTransaction", "beforeCompletion", "afterCompletion"]


# -- metadata -------------------------------------------------------------------------------


def test_note_user_description_extension() -> None:
    txn = Transaction()
    assert (txn.user, txn.description, txn.extension) == ("", "", {})
    txn.note("  first line \n")
    txn.note("")
    txn.note("   ")
    txn.note("second")
    assert txn.description == "first line\nsecond"
    txn.user = "alice"
    assert txn.user == "alice"
    txn.description = "replaced"
    assert txn.description == "replaced"
    txn.setExtendedInfo("reason", "test")
    assert txn.extension == {"reason": "test"}
    assert txn._extension is txn.extension
    txn._extension = {"other": 1}
    assert txn.extension == {"other": 1}


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (lambda t: setattr(t, "user", b"bob"), "Transaction.user must be a str, not bytes"),
        (lambda t: setattr(t, "description", 5), "Transaction.description must be a str, not int"),
        (lambda t: setattr(t, "extension", []), "Transaction.extension must be a dict, not list"),
        (lambda t: t.note(b"x"), "note() takes a str, not bytes"),
    ],
)
def test_metadata_type_errors_name_the_problem(action: Any, message: str) -> None:
    with pytest.raises(TypeError) as info:
        action(Transaction())
    assert str(info.value) == message


def test_data_kept_per_owner_until_the_end() -> None:
    txn = Transaction()
    owner = object()
    txn.set_data(owner, 42)
    assert txn.data(owner) == 42
    with pytest.raises(KeyError):
        txn.data(object())
    txn.commit()
    with pytest.raises(KeyError):
        txn.data(owner)


def test_exceptions_are_re_exported_and_belong_to_the_tree() -> None:
    assert transaction.TransactionError is TransactionError
    assert issubclass(transaction.TransactionFailedError, DatabaseError)
    assert transaction.DoomedTransaction is DoomedTransactionError
    assert issubclass(transaction.TransientError, DatabaseError)
    assert transaction.NoTransactionError.__module__ == "amberdb.exceptions"
    assert transaction.InvalidSavepointRollbackError.__module__ == "amberdb.exceptions"


def test_repr_shows_status() -> None:
    txn = Transaction()
    txn.join(RecordingDM("a"))
    assert repr(txn) == "<Transaction Active, 1 data manager(s)>"
    txn.abort()
    assert repr(txn) == "<Transaction Active, finished, 0 data manager(s)>"


def test_savepoint_dm_commits_normally() -> None:
    dm = SavepointDM("a")
    txn = Transaction()
    txn.join(dm)
    txn.commit()
    assert dm.calls() == PHASES


# -- interrupts (KeyboardInterrupt, SystemExit) during clean-up ------------------------------


class Interrupting:
    """Raises KeyboardInterrupt from the named method; records calls in the shared log."""

    def __init__(self, name: str, log: list[tuple[str, str]], on: str) -> None:
        self.name, self.log, self.on = name, log, on

    def sortKey(self) -> str:
        return self.name

    def __getattr__(self, method: str) -> Callable[..., None]:
        if method.startswith("__"):
            raise AttributeError(method)

        def call(*args: Any) -> None:
            self.log.append((self.name, method))
            if method == self.on:
                raise KeyboardInterrupt(f"{self.name}.{method}")

        return call


@pytest.mark.parametrize(
    "where", ["synch.beforeCompletion", "dm.abort", "after-abort", "synch.afterCompletion", "before-abort"]
)
def test_an_interrupt_during_abort_is_raised_once_everything_was_aborted(where: str) -> None:
    log: list[tuple[str, str]] = []
    tm = TransactionManager()
    synch = Interrupting("synch", log, where.partition(".")[2] if where.startswith("synch") else "")
    tm.registerSynch(synch)  # type: ignore[arg-type]
    txn = tm.get()
    txn.join(Interrupting("dm", log, "abort" if where == "dm.abort" else ""))  # type: ignore[arg-type]
    txn.join(RecordingDM("other", log))

    def hook(name: str) -> None:
        log.append(("hook", name))
        if name == where:
            raise KeyboardInterrupt(name)

    txn.addBeforeAbortHook(hook, ("before-abort",))
    txn.addAfterAbortHook(hook, ("after-abort",))
    with pytest.raises(KeyboardInterrupt):
        tm.abort()
    assert log == [
        ("hook", "before-abort"),
        ("synch", "beforeCompletion"),
        ("dm", "abort"),
        ("other", "abort"),
        ("hook", "after-abort"),
        ("synch", "afterCompletion"),
    ]
    assert tm.get() is not txn and txn.status == Status.ACTIVE
    with pytest.raises(TransactionError, match="already aborted"):
        txn.commit()


def test_an_interrupt_wins_over_an_earlier_error_of_the_abort() -> None:
    log: list[tuple[str, str]] = []
    txn = Transaction()
    txn.join(RecordingDM("a", log, fail_on="abort"))
    txn.join(Interrupting("b", log, "abort"))  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        txn.abort()


@pytest.mark.parametrize("where", ["tpc_abort", "afterCompletion", "after-commit"])
def test_an_interrupt_while_cleaning_up_a_failed_commit_finishes_the_clean_up(where: str) -> None:
    log: list[tuple[str, str]] = []
    tm = TransactionManager()
    synch = Interrupting("synch", log, where)
    tm.registerSynch(synch)  # type: ignore[arg-type]
    txn = tm.get()
    txn.join(Interrupting("a", log, where))  # type: ignore[arg-type]
    txn.join(RecordingDM("b", log, fail_on="tpc_vote"))

    def hook(ok: bool) -> None:
        log.append(("hook", f"after-commit {ok}"))
        if where == "after-commit":
            raise KeyboardInterrupt

    txn.addAfterCommitHook(hook)
    with pytest.raises(KeyboardInterrupt) as info:
        tm.commit()
    assert isinstance(info.value.__cause__, FakeError)  # the commit's own error, kept
    # Every clean-up step ran, in order, past the interrupt.
    assert log[-4:] == [
        ("a", "tpc_abort"),
        ("b", "tpc_abort"),
        ("synch", "afterCompletion"),
        ("hook", "after-commit False"),
    ]
    assert txn.status == Status.COMMIT_FAILED
    tm.unregisterSynch(synch)  # type: ignore[arg-type]
    tm.abort()


def test_an_interrupt_after_a_durable_commit_is_raised_once_all_were_told() -> None:
    log: list[tuple[str, str]] = []
    tm = TransactionManager()
    synch = Interrupting("synch", log, "afterCompletion")
    tm.registerSynch(synch)  # type: ignore[arg-type]
    txn = tm.get()
    txn.join(RecordingDM("a", log))
    txn.addAfterCommitHook(lambda ok: log.append(("hook", f"after-commit {ok}")))
    with pytest.raises(KeyboardInterrupt):
        tm.commit()
    assert txn.status == Status.COMMITTED
    assert log[-2:] == [("synch", "afterCompletion"), ("hook", "after-commit True")]
    assert tm.get() is not txn


def test_before_abort_hook_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    txn = Transaction()
    dm = RecordingDM("a")
    txn.join(dm)
    txn.addBeforeAbortHook(lambda: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="amberdb.transaction"):
        txn.abort()
    assert dm.calls() == ["abort"]
    assert "before-abort hook" in caplog.text and "ZeroDivisionError" in caplog.text


def test_before_abort_hooks_are_kept_by_a_failed_commit() -> None:
    txn = Transaction()
    txn.join(RecordingDM("a", fail_on="tpc_vote"))
    ran: list[str] = []
    txn.addBeforeAbortHook(ran.append, ("before-abort",))
    with pytest.raises(FakeError):
        txn.commit()
    assert len(list(txn.getBeforeAbortHooks())) == 1
    txn.abort()
    assert ran == ["before-abort"]


def test_transaction_without_manager_answers_is_retryable_error() -> None:
    txn = Transaction()
    assert txn.isRetryableError(transaction.TransientError()) and not txn.isRetryableError(FakeError())


def test_set_user_checks_types() -> None:
    with pytest.raises(TypeError, match="setUser"):
        Transaction().setUser(b"bob")  # type: ignore[arg-type]
