"""The spill file behaves like a dict of oid -> (record, base) with positional rollback."""

from __future__ import annotations

import random
import tracemalloc

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from amberdb.storage.spill import SpillFile
from amberdb.utils import p64

OIDS = st.integers(0, 12).map(p64)
SIZES = st.one_of(st.integers(0, 64), st.sampled_from([300_000, 700_000]))


class SpillMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.spill = SpillFile()
        self.model: dict[bytes, tuple[bytes, bytes]] = {}
        self.savepoints: list[tuple[int, dict[bytes, tuple[bytes, bytes]]]] = []
        self.counter = 0

    @rule(oid=OIDS, size=SIZES)
    def store(self, oid: bytes, size: int) -> None:
        self.counter += 1
        record = (b"%d:" % self.counter) + b"x" * size
        base = p64(self.counter)
        self.spill.store(oid, base, record)
        self.model[oid] = (record, base)

    @rule()
    def savepoint(self) -> None:
        self.savepoints.append((self.spill.position, dict(self.model)))

    @precondition(lambda self: self.savepoints)
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.savepoints) - 1))
        position, model = self.savepoints[index]
        del self.savepoints[index + 1 :]
        undone = set(self.spill.rollback(position))
        changed = {oid for oid in set(self.model) | set(model) if self.model.get(oid) != model.get(oid)}
        assert changed <= undone
        self.model = dict(model)

    @invariant()
    def matches_model(self) -> None:
        for oid in map(p64, range(13)):
            expected = self.model.get(oid)
            assert self.spill.load(oid) == expected
            assert (oid in self.spill) == (expected is not None)
        entries = {oid: (record, base) for oid, base, record in self.spill.entries()}
        assert entries == self.model
        assert sorted(self.spill.oids()) == sorted(self.model)
        assert len(self.spill) == len(self.model)

    def teardown(self) -> None:
        self.spill.close()


SpillMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_spill_matches_model = SpillMachine.TestCase


def test_entries_read_across_chunk_boundaries_in_bounded_memory() -> None:
    # 60k entries (about 12 MB, records of every size around the 1 MB read chunk): the
    # iteration must see each exactly once and hold about one chunk, not the file.
    rng = random.Random(5)
    spill = SpillFile()
    expected = {}
    try:
        for n in range(60_000):
            size = rng.choice((0, 7, 150, 300)) if n % 5000 else rng.choice((1 << 20, 1_500_000))
            record = b"%d:" % n + bytes([n % 256]) * size
            spill.store(p64(n), p64(n + 1), record)
            expected[p64(n)] = (p64(n + 1), record)
        tracemalloc.start()
        try:
            seen = 0
            for oid, base, record in spill.entries():
                assert expected[oid] == (base, record)
                seen += 1
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert seen == len(expected)
        assert peak < 8 << 20, f"entries() held {peak >> 20} MB"
    finally:
        spill.close()
