"""A damaged spill file raises CorruptedDataError wherever it is read; it never yields other data."""

from __future__ import annotations

import os

import pytest

from amberdb.exceptions import CorruptedDataError
from amberdb.storage.spill import SpillFile
from amberdb.utils import p64

RECORDS = {p64(i): b"record %d " % i * (i + 1) for i in range(1, 6)}


def filled() -> SpillFile:
    spill = SpillFile()
    for oid, record in RECORDS.items():
        spill.store(oid, p64(100), record)
    spill.store(p64(2), p64(100), b"second state of 2")
    spill._flush()  # everything in the file, where damage can reach it
    return spill


def expected() -> dict[bytes, bytes]:
    return {**RECORDS, p64(2): b"second state of 2"}


def test_every_flipped_byte_is_caught_or_harmless() -> None:
    probe = filled()
    size = probe.position
    probe.close()
    assert 300 < size < 2000
    outcomes = {"caught": 0, "harmless": 0}
    for pos in range(size):
        spill = filled()
        try:
            byte = os.pread(spill._fd, 1, pos)
            os.pwrite(spill._fd, bytes([byte[0] ^ 0xFF]), pos)
            try:
                loaded = {oid: spill.load(oid) for oid in expected()}
                entries = {oid: (record, base) for oid, base, record in spill.entries()}
            except CorruptedDataError as exc:
                assert "spill file of this transaction" in str(exc) and "abort it" in str(exc)
                outcomes["caught"] += 1
                continue
            # Only bytes of a replaced entry, never read again, may change unnoticed.
            assert loaded == {oid: (record, p64(100)) for oid, record in expected().items()}
            assert entries == loaded
            outcomes["harmless"] += 1
        finally:
            spill.close()
    assert outcomes["caught"] > size * 3 // 4, outcomes


def test_rollback_walk_checks_entry_headers() -> None:
    spill = SpillFile()
    spill.store(p64(1), p64(100), b"kept")
    mark = spill.position
    spill.store(p64(2), p64(100), b"rolled back")
    spill._flush()
    os.pwrite(spill._fd, b"\xff", mark + 3)  # inside the oid of the entry the walk reads
    with pytest.raises(CorruptedDataError, match=rf"offset {mark}\b: entry header checksum mismatch"):
        spill.rollback(mark)
    spill.close()
