"""Transaction savepoints: a state of all joined data managers that can be returned to.

A :class:`Savepoint` holds one data-manager savepoint per resource joined when it was taken.
Rolling back to it rolls each of those back, and aborts the resources that joined later (they
had nothing at the savepoint).  A rollback invalidates every savepoint taken after it, but the
rolled-back savepoint stays valid, so it can be rolled back to again.  Commit and abort
invalidate all savepoints of the transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from amberdb.exceptions import InvalidSavepointRollbackError

if TYPE_CHECKING:
    from amberdb.transaction._transaction import Transaction
    from amberdb.transaction.interfaces import DataManager, DataManagerSavepoint

__all__ = ["Savepoint"]


class Savepoint:
    """A savepoint of a whole transaction; get one from :meth:`Transaction.savepoint`."""

    def __init__(
        self,
        transaction: Transaction,
        entries: list[tuple[DataManager, DataManagerSavepoint]],
    ) -> None:
        self._transaction: Transaction | None = transaction
        self._entries = entries
        self._invalid_reason = ""

    @property
    def valid(self) -> bool:
        """Whether :meth:`rollback` may still be called."""
        return self._transaction is not None

    @property
    def transaction(self) -> Transaction | None:
        """The transaction this savepoint belongs to, or ``None`` once it is invalid."""
        return self._transaction

    def rollback(self) -> None:
        """Return every joined data manager to its state at this savepoint.

        Raises :class:`InvalidSavepointRollbackError` when the savepoint is no longer valid,
        and ``TypeError`` when a data manager in it cannot roll back (an optimistic savepoint
        over a data manager without savepoints); either way nothing is rolled back.
        """
        transaction = self._transaction
        if transaction is None:
            raise InvalidSavepointRollbackError(
                f"cannot roll back to this savepoint: it is no longer valid ({self._invalid_reason})"
            )
        transaction._rollback_to(self)

    def _invalidate(self, reason: str) -> None:
        # Dropping the entries frees what data managers keep for their savepoints (possibly
        # large), even while the application still holds this object.
        self._transaction = None
        self._entries = []
        self._invalid_reason = reason

    def __repr__(self) -> str:
        state = "valid" if self.valid else f"invalid: {self._invalid_reason}"
        return f"<Savepoint of {len(self._entries)} data manager(s), {state}>"


class NoRollbackSavepoint:
    """Stands in for a data manager without savepoint support in an optimistic savepoint."""

    def __init__(self, datamanager: DataManager) -> None:
        self.datamanager = datamanager

    def rollback(self) -> None:
        """Always raise ``TypeError`` (as the ``transaction`` package does): nothing to go back to."""
        raise TypeError(
            f"cannot roll back to an optimistic savepoint: data manager {self.datamanager!r} "
            "does not support savepoints"
        )
