"""``amberdb rename-class``, ``amberdb evolve``, and the missing-class checks of info and verify.

Tools do not run application code to find out whether a class exists: :func:`missing_reason`
finds a class's module on ``sys.path`` (and the current directory) without importing it and
reads its source with :mod:`ast` for a top-level definition of the name.  Only ``amberdb
evolve`` imports application code: the schema module it is told to run.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.machinery
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from amberdb.cli.common import EXIT_OK, CliError, open_writable, print_json
from amberdb.cli.progress import Progress
from amberdb.exceptions import ConflictError, DatabaseError, POSKeyError
from amberdb.persistent import persistent_class_named
from amberdb.rename import record_globals, rename_in_record
from amberdb.serialize import normalize_class_name
from amberdb.storage.base import Storage, TransactionMeta
from amberdb.storage.history import iter_current_records
from amberdb.utils import Oid, Tid

__all__ = ["cmd_evolve", "cmd_rename_class", "missing_classes", "missing_reason"]

_REWRITE_BATCH = 500


# -- which classes are missing -------------------------------------------------------------


def _search_path() -> list[str]:
    cwd = os.getcwd()
    return list(sys.path) if cwd in sys.path or "" in sys.path else [cwd, *sys.path]


def _module_source(module: str) -> tuple[bool, str | None]:
    """(found, path of its Python source or None) for ``module``, without importing anything."""
    path: list[str] | None = _search_path()
    spec = None
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return False, None
        if depth < len(parts):
            locations = spec.submodule_search_locations
            if not locations:
                return False, None
            path = list(locations)
    origin = None if spec is None else spec.origin
    return True, origin if origin and origin.endswith(".py") else None


def _defines(tree: ast.Module, qualname: str) -> bool:
    """Whether the module's source defines (or imports, or assigns) ``qualname``'s first part,
    and each nested part as a class inside the previous one."""
    parts = qualname.split(".")
    body: list[ast.stmt] = tree.body
    for index, part in enumerate(parts):
        found: ast.stmt | None = None
        for node in body:
            names: list[str] = []
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [node.name]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [(alias.asname or alias.name).split(".")[0] for alias in node.names]
                if any(alias.name == "*" for alias in node.names):
                    return True  # a star import may define anything
            elif isinstance(node, ast.Assign):
                names = [target.id for target in node.targets if isinstance(target, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            elif isinstance(node, (ast.If, ast.Try)):
                return True  # conditional definitions: cannot tell without running it
            if part in names:
                found = node
        if found is None:
            return False
        if index + 1 < len(parts):
            if not isinstance(found, ast.ClassDef):
                return True  # an alias or an import: cannot follow it without running code
            body = found.body
    return True


def missing_reason(name: str) -> str | None:
    """Why the class ``name`` (``module:qualname``) cannot be found, or None when it can (or
    when that cannot be told without running code)."""
    module, _, qualname = name.partition(":")
    if persistent_class_named(name) is not None:
        return None
    loaded = sys.modules.get(module)
    if loaded is not None:
        target: Any = loaded
        for part in qualname.split("."):
            target = getattr(target, part, None)
            if target is None:
                return f"module {module} has no {qualname}"
        return None
    try:
        found, source = _module_source(module)
    except (ImportError, ValueError, OSError) as exc:
        return f"module {module} cannot be looked up: {exc}"
    if not found:
        return f"no module named {module}"
    if source is None:
        return None
    try:
        with open(source, "rb") as file:
            tree = ast.parse(file.read(), source)
    except (OSError, SyntaxError, ValueError):
        return None
    return None if _defines(tree, qualname) else f"{source} does not define {qualname}"


def missing_classes(counts: dict[str, int]) -> dict[str, dict[str, Any]]:
    """``{class name: {"count": n, "reason": why}}`` for the classes of ``counts`` not found."""
    missing: dict[str, dict[str, Any]] = {}
    for name, count in counts.items():
        if ":" not in name:
            continue
        reason = missing_reason(name)
        if reason is not None:
            missing[name] = {"count": count, "reason": reason}
    return missing


def class_counts_of_records(records: Iterable[bytes]) -> dict[str, int]:
    """How many records name each class (as their own class, a reference's or a value's)."""
    counts: dict[str, int] = {}
    for record in records:
        try:
            names = record_globals(record)
        except DatabaseError:
            continue
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return counts


# -- amberdb rename-class ---------------------------------------------------------------------


def cmd_rename_class(args: argparse.Namespace) -> int:
    from amberdb.db import DB

    try:
        old = normalize_class_name(args.old)
        new = normalize_class_name(args.new)
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc)) from None
    storage = open_writable(args.uri)
    db = DB(storage)
    try:
        db.rename_class(old, new)
        report: dict[str, Any] = {"uri": args.uri, "old": old, "new": new, "recorded": True}
        if args.rewrite:
            old_names = db.class_resolver.names_for(new) - {new}
            renames = {name: new for name in old_names}
            report.update(rewrite_records(storage, renames, args.quiet))
    finally:
        db.close()
    if args.json:
        print_json(report)
        return EXIT_OK
    print(f"recorded: {old.replace(':', '.')} is now {new.replace(':', '.')}")
    if args.rewrite:
        print(f"rewrote {report['rewritten']:,} of {report['scanned']:,} records")
        if report["skipped"]:
            print(
                f"{report['skipped']:,} record(s) kept changing while being rewritten and were left as they"
                " are: run the command again to finish"
            )
        else:
            print(
                f"no record names {old.replace(':', '.')} any more: the rename entry can be dropped "
                f"(db.drop_class_alias({old.replace(':', '.')!r})) once no old software writes it"
            )
    return EXIT_OK


def rewrite_records(storage: Storage, renames: dict[str, str], quiet: bool) -> dict[str, Any]:
    """Rewrite every current record naming a key of ``renames`` (headers and pickle globals).

    Batches of records commit as raw storage transactions checked against the revision
    read, so a record an application changed meanwhile is read again and rewritten from its
    new revision.  Stopped at any point, running it again finishes the job: only records
    still naming an old name are written.
    """
    scanned = rewritten = skipped = 0
    olds = set(renames)
    batch: list[tuple[Oid, Tid, bytes]] = []
    with Progress("rewriting records", quiet=quiet, unit="records") as progress:
        for oid, tid, record in iter_current_records(storage):
            scanned += 1
            try:
                if not olds & record_globals(record):
                    continue
            except DatabaseError:
                continue
            batch.append((oid, tid, record))
            if len(batch) >= _REWRITE_BATCH:
                done, left = _rewrite_batch(storage, batch, renames)
                rewritten, skipped, batch = rewritten + done, skipped + left, []
            progress.update(scanned)
        if batch:
            done, left = _rewrite_batch(storage, batch, renames)
            rewritten, skipped = rewritten + done, skipped + left
    return {"scanned": scanned, "rewritten": rewritten, "skipped": skipped}


def _rewrite_batch(
    storage: Storage, batch: list[tuple[Oid, Tid, bytes]], renames: dict[str, str]
) -> tuple[int, int]:
    """Rewrite a batch in one transaction; when records keep changing under it, one record at
    a time, leaving those still changing for a later run.  Returns (rewritten, skipped)."""
    written, batch = _rewrite_retrying(storage, batch, renames, 3)
    if written is not None:
        return written, 0
    rewritten = skipped = 0
    for item in batch:
        written, _ = _rewrite_retrying(storage, [item], renames, 5)
        if written is None:
            skipped += 1
        else:
            rewritten += written
    return rewritten, skipped


def _rewrite_retrying(
    storage: Storage, batch: list[tuple[Oid, Tid, bytes]], renames: dict[str, str], attempts: int
) -> tuple[int | None, list[tuple[Oid, Tid, bytes]]]:
    """Up to ``attempts`` transactions rewriting ``batch``, reading it again after each that a
    concurrent commit spoilt; (records written or None, the batch as last read)."""
    for attempt in range(attempts):
        written = _rewrite_once(storage, batch, renames)
        if written is not None:
            return written, batch
        time.sleep(0.01 * 2**attempt)
        batch = _reread(storage, batch)
    return None, batch


def _rewrite_once(
    storage: Storage, batch: list[tuple[Oid, Tid, bytes]], renames: dict[str, str]
) -> int | None:
    """One transaction rewriting ``batch``; None when one of its records changed meanwhile."""
    names = ", ".join(f"{old} -> {new}" for old, new in sorted(renames.items()))
    storage.begin(TransactionMeta(description=f"amberdb rename-class --rewrite ({names})"))
    written = 0
    try:
        for oid, tid, record in batch:
            new_record = rename_in_record(record, renames)
            if new_record is None:
                continue
            storage.store(oid, tid, new_record)
            written += 1
        storage.vote()
    except ConflictError:
        storage.abort()
        return None
    except BaseException:
        storage.abort()
        raise
    storage.finish()
    return written


def _reread(storage: Storage, batch: list[tuple[Oid, Tid, bytes]]) -> list[tuple[Oid, Tid, bytes]]:
    storage.poll_invalidations(storage.last_tid())
    fresh = []
    for oid, _tid, _record in batch:
        try:
            record, tid = storage.load(oid)
        except POSKeyError:
            continue  # packed away meanwhile
        fresh.append((oid, tid, record))
    return fresh


# -- amberdb evolve -----------------------------------------------------------------------------


def cmd_evolve(args: argparse.Namespace) -> int:
    from amberdb import evolve
    from amberdb.db import DB

    module_name, _, attribute = args.schema.partition(":")
    if not module_name or not attribute:
        raise CliError(f"{args.schema!r}: name the schema as module:attribute (e.g. myapp.evolve:schema)")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name}: {exc}") from None
    except Exception as exc:  # the application's module failed while it was imported
        raise CliError(f"importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    schema = getattr(module, attribute, None)
    if not isinstance(schema, evolve.Schema):
        raise CliError(f"{args.schema} is not an amberdb.evolve.Schema (it is {type(schema).__qualname__})")
    allowed = list(args.allow or [module_name.split(".")[0]])
    db = DB(open_writable(args.uri), allowed_modules=allowed)
    try:
        before = schema.generation(db)

        def show(generation: int, step: str) -> None:
            if not args.quiet and not args.json:
                print(f"{'dry run: ' if args.dry_run else ''}generation {generation}: {step}", flush=True)

        result = schema.run(db, dry_run=args.dry_run, progress=show)
        after = schema.generation(db)
    finally:
        db.close()
    report = {
        "uri": args.uri,
        "schema": schema.name,
        "dry_run": bool(args.dry_run),
        "generation_before": before,
        "generation_after": after,
        "generations": list(result),
        "changed": result.changed_by_generation,
    }
    if args.json:
        print_json(report)
    else:
        print(str(result))
        dry = " (dry run: nothing committed)" if args.dry_run else ""
        print(f"schema {schema.name!r}: generation {before} -> {after}{dry}")
    return EXIT_OK


def describe_missing(missing: dict[str, dict[str, Any]]) -> list[str]:
    """One line per missing class, for info and verify."""
    return [
        f"{info['count']:,} record(s) name {name.replace(':', '.')}, which cannot be found"
        f" ({info['reason']}): those objects load as broken objects"
        for name, info in sorted(missing.items())
    ]
