"""Read-only subcommands: ``info``, ``verify``, ``history``, ``undo-log``.

Each opens its storage read-only, so it runs while an application writes.  None of them
unpickles application data: ``info`` and the reference walk of ``verify`` read record
headers (:func:`amberdb.record.decode_header`), and the BTree checks of ``verify`` load only
amberdb's own BTree classes; other classes they meet stay ghosts whose state is never read.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any, cast

import amberdb.transaction as transaction_module
from amberdb.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    CliError,
    close_quietly,
    file_path,
    open_read_only,
    parse_oid,
    print_json,
    storage_size,
    tid_info,
)
from amberdb.cli.evolution import class_counts_of_records, describe_missing, missing_classes
from amberdb.cli.progress import Progress
from amberdb.exceptions import CorruptedDataError, DatabaseError, POSKeyError, RecordDecodeError
from amberdb.persistent import Persistent
from amberdb.record import decode_header
from amberdb.rename import record_globals
from amberdb.storage.base import Storage, TransactionRecord
from amberdb.storage.file import FileStorage
from amberdb.storage.file.verify import verify as verify_file
from amberdb.storage.history import iter_current_records
from amberdb.utils import Oid, oid_repr, p64, z64

__all__ = ["cmd_history", "cmd_info", "cmd_undo_log", "cmd_verify", "verify_storage"]


def _transactions(storage: Storage) -> Iterator[TransactionRecord]:
    """The storage's committed transactions, oldest first (``iterator()``)."""
    iterator = getattr(storage, "iterator", None)
    if iterator is None:
        raise CliError(f"{storage.name}: this storage cannot list its transactions")
    return cast(Iterator[TransactionRecord], iterator())


# -- info -----------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    storage = open_read_only(args.uri)
    try:
        report = _info(storage, args.quiet)
    finally:
        storage.close()
    report = {"uri": args.uri, **report}
    if args.json:
        print_json(report)
        return EXIT_OK
    print(f"storage:      {storage.name}")
    size = report["size"]
    print(f"size:         {'unknown' if size is None else f'{size:,} bytes'}")
    print(f"objects:      {report['objects']:,}")
    print(f"transactions: {report['transactions']:,}")
    for key in ("first_commit", "last_commit"):
        commit = report[key]
        label = key.replace("_", " ") + ":"
        print(f"{label:<14}{'none' if commit is None else commit['time'] + '  tid ' + commit['tid']}")
    classes = report["classes"]
    if classes:
        print("classes:")
        width = max(len(f"{count:,}") for count in classes.values())
        for name, count in classes.items():
            print(f"  {count:>{width},}  {name}")
    missing = report["missing_classes"]
    if missing:
        print("missing classes (their objects load as broken objects):")
        width = max(len(f"{info['count']:,}") for info in missing.values())
        for name, info in missing.items():
            print(f"  {info['count']:>{width},}  {name}  ({info['reason']})")
    return EXIT_OK


def _info(storage: Storage, quiet: bool) -> dict[str, Any]:
    """Counts from one pass over the history: the newest record of each oid gives its class."""
    current: dict[Oid, str] = {}
    names: dict[str, str] = {}  # one string object per class name
    transactions = 0
    first = last = None
    with Progress("reading", quiet=quiet, unit="transactions") as progress:
        for txn in _transactions(storage):
            transactions += 1
            if first is None:
                first = txn.tid
            last = txn.tid
            for data in txn.records:
                try:
                    name = decode_header(data.record).class_name
                except RecordDecodeError:
                    name = "(undecodable record)"
                current[data.oid] = names.setdefault(name, name)
            progress.update(transactions)
    classes = Counter(current.values())
    return {
        "missing_classes": _missing_classes(storage, classes, quiet),
        "size": storage_size(storage),
        "objects": len(storage),
        "transactions": transactions,
        "first_commit": None if first is None else tid_info(first),
        "last_commit": None if last is None else tid_info(last),
        "classes": dict(sorted(classes.items(), key=lambda item: (-item[1], item[0]))),
    }


def _missing_classes(storage: Storage, classes: Counter[str], quiet: bool) -> dict[str, dict[str, Any]]:
    """The classes current records name (their own, their references', their values') that
    cannot be found, with how many records name each.  Without ``current_records`` only the
    records' own classes are looked at."""
    counts: dict[str, int] = dict(classes)
    if getattr(storage, "current_records", None) is not None:
        with Progress("reading class names", quiet=quiet, unit="records") as progress:
            counts = class_counts_of_records(_progress_records(storage, progress))
    return dict(sorted(missing_classes(counts).items()))


def _progress_records(storage: Storage, progress: Progress) -> Iterator[bytes]:
    for done, (_oid, _tid, record) in enumerate(iter_current_records(storage), 1):
        if done % 1000 == 0:
            progress.update(done)
        yield record


# -- verify ---------------------------------------------------------------------------------


def _btree_classes() -> tuple[dict[str, str], set[str]]:
    """``{tree class name: its bucket class name}`` and the bucket/set class names."""
    from amberdb.btrees._families import FAMILIES

    def name(cls: type) -> str:
        return f"{cls.__module__}:{cls.__qualname__}"

    trees: dict[str, str] = {}
    leaves: set[str] = set()
    for family in FAMILIES.values():
        trees[name(family.BTree)] = name(family.Bucket)
        trees[name(family.TreeSet)] = name(family.Set)
        leaves.update((name(family.Bucket), name(family.Set)))
    return trees, leaves


class _Report:
    def __init__(self, target: str) -> None:
        self.target = target
        self.problems: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []  # not problems: verify still passes
        self.counts: dict[str, int] = {}

    def problem(self, check: str, message: str, **details: Any) -> None:
        self.problems.append({"check": check, "message": message, **details})

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ok": not self.problems,
            "counts": self.counts,
            "problems": self.problems,
            "notes": self.notes,
            "warnings": self.warnings,
        }


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_uri(args.uri, args.quiet)
    print_verify_report(report, args.json)
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def print_verify_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(report)
        return
    counts = report["counts"]
    print(f"verify {report['target']}")
    if "transactions" in counts:
        print(f"  checksums:  {counts['transactions']:,} transactions, {counts['records']:,} data records")
    if "reachable" in counts:
        print(f"  references: {counts['reachable']:,} objects reachable from the root")
    if "btrees" in counts:
        print(f"  btrees:     {counts['btrees']:,} checked")
    for problem in report["problems"]:
        print(f"problem ({problem['check']}): {problem['message']}")
        if problem.get("path"):
            print(f"  path: {' -> '.join(problem['path'])}")
    for warning in report.get("warnings", ()):
        print(f"warning: {warning}")
    for note in report["notes"]:
        print(f"note: {note}")
    print("OK" if report["ok"] else f"{len(report['problems'])} problem(s) found")


def verify_uri(uri: str, quiet: bool) -> dict[str, Any]:
    """Every check of ``amberdb verify`` on the storage ``uri`` names."""
    report = _Report(uri)
    path = file_path(uri)
    if path is not None:
        if not os.path.exists(path):
            raise CliError(f"{path}: no such file")
        if not os.path.isfile(path):
            raise CliError(f"{path} is not a regular file")
        _verify_file(path, report)
    storage: Storage | None
    try:
        storage = open_read_only(uri)
    except CorruptedDataError as exc:
        if path is None or not report.problems:
            raise
        # An open refuses a damaged file; the part before the damage can still be walked.
        try:
            storage = FileStorage(path, read_only=True, salvage=True)
        except DatabaseError:
            storage = None
        where = "" if exc.offset is None else f" at offset {exc.offset}"
        report.notes.append(
            f"the file does not open as it is (damage{where}): "
            + (
                "the reference and BTree checks ran on the transactions before the damage"
                if storage is not None
                else "the reference and BTree checks were skipped"
            )
        )
        if storage is None:
            return report.as_dict()
    verify_storage(storage, report, quiet, checksums=path is None)
    return report.as_dict()


def verify_open_storage(storage: Storage, target: str, quiet: bool) -> dict[str, Any]:
    """The checks of ``verify`` on an open storage (closed when this returns)."""
    report = _Report(target)
    if isinstance(storage, FileStorage):
        path = storage.path
        storage.close()
        return verify_uri(path, quiet)
    verify_storage(storage, report, quiet, checksums=True)
    return report.as_dict()


def _verify_file(path: str, report: _Report) -> None:
    result = verify_file(path)
    report.counts["transactions"] = result.transactions
    report.counts["records"] = result.records
    for problem in result.problems:
        report.problem("checksum", str(problem), offset=problem.offset, file=problem.file)
    report.notes.extend(result.notes)


def verify_storage(storage: Storage, report: _Report, quiet: bool, *, checksums: bool) -> None:
    """Checks (1, for storages other than files) history, (2) references, (3) BTrees; closes it."""
    try:
        if checksums:
            _verify_iterator(storage, report, quiet)
        walk, roots, leaves, foreign = _walk_references(storage, report, quiet)
        missing = missing_classes(walk.reached_classes)
        report.warnings.extend(describe_missing(missing))
    except BaseException:
        close_quietly(storage)
        raise
    _check_btrees(storage, report, walk, roots + leaves, foreign, quiet)


def _verify_iterator(storage: Storage, report: _Report, quiet: bool) -> None:
    transactions = records = 0
    with Progress("reading history", quiet=quiet, unit="transactions") as progress:
        try:
            for txn in _transactions(storage):
                transactions += 1
                records += len(txn.records)
                progress.update(transactions)
        except CorruptedDataError as exc:
            report.problem("checksum", _one_line(exc), offset=exc.offset)
    report.counts["transactions"] = transactions
    report.counts["records"] = records


class _Walk:
    """Parents of every object reached, as integers (a compact dict), for paths."""

    def __init__(self, storage: Storage) -> None:
        self.reached_classes: dict[str, int] = {}  # class name -> reachable records naming it
        self.storage = storage
        self.parents: dict[int, int] = {0: -1}
        self.classes: dict[int, str] = {}  # filled only for the oids on a path shown

    def class_of(self, oid: int) -> str:
        name = self.classes.get(oid)
        if name is None:
            try:
                name = decode_header(self.storage.load(p64(oid))[0]).class_name
            except (POSKeyError, CorruptedDataError, RecordDecodeError):
                name = "?"
            self.classes[oid] = name
        return name

    def path(self, oid: int, last: str | None = None) -> list[str]:
        """``oid (class)`` from the root to ``oid``; ``last`` describes ``oid`` itself."""
        chain = []
        at = oid
        while at != -1:
            chain.append(at)
            at = self.parents[at]
        chain.reverse()
        shown = [f"{oid_repr(p64(each))} ({self.class_of(each)})" for each in chain]
        if last is not None:
            shown[-1] = f"{oid_repr(p64(oid))} ({last})"
        return shown


def _walk_references(
    storage: Storage, report: _Report, quiet: bool
) -> tuple[_Walk, list[int], list[int], set[str]]:
    """Breadth first from the root over record headers: report dangling references.

    Returns the walk (parents, for paths); the BTree objects to check: roots of trees (not
    their interior nodes) and buckets or sets that something other than their own tree refers
    to; and the classes outside amberdb that BTree records refer to.
    """
    tree_bucket, leaf_names = _btree_classes()
    walk = _Walk(storage)
    parents = walk.parents
    tree_roots: list[int] = []
    interior: set[int] = set()
    loose_leaves: set[int] = set()
    foreign: set[str] = set()
    queue: deque[int] = deque([0])
    total = len(storage)
    reached = 0
    try:
        storage.load(z64)
    except POSKeyError:
        report.notes.append("the storage has no root object (oid 0x0): nothing is reachable")
        report.counts["reachable"] = 0
        return walk, [], [], foreign
    with Progress("walking references", quiet=quiet, unit="objects") as progress:
        while queue:
            oid = queue.popleft()
            try:
                record = storage.load(p64(oid))[0]
            except POSKeyError:
                parent = parents[oid]
                report.problem(
                    "reference",
                    f"dangling reference: {oid_repr(p64(parent))} ({walk.class_of(parent)}) refers to"
                    f" {oid_repr(p64(oid))}, which does not exist",
                    oid=oid_repr(p64(oid)),
                    referenced_by=oid_repr(p64(parent)),
                    path=walk.path(oid, "missing"),
                )
                continue
            except CorruptedDataError as exc:
                report.problem(
                    "record",
                    f"{oid_repr(p64(oid))} cannot be read: {_one_line(exc)}",
                    oid=oid_repr(p64(oid)),
                    path=walk.path(oid, "unreadable"),
                )
                continue
            reached += 1
            progress.update(reached, total)
            try:
                header = decode_header(record)
            except RecordDecodeError as exc:
                report.problem(
                    "record",
                    f"{oid_repr(p64(oid))}: {exc}",
                    oid=oid_repr(p64(oid)),
                    path=walk.path(oid, "undecodable"),
                )
                continue
            own = header.class_name
            try:
                for name in record_globals(record):
                    walk.reached_classes[name] = walk.reached_classes.get(name, 0) + 1
            except RecordDecodeError:
                pass  # the state is checked where it is loaded; the header was readable
            walk.classes[oid] = own
            in_btree = own in tree_bucket or own in leaf_names
            if own in tree_bucket and oid not in interior:
                tree_roots.append(oid)
            for ref, ref_class in header.refs:
                child = int.from_bytes(ref, "big")
                if ref_class in tree_bucket and ref_class == own:
                    interior.add(child)  # a node of the same tree
                elif ref_class in leaf_names and ref_class != own and tree_bucket.get(own) != ref_class:
                    loose_leaves.add(child)  # referred to from outside its tree: check it alone
                if in_btree and not ref_class.startswith("amberdb."):
                    foreign.add(ref_class)
                if child not in parents:
                    parents[child] = oid
                    queue.append(child)
            if len(walk.classes) > 100_000:
                walk.classes.clear()  # only a cache for paths
    report.counts["reachable"] = reached
    # A node met before the reference that makes it interior was seen is not a root.
    roots = [oid for oid in tree_roots if oid not in interior]
    return walk, roots, sorted(loose_leaves), foreign


class _Stub(Persistent):
    """Stands in for a persistent class outside amberdb that a BTree refers to: the BTree
    check only needs such objects as ghosts, so their state is never loaded."""

    _p_is_twin = True  # not registered under its own name: it is only ever named by records

    def __setstate__(self, state: Any) -> None:
        raise RuntimeError("amberdb verify does not load application objects")


def _check_btrees(
    storage: Storage, report: _Report, walk: _Walk, oids: list[int], foreign: set[str], quiet: bool
) -> None:
    from amberdb.btrees import check
    from amberdb.db import DB

    report.counts["btrees"] = 0
    if not oids:
        storage.close()
        return
    # Persistent classes the BTrees refer to are named in their records' headers; each
    # becomes a stub class so references to it load as ghosts that are never activated.
    db = DB(storage)
    try:
        for name in sorted(foreign):
            db.register_class(type(f"Stub[{name}]", (_Stub,), {"_p_is_twin": True}), name)
        manager = transaction_module.TransactionManager()
        conn = db.open(manager)
        with Progress("checking btrees", quiet=quiet, unit="btrees") as progress:
            for done, oid in enumerate(oids, 1):
                progress.update(done, len(oids))
                try:
                    check(conn.get(p64(oid)))
                    report.counts["btrees"] += 1
                except AssertionError as exc:
                    report.problem(
                        "btree",
                        f"{oid_repr(p64(oid))} fails its check: {exc}",
                        oid=oid_repr(p64(oid)),
                        path=walk.path(oid),
                    )
                except (CorruptedDataError, POSKeyError, RecordDecodeError) as exc:
                    report.problem(
                        "btree",
                        f"{oid_repr(p64(oid))} could not be checked: {_one_line(exc)}",
                        oid=oid_repr(p64(oid)),
                        path=walk.path(oid),
                    )
                except Exception as exc:
                    # Keys that are application objects (compared, so loaded), a class the
                    # tool may not load: the tree is not known to be damaged, only unchecked.
                    report.notes.append(
                        f"BTree {oid_repr(p64(oid))} was not checked: {type(exc).__name__}: {_one_line(exc)}"
                    )
                if done % 100 == 0:
                    conn.cache_minimize()
        manager.abort()
        conn.close()
    finally:
        db.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# -- history --------------------------------------------------------------------------------


def cmd_history(args: argparse.Namespace) -> int:
    oid = parse_oid(args.oid)
    if args.size < 1:
        raise CliError("--size must be at least 1")
    storage = open_read_only(args.uri)
    try:
        history = getattr(storage, "history", None)
        if history is None:
            raise CliError(f"{storage.name}: this storage keeps no history of objects")
        try:
            revisions = history(oid, args.size)
        except POSKeyError:
            raise CliError(f"{storage.name}: no object {oid_repr(oid)}", EXIT_PROBLEMS) from None
    finally:
        storage.close()
    rows = [
        {
            **tid_info(rev.tid),
            "user": rev.meta.user,
            "description": rev.meta.description,
            "size": rev.size,
        }
        for rev in revisions
    ]
    if args.json:
        print_json({"oid": oid_repr(oid), "revisions": rows})
        return EXIT_OK
    print(f"history of {oid_repr(oid)}, newest first:")
    for row in rows:
        print(
            f"  {row['tid']}  {row['time']}  {row['size']:>8} bytes  "
            f"user={row['user']!r}  {row['description']!r}"
        )
    return EXIT_OK


# -- undo-log -------------------------------------------------------------------------------


def cmd_undo_log(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    storage = open_read_only(args.uri)
    try:
        undo_log = getattr(storage, "undo_log", None)
        if undo_log is None:
            raise CliError(f"{storage.name}: this storage keeps no undo log")
        entries = undo_log(0, args.limit)
    finally:
        storage.close()
    rows = [
        {
            **tid_info(entry.tid),
            "user": entry.meta.user,
            "description": entry.meta.description,
        }
        for entry in entries
    ]
    if args.json:
        print_json({"transactions": rows})
        return EXIT_OK
    for row in rows:
        print(f"{row['tid']}  {row['time']}  user={row['user']!r}  {row['description']!r}")
    if not rows:
        print("no undoable transactions", file=sys.stderr)
    return EXIT_OK
