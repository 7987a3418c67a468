"""Storage doubles for the hostile tests: a wrapper that fails chosen calls on demand."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from amberdb.storage.base import Storage, TransactionMeta
from amberdb.utils import Oid, Tid


class Faulty:
    """Wraps ``inner``; ``fail_poll`` makes every ``poll_invalidations`` raise OSError.

    ``fail_poll_after_finish`` switches ``fail_poll`` on as soon as a ``finish`` returns,
    so the first poll to fail is the one a connection makes after its commit is durable.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.fail_poll = False
        self.fail_poll_after_finish = False
        self.polls = 0

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def name(self) -> str:
        return f"faulty:{self.inner.name}"

    def __len__(self) -> int:
        return len(self.inner)

    def load(self, oid: Oid, before: Tid | None = None) -> tuple[bytes, Tid]:
        return self.inner.load(oid, before)

    def last_tid(self) -> Tid:
        return self.inner.last_tid()

    def poll_invalidations(self, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
        self.polls += 1
        if self.fail_poll:
            raise OSError("the storage server went away")
        return self.inner.poll_invalidations(since)

    def new_oid(self) -> Oid:
        return self.inner.new_oid()

    def begin(self, meta: TransactionMeta) -> None:
        self.inner.begin(meta)

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        self.inner.store(oid, base_tid, record)

    def vote(self) -> None:
        self.inner.vote()

    def finish(self) -> Tid:
        tid = self.inner.finish()
        if self.fail_poll_after_finish:
            self.fail_poll = True
        return tid

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
