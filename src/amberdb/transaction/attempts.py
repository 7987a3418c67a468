"""Retrying a transaction on transient errors: ``for attempt in manager.attempts(3): with attempt:``.

Each attempt begins a transaction when its ``with`` block starts and commits when the block
ends.  If the block or the commit raises a retryable error (ConflictError and its kin, or an
error a joined data manager's ``should_retry`` accepts) and attempts remain, the transaction
is aborted, the error is swallowed and the loop runs the block again; any other error, or a
retryable one on the last attempt, is raised after the abort.  A retryable error from the
start of an attempt (the begin's poll of a storage that lost its server) begins again after
a short pause, within the attempts that remain.  Three attempts is the
default, as Zope does.
"""

from __future__ import annotations

import logging
import time
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

    def __init__(self, manager: TransactionManager, number: int, last: bool, begins: int = 1) -> None:
        self._manager = manager
        self.number = number
        self.last = last
        self.succeeded = False
        self._begins = begins

    def __enter__(self) -> Transaction:
        # A begin that fails with a retryable error (a storage whose server is restarting
        # fails its poll) cannot be retried by the loop -- the with block never ran -- so it
        # is tried again here, after a growing pause, up to the attempts that remain.
        pause = 0.05
        for remaining in range(self._begins - 1, -1, -1):
            try:
                return self._manager.begin()
            except Exception as error:
                if not remaining or not self._manager.isRetryableError(error):
                    raise
                log.info("retrying the start of the transaction after %r", error)
                self._manager.abort()
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
        raise AssertionError("unreachable")

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
        attempt = Attempt(manager, index + 1, last=index == number - 1, begins=number - index)
        yield attempt
        if attempt.succeeded:
            return
