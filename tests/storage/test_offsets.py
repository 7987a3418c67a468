"""OffsetIndex against a plain dict."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from amberdb.storage.offsets import OffsetIndex

# Mostly small oids (the dense array), some far away (the overflow dict), some in between.
OIDS = st.one_of(
    st.integers(0, 3000),
    st.integers(0, 1 << 21),
    st.integers(1 << 40, (1 << 40) + 50),
    st.integers(0, (1 << 63) - 1),
)
OFFSETS = st.integers(0, (1 << 63) - 1)


class IndexVsDict(RuleBasedStateMachine):
    floating = False

    def __init__(self) -> None:
        super().__init__()
        self.index = OffsetIndex(floating=self.floating)
        self.model: dict[int, int] = {}

    @rule(oid=OIDS, offset=OFFSETS)
    def set(self, oid: int, offset: int) -> None:
        self.index[oid] = offset
        self.model[oid] = offset

    @rule(oid=OIDS)
    def delete(self, oid: int) -> None:
        if oid in self.model:
            del self.index[oid]
            del self.model[oid]
        else:
            with pytest.raises(KeyError):
                del self.index[oid]

    @rule(oid=OIDS)
    def get(self, oid: int) -> None:
        assert self.index.get(oid) == self.model.get(oid, -1)
        assert self.index.get(oid, 7) == self.model.get(oid, 7)
        assert (oid in self.index) == (oid in self.model)

    @rule()
    def round_trip(self) -> None:
        if self.index._base:  # a floating index whose array does not start at 0
            with pytest.raises(ValueError, match="starts at oid 0"):
                self.index.to_bytes()
            return
        clone = OffsetIndex.from_bytes(self.index.to_bytes())
        assert list(clone.items()) == sorted(self.model.items())
        assert len(clone) == len(self.model)
        self.index = clone

    @rule()
    def copy_is_independent(self) -> None:
        clone = self.index.copy()
        clone[5] = 123
        assert self.index.get(5) == self.model.get(5, -1)
        assert clone == clone.copy()

    @invariant()
    def agrees(self) -> None:
        assert len(self.index) == len(self.model)
        assert self.index.max_oid() == max(self.model, default=-1)


TestIndexVsDict = IndexVsDict.TestCase
TestIndexVsDict.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


class FloatingIndexVsDict(IndexVsDict):
    floating = True


TestFloatingIndexVsDict = FloatingIndexVsDict.TestCase
TestFloatingIndexVsDict.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_a_floating_index_stays_dense_far_from_oid_zero() -> None:
    # A transaction's spill index in a database that already holds millions of objects.
    index = OffsetIndex(floating=True)
    first = 50_000_000
    for oid in range(first, first + 100_000):
        index[oid] = oid
    index[7] = 7  # an old object changed in the same transaction
    assert len(index._dense) < 200_000 and len(index._overflow) == 1
    assert index.get(first + 99_999) == first + 99_999 and index.get(7) == 7
    assert index.max_oid() == first + 99_999
    assert next(iter(index.items())) == (7, 7)


@given(st.dictionaries(OIDS, OFFSETS, max_size=50))
def test_items_in_oid_order(entries: dict[int, int]) -> None:
    index = OffsetIndex()
    for oid, offset in entries.items():
        index[oid] = offset
    assert list(index.items()) == sorted(entries.items())
    assert list(index.keys()) == sorted(entries)


def test_sequential_oids_stay_dense() -> None:
    index = OffsetIndex()
    for oid in range(100_000):
        index[oid] = oid * 10
    assert len(index) == 100_000
    assert index.max_oid() == 99_999
    assert len(index.to_bytes()) < 100_000 * 8 * 2 + 100
    assert index.get(123) == 1230


def test_far_oid_overflows_then_migrates() -> None:
    index = OffsetIndex()
    index[5_000_000] = 1
    assert len(index.to_bytes()) < 100  # no giant array for one far oid
    for oid in range(0, 5_000_001, 1 << 19):
        index[oid] = 2
    assert index[5_000_000] == 1
    assert index.get(4_999_999) == -1
    assert len(index) == len(range(0, 5_000_001, 1 << 19)) + 1


def test_rejects_negative() -> None:
    index = OffsetIndex()
    with pytest.raises(ValueError):
        index[-1] = 0
    with pytest.raises(ValueError):
        index[0] = -5


@pytest.mark.parametrize(
    "data", [b"", b"junk" * 10, OffsetIndex().to_bytes()[:-1] + b"x", OffsetIndex().to_bytes() + b"x"]
)
def test_from_bytes_rejects_garbage(data: bytes) -> None:
    if data == OffsetIndex().to_bytes():
        return
    with pytest.raises(ValueError):
        OffsetIndex.from_bytes(data)


def read_back(data: bytes, length: int | None = None, **crc: int) -> OffsetIndex:
    """``OffsetIndex.read_from`` over a file holding ``data`` after a 5-byte prefix."""
    with tempfile.TemporaryFile() as f:
        f.write(b"head:" + data)
        f.flush()
        os.lseek(f.fileno(), 5, os.SEEK_SET)
        return OffsetIndex.read_from(f.fileno(), len(data) if length is None else length, **crc)


@given(st.dictionaries(OIDS, OFFSETS, max_size=50))
@settings(deadline=None)
def test_read_from_reads_what_from_bytes_reads(entries: dict[int, int]) -> None:
    index = OffsetIndex()
    for oid, offset in entries.items():
        index[oid] = offset
    data = index.to_bytes()
    clone = read_back(data, crc_start=7, expected_crc=zlib.crc32(data, 7))
    assert clone == OffsetIndex.from_bytes(data) == index
    assert list(clone.items()) == sorted(entries.items())
    assert clone.max_oid() == max(entries, default=-1)
    clone[3] = 33  # the array read into is an ordinary, growable one
    clone[5000] = 55
    assert clone.get(3) == 33 and clone.get(5000) == 55


def small_index_bytes() -> bytes:
    index = OffsetIndex()
    for oid in (0, 1, 2, 5, 1 << 40):
        index[oid] = 100 + oid % 1000
    return index.to_bytes()


def test_read_from_refuses_what_from_bytes_refuses() -> None:
    data = small_index_bytes()
    for cut in range(len(data)):  # a file cut short, whatever length it claims
        with pytest.raises(ValueError):
            read_back(data[:cut], len(data))
        with pytest.raises(ValueError):
            read_back(data[:cut])
    with pytest.raises(ValueError, match="wrong length"):
        read_back(data + b"x")
    pair_at = len(data) - 16  # the overflow pair of oid 2**40: make it collide with the array
    with pytest.raises(ValueError, match="bad overflow entry"):
        read_back(data[:pair_at] + (1).to_bytes(8, "little") + data[pair_at + 8 :])


def test_read_from_checks_the_crc_before_the_entries() -> None:
    data = small_index_bytes()
    crc = zlib.crc32(data)
    assert read_back(data, expected_crc=crc) == OffsetIndex.from_bytes(data)
    with pytest.raises(ValueError, match="checksum"):
        read_back(data, expected_crc=crc ^ 1)
    with pytest.raises(ValueError, match="checksum"):
        read_back(data, crc_start=1, expected_crc=crc)
    for pos in range(32, len(data)):  # past the header every damaged byte is a checksum mismatch
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        with pytest.raises(ValueError, match="checksum"):
            read_back(bytes(damaged), expected_crc=crc)


def test_saved_array_ends_at_the_largest_oid() -> None:
    index = OffsetIndex()
    for oid in range(1000):
        index[oid] = oid + 1
    assert len(index._dense) > 1000  # growth left an empty tail
    assert len(index.to_bytes()) == 32 + 8 * 1000
    for oid in range(900, 1000):
        del index[oid]
    index[3_000_000] = 7  # in the overflow dict, saved as a pair after the array
    data = index.to_bytes()
    assert len(data) == 32 + 8 * 900 + 16
    clone = OffsetIndex.from_bytes(data)
    assert clone == index and clone.max_oid() == 3_000_000
    del clone[3_000_000]
    assert clone.max_oid() == 899
    assert len(OffsetIndex().to_bytes()) == 32


def test_an_untrimmed_array_still_loads() -> None:
    """What earlier versions saved: the array with the empty tail growth left."""
    index = OffsetIndex()
    for oid in range(10):
        index[oid] = oid + 1
    slots = [oid + 1 for oid in range(10)] + [-1] * 1014
    data = struct.pack(f"<8sQQQ{len(slots)}q", b"AMBOFFS\x02", len(slots), 0, 10, *slots)
    for clone in (OffsetIndex.from_bytes(data), read_back(data)):
        assert clone == index and clone.max_oid() == 9
        assert len(clone.to_bytes()) == 32 + 8 * 10


def test_reserve_makes_room_once() -> None:
    index = OffsetIndex()
    index.reserve(10_000)
    dense = index._dense
    assert len(dense) == 10_000 and len(index) == 0
    for oid in range(10_000):
        index[oid] = oid + 1
    assert index._dense is dense and len(dense) == 10_000  # filled without regrowing
    assert index.max_oid() == 9_999 and index.get(1234) == 1235
    floating = OffsetIndex(floating=True)
    floating.reserve(100)  # a floating index starts where its first oid is: nothing to reserve
    assert len(floating) == 0 and floating.get(5) == -1
