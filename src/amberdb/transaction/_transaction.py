"""The :class:`Transaction`: one unit of work over any number of data managers.

Commit-protocol state machine (``status`` values in boxes, arrows labelled by the method that
takes them; "finished" is not a status: the manager has let go of the transaction, and
commit/join/savepoint on it raise :class:`TransactionError`)::

                    doom()                       commit() raises DoomedTransactionError,
      ┌────────┐ ──────────────▶ ┌────────┐ ◀──┘ status stays Doomed
      │ Active │                 │ Doomed │
      └────────┘                 └────────┘
        │    │    abort(): before-abort hooks, beforeCompletion, data managers' abort,
        │    │    after-abort hooks (what they change is aborted too), manager lets go,
        │    │    afterCompletion
        │    └───────────────────────┴──────────────▶ finished (status left as it was)
        │ commit(): before-commit hooks and
        │ beforeCompletion run while still Active
        ▼
      ┌────────────┐  tpc_begin*, commit*, tpc_vote*,    ┌───────────┐  afterCompletion, after-commit
      │ Committing │ ──── tpc_finish* all returned ────▶ │ Committed │  hooks(True) ─▶ finished (their
      └────────────┘                                     └───────────┘  errors are logged, never raised)
        │ any of them raised: tpc_abort for data managers whose tpc_begin was called, abort
        │ for the others; afterCompletion, after-commit hooks(False); the error propagates
        ▼
      ┌───────────────┐  commit() / join() / savepoint() raise TransactionFailedError
      │ Commit failed │ ──── abort() ────▶ finished
      └───────────────┘
        ▲ also from Active or Doomed when a before-commit hook, beforeCompletion,
          savepoint() or Savepoint.rollback() raises

Only Active and Doomed transactions accept new data managers (``join``): a change made in an
after-commit hook is refused, and one made after ``commit()`` returned belongs to the next
transaction.

A hook or synchronizer that raises before the two-phase commit starts fails the commit just
like a data manager does: the hooks are used up by then, so retrying the commit would silently
skip them.  A failed transaction stays its manager's current transaction until ``abort()``.
"""

from __future__ import annotations

import logging
import traceback
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from amberdb.exceptions import (
    DoomedTransactionError,
    InvalidSavepointRollbackError,
    TransactionError,
    TransactionFailedError,
    TransientError,
)
from amberdb.transaction.interfaces import (
    DATA_MANAGER_METHODS,
    DataManager,
    DataManagerSavepoint,
    Synchronizer,
)
from amberdb.transaction.savepoint import NoRollbackSavepoint, Savepoint
from amberdb.transaction.weakset import WeakRegistry

if TYPE_CHECKING:
    from amberdb.transaction.manager import TransactionManager

__all__ = ["Status", "Transaction"]

_LOGGER = logging.getLogger("amberdb.transaction")

# Data-manager classes already checked to provide every protocol method (join is per commit).
_checked_resource_types: set[type] = set()

Hook = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class Status:
    """The values :attr:`Transaction.status` takes."""

    ACTIVE = "Active"
    COMMITTING = "Committing"
    COMMITTED = "Committed"
    DOOMED = "Doomed"
    COMMIT_FAILED = "Commit failed"
    COMMITFAILED = COMMIT_FAILED  # the transaction package's spelling


def _run_logged_hooks(
    hooks: list[Hook],
    leading: tuple[Any, ...],
    message: str,
    errors: list[BaseException],
    interrupts_only: bool = False,
) -> None:
    """Call each ``hook(*leading, *args, **kws)``, logging what raises, then forget them all.

    What a hook raises goes to ``errors`` (only interrupts, with ``interrupts_only``).  An
    index loop, not iteration: a hook may add hooks, and those must run too.
    """
    index = 0
    while index < len(hooks):
        hook, args, kws = hooks[index]
        index += 1
        try:
            hook(*leading, *args, **kws)
        except BaseException as exc:
            _LOGGER.error(message, hook, exc_info=True)
            if not interrupts_only or not isinstance(exc, Exception):
                errors.append(exc)
    hooks.clear()


def _sort_key(resource: DataManager) -> str:
    return resource.sortKey()


def _interrupt(errors: list[BaseException]) -> BaseException | None:
    """The first error that is not an ``Exception`` (KeyboardInterrupt, SystemExit), if any."""
    for error in errors:
        if not isinstance(error, Exception):
            return error
    return None


def _first_error(errors: list[BaseException]) -> BaseException:
    """The error to raise after a clean-up that went on through ``errors``: an interrupt first."""
    return _interrupt(errors) or errors[0]


class Transaction:
    """A unit of work: data managers join it, and it commits or aborts them all together.

    Usually obtained from a transaction manager (``transaction.get()``), which starts a new
    one once this one is committed or aborted.  A ``Transaction()`` made directly works the
    same, without synchronizers.
    """

    def __init__(
        self,
        synchronizers: WeakRegistry[Synchronizer] | None = None,
        manager: TransactionManager | None = None,
    ) -> None:
        self._status = Status.ACTIVE
        self._doomed = False
        # Shared with the manager, so synchronizers registered mid-transaction are told too.
        self._synchs: WeakRegistry[Synchronizer] = (
            synchronizers if synchronizers is not None else WeakRegistry()
        )
        self._manager = manager
        self._resources: list[DataManager] = []
        self._before_commit: list[Hook] = []
        self._after_commit: list[Hook] = []
        self._before_abort: list[Hook] = []
        self._after_abort: list[Hook] = []
        # Weak: a savepoint the application dropped should free its data managers' state.
        # Made on the first savepoint: most transactions take none, and commit is a hot path.
        self._savepoints: weakref.WeakKeyDictionary[Savepoint, int] | None = None
        self._savepoint_count = 0
        self._subtransaction_savepoint: Savepoint | None = None
        self._data: dict[int, tuple[object, Any]] = {}
        self._committing = False
        self._finished = False
        self._failed_operation = ""
        self._failure = ""
        self._user = ""
        self._description = ""
        self._extension_dict: dict[str, Any] = {}

    # -- metadata -------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """One of the :class:`Status` values: "Active", "Committing", "Committed", ..."""
        return self._status

    @property
    def user(self) -> str:
        """Who made this transaction; stored with it."""
        return self._user

    @user.setter
    def user(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Transaction.user must be a str, not {type(value).__name__}")
        self._user = value

    @property
    def description(self) -> str:
        """What this transaction did; :meth:`note` adds lines to it."""
        return self._description

    @description.setter
    def description(self, value: str | None) -> None:
        if value is None:
            return  # as in the transaction package: None leaves the description alone
        if not isinstance(value, str):
            raise TypeError(f"Transaction.description must be a str, not {type(value).__name__}")
        self._description = value

    @property
    def extension(self) -> dict[str, Any]:
        """Further metadata stored with the transaction (a dict; see :meth:`setExtendedInfo`)."""
        return self._extension_dict

    @extension.setter
    def extension(self, value: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"Transaction.extension must be a dict, not {type(value).__name__}")
        self._extension_dict = value

    # ZODB-era code reads and writes ``_extension``; it is the same dict.
    _extension = extension

    def note(self, text: str | None) -> None:
        """Add ``text`` (stripped) as a line of the description; empty text or None is ignored."""
        if text is None:
            return
        if not isinstance(text, str):
            raise TypeError(f"note() takes a str, not {type(text).__name__}")
        text = text.strip()
        if not text:
            return
        self._description = f"{self._description}\n{text}" if self._description else text

    def setUser(self, user_name: str, path: str = "/") -> None:
        """Set :attr:`user` to ``"<path> <user_name>"``, the form Zope and ZODB tools read."""
        if not isinstance(user_name, str) or not isinstance(path, str):
            raise TypeError(
                f"setUser() takes str arguments, not {type(user_name).__name__} and {type(path).__name__}"
            )
        self._user = f"{path} {user_name}"

    def setExtendedInfo(self, name: str, value: Any) -> None:
        """Set one item of :attr:`extension`."""
        self._extension_dict[name] = value

    def data(self, owner: object) -> Any:
        """Return what :meth:`set_data` stored for ``owner``; ``KeyError`` if nothing."""
        try:
            stored_owner, value = self._data[id(owner)]
        except KeyError:
            raise KeyError(owner) from None
        if stored_owner is not owner:
            raise KeyError(owner)
        return value

    def set_data(self, owner: object, value: Any) -> None:
        """Keep ``value`` for ``owner`` (typically a data manager) until the transaction ends."""
        self._data[id(owner)] = (owner, value)

    # -- doom -----------------------------------------------------------------------------

    def doom(self) -> None:
        """Mark the transaction so that it can only be aborted; commit will raise."""
        if self._doomed:
            return
        if self._finished:
            raise TransactionError("cannot doom the transaction: it is already finished")
        if self._committing or self._status != Status.ACTIVE:
            state = "committing" if self._committing else f"in status {self._status!r}"
            raise TransactionError(f"cannot doom the transaction: it is {state}")
        self._doomed = True
        self._status = Status.DOOMED

    def isDoomed(self) -> bool:
        """Whether :meth:`doom` was called."""
        return self._doomed

    # -- joining --------------------------------------------------------------------------

    def join(self, resource: DataManager) -> None:
        """Make ``resource`` commit or abort with this transaction (joining twice is harmless).

        Only an active (or doomed) transaction accepts data managers, as in the ``transaction``
        package: one that is committing or committed refuses them, so a change made in an
        after-commit hook is refused rather than joined to a transaction that is over.
        """
        self._check_usable("join")
        if self._status == Status.COMMITTING:
            raise TransactionError(f"cannot join {resource!r}: the transaction is committing")
        if self._status == Status.COMMITTED:
            raise TransactionError(
                f"cannot join {resource!r}: the transaction already committed (changes made in "
                "an after-commit hook are refused; make them in a new transaction)"
            )
        if type(resource) not in _checked_resource_types:
            self._check_data_manager(resource)
        if any(joined is resource for joined in self._resources):
            return
        self._resources.append(resource)

    @staticmethod
    def _check_data_manager(resource: DataManager) -> None:
        missing = [name for name in DATA_MANAGER_METHODS if not callable(getattr(resource, name, None))]
        if missing:
            raise TypeError(
                f"cannot join {resource!r} to a transaction: it has no {', '.join(missing)} "
                "(see amberdb.transaction.interfaces.DataManager)"
            )
        if not isinstance(resource, type) and all(
            callable(getattr(type(resource), name, None)) for name in DATA_MANAGER_METHODS
        ):
            # The class provides them all: later instances need no check (join is per commit).
            _checked_resource_types.add(type(resource))

    def _unjoin(self, resource: DataManager) -> None:
        self._resources = [joined for joined in self._resources if joined is not resource]

    # -- hooks ----------------------------------------------------------------------------

    def addBeforeCommitHook(
        self, hook: Callable[..., Any], args: Sequence[Any] = (), kws: Mapping[str, Any] | None = None
    ) -> None:
        """Call ``hook(*args, **kws)`` when commit starts, before the two-phase commit."""
        self._before_commit.append((hook, tuple(args), dict(kws or {})))

    def getBeforeCommitHooks(self) -> Iterator[Hook]:
        """Return the registered before-commit hooks as ``(hook, args, kws)`` triples."""
        return iter(list(self._before_commit))

    def addAfterCommitHook(
        self, hook: Callable[..., Any], args: Sequence[Any] = (), kws: Mapping[str, Any] | None = None
    ) -> None:
        """Call ``hook(ok, *args, **kws)`` after commit; ``ok`` is whether it succeeded.

        Exceptions from the hook are logged, not raised: the commit is over by then.
        """
        self._after_commit.append((hook, tuple(args), dict(kws or {})))

    def getAfterCommitHooks(self) -> Iterator[Hook]:
        """Return the registered after-commit hooks as ``(hook, args, kws)`` triples."""
        return iter(list(self._after_commit))

    def addBeforeAbortHook(
        self, hook: Callable[..., Any], args: Sequence[Any] = (), kws: Mapping[str, Any] | None = None
    ) -> None:
        """Call ``hook(*args, **kws)`` when abort starts, before the data managers abort.

        Exceptions from the hook are logged, not raised, as in the ``transaction`` package
        (an abort usually runs while another error is on its way out).
        """
        self._before_abort.append((hook, tuple(args), dict(kws or {})))

    def getBeforeAbortHooks(self) -> Iterator[Hook]:
        """Return the registered before-abort hooks as ``(hook, args, kws)`` triples."""
        return iter(list(self._before_abort))

    def addAfterAbortHook(
        self, hook: Callable[..., Any], args: Sequence[Any] = (), kws: Mapping[str, Any] | None = None
    ) -> None:
        """Call ``hook(*args, **kws)`` after the transaction is aborted."""
        self._after_abort.append((hook, tuple(args), dict(kws or {})))

    def getAfterAbortHooks(self) -> Iterator[Hook]:
        """Return the registered after-abort hooks as ``(hook, args, kws)`` triples."""
        return iter(list(self._after_abort))

    def _run_before_commit_hooks(self) -> None:
        # Index loop, not iteration: a hook may add hooks, and those must run too.
        hooks = self._before_commit
        try:
            index = 0
            while index < len(hooks):
                hook, args, kws = hooks[index]
                index += 1
                hook(*args, **kws)
        finally:
            hooks.clear()

    def _run_after_commit_hooks(self, ok: bool, errors: list[BaseException]) -> None:
        # Errors are logged and collected; the caller raises only interrupts (the commit's
        # outcome is decided by then).
        _run_logged_hooks(self._after_commit, (ok,), "after-commit hook %r raised; ignored", errors)

    def _run_before_abort_hooks(self, errors: list[BaseException]) -> None:
        # As in the transaction package, their errors are only logged; an interrupt
        # (KeyboardInterrupt, SystemExit) is kept and raised once the abort is complete.
        _run_logged_hooks(
            self._before_abort, (), "before-abort hook %r raised; ignored", errors, interrupts_only=True
        )

    def _run_after_abort_hooks(self, errors: list[BaseException]) -> None:
        _run_logged_hooks(self._after_abort, (), "after-abort hook %r raised", errors)

    def _notify_synchs(self, event: str, errors: list[BaseException] | None = None) -> None:
        # Every synchronizer hears about the event even when one of them raises (even a
        # KeyboardInterrupt: the others must still clean up); with no ``errors`` list the
        # first exception is raised once all were told.
        collected: list[BaseException] = [] if errors is None else errors
        first = len(collected)
        for synch in self._synchs.live():
            try:
                getattr(synch, event)(self)
            except BaseException as exc:
                _LOGGER.error("synchronizer %r raised in %s", synch, event, exc_info=True)
                collected.append(exc)
        if errors is None and len(collected) > first:
            raise _first_error(collected[first:])

    # -- state checks ---------------------------------------------------------------------

    # -- retrying -------------------------------------------------------------------------

    def isRetryableError(self, error: BaseException) -> bool:
        """Whether retrying this transaction after ``error`` may succeed.

        True for a :class:`TransientError` (ConflictError and its kin), and for any error a
        joined data manager's ``should_retry(error)`` accepts, as in the ``transaction``
        package (zope.sqlalchemy's data manager says so for database serialization errors).
        Ask before aborting: abort lets go of the data managers.
        """
        if isinstance(error, TransientError):
            return True
        for resource in self._resources:
            should_retry = getattr(resource, "should_retry", None)
            if should_retry is not None and should_retry(error):
                return True
        return False

    # -- state checks ---------------------------------------------------------------------

    def _check_usable(self, action: str) -> None:
        if self._finished:
            how = "committed" if self._status == Status.COMMITTED else "aborted"
            raise TransactionError(
                f"cannot {action}: the transaction was already {how}; "
                "use the transaction manager's get() or begin() for a new one"
            )
        if self._status == Status.COMMIT_FAILED:
            raise TransactionFailedError(
                f"cannot {action}: an earlier {self._failed_operation} of this transaction failed, "
                f"so it must be aborted first (call abort()). The failure was:\n{self._failure}"
            )

    def _fail(self, operation: str, exc: BaseException) -> None:
        self._status = Status.COMMIT_FAILED
        self._failed_operation = operation
        # Text, not the exception: its traceback would keep every frame of the failure alive.
        self._failure = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

    # -- commit ---------------------------------------------------------------------------

    def commit(self) -> None:
        """Commit every joined data manager with the two-phase commit protocol.

        On failure the data managers are cleaned up (``tpc_abort`` or ``abort``), the
        status becomes "Commit failed", and the original exception propagates; the
        transaction must then be aborted.
        """
        if self._committing:
            raise TransactionError("cannot commit: the transaction is already committing")
        if self._doomed and not self._finished:
            raise DoomedTransactionError(
                "cannot commit: the transaction is doomed (doom() was called); it can only be aborted"
            )
        self._check_usable("commit")
        self._committing = True
        try:
            self._commit()
        finally:
            self._committing = False

    def _commit(self) -> None:
        self._invalidate_savepoints("commit() of the transaction invalidated it")
        begun: set[int] = set()
        finished: set[int] = set()
        try:
            # Hooks may change data and join data managers, so they run first.
            self._run_before_commit_hooks()
            self._notify_synchs("beforeCompletion")
            resources = sorted(self._resources, key=_sort_key)
            self._status = Status.COMMITTING
            for resource in resources:
                # Counted as begun before the call: a half-done tpc_begin needs tpc_abort too.
                begun.add(id(resource))
                resource.tpc_begin(self)
            for resource in resources:
                resource.commit(self)
            for resource in resources:
                resource.tpc_vote(self)
            try:
                for resource in resources:
                    resource.tpc_finish(self)
                    finished.add(id(resource))
            except BaseException:
                _LOGGER.critical(
                    "a data manager failed in tpc_finish, after others may have finished: "
                    "the data managers of this transaction may be inconsistent",
                    exc_info=True,
                )
                raise
        except BaseException as exc:
            # Clean-up errors are logged; the commit's own error propagates, unless an
            # interrupt came during the clean-up (it must reach the caller).  As in the
            # ``transaction`` package, synchronizers hear of the end before after-commit hooks.
            errors: list[BaseException] = []
            self._clean_up_failed_commit(begun, finished, errors)
            self._fail("commit", exc)
            self._notify_synchs("afterCompletion", errors)
            self._run_after_commit_hooks(False, errors)
            interrupt = _interrupt(errors)
            if interrupt is not None and isinstance(exc, Exception):
                raise interrupt from exc
            raise
        # Every data manager finished: the transaction is durable, and nothing from here on
        # may report it as failed (errors are logged, only an interrupt is raised, once all
        # ran).  Synchronizers catch up first, then after-commit hooks run, as in the
        # ``transaction`` package.
        self._status = Status.COMMITTED
        errors = []
        try:
            self._notify_synchs("afterCompletion", errors)
            self._run_after_commit_hooks(True, errors)
        finally:
            self._finish()
        if errors:
            interrupt = _interrupt(errors)
            if interrupt is not None:
                raise interrupt

    def _clean_up_failed_commit(
        self, begun: set[int], finished: set[int], errors: list[BaseException]
    ) -> None:
        for resource in self._resources:
            key = id(resource)
            if key in finished:
                continue
            method = "tpc_abort" if key in begun else "abort"
            try:
                getattr(resource, method)(self)
            except BaseException as exc:
                _LOGGER.error(
                    "%s on %r raised while cleaning up a failed commit", method, resource, exc_info=True
                )
                errors.append(exc)

    # -- abort ----------------------------------------------------------------------------

    def abort(self) -> None:
        """Abort every joined data manager and end the transaction.

        Every data manager, hook and synchronizer is called even if some raise (even with
        a KeyboardInterrupt); the first exception is raised at the end (an interrupt before
        any other; before-abort hooks' other errors are only logged).  Aborting a finished
        transaction does nothing.
        """
        if self._finished:
            return
        if self._committing:
            raise TransactionError("cannot abort: the transaction is committing")
        errors: list[BaseException] = []
        try:
            if self._before_abort:
                self._run_before_abort_hooks(errors)
            self._invalidate_savepoints("abort() of the transaction invalidated it")
            self._notify_synchs("beforeCompletion", errors)
            self._abort_resources(errors)
            self._run_after_abort_hooks(errors)
            # A hook that changed objects joined their data managers again: their changes
            # are discarded with the rest, as the transaction package does.
            self._abort_resources(errors)
            # Synchronizers hear of the abort once the manager let go of the transaction, so
            # what they change belongs to the next one (as in the transaction package).
            self._release_manager()
            self._notify_synchs("afterCompletion", errors)
        finally:
            self._finish()
        if errors:
            raise _first_error(errors)

    def _abort_resources(self, errors: list[BaseException]) -> None:
        for resource in self._resources:
            try:
                resource.abort(self)
            except BaseException as exc:
                _LOGGER.error("abort on %r raised", resource, exc_info=True)
                errors.append(exc)
        self._resources.clear()

    def _release_manager(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            manager._free(self)

    def _finish(self) -> None:
        self._finished = True
        self._resources.clear()
        self._before_commit.clear()
        self._after_commit.clear()
        if self._before_abort:  # rarely used: no call for it on the commit path
            self._before_abort.clear()
        self._after_abort.clear()
        self._data.clear()
        self._invalidate_savepoints("the transaction is finished")
        # Drop the link to the manager's synchronizers: a finished transaction has no more news.
        self._synchs = WeakRegistry()
        self._release_manager()

    # -- savepoints -----------------------------------------------------------------------

    def savepoint(self, optimistic: bool = False) -> Savepoint:
        """Take a savepoint of every joined data manager.

        A data manager without a ``savepoint`` method makes this raise ``TypeError``, unless
        ``optimistic`` is true: then the savepoint is taken, but rolling back to it raises
        ``TypeError`` (as in the ``transaction`` package) and changes nothing.
        """
        self._check_usable("take a savepoint")
        if self._status == Status.COMMITTING:
            raise TransactionError("cannot take a savepoint: the transaction is committing")
        if not optimistic:
            for resource in self._resources:
                if not callable(getattr(resource, "savepoint", None)):
                    raise TypeError(
                        f"cannot take a savepoint: data manager {resource!r} does not support "
                        "savepoints (it has no savepoint() method); savepoint(optimistic=True) "
                        "takes one that cannot be rolled back"
                    )
        entries: list[tuple[DataManager, DataManagerSavepoint]] = []
        try:
            for resource in self._resources:
                make = getattr(resource, "savepoint", None)
                entries.append((resource, make() if callable(make) else NoRollbackSavepoint(resource)))
        except BaseException as exc:
            # Some data managers may be half-way through; only an abort is safe now.
            self._fail("savepoint", exc)
            raise
        savepoint = Savepoint(self, entries)
        self._savepoint_count += 1
        if self._savepoints is None:
            self._savepoints = weakref.WeakKeyDictionary()
        self._savepoints[savepoint] = self._savepoint_count
        return savepoint

    def _rollback_to(self, savepoint: Savepoint) -> None:
        # Called by Savepoint.rollback() for a savepoint that is still valid.
        self._check_usable("roll back to a savepoint")
        if self._status == Status.COMMITTING:
            raise TransactionError("cannot roll back to a savepoint: the transaction is committing")
        entries = savepoint._entries
        # Refuse before touching anything, so an optimistic savepoint leaves the state intact.
        for _, entry in entries:
            if isinstance(entry, NoRollbackSavepoint):
                entry.rollback()
        savepoints = self._savepoints
        assert savepoints is not None, "a valid savepoint is always registered"
        index = savepoints[savepoint]
        for other, other_index in list(savepoints.items()):
            if other_index > index:
                other._invalidate("a rollback to an earlier savepoint invalidated it")
                del savepoints[other]
        in_savepoint = {id(resource) for resource, _ in entries}
        try:
            for _, entry in entries:
                entry.rollback()
            # Data managers that joined after the savepoint had nothing then.
            for resource in [r for r in self._resources if id(r) not in in_savepoint]:
                resource.abort(self)
                self._unjoin(resource)
        except BaseException as exc:
            self._fail("savepoint rollback", exc)
            raise

    def _invalidate_savepoints(self, reason: str) -> None:
        savepoints = self._savepoints
        if savepoints is not None:
            for savepoint in list(savepoints.keys()):
                savepoint._invalidate(reason)
            savepoints.clear()
        self._subtransaction_savepoint = None

    # -- subtransactions (ZODB's old API, used through the manager) -----------------------

    def _commit_subtransaction(self) -> None:
        # An optimistic savepoint: data managers without savepoints must not block it.
        self._subtransaction_savepoint = self.savepoint(optimistic=True)

    def _abort_subtransaction(self) -> None:
        self._check_usable("abort a subtransaction")
        savepoint = self._subtransaction_savepoint
        if savepoint is not None:
            if not savepoint.valid:
                raise InvalidSavepointRollbackError(
                    "cannot abort the subtransaction: the savepoint of the last "
                    "commit(subtransaction=True) is no longer valid (a rollback to an earlier "
                    "savepoint invalidated it)"
                )
            savepoint.rollback()
            return
        # No subtransaction committed yet: back to the transaction's start means aborting
        # the data managers' changes; they join again when they change something.
        errors: list[BaseException] = []
        for resource in self._resources:
            try:
                resource.abort(self)
            except BaseException as exc:
                _LOGGER.error("abort on %r raised in abort(subtransaction=True)", resource, exc_info=True)
                errors.append(exc)
        self._resources.clear()
        self._invalidate_savepoints("abort(subtransaction=True) discarded the changes it covered")
        if errors:
            error = _first_error(errors)
            self._fail("subtransaction abort", error)
            raise error

    def __repr__(self) -> str:
        finished = ", finished" if self._finished else ""
        return f"<Transaction {self._status}{finished}, {len(self._resources)} data manager(s)>"
