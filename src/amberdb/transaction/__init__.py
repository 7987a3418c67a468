"""AmberDB transactions, used the way ZODB's ``transaction`` package is::

    import amberdb.transaction as transaction

    root["count"] = 1
    transaction.commit()

    with transaction.manager as txn:
        txn.note("add an item")
        root["items"].append(item)

The module functions work on :data:`manager`, a :class:`ThreadTransactionManager`: each
thread has its own current transaction.  Anything implementing the data-manager protocol of
:mod:`amberdb.transaction.interfaces` can join a transaction; this package knows nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator

from amberdb.exceptions import (
    AlreadyInTransaction,
    AlreadyInTransactionError,
    DoomedTransaction,
    DoomedTransactionError,
    InvalidSavepointRollbackError,
    NoTransaction,
    NoTransactionError,
    TransactionError,
    TransactionFailedError,
    TransientError,
)
from amberdb.transaction._transaction import Status, Transaction
from amberdb.transaction.attempts import DEFAULT_ATTEMPTS, Attempt
from amberdb.transaction.manager import ThreadTransactionManager, TransactionManager
from amberdb.transaction.savepoint import Savepoint

__all__ = [
    "AlreadyInTransaction",
    "AlreadyInTransactionError",
    "Attempt",
    "DoomedTransaction",
    "DoomedTransactionError",
    "InvalidSavepointRollbackError",
    "NoTransaction",
    "NoTransactionError",
    "Savepoint",
    "Status",
    "ThreadTransactionManager",
    "Transaction",
    "TransactionError",
    "TransactionFailedError",
    "TransactionManager",
    "TransientError",
    "abort",
    "attempts",
    "begin",
    "commit",
    "doom",
    "get",
    "isDoomed",
    "manager",
    "savepoint",
]

manager = ThreadTransactionManager()
"""The default transaction manager; the functions below act on the calling thread's part of it."""


def begin() -> Transaction:
    """Start a new transaction in this thread, aborting its current one first."""
    return manager.begin()


def get() -> Transaction:
    """Return this thread's current transaction, starting one if there is none."""
    return manager.get()


def commit(subtransaction: bool | int = False) -> None:
    """Commit this thread's current transaction; ``commit(True)`` commits a subtransaction."""
    manager.commit(subtransaction)


def abort(subtransaction: bool | int = False) -> None:
    """Abort this thread's current transaction; ``abort(True)`` only its last subtransaction."""
    manager.abort(subtransaction)


def savepoint(optimistic: bool = False) -> Savepoint:
    """Take a savepoint of this thread's current transaction."""
    return manager.savepoint(optimistic)


def doom() -> None:
    """Doom this thread's current transaction: it can then only be aborted."""
    manager.doom()


def attempts(number: int = DEFAULT_ATTEMPTS) -> Iterator[Attempt]:
    """Retry this thread's transaction on transient errors: ``for a in attempts(3): with a: ...``."""
    return manager.attempts(number)


def isDoomed() -> bool:
    """Whether this thread's current transaction is doomed."""
    return manager.isDoomed()
