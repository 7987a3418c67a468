"""What every subcommand shares: errors, opening storages, oids, times, output."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import sys
from typing import Any
from urllib.parse import unquote, urlsplit

from amberdb.exceptions import StorageError
from amberdb.storage.base import Storage
from amberdb.storage.uri import open_storage
from amberdb.utils import Oid, Tid, oid_repr, p64, time_from_tid

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "CliError",
    "file_path",
    "iso_time",
    "open_read_only",
    "parse_oid",
    "parse_time",
    "print_json",
    "storage_size",
    "tid_info",
]

EXIT_OK = 0
EXIT_PROBLEMS = 1
"""Something is wrong with the data: verify found problems, a backup segment is damaged."""
EXIT_USAGE = 2
"""The command could not run: usage, a bad URI, a missing or locked file."""

# The rule of amberdb.storage.uri: a scheme has two or more characters ("C:" is a path).
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+):")


class CliError(Exception):
    """An error the command reports as one line, exiting with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def file_path(uri: str) -> str | None:
    """The data file a plain path or ``file:`` URI names; None for any other scheme."""
    found = _SCHEME.match(uri)
    if found is None:
        return uri
    if found.group(1).lower() != "file":
        return None
    return unquote(urlsplit(uri).path) or None


def open_read_only(uri: str) -> Storage:
    """The storage ``uri`` names, opened read-only (works while an application writes)."""
    path = file_path(uri)
    if path is not None and not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    try:
        return open_storage(uri, read_only=True)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def open_writable(uri: str) -> Storage:
    """The storage ``uri`` names, writable; a file must exist already (tools create nothing)."""
    path = file_path(uri)
    if path is not None and not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    try:
        return open_storage(uri)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def storage_size(storage: Storage) -> int:
    """Bytes the storage occupies (a FileStorage's committed length)."""
    return storage.get_size()


def iso_time(seconds: float) -> str:
    """``2024-05-01T12:00:00.123456+00:00``: a moment in UTC."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat()


def tid_info(tid: Tid) -> dict[str, str]:
    """A tid as JSON shows it: hex and the ISO time it encodes."""
    return {"tid": oid_repr(tid), "time": iso_time(time_from_tid(tid))}


def parse_oid(text: str) -> Oid:
    """An oid given as ``0x1f`` (hex) or ``31`` (decimal)."""
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
        return p64(value)
    except ValueError:
        raise CliError(f"{text!r} is not an oid: give it as hex (0x1f) or decimal (31)") from None


def parse_time(text: str) -> float:
    """POSIX seconds from ``1714564800``/``1714564800.5`` or an ISO 8601 datetime.

    A datetime without a zone is local time, as ``date`` shows it.
    """
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise CliError(f"{text!r} is not a time: give an ISO 8601 datetime or POSIX seconds")
        return seconds
    iso = text.strip()
    if iso.endswith(("Z", "z")):
        iso = iso[:-1] + "+00:00"  # Python 3.10's fromisoformat does not take "Z"
    try:
        moment = datetime.datetime.fromisoformat(iso)
    except ValueError:
        raise CliError(
            f"{text!r} is not a time: give an ISO 8601 datetime (2024-05-01T12:00:00+00:00) or POSIX seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time
    return moment.timestamp()


def print_json(value: Any) -> None:
    """Write ``value`` as indented JSON on stdout."""
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def close_quietly(storage: Storage | None) -> None:
    """Close ``storage`` if there is one, keeping the error already on its way."""
    if storage is None:
        return
    try:
        storage.close()
    except StorageError:
        pass
