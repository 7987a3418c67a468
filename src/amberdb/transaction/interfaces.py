"""What a resource must implement to take part in an AmberDB transaction.

The transaction package knows nothing about connections, storages or persistent objects: it
drives anything that implements :class:`DataManager`.  These are :class:`typing.Protocol`
classes, so a data manager needs no base class; it only needs the methods.

A data manager joins a transaction with ``txn.join(dm)`` the first time it has something to
commit.  At commit the transaction calls, on every joined data manager in ``sortKey()``
order, ``tpc_begin`` on all, then ``commit`` on all, then ``tpc_vote`` on all, then
``tpc_finish`` on all.  When anything fails before ``tpc_finish``, data managers whose
``tpc_begin`` was called get ``tpc_abort`` and the others get ``abort``.

Two methods are optional: ``savepoint()`` (:class:`SavepointDataManager`), and
``should_retry(error) -> bool``, which makes ``attempts()``, ``run()`` and
``isRetryableError`` retry the transaction after an error the data manager knows to be
transient (a database serialization failure, say), as in the ``transaction`` package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from amberdb.transaction._transaction import Transaction

__all__ = [
    "DATA_MANAGER_METHODS",
    "DataManager",
    "DataManagerSavepoint",
    "SavepointDataManager",
    "Synchronizer",
]

DATA_MANAGER_METHODS = ("abort", "tpc_begin", "commit", "tpc_vote", "tpc_finish", "tpc_abort", "sortKey")
"""The methods :meth:`Transaction.join` checks for, so a wrong object fails at join, not at commit."""


class DataManager(Protocol):
    """A resource that commits or aborts its changes together with a transaction."""

    def abort(self, txn: Transaction) -> None:
        """Discard the changes made in ``txn`` (never called after ``tpc_begin``)."""

    def tpc_begin(self, txn: Transaction) -> None:
        """Start the two-phase commit of ``txn``."""

    def commit(self, txn: Transaction) -> None:
        """Write the changes made in ``txn`` so that ``tpc_vote`` can decide on them."""

    def tpc_vote(self, txn: Transaction) -> None:
        """Raise if ``txn`` cannot be committed; after returning, ``tpc_finish`` must succeed."""

    def tpc_finish(self, txn: Transaction) -> None:
        """Make the changes of ``txn`` permanent and visible."""

    def tpc_abort(self, txn: Transaction) -> None:
        """Undo everything done for ``txn`` since ``tpc_begin``."""

    def sortKey(self) -> str:
        """Return a key that orders data managers in the commit (and so their locking)."""


class DataManagerSavepoint(Protocol):
    """A data manager's own savepoint: something it can go back to."""

    def rollback(self) -> None:
        """Put the data manager back in the state it had when the savepoint was taken."""


class SavepointDataManager(DataManager, Protocol):
    """A data manager that can also take savepoints."""

    def savepoint(self) -> DataManagerSavepoint:
        """Remember the current state so that it can be rolled back to later."""


class Synchronizer(Protocol):
    """An object told about every transaction of a transaction manager it registered with.

    Managers keep synchronizers in a weak set: registering does not keep one alive.
    """

    def newTransaction(self, txn: Transaction) -> None:
        """Called when the manager's ``begin()`` starts ``txn``, and on registering during ``txn``.

        An implicit start (``get()`` creating a transaction) does not call it: that happens
        inside a data manager's first change.
        """

    def beforeCompletion(self, txn: Transaction) -> None:
        """Called when ``txn`` starts to commit or abort."""

    def afterCompletion(self, txn: Transaction) -> None:
        """Called when a commit of ``txn`` or its abort is over (also after a failed commit)."""
