"""Every storage in the project passes the public conformance kit (amberdb.testing).

The kit is what a storage author outside the project runs too; here it runs against the
reference MemoryStorage, FileStorage (durable, with a read-only follower as its second
instance), and the VoteConflictStorage double, which finds conflicts only at vote and locks
only there, over each of them.
"""

from __future__ import annotations

from amberdb.testing import (
    FileStorageFactory,
    MemoryStorageFactory,
    VoteConflictFactory,
    conformance_suite,
)


class VoteConflictsOverFile(VoteConflictFactory):
    inner = FileStorageFactory


TestMemoryStorage = conformance_suite(MemoryStorageFactory)
TestFileStorage = conformance_suite(FileStorageFactory)
TestVoteConflictsOverMemory = conformance_suite(VoteConflictFactory)
TestVoteConflictsOverFile = conformance_suite(VoteConflictsOverFile)
