"""``backup`` and ``restore``: incremental backups of a FileStorage data file.

Any other storage (SQLite, PostgreSQL, a server) is backed up through a *mirror*: a
FileStorage ``mirror.fs`` in the backup directory, brought up to date by copying the
transactions committed since the last backup (tids and metadata kept), then backed up as
below.  ``restore`` gives a data file either way; ``amberdb copy restored.fs URI`` puts it
back into a SQL database.

A backup directory holds *segments* and a manifest, ``backup.json``.  A FileStorage data
file only ever grows at its end, so a chain of segments -- the first one the file from byte 0
to its committed end at the first backup, each later one the bytes committed since the one
before -- concatenates into a valid data file.  The manifest lists each segment: file name,
chain number, start and end offsets in the data file, first and last tid, sha256, the data
file's id (bytes 8..16 of its header) and when it was taken.

A pack writes a new data file with a new file id; a file found shorter than the last backup
or without the last backed-up transaction where it was is not the same history either.  Then
the next backup starts a new chain with a full copy (and says so); older chains stay, and
``restore --at`` can still use them.

Only committed transactions are copied: the source is opened read-only as a FileStorage,
whose committed end (:meth:`FileStorage.size`) bounds what is read, while a writer may go on
appending.  Segments and the manifest are written to temporary names, synced and renamed, so
a backup interrupted at any moment leaves the previous backup as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from typing import Any

from amberdb.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    CliError,
    file_path,
    iso_time,
    parse_time,
    print_json,
)
from amberdb.cli.progress import Progress, format_bytes
from amberdb.fsutil import fsync_directory, replace_file
from amberdb.storage.file import FileStorage
from amberdb.storage.file.format import (
    FILE_HEADER,
    FILE_MAGIC_PREFIX,
    TXN_HEADER,
    TXN_TRAILER,
    decode_txn_header,
    file_header_packed_tid,
)
from amberdb.storage.file.verify import verify as verify_file
from amberdb.utils import oid_repr, time_from_tid

__all__ = ["MANIFEST", "cmd_backup", "cmd_restore"]

MIRROR = "mirror.fs"
MANIFEST = "backup.json"
_FORMAT = 1
_CHUNK = 1 << 20


# -- small file helpers ---------------------------------------------------------------------


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise CliError(f"short read at offset {offset}: the file changed under the backup")
    return data


def _tid_hex(tid: bytes | None) -> str | None:
    return None if tid is None else tid.hex()


def _tid_shown(tid_hex: str | None) -> str:
    return "none" if tid_hex is None else oid_repr(bytes.fromhex(tid_hex))


def _load_manifest(directory: str, *, must_exist: bool) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        if must_exist:
            raise CliError(f"{path}: no such file: {directory} holds no amberdb backup") from None
        return {"format": _FORMAT, "segments": []}
    except (ValueError, UnicodeDecodeError) as exc:
        raise CliError(f"{path} is damaged: {exc}", EXIT_PROBLEMS) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != _FORMAT
        or not isinstance(manifest.get("segments"), list)
    ):
        raise CliError(f"{path} is not an amberdb backup manifest of format {_FORMAT}", EXIT_PROBLEMS)
    for number, segment in enumerate(manifest["segments"], 1):
        problem = _segment_problem(segment)
        if problem is not None:
            raise CliError(f"{path} is damaged: its segment entry {number} {problem}", EXIT_PROBLEMS)
    return manifest


_SEGMENT_NAME = re.compile(r"segment-[0-9]{6,}\.fs")
_HEX = re.compile(r"[0-9a-f]*")


def _segment_problem(segment: Any) -> str | None:
    """What is wrong with one manifest entry (None: nothing).  The manifest is data a backup
    directory brings along: its names must stay inside the directory, its numbers sane."""
    if not isinstance(segment, dict):
        return "is not an object"
    name = segment.get("file")
    if not isinstance(name, str) or not _SEGMENT_NAME.fullmatch(name):
        return f"names the file {name!r}, not a segment file of this directory (segment-NNNNNN.fs)"
    for key in ("chain", "start", "end"):
        value = segment.get(key)
        if type(value) is not int or value < 0 or value > 1 << 62:
            return f"has {key} {value!r}, not a count"
    if segment["start"] > segment["end"]:
        return f"starts at {segment['start']}, after its end {segment['end']}"
    for key, size in (("first_tid", 16), ("last_tid", 16), ("sha256", 64), ("file_id", 16)):
        value = segment.get(key)
        if value is None and key in ("first_tid", "last_tid"):
            continue
        if not isinstance(value, str) or len(value) != size or not _HEX.fullmatch(value):
            return f"has {key} {value!r}, not {size} hex digits"
    return None


# -- backup ---------------------------------------------------------------------------------


def _snapshot(path: str) -> tuple[int, bytes, int, bytes]:
    """``(fd, file id, committed end, last tid)`` of the data file at ``path``.

    The descriptor is opened before the storage and checked to be the same file after it, so
    a pack replacing the file meanwhile cannot pair one file's end with another's bytes.
    """
    for _ in range(5):
        fd = os.open(path, os.O_RDONLY)
        try:
            storage = FileStorage(path, read_only=True)
            try:
                end, last_tid = storage.size(), storage.last_tid()
            finally:
                storage.close()
            mine, now = os.fstat(fd), os.stat(path)
            if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
                header = os.pread(fd, FILE_HEADER.size, 0)
                if len(header) < FILE_HEADER.size or header[:7] != FILE_MAGIC_PREFIX:
                    raise CliError(f"{path} is empty or not an amberdb data file: nothing to back up")
                return fd, header[8:16], end, last_tid
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # replaced while we looked (a pack): look again
    raise CliError(f"{path} keeps being replaced (packed?) while the backup starts: try again later")


def _tid_ending_at(fd: int, end: int) -> bytes | None:
    """The tid of the transaction that ends at offset ``end``, or None if none does there."""
    if end < FILE_HEADER.size + TXN_HEADER.size + TXN_TRAILER.size:
        return None
    try:
        length, _crc, magic = TXN_TRAILER.unpack(os.pread(fd, TXN_TRAILER.size, end - TXN_TRAILER.size))
        start = end - length
        if magic != b"AmbT" or start < FILE_HEADER.size:
            return None
        header = decode_txn_header(os.pread(fd, TXN_HEADER.size, start))
    except Exception:  # any garbage read means "not the same history"
        return None
    return header.tid if header.length == length else None


def cmd_backup(args: argparse.Namespace) -> int:
    directory = args.directory
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CliError(f"{directory} is not a directory")
    path = file_path(args.uri)
    if path is None:
        path = _mirror(args.uri, directory, args.quiet)
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    os.makedirs(directory, exist_ok=True)
    manifest = _load_manifest(directory, must_exist=False)
    segments: list[dict[str, Any]] = manifest["segments"]

    source = manifest.get("source")
    if segments and isinstance(source, str) and source != os.path.abspath(path):
        raise CliError(
            f"{directory} holds backups of {source}, not of {os.path.abspath(path)}: back each database"
            " up into a directory of its own"
        )
    fd, file_id, end, last_tid = _snapshot(path)
    try:
        chain = max((s["chain"] for s in segments), default=0)
        previous = [s for s in segments if s["chain"] == chain]
        new_chain_reason = None
        if not previous:
            new_chain_reason = "first backup: a full copy"
        else:
            last = previous[-1]
            if last["file_id"] != file_id.hex():
                new_chain_reason = "the data file was replaced (packed?): a new full chain"
            elif end < last["end"]:
                new_chain_reason = "the data file is shorter than the last backup: a new full chain"
            elif last["last_tid"] is not None and _tid_ending_at(fd, last["end"]) != bytes.fromhex(
                last["last_tid"]
            ):
                new_chain_reason = (
                    "the last backed-up transaction is not where it was in the data file: a new full chain"
                )
        start = 0 if new_chain_reason else previous[-1]["end"]
        if new_chain_reason:
            chain += 1
        if start == end:
            result: dict[str, Any] = {
                "source": path,
                "directory": directory,
                "segment": None,
                "message": f"nothing new since the last backup (last tid {oid_repr(last_tid)})",
            }
        else:
            segment = _copy_segment(fd, path, directory, start, end, len(segments) + 1, args.quiet)
            segment.update(
                chain=chain,
                file_id=file_id.hex(),
                last_tid=_tid_hex(last_tid) if end > FILE_HEADER.size else None,
                time=iso_time(time.time()),
            )
            segments.append(segment)
            manifest["source"] = os.path.abspath(path)
            replace_file(
                os.path.join(directory, MANIFEST), json.dumps(manifest, indent=2).encode("utf-8") + b"\n"
            )
            result = {
                "source": path,
                "directory": directory,
                "segment": segment,
                "message": new_chain_reason or "incremental: what was committed since the last backup",
            }
    finally:
        os.close(fd)
    if args.json:
        print_json(result)
        return EXIT_OK
    segment = result["segment"]
    if segment is None:
        print(result["message"])
        return EXIT_OK
    print(f"backed up {path} to {os.path.join(directory, segment['file'])} ({result['message']})")
    size = segment["end"] - segment["start"]
    print(f"  bytes {segment['start']:,}..{segment['end']:,} ({size:,} bytes, {format_bytes(size)})")
    print(f"  transactions {_tid_shown(segment['first_tid'])} .. {_tid_shown(segment['last_tid'])}")
    return EXIT_OK


def _mirror(uri: str, directory: str, quiet: bool) -> str:
    """Bring ``directory/MIRROR`` up to date with the storage ``uri`` names (a SQL or network
    storage has no data file to back up): the transactions committed since the last backup are
    copied into that FileStorage, which is then backed up like any data file.  When the source's
    history no longer continues the mirror's (a pack removed its newest transaction), a new
    mirror is made, and the file backup starts a new chain."""
    from amberdb.cli.common import open_read_only
    from amberdb.exceptions import StorageError
    from amberdb.storage.file import FileStorage

    mirror = os.path.join(directory, MIRROR)
    source = open_read_only(uri)
    try:
        os.makedirs(directory, exist_ok=True)
        for fresh in (False, True):
            if fresh and os.path.exists(mirror):
                os.replace(mirror, mirror + ".old")
            target = FileStorage(mirror)
            try:
                count = target.copy_transactions_from(source)
            except StorageError as exc:
                if fresh:
                    raise
                if not quiet:
                    print(f"{exc}: starting a new mirror")
                continue
            finally:
                target.close()
            if os.path.exists(mirror + ".old"):
                os.unlink(mirror + ".old")
            for suffix in (".index", ".lock", ".tmp"):
                if os.path.exists(mirror + ".old" + suffix):
                    os.unlink(mirror + ".old" + suffix)
            if not quiet:
                print(f"copied {count:,} new transaction(s) of {source.name} into {mirror}")
            return mirror
    finally:
        source.close()
    raise AssertionError("unreachable")


def _copy_segment(
    fd: int, path: str, directory: str, start: int, end: int, number: int, quiet: bool
) -> dict[str, Any]:
    """Copy bytes ``start..end`` of the data file into a new segment file; its manifest entry."""
    name = f"segment-{number:06d}.fs"
    final = os.path.join(directory, name)
    if os.path.lexists(final):
        # Not in the manifest: left by a backup interrupted before it wrote the manifest, so
        # part of no backup.  Replaced, or every later backup would stop here.
        os.unlink(final)
    tmp = final + ".tmp"
    first_at = max(start, FILE_HEADER.size)
    first_tid = _pread_exact(fd, 8, first_at) if first_at < end else None
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, Progress("backing up", quiet=quiet) as progress:
            pos = start
            while pos < end:
                chunk = _pread_exact(fd, min(_CHUNK, end - pos), pos)
                out.write(chunk)
                digest.update(chunk)
                pos += len(chunk)
                progress.update(pos - start, end - start)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(directory)
    return {
        "file": name,
        "start": start,
        "end": end,
        "first_tid": _tid_hex(first_tid),
        "sha256": digest.hexdigest(),
    }


# -- restore --------------------------------------------------------------------------------


def _micros(seconds: float) -> int:
    """A time at the microsecond the commands print it to: ``--at`` a printed time means it."""
    return round(seconds * 1_000_000)


def _packed_time(directory: str, chain: list[dict[str, Any]]) -> float | None:
    """When the data file the chain was taken from was packed (None: never).

    States before that moment are not in the chain: a pack kept only what later snapshots
    see.
    """
    try:
        with open(os.path.join(directory, chain[0]["file"]), "rb") as f:
            header = f.read(FILE_HEADER.size)
    except OSError:
        return None  # reported when the chain is read
    packed = file_header_packed_tid(header) if len(header) == FILE_HEADER.size else None
    return None if packed is None else time_from_tid(packed)


def _choose_chain(directory: str, segments: list[dict[str, Any]], at: float | None) -> list[dict[str, Any]]:
    """The segments of the chain to restore from, in order.

    Without ``at``, the newest chain.  With it, of the chains that hold that moment (not
    packed after it), the oldest whose last transaction is at or after ``at`` -- it holds the
    history as it was then -- or else the newest; CliError when none holds it.
    """
    chains: dict[int, list[dict[str, Any]]] = {}
    for segment in segments:
        chains.setdefault(segment["chain"], []).append(segment)
    ordered = [chains[number] for number in sorted(chains)]
    if at is None:
        return ordered[-1]
    wanted = _micros(at)
    holding = []
    for chain in ordered:
        packed = _packed_time(directory, chain)
        if packed is None or _micros(packed) <= wanted:
            holding.append(chain)
    if not holding:
        raise CliError(
            f"no backup holds the database as it was at {iso_time(at)}: every backup chain was taken"
            " from a file packed after that moment, which keeps only later states",
            EXIT_PROBLEMS,
        )
    for chain in holding:
        last = chain[-1]["last_tid"]
        if last is not None and _micros(time_from_tid(bytes.fromhex(last))) >= wanted:
            return chain
    return holding[-1]


def cmd_restore(args: argparse.Namespace) -> int:
    directory, target = args.directory, args.target
    at = None if args.at is None else parse_time(args.at)
    if os.path.lexists(target):
        raise CliError(f"{target} exists: restore never overwrites; give a new file name")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise CliError(f"{target}: its directory {parent} does not exist")
    manifest = _load_manifest(directory, must_exist=True)
    if not manifest["segments"]:
        raise CliError(f"{os.path.join(directory, MANIFEST)} lists no segment: nothing to restore")
    chain = _choose_chain(directory, manifest["segments"], at)
    expected = 0
    for segment in chain:
        if segment["start"] != expected:
            raise CliError(
                f"backup chain {segment['chain']} has a gap before {segment['file']}: it starts at byte"
                f" {segment['start']}, the segments before end at {expected}",
                EXIT_PROBLEMS,
            )
        expected = segment["end"]
    tmp = target + ".tmp"
    try:
        size = _concatenate(directory, chain, tmp, args.quiet)
        transactions, last_tid, size = _cut(tmp, size, at, args.at)
        report = verify_file(tmp)
        if not report.ok:
            problems = "; ".join(str(p) for p in report.problems[:3])
            raise CliError(f"the restored file does not verify: {problems}", EXIT_PROBLEMS)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)  # fails if target appeared meanwhile: never overwrite
        except FileExistsError:
            raise CliError(f"{target} appeared while restoring: left it alone") from None
        os.unlink(tmp)
        fsync_directory(parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    result = {
        "directory": directory,
        "target": target,
        "chain": chain[0]["chain"],
        "segments": [s["file"] for s in chain],
        "transactions": transactions,
        "last_tid": None if last_tid is None else oid_repr(last_tid),
        "last_time": None if last_tid is None else iso_time(time_from_tid(last_tid)),
        "size": size,
    }
    if args.json:
        print_json(result)
    else:
        shown = "none" if last_tid is None else f"{oid_repr(last_tid)} ({result['last_time']})"
        print(
            f"restored {target} from {len(chain)} segment(s) of {directory}: {transactions:,} transactions,"
            f" {size:,} bytes, last transaction {shown}"
        )
    return EXIT_OK


def _concatenate(directory: str, chain: list[dict[str, Any]], tmp: str, quiet: bool) -> int:
    """Write the chain's segments to ``tmp``, checking each one's size and sha256."""
    total: int = chain[-1]["end"]
    done = 0
    with open(tmp, "wb") as out, Progress("restoring", quiet=quiet) as progress:
        for segment in chain:
            name = os.path.join(directory, segment["file"])
            digest = hashlib.sha256()
            if not os.path.isfile(name):
                raise CliError(f"backup segment {name} is missing", EXIT_PROBLEMS)
            with open(name, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    done += len(chunk)
                    progress.update(done, total)
            if digest.hexdigest() != segment["sha256"]:
                raise CliError(
                    f"backup segment {name} is damaged: its sha256 does not match the manifest", EXIT_PROBLEMS
                )
            if done != segment["end"]:
                raise CliError(
                    f"backup segment {name} has the wrong size: the chain is {done} bytes long after it,"
                    f" the manifest says {segment['end']}",
                    EXIT_PROBLEMS,
                )
        out.flush()
    return total


def _cut(tmp: str, size: int, at: float | None, at_text: str | None) -> tuple[int, bytes | None, int]:
    """Walk the transaction headers; with ``at``, truncate after the last one at or before it.

    Returns ``(transactions kept, last tid kept, size)``.
    """
    fd = os.open(tmp, os.O_RDWR)
    try:
        pos = FILE_HEADER.size
        count = 0
        last: bytes | None = None
        first: bytes | None = None
        while pos + TXN_HEADER.size <= size:
            header = decode_txn_header(_pread_exact(fd, TXN_HEADER.size, pos))
            if header.length < TXN_HEADER.size + TXN_TRAILER.size:
                raise CliError(f"the restored file has a damaged transaction at offset {pos}", EXIT_PROBLEMS)
            if first is None:
                first = header.tid
            if at is not None and _micros(time_from_tid(header.tid)) > _micros(at):
                break
            count += 1
            last = header.tid
            pos += header.length
        if at is not None:
            if count == 0 and first is not None:
                raise CliError(
                    f"no transaction at or before {at_text}: the backup starts at"
                    f" {iso_time(time_from_tid(first))}",
                    EXIT_USAGE,
                )
            os.ftruncate(fd, pos)
            size = pos
    finally:
        os.close(fd)
    return count, last, size
