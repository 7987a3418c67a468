"""Subcommands that write: ``pack`` and ``copy``."""

from __future__ import annotations

import argparse
import time
from typing import Any

from amberdb.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    CliError,
    close_quietly,
    open_read_only,
    open_writable,
    print_json,
    storage_size,
)
from amberdb.cli.inspect import print_verify_report, verify_open_storage
from amberdb.cli.progress import Progress, format_bytes
from amberdb.storage.base import Storage
from amberdb.utils import z64

__all__ = ["cmd_copy", "cmd_pack", "cmd_upgrade_schema"]


def _never_committed(uri: str) -> bool:
    """Whether the storage ``uri`` names holds no transaction (looked at read-only)."""
    storage = open_read_only(uri)
    try:
        return storage.last_tid() == z64
    finally:
        close_quietly(storage)


def storage_size_of(uri: str) -> int | None:
    """The size of the storage ``uri`` names, looked at read-only."""
    storage = open_read_only(uri)
    try:
        return storage_size(storage)
    finally:
        close_quietly(storage)


def _size_text(size: int | None) -> str:
    return "unknown" if size is None else f"{size:,} bytes ({format_bytes(size)})"


def cmd_pack(args: argparse.Namespace) -> int:
    if args.days < 0:
        raise CliError("--days must not be negative")
    if args.uri != "memory:" and _never_committed(args.uri):
        # An empty file stays as it is: a writable open would give it a header.
        before = after = storage_size_of(args.uri)
    else:
        storage = open_writable(args.uri)
        try:
            before = storage_size(storage)
            with Progress("packing", quiet=args.quiet) as progress:
                # The storage's pack, not a DB's: a DB would create a root in a new storage.
                storage.pack(time.time() - args.days * 86400.0, progress=progress.update)
            after = storage_size(storage)
        finally:
            close_quietly(storage)
    result: dict[str, Any] = {"uri": args.uri, "days": args.days, "size_before": before, "size_after": after}
    if args.json:
        print_json(result)
    else:
        print(f"packed {storage.name}")
        print(f"  size before: {_size_text(before)}")
        print(f"  size after:  {_size_text(after)}")
    return EXIT_OK


def cmd_copy(args: argparse.Namespace) -> int:
    source = open_read_only(args.source)
    destination: Storage | None = None
    try:
        destination = open_writable_or_new(args.destination)
        copy = getattr(destination, "copy_transactions_from", None)
        if copy is None:
            raise CliError(f"{destination.name}: this storage cannot copy transactions in")
        count = copy(source)
    except BaseException:
        close_quietly(destination)
        raise
    finally:
        source.close()
    report = verify_open_storage(destination, args.destination, args.quiet)
    report["copied_transactions"] = count
    if args.json:
        print_json(report)
    else:
        print(f"copied {count:,} transaction(s) from {args.source} to {args.destination}")
        print_verify_report(report, False)
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def open_writable_or_new(uri: str) -> Storage:
    """The destination of a copy: an existing storage, or a new file."""
    from amberdb.cli.common import file_path
    from amberdb.storage.uri import open_storage

    if file_path(uri) is None:
        return open_writable(uri)
    try:
        return open_storage(uri)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_upgrade_schema(args: argparse.Namespace) -> int:
    from amberdb.storage.sql.core import upgrade_schema

    try:
        before, after = upgrade_schema(args.uri)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print_json({"uri": args.uri, "version_before": before, "version_after": after})
    elif before == after:
        print(f"the schema is at version {after} already: nothing to do")
    else:
        print(f"upgraded the schema from version {before} to {after}")
    return EXIT_OK
