"""Storage doubles for the hostile tests: a wrapper that fails chosen calls on demand."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from amberdb.storage.base import Storage
from amberdb.testing import StorageWrapper
from amberdb.utils import Oid, Tid


class Faulty(StorageWrapper):
    """Wraps ``inner``; ``fail_poll`` makes every ``poll_invalidations`` raise OSError.

    ``fail_poll_after_finish`` switches ``fail_poll`` on as soon as a ``finish`` returns,
    so the first poll to fail is the one a connection makes after its commit is durable.
    """

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.fail_poll = False
        self.fail_poll_after_finish = False
        self.polls = 0

    @property
    def name(self) -> str:
        return f"faulty:{self.inner.name}"

    def poll_invalidations(self, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
        self.polls += 1
        if self.fail_poll:
            raise OSError("the storage server went away")
        return super().poll_invalidations(since)

    def finish(self) -> Tid:
        tid = super().finish()
        if self.fail_poll_after_finish:
            self.fail_poll = True
        return tid

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
