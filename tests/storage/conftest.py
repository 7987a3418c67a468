"""Fixtures for the storage tests: one factory per storage kind, so suites run against all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from amberdb.storage.base import IterableStorage, TransactionMeta
from amberdb.storage.file import FileStorage, verify
from amberdb.storage.memory import MemoryStorage
from amberdb.utils import Oid, Tid


class StorageMaker:
    """Creates a storage of one kind and, for persistent kinds, reopens it."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.path = directory / "data.fs"
        self.opened: list[IterableStorage] = []

    @property
    def persistent(self) -> bool:
        return self.kind == "file"

    def open(self, **kwargs: object) -> IterableStorage:
        storage: IterableStorage = (
            MemoryStorage() if self.kind == "memory" else FileStorage(self.path, **kwargs)  # type: ignore[arg-type]
        )
        self.opened.append(storage)
        return storage

    def close_all(self) -> None:
        for storage in self.opened:
            storage.close()
        if self.kind == "file" and self.path.exists():
            # Every test ends with a consistency check of what it left on disk.
            report = verify(self.path)
            assert report.ok and not report.notes, str(report)


@pytest.fixture(params=["memory", "file"])
def maker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageMaker]:
    m = StorageMaker(request.param, tmp_path)
    yield m
    m.close_all()


@pytest.fixture
def storage(maker: StorageMaker) -> IterableStorage:
    return maker.open()


def commit(
    storage: IterableStorage, items: dict[Oid, tuple[Tid, bytes]], meta: TransactionMeta | None = None
) -> Tid:
    """Run one whole commit of ``{oid: (base_tid, record)}`` and return its tid."""
    storage.begin(meta or TransactionMeta())
    try:
        for oid, (base, record) in items.items():
            storage.store(oid, base, record)
        storage.vote()
    except BaseException:
        storage.abort()
        raise
    return storage.finish()


FileStorageFactory = Callable[..., FileStorage]
