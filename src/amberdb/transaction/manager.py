"""Transaction managers: who keeps track of the current transaction.

A :class:`TransactionManager` has at most one current transaction.  ``get()`` returns it,
creating one when there is none (unless the manager is *explicit*: then only ``begin()``
starts one and using the manager without it raises :class:`NoTransactionError`).  Once the
current transaction is committed or aborted, the manager lets go of it, and the next
``get()`` starts a fresh one.

:class:`ThreadTransactionManager` gives each thread its own :class:`TransactionManager`, so
each thread has its own current transaction and its own synchronizers.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Protocol, TypeVar, overload

from amberdb.exceptions import AlreadyInTransactionError, NoTransactionError, TransientError
from amberdb.transaction._transaction import Transaction
from amberdb.transaction.attempts import DEFAULT_ATTEMPTS, Attempt, attempts
from amberdb.transaction.interfaces import Synchronizer
from amberdb.transaction.savepoint import Savepoint
from amberdb.transaction.weakset import WeakRegistry

__all__ = ["RunDecorator", "ThreadTransactionManager", "TransactionManager"]

log = logging.getLogger("amberdb.transaction")

T = TypeVar("T")
R = TypeVar("R")


class RunDecorator(Protocol):
    """What ``run()`` and ``run(tries)`` return: applied to a function, runs it at once."""

    def __call__(self, func: Callable[[], R], /) -> R: ...


def _check_tries(tries: int) -> None:
    if tries < 1:
        raise ValueError(f"run() needs tries >= 1, got {tries}")


def _text(value: object) -> str:
    # A callable class may carry bytes (or anything) as its name or doc.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _run_note(func: Callable[..., object]) -> str:
    """The note ``run`` gives a transaction: "name\n\ndoc", as the ``transaction`` package does.

    A function named ``_`` (the usual name of a ``@run`` function) contributes only its doc.
    """
    name = getattr(func, "__name__", None)
    if name is None:
        return ""  # a partial or another nameless callable: its doc would be its class's
    name = _text(name or "")
    doc = _text(getattr(func, "__doc__", None) or "")
    if name and name != "_":
        return f"{name}\n\n{doc}" if doc else name
    return doc


class TransactionManager:
    """Keeps the current transaction and the synchronizers told about each transaction.

    Used as a context manager, ``with tm as txn:`` begins a transaction, commits it when the
    block ends normally and aborts it when the block raises (the exception propagates).  A
    commit that fails there is aborted too, so the manager is ready for the next block.
    """

    def __init__(self, explicit: bool = False) -> None:
        self._explicit = explicit
        self._txn: Transaction | None = None
        self._synchs: WeakRegistry[Synchronizer] = WeakRegistry()

    @property
    def explicit(self) -> bool:
        """Whether transactions must be started with :meth:`begin` (``get()`` never creates one)."""
        return self._explicit

    @explicit.setter
    def explicit(self, value: bool) -> None:
        self._explicit = bool(value)

    # -- the current transaction ----------------------------------------------------------

    def begin(self) -> Transaction:
        """Start a new transaction, aborting the current one first.

        An explicit manager refuses instead, with :class:`AlreadyInTransactionError`.
        """
        if self._txn is not None:
            if self._explicit:
                raise AlreadyInTransactionError(
                    "begin() called while a transaction is in progress; commit or abort it first "
                    "(this transaction manager is explicit)"
                )
            self._txn.abort()
        return self._new_transaction(notify=True)

    def get(self) -> Transaction:
        """Return the current transaction, starting one if there is none (unless explicit)."""
        if self._txn is None:
            if self._explicit:
                raise NoTransactionError(
                    "no transaction in progress: call begin() first (this transaction manager is explicit)"
                )
            return self._new_transaction()
        return self._txn

    def _new_transaction(self, notify: bool = False) -> Transaction:
        # Only an explicit begin() tells synchronizers: an implicit get() happens inside a
        # data manager's join (its first change), where moving its snapshot would be wrong.
        txn = self._txn = Transaction(self._synchs, self)
        if not notify:
            return txn
        errors: list[BaseException] = []
        for synch in self._synchs.live():
            try:
                synch.newTransaction(txn)
            except Exception as exc:
                log.error("synchronizer %r raised in newTransaction", synch, exc_info=True)
                errors.append(exc)
        if errors:
            raise errors[0]
        return txn

    def _free(self, txn: Transaction) -> None:
        # Called by a transaction that finished; an older transaction finishing late must not
        # make the manager forget a newer one.
        if self._txn is txn:
            self._txn = None

    def commit(self, subtransaction: bool | int = False) -> None:
        """Commit the current transaction.

        ``commit(True)`` is ZODB's old subtransaction commit: it takes an optimistic savepoint
        that ``abort(True)`` rolls back to, and the transaction stays active.
        """
        txn = self.get()
        if subtransaction:
            txn._commit_subtransaction()
        else:
            txn.commit()

    def abort(self, subtransaction: bool | int = False) -> None:
        """Abort the current transaction.

        ``abort(True)`` only discards the changes since the last ``commit(True)``; with no
        subtransaction committed yet, it aborts the data managers' changes.  Either way the
        transaction stays active.
        """
        txn = self.get()
        if subtransaction:
            txn._abort_subtransaction()
        else:
            txn.abort()

    def savepoint(self, optimistic: bool = False) -> Savepoint:
        """Take a savepoint of the current transaction."""
        return self.get().savepoint(optimistic)

    def doom(self) -> None:
        """Doom the current transaction: it can then only be aborted."""
        self.get().doom()

    def isDoomed(self) -> bool:
        """Whether the current transaction is doomed."""
        return self.get().isDoomed()

    # -- synchronizers --------------------------------------------------------------------

    def registerSynch(self, synch: Synchronizer) -> None:
        """Tell ``synch`` about every transaction of this manager (held by a weak reference).

        With a transaction in progress, ``synch.newTransaction`` hears of it at once, as in
        the ``transaction`` package.
        """
        self._synchs.add(synch)
        txn = self._txn
        if txn is not None:
            synch.newTransaction(txn)

    def unregisterSynch(self, synch: Synchronizer) -> None:
        """Stop telling ``synch`` about transactions (no error if it was not registered)."""
        self._synchs.discard(synch)

    def clearSynchs(self) -> None:
        """Unregister every synchronizer."""
        self._synchs.clear()

    def registeredSynchs(self) -> bool:
        """Whether any synchronizer is registered (and alive)."""
        return bool(self._synchs.live())

    # -- retrying -------------------------------------------------------------------------

    def isRetryableError(self, error: BaseException) -> bool:
        """Whether retrying the current transaction after ``error`` may succeed.

        See :meth:`Transaction.isRetryableError`: a transient error, or one a joined data
        manager's ``should_retry`` accepts.  With no transaction, only a transient error.
        """
        txn = self._txn
        if txn is None:
            return isinstance(error, TransientError)
        return txn.isRetryableError(error)

    def attempts(self, number: int = DEFAULT_ATTEMPTS) -> Iterator[Attempt]:
        """``for attempt in tm.attempts(3): with attempt: ...`` retries on retryable errors."""
        return attempts(self, number)

    @overload
    def run(self, func: None = None, tries: int = DEFAULT_ATTEMPTS) -> RunDecorator: ...
    @overload
    def run(self, func: int, tries: int = DEFAULT_ATTEMPTS) -> RunDecorator: ...
    @overload
    def run(self, func: Callable[[], T], tries: int = DEFAULT_ATTEMPTS) -> T: ...
    def run(
        self, func: Callable[[], T] | int | None = None, tries: int = DEFAULT_ATTEMPTS
    ) -> T | RunDecorator:
        """Call ``func`` in a new transaction and commit it, retrying on a retryable error.

        As in the ``transaction`` package: ``tm.run(func)``, ``tm.run(func, tries=5)``, and
        as decorators that run the function at once and bind its name to the result:
        ``@tm.run``, ``@tm.run()``, ``@tm.run(5)``.  The transaction is noted with the
        function's name and docstring ("name\n\ndoc"; only the doc for a function named
        ``_``).  After ``tries`` attempts, or on an error that is not retryable (see
        :meth:`isRetryableError`), the transaction is aborted and the exception propagates.
        """
        if func is None or isinstance(func, int):
            # Checked now, not when the decorator is applied: the mistake is in this call.
            tries = tries if func is None else func
            _check_tries(tries)

            def decorator(function: Callable[[], R], /) -> R:
                return self._run(function, tries)

            return decorator
        _check_tries(tries)
        return self._run(func, tries)

    def _run(self, func: Callable[[], T], tries: int) -> T:
        note = _run_note(func)
        for attempt in itertools.count(1):
            txn = self.begin()
            if note:
                txn.note(note)
            try:
                result = func()
                self.commit()
            except BaseException as exc:
                # Asked before the abort, which lets go of the data managers that may know.
                retry = isinstance(exc, Exception) and attempt < tries and self.isRetryableError(exc)
                self.abort()
                if retry:
                    log.info("retrying %s after %r (attempt %d of %d)", note or func, exc, attempt, tries)
                    continue
                raise
            return result
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> Transaction:
        """Begin a transaction."""
        return self.begin()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit when the block ended normally, otherwise abort; never swallow the error."""
        if self._txn is None:
            # The block committed or aborted by itself and started nothing since.
            return
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self._abort_quietly()
                raise
        else:
            self._abort_quietly()

    def _abort_quietly(self) -> None:
        # The exception already on its way out is the one the caller needs to see.
        try:
            self.abort()
        except Exception:
            log.error("abort after a failed transaction block raised", exc_info=True)


class ThreadTransactionManager:
    """A transaction manager per thread: each thread has its own current transaction."""

    def __init__(self, explicit: bool = False) -> None:
        self._explicit = explicit
        self._local = threading.local()

    @property
    def manager(self) -> TransactionManager:
        """The calling thread's :class:`TransactionManager` (made on first use)."""
        manager: TransactionManager | None = getattr(self._local, "manager", None)
        if manager is None:
            manager = self._local.manager = TransactionManager(self._explicit)
        return manager

    @property
    def explicit(self) -> bool:
        """Whether the calling thread's manager is explicit (see :class:`TransactionManager`)."""
        return self.manager.explicit

    @explicit.setter
    def explicit(self, value: bool) -> None:
        self.manager.explicit = value

    def begin(self) -> Transaction:
        """Start a new transaction in this thread, aborting its current one first."""
        return self.manager.begin()

    def get(self) -> Transaction:
        """Return this thread's current transaction, starting one if there is none."""
        return self.manager.get()

    def commit(self, subtransaction: bool | int = False) -> None:
        """Commit this thread's current transaction (``commit(True)``: a subtransaction)."""
        self.manager.commit(subtransaction)

    def abort(self, subtransaction: bool | int = False) -> None:
        """Abort this thread's current transaction (``abort(True)``: its last subtransaction)."""
        self.manager.abort(subtransaction)

    def savepoint(self, optimistic: bool = False) -> Savepoint:
        """Take a savepoint of this thread's current transaction."""
        return self.manager.savepoint(optimistic)

    def doom(self) -> None:
        """Doom this thread's current transaction."""
        self.manager.doom()

    def isDoomed(self) -> bool:
        """Whether this thread's current transaction is doomed."""
        return self.manager.isDoomed()

    def registerSynch(self, synch: Synchronizer) -> None:
        """Register ``synch`` with this thread's manager."""
        self.manager.registerSynch(synch)

    def unregisterSynch(self, synch: Synchronizer) -> None:
        """Unregister ``synch`` from this thread's manager."""
        self.manager.unregisterSynch(synch)

    def clearSynchs(self) -> None:
        """Unregister every synchronizer of this thread's manager."""
        self.manager.clearSynchs()

    def registeredSynchs(self) -> bool:
        """Whether this thread's manager has any synchronizer."""
        return self.manager.registeredSynchs()

    def isRetryableError(self, error: BaseException) -> bool:
        """Whether retrying the transaction that raised ``error`` may succeed."""
        return self.manager.isRetryableError(error)

    def attempts(self, number: int = DEFAULT_ATTEMPTS) -> Iterator[Attempt]:
        """Attempts on this thread's manager (see :meth:`TransactionManager.attempts`)."""
        return self.manager.attempts(number)

    @overload
    def run(self, func: None = None, tries: int = DEFAULT_ATTEMPTS) -> RunDecorator: ...
    @overload
    def run(self, func: int, tries: int = DEFAULT_ATTEMPTS) -> RunDecorator: ...
    @overload
    def run(self, func: Callable[[], T], tries: int = DEFAULT_ATTEMPTS) -> T: ...
    def run(
        self, func: Callable[[], T] | int | None = None, tries: int = DEFAULT_ATTEMPTS
    ) -> T | RunDecorator:
        """Run ``func`` in a transaction of this thread (see :meth:`TransactionManager.run`)."""
        return self.manager.run(func, tries)

    def __enter__(self) -> Transaction:
        """Begin a transaction in this thread."""
        return self.manager.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit or abort this thread's transaction (see :class:`TransactionManager`)."""
        self.manager.__exit__(exc_type, exc, tb)
