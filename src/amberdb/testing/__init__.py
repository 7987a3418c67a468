"""The storage conformance kit: one call runs AmberDB's whole storage suite against your storage.

In your own pytest suite::

    from amberdb.testing import StorageFactory, conformance_suite

    class MyFactory(StorageFactory):
        durable = True

        def create(self):
            return MyStorage(self.directory / "data", create=True)

        def reopen(self):
            return MyStorage(self.directory / "data")

    TestMyStorage = conformance_suite(MyFactory)

The suite checks the numbered invariants of :mod:`amberdb.storage.base` -- conflicts reported
at ``store`` or at ``vote``, one committer at a time, polls that name what changed -- plus,
where the factory says the storage can, durability across reopening and across a committing
process killed at a random moment, and a second instance (a second process) that follows the
first one's commits; and the object layer on top: two :class:`~amberdb.DB` objects on one
set of data, each transaction seeing one committed state, conflicts raised or resolved.
``StorageWrapper`` passes every call to a wrapped storage: subclass it for a test double that
changes one call.  It needs ``pytest`` and ``hypothesis`` (the ``testing`` extra).
"""

from __future__ import annotations

import pytest

# The suites are not test modules of the author's project, so pytest would not rewrite their
# assertions: a failing check would read as a bare "AssertionError".  Registered before they
# are imported, they fail showing the values compared.
pytest.register_assert_rewrite(
    "amberdb.testing.storage_suite", "amberdb.testing.object_suite", "amberdb.testing.history_suite"
)

from amberdb.testing.doubles import StorageWrapper, VoteConflictStorage  # noqa: E402
from amberdb.testing.factories import (  # noqa: E402
    ClientStorageFactory,
    FileStorageFactory,
    MemoryStorageFactory,
    PostgreSQLHistoryFreeFactory,
    PostgreSQLStorageFactory,
    SQLiteHistoryFreeFactory,
    SQLiteStorageFactory,
    StorageFactory,
    VoteConflictFactory,
)
from amberdb.testing.history_suite import HistoryFreeSuite, HistorySuite, PackSuite  # noqa: E402
from amberdb.testing.object_suite import ObjectSuite  # noqa: E402
from amberdb.testing.storage_suite import ReadOnlySuite, StorageMachineSuite, StorageSuite, commit  # noqa: E402

__all__ = [
    "ClientStorageFactory",
    "FileStorageFactory",
    "HistorySuite",
    "MemoryStorageFactory",
    "PackSuite",
    "PostgreSQLHistoryFreeFactory",
    "PostgreSQLStorageFactory",
    "SQLiteHistoryFreeFactory",
    "SQLiteStorageFactory",
    "StorageFactory",
    "StorageWrapper",
    "VoteConflictFactory",
    "VoteConflictStorage",
    "commit",
    "conformance_suite",
]


def conformance_suite(factory_class: type[StorageFactory]) -> type:
    """A pytest test class running every conformance test against ``factory_class``'s storages.

    Assign it to a name starting with ``Test`` in a test module for pytest to collect it.
    """
    history: tuple[type, ...] = (
        (HistorySuite, PackSuite) if factory_class.keeps_history else (HistoryFreeSuite,)
    )
    return type(
        f"ConformanceOf{factory_class.__name__}",
        (StorageSuite, StorageMachineSuite, ReadOnlySuite, ObjectSuite, *history),
        {"factory_class": factory_class, "__test__": True},
    )
