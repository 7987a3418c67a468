"""Pack on the storages that have it so far; the rest of the history contract runs in
test_conformance through amberdb.testing.conformance_suite."""

from amberdb.testing import MemoryStorageFactory, PackSuite, VoteConflictFactory


class TestMemoryPack(PackSuite):
    factory_class = MemoryStorageFactory


class TestVoteConflictPack(PackSuite):
    factory_class = VoteConflictFactory
