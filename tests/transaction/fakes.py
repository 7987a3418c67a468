"""Small data managers and synchronizers that record what the transaction asks of them."""

from __future__ import annotations

from typing import Any

from amberdb.transaction import Transaction


class FakeError(Exception):
    """What a fake raises when told to fail."""


class RecordingDM:
    """A data manager without savepoint support that records every call in ``log``.

    ``fail_on`` names a method that raises :class:`FakeError`; ``log`` may be shared between
    data managers to check the order of calls across them.
    """

    def __init__(
        self,
        name: str,
        log: list[tuple[str, str]] | None = None,
        *,
        fail_on: str | None = None,
        sort_key: str | None = None,
    ) -> None:
        self.name = name
        self.log: list[tuple[str, str]] = [] if log is None else log
        self.fail_on = fail_on
        self.sort_key = name if sort_key is None else sort_key
        self.txns: list[Transaction] = []

    def _call(self, method: str, txn: Transaction | None = None) -> None:
        self.log.append((self.name, method))
        if txn is not None:
            self.txns.append(txn)
        if method == self.fail_on:
            raise FakeError(f"{self.name}.{method} failed")

    def calls(self) -> list[str]:
        """The methods called on this data manager, in order."""
        return [method for name, method in self.log if name == self.name]

    def abort(self, txn: Transaction) -> None:
        self._call("abort", txn)

    def tpc_begin(self, txn: Transaction) -> None:
        self._call("tpc_begin", txn)

    def commit(self, txn: Transaction) -> None:
        self._call("commit", txn)

    def tpc_vote(self, txn: Transaction) -> None:
        self._call("tpc_vote", txn)

    def tpc_finish(self, txn: Transaction) -> None:
        self._call("tpc_finish", txn)

    def tpc_abort(self, txn: Transaction) -> None:
        self._call("tpc_abort", txn)

    def sortKey(self) -> str:
        return self.sort_key

    def __repr__(self) -> str:
        return f"<RecordingDM {self.name}>"


class RecordingSavepoint:
    """A data-manager savepoint that records its rollbacks."""

    def __init__(self, dm: SavepointDM, number: int) -> None:
        self.dm = dm
        self.number = number

    def rollback(self) -> None:
        self.dm._call(f"rollback{self.number}")


class SavepointDM(RecordingDM):
    """A recording data manager that supports savepoints (numbered from 1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.savepoints_taken = 0

    def savepoint(self) -> RecordingSavepoint:
        self._call("savepoint")
        self.savepoints_taken += 1
        return RecordingSavepoint(self, self.savepoints_taken)


class ListDM:
    """A list that commits with transactions: a model of a connection's changes.

    ``append`` joins the manager's current transaction on the first change, as a connection
    does when an object is first modified; abort and the end of a commit forget the join.
    """

    def __init__(self, name: str, manager: Any) -> None:
        self.name = name
        self.manager = manager
        self.committed: list[int] = []
        self.working: list[int] = []
        self.joined: Transaction | None = None
        self._prepared: list[int] | None = None

    def append(self, value: int) -> None:
        if self.joined is None:
            txn = self.manager.get()
            txn.join(self)
            self.joined = txn
        self.working.append(value)

    def abort(self, txn: Transaction) -> None:
        self.working = list(self.committed)
        self.joined = None

    def tpc_begin(self, txn: Transaction) -> None:
        self._prepared = None

    def commit(self, txn: Transaction) -> None:
        self._prepared = list(self.working)

    def tpc_vote(self, txn: Transaction) -> None:
        assert self._prepared is not None

    def tpc_finish(self, txn: Transaction) -> None:
        assert self._prepared is not None
        self.committed = self._prepared
        self._prepared = None
        self.joined = None

    def tpc_abort(self, txn: Transaction) -> None:
        self._prepared = None
        self.working = list(self.committed)
        self.joined = None

    def sortKey(self) -> str:
        return self.name

    def savepoint(self) -> ListSavepoint:
        return ListSavepoint(self, list(self.working))


class ListSavepoint:
    """Remembers a copy of a :class:`ListDM`'s working list."""

    def __init__(self, dm: ListDM, state: list[int]) -> None:
        self.dm = dm
        self.state = state

    def rollback(self) -> None:
        self.dm.working = list(self.state)


class RecordingSynch:
    """A synchronizer that records ``(event, transaction)`` pairs."""

    def __init__(self, log: list[tuple[str, str]] | None = None, name: str = "synch") -> None:
        self.name = name
        self.events: list[tuple[str, Transaction]] = []
        self.log = log
        self.fail_on: str | None = None

    def _event(self, event: str, txn: Transaction) -> None:
        self.events.append((event, txn))
        if self.log is not None:
            self.log.append((self.name, event))
        if event == self.fail_on:
            raise FakeError(f"{self.name}.{event} failed")

    def names(self) -> list[str]:
        """The events received, in order."""
        return [event for event, _ in self.events]

    def newTransaction(self, txn: Transaction) -> None:
        self._event("newTransaction", txn)

    def beforeCompletion(self, txn: Transaction) -> None:
        self._event("beforeCompletion", txn)

    def afterCompletion(self, txn: Transaction) -> None:
        self._event("afterCompletion", txn)
