"""Checking a whole FileStorage data file, and its index file, without changing either.

:func:`verify` reads every byte: the file header, every transaction (layout, tid order,
checksum), every data record (checksum, tid, layout) and the back-pointer structure (each
record points exactly at the previous revision of its oid).  Past damage it looks for the
next valid transaction and goes on, so one report lists every problem.  It is what a
command-line ``amberdb verify`` prints, and what to run before deciding how to recover a
file an open refused.  Run it on a file no writer has open: with a writer alive, damage at
the very end is reported as that writer's transaction in flight, not as a problem.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

from amberdb.storage.file.format import (
    DATA_HEADER,
    DATA_HEADER_CHECKED,
    FILE_HEADER,
    FILE_MAGIC_PREFIX,
    INDEX_HEADER,
    MAX_OID,
    READABLE_VERSIONS,
    STATUS_ABORTED,
    STATUS_VOTED,
    TXN_HEADER,
    TXN_TRAILER,
    TxnHeader,
    file_header_crc_ok,
    is_partial_file_header,
    magic_damaged,
)
from amberdb.storage.file.index_file import SavedIndex, index_beside_a_cut_file, own_index_file
from amberdb.storage.file.locking import writers_kept_out
from amberdb.storage.file.recovery import (
    describe_txn_problem,
    find_valid_txn,
    judge_stop,
    pread_exact,
)
from amberdb.storage.offsets import OffsetIndex
from amberdb.utils import oid_repr, z64

__all__ = ["Problem", "VerifyReport", "verify"]

_H = TXN_HEADER.size
_T = TXN_TRAILER.size
_D = DATA_HEADER.size


@dataclass(frozen=True)
class Problem:
    """One check that failed: where (``offset`` in ``file``) and what."""

    offset: int
    what: str
    file: str = "data"
    """``data`` or ``index``."""

    def __str__(self) -> str:
        return f"{self.file} file, offset {self.offset}: {self.what}"


@dataclass
class VerifyReport:
    """What :func:`verify` found.  ``ok`` when no check failed (notes are not problems)."""

    path: str
    file_size: int = 0
    end: int = 0
    """Just past the last valid transaction."""
    transactions: int = 0
    records: int = 0
    last_tid: bytes = z64
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Things worth knowing that are not damage: a torn tail, a voted tail, a stale index."""

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.problems

    def __str__(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [
            f"{self.path}: {verdict}; {self.transactions} transactions, {self.records} data records,"
            f" {self.file_size} bytes, valid up to {self.end}, last tid {oid_repr(self.last_tid)}"
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Check the data file at ``path`` and its index file; change nothing.  Returns a report."""
    name = os.fspath(path)
    report = VerifyReport(name)
    fd = os.open(name, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        report.file_size = report.end = size
        file_id = _check_file_header(fd, size, report)
        if file_id is None:
            return report
        saved = _read_index_file(name, file_id, report)
        walker = _Walker(fd, size, zlib.crc32(file_id), report, None if saved is None else saved.position)
        walker.run()
        if walker.tail_problem is not None:
            with writers_kept_out(name) as no_writer:
                if not no_writer:
                    # A live writer's transaction in flight looks like damage (I9 of storage.py).
                    report.problems.remove(walker.tail_problem)
                    report.notes.append(
                        f"the end of the file from offset {walker.tail_problem.offset} is being written"
                        " by a live writer; check again once it has closed the file"
                    )
        if saved is not None:
            _compare_index(saved, walker, report)
    finally:
        os.close(fd)
    return report


def _check_file_header(fd: int, size: int, report: VerifyReport) -> bytes | None:
    """The file id to check with, or None when nothing past the header can be checked."""
    header = pread_exact(fd, FILE_HEADER.size, 0)
    if size < FILE_HEADER.size:
        if is_partial_file_header(header):
            problem = index_beside_a_cut_file(report.path, size)
            if problem is not None:
                report.problems.append(Problem(0, problem))
            else:
                report.notes.append("the file is shorter than its header: a writable open starts it afresh")
        else:
            report.problems.append(Problem(0, f"not an AmberDB file storage (bad magic {header[:8]!r})"))
        return None
    if magic_damaged(header):
        report.problems.append(
            Problem(0, f"the magic is damaged ({header[:8]!r}); checking with the file id")
        )
        return bytes(FILE_HEADER.unpack(header)[1])
    if header[:7] != FILE_MAGIC_PREFIX:
        report.problems.append(Problem(0, f"not an AmberDB file storage (bad magic {header[:8]!r})"))
        return None
    if header[7] not in READABLE_VERSIONS and (file_header_crc_ok(header) or header[7] == 1):
        report.problems.append(Problem(0, f"format version {header[7]} is not the one this AmberDB reads"))
        return None
    if not file_header_crc_ok(header):
        report.problems.append(Problem(0, "file header checksum mismatch; checking with the stored file id"))
    file_id: bytes = FILE_HEADER.unpack(header)[1]
    return file_id


class _Walker:
    """One pass over the transactions, oldest first."""

    def __init__(self, fd: int, size: int, file_id_crc: int, report: VerifyReport, watch: int | None) -> None:
        self.fd = fd
        self.size = size
        self.crc = file_id_crc
        self.report = report
        self.newest = OffsetIndex()  # oid -> offset of its newest record seen so far
        self.gaps: list[tuple[int, int]] = []  # damaged ranges skipped: revisions there are unknown
        self.ends: dict[int, bytes] = {FILE_HEADER.size: z64}  # transaction end -> its tid
        self.watch = watch
        self.at_watch: OffsetIndex | None = OffsetIndex() if watch == FILE_HEADER.size else None
        self.tail_problem: Problem | None = None  # damage at the end, with nothing valid after

    def run(self) -> None:
        report = self.report
        pos = FILE_HEADER.size
        prev_tid = z64
        report.end = pos
        while pos < self.size:
            h, problem = describe_txn_problem(self.fd, self.crc, pos, self.size, prev_tid)
            if problem is None:
                assert h is not None
                if h.status == STATUS_ABORTED:
                    # Aborted after its vote (group commit): whole, in no state of the
                    # database; only its tid orders the next one.
                    prev_tid = h.tid
                    pos += h.length
                    report.end = pos
                    continue
                self._check_records(pos, h)
                report.transactions += 1
                prev_tid = report.last_tid = h.tid
                if h.status == STATUS_VOTED:
                    report.notes.append(
                        f"the transaction at offset {pos} is marked voted, not finished: it is committed"
                        " unless the writer that voted it still runs (a writable open marks it finished)"
                    )
                pos += h.length
                report.end = pos
                self.ends[pos] = h.tid
                if pos == self.watch:
                    self.at_watch = self.newest.copy()
                continue
            tail, reason, damage = judge_stop(self.fd, self.crc, pos, self.size, prev_tid)
            if tail == "torn":
                report.notes.append(
                    f"torn tail of {self.size - pos} bytes at offset {pos} ({reason}): not committed;"
                    " a writable open truncates it"
                )
                return
            report.problems.append(Problem(pos, damage.problem if damage is not None else str(problem)))
            follower = find_valid_txn(self.fd, self.crc, pos + 1, self.size, prev_tid)
            if follower is None:
                self.tail_problem = report.problems[-1]
                return
            self.gaps.append((pos, follower))
            pos = follower

    def _check_records(self, pos: int, h: TxnHeader) -> None:
        """Check every data record of the valid transaction at ``pos``."""
        problems = self.report.problems
        data = pread_exact(self.fd, h.length - _H - _T, pos + _H)
        view = memoryview(data)
        p = h.meta_len
        updates: dict[int, int] = {}
        for _ in range(h.records):
            at = pos + _H + p
            if p + _D > len(data):
                problems.append(Problem(pos, "data records overrun their transaction"))
                return
            oid, rtid, back, rlen, rcrc = DATA_HEADER.unpack_from(data, p)
            what = f"data record of oid {oid_repr(oid)}"
            start, stop = p + _D, p + _D + rlen
            if stop > len(data):
                problems.append(Problem(at, f"{what} runs past its transaction"))
                return
            if zlib.crc32(view[start:stop], zlib.crc32(view[p : p + DATA_HEADER_CHECKED], self.crc)) != rcrc:
                problems.append(Problem(at, f"{what}: checksum mismatch"))
            if rtid != h.tid:
                problems.append(Problem(at, f"{what} has tid {oid_repr(rtid)}, not {oid_repr(h.tid)}"))
            oid_int = int.from_bytes(oid, "big")
            if oid_int > MAX_OID:
                problems.append(Problem(at, f"{what}: oid above 2**63-1"))
            else:
                expected = max(self.newest.get(oid_int), 0)
                if back != expected and not any(lo <= back < hi for lo, hi in self.gaps):
                    problems.append(Problem(at, f"{what} points back at {back}, not at {expected}"))
                updates[oid_int] = at
            self.report.records += 1
            p = stop
        if p != len(data):
            problems.append(Problem(pos, "data records do not fill their transaction"))
        for oid_int, at in updates.items():
            self.newest[oid_int] = at


def _read_index_file(name: str, file_id: bytes, report: VerifyReport) -> SavedIndex | None:
    """The index file of this data file when it passes its own checks, else None (and a note)."""
    saved, why_not = own_index_file(name, file_id)
    if why_not is not None:
        report.notes.append(why_not)
    return saved


def _compare_index(saved: SavedIndex, walker: _Walker, report: VerifyReport) -> None:
    position, last_tid, next_oid, entries = saved
    if walker.ends.get(position) != last_tid:
        report.problems.append(
            Problem(
                position,
                f"the index file says a transaction with tid {oid_repr(last_tid)} ends here; the data file"
                " disagrees (it is damaged, or an older copy under a newer index): opens refuse it",
                "index",
            )
        )
        return
    if walker.gaps:
        return  # the damaged ranges hide revisions: the entries cannot be compared
    if walker.at_watch is not None and walker.at_watch != entries:
        report.problems.append(
            Problem(INDEX_HEADER.size, "the index's entries differ from the newest records", "index")
        )
    if next_oid <= entries.max_oid():
        report.problems.append(Problem(32, f"next oid {next_oid} is not above every indexed oid", "index"))
