"""Retrying a transaction on transient errors: ``for attempt in manager.attempts(3): with attempt:``.

Each attempt begins a transaction when its ``with`` block starts and commits when the block
ends.  If the block or the commit raises a retryable error (ConflictError and its kin, or an
error a joined data manager's ``should_retry`` accepts) and attempts remain, the transaction
is aborted, the error is swallowed and the loop runs the block again; any other error, or a
retryable one on the last attempt, is raised after the abort.  Three attempts is the
default, as Zope does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amberdb.transaction._transaction import Transaction
    from amberdb.transaction.manager import TransactionManager

__all__ = ["Attempt", "attempts"]

log = logging.getLogger("amberdb.transaction")

DEFAULT_ATTEMPTS = 3


class Attempt:
    """One try of a transaction; a context manager."""

    def __init__(self, manager: TransactionManager, number: int, last: bool) -> None:
        self._manager = manager
        self.number = number
        self.last = last
        self.succeeded = False

    def __enter__(self) -> Transaction:
        return self._manager.begin()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        manager = self._manager
        # Whether to retry is asked before the abort, which lets go of the data managers
        # whose should_retry may know.
        if exc is None:
            try:
                manager.commit()
            except BaseException as error:
                retry = self._retry(error)
                manager.abort()
                if retry:
                    return False  # nothing is propagating: the loop goes on
                raise
            self.succeeded = True
            return False
        retry = self._retry(exc)
        manager.abort()
        return retry

    def _retry(self, error: BaseException) -> bool:
        # An interrupt (KeyboardInterrupt, SystemExit) is never retried.
        if self.last or not isinstance(error, Exception) or not self._manager.isRetryableError(error):
            return False
        log.info("retrying the transaction after %r (attempt %d)", error, self.number)
        return True


def attempts(manager: TransactionManager, number: int = DEFAULT_ATTEMPTS) -> Iterator[Attempt]:
    """Yield up to ``number`` attempts, stopping after the first that commits."""
    if number < 1:
        raise ValueError(f"attempts() needs a number >= 1, got {number}")
    for index in range(number):
        attempt = Attempt(manager, index + 1, last=index == number - 1)
        yield attempt
        if attempt.succeeded:
            return
