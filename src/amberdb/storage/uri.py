"""Storage URIs: ``amberdb.open_storage(uri)`` and ``amberdb.DB(uri)``.

=================================  ==========================================================
``memory:``                        a new, empty :class:`~amberdb.storage.memory.MemoryStorage`
``file:///abs/path.fs``            a :class:`~amberdb.storage.file.FileStorage`; ``file:rel.fs``
                                   is relative to the working directory
``file:...?read_only=true``        FileStorage's options: ``read_only``, ``create``,
                                   ``fsync``, ``salvage`` (``true``/``false``, ``1``/``0``,
                                   ``yes``/``no``)
``amberdb://host:port?...``        a :class:`~amberdb.server.client.ClientStorage` of an
                                   ``amberdb serve`` server; ``amberdbs://`` with TLS,
                                   ``amberdb+unix:///path/to/socket`` over a Unix socket
                                   (options: :func:`~amberdb.server.client.open_client_uri`)
``sqlite:///abs/path.sqlite``      a :class:`~amberdb.storage.sql.sqlite.SQLiteStorage`
                                   (``?history=false``, ``read_only``, ``cache_size``,
                                   ``cache_path``, ``lock_timeout``)
``postgresql://user@host/dbname``  a :class:`~amberdb.storage.sql.postgresql.PostgreSQLStorage`
                                   (``?history=false``, ``replica=DSN``, ...; the rest of the
                                   URI goes to libpq; needs ``amberdb[postgresql]``)
``path/to/data.fs``                a plain path: a FileStorage
``<scheme>:...``                   a scheme a package registered in the ``amberdb.storages``
                                   entry-point group (or with :func:`register_scheme`)
=================================  ==========================================================

A string is a URI when it starts with a scheme of two or more characters and a colon
(``memory:``, ``file:``, ``postgresql://``); anything else, and every ``os.PathLike``, is a
path.  A path whose first colon comes before any slash (``data:2024.fs``) must be given as a
``pathlib.Path`` or a ``file:`` URI.  An unknown scheme or option fails with ``ValueError``
naming it and what is known; so does an option given twice or without a value.

An entry point of the ``amberdb.storages`` group is named after its scheme and loads a
callable ``opener(uri: str, read_only: bool) -> Storage``; it is imported only when a URI with
that scheme is opened.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from amberdb.storage.base import Storage

__all__ = [
    "ENTRY_POINT_GROUP",
    "Opener",
    "flag_value",
    "known_schemes",
    "local_file",
    "open_storage",
    "register_scheme",
]

ENTRY_POINT_GROUP = "amberdb.storages"
"""The entry-point group in which a package registers a URI scheme."""

Opener = Callable[[str, bool], Storage]
"""Opens the storage a URI names: ``opener(uri, read_only)``."""

# Two or more characters: "C:\\data.fs" stays a (Windows) path.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+):")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_FILE_OPTIONS = ("read_only", "create", "fsync", "salvage")

_registered: dict[str, Opener] = {}
_registry_lock = threading.Lock()


def register_scheme(scheme: str, opener: Opener) -> None:
    """Let ``open_storage`` open URIs of ``scheme`` with ``opener(uri, read_only)``."""
    if _SCHEME.fullmatch(scheme + ":") is None:
        raise ValueError(f"{scheme!r} is not a URI scheme (a letter, then letters, digits, '+', '-', '.')")
    if scheme.lower() in _BUILT_IN:
        # open_storage looks built-in schemes up first: a registration would be ignored.
        raise ValueError(f"scheme {scheme.lower()!r} is built in and cannot be registered again")
    with _registry_lock:
        _registered[scheme.lower()] = opener


def known_schemes() -> list[str]:
    """The schemes ``open_storage`` knows: built in, registered, and from entry points."""
    names = set(_BUILT_IN) | set(_registered)
    names.update(entry.name.lower() for entry in _entry_points())
    return sorted(names)


def open_storage(uri: str | os.PathLike[str], *, read_only: bool = False) -> Storage:
    """The storage ``uri`` names (see the module docstring); ``read_only`` applies to any."""
    if isinstance(uri, os.PathLike):
        return _open_file_path(os.fspath(uri), {}, read_only)
    if not isinstance(uri, str):
        raise TypeError(f"a storage URI or path is a str or os.PathLike, not {type(uri).__qualname__}")
    if not uri:
        raise ValueError("empty storage URI or path")
    found = _SCHEME.match(uri)
    if found is None:
        return _open_file_path(uri, {}, read_only)
    scheme = found.group(1).lower()
    opener = _BUILT_IN.get(scheme) or _registered.get(scheme) or _entry_point_opener(scheme)
    if opener is None:
        raise ValueError(
            f"unknown storage scheme {scheme!r} in {uri!r}: known schemes are "
            f"{', '.join(known_schemes())} (a package adds one through the {ENTRY_POINT_GROUP!r} "
            "entry-point group; a file path with a colon in it can be given as pathlib.Path or "
            "a file: URI)"
        )
    storage = opener(uri, read_only)
    if not isinstance(storage, Storage):
        returned = type(storage).__qualname__
        raise TypeError(f"the opener of scheme {scheme!r} returned {returned}, not a storage")
    if read_only and not storage.read_only:
        # A writable storage handed to a caller who asked for a read-only one would let
        # its commits through.
        storage.close()
        raise ValueError(f"the opener of scheme {scheme!r} ignored read_only=True: it returned {storage!r}")
    return storage


def _entry_point_opener(scheme: str) -> Opener | None:
    for entry in _entry_points():
        if entry.name.lower() == scheme:
            opener: Opener = entry.load()
            return opener
    return None


def _options(uri: str, query: str, known: tuple[str, ...]) -> dict[str, bool]:
    options: dict[str, bool] = {}
    # Field by field rather than urllib's strict parsing, whose "bad query field" names
    # neither the URI nor the option.
    for field in query.split("&") if query else ():
        if not field:
            raise ValueError(f"empty option (a stray '&') in storage URI {uri!r}")
        if "=" not in field:
            name = unquote(field)
            raise ValueError(
                f"option {name!r} has no value in storage URI {uri!r}: write {name}=true or {name}=false"
            )
        ((name, text),) = parse_qsl(field, keep_blank_values=True)
        if name in options:
            # The last value winning would quietly turn read_only=true&read_only=false writable.
            raise ValueError(f"option {name!r} is given twice in storage URI {uri!r}")
        if name not in known:
            shown = ", ".join(known) if known else "none"
            raise ValueError(f"unknown option {name!r} in storage URI {uri!r}: known options are {shown}")
        flag = flag_value(text)
        if flag is None:
            raise ValueError(f"option {name}={text!r} in storage URI {uri!r} is not true or false")
        options[name] = flag
    return options


def flag_value(text: str) -> bool | None:
    """A URI option's true/false value (``true``/``false``, ``1``/``0``, ``yes``/``no``,
    ``on``/``off``, any case), or None when it is neither."""
    value = text.lower()
    return True if value in _TRUE else False if value in _FALSE else None


def local_file(uri: str) -> tuple[str, str]:
    """``(path, query)`` of a URI naming a local file (``file:``, ``sqlite:``): ValueError for
    another host, a fragment, or no path."""
    parts = urlsplit(uri)
    scheme = f"{parts.scheme}:"
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{scheme} URI {uri!r} names host {parts.netloc!r}: only local files can be opened")
    if parts.fragment:
        raise ValueError(f"{scheme} URI {uri!r} has a fragment (#...); options go after '?'")
    path = unquote(parts.path)
    if not path:
        raise ValueError(f"{scheme} URI {uri!r} names no file")
    return path, parts.query


def _open_memory(uri: str, read_only: bool) -> Storage:
    from amberdb.storage.memory import MemoryStorage

    parts = urlsplit(uri)
    if parts.netloc or parts.path.strip("/"):
        raise ValueError(f"a memory: URI names no place, got {uri!r}")
    if parts.fragment:
        raise ValueError(f"memory: URI {uri!r} has a fragment (#...), which names nothing")
    _options(uri, parts.query, ())
    if read_only:
        raise ValueError(f"{uri!r}: a new in-memory storage cannot be read-only (it would stay empty)")
    return MemoryStorage()


def _open_file(uri: str, read_only: bool) -> Storage:
    path, query = local_file(uri)
    return _open_file_path(path, _options(uri, query, _FILE_OPTIONS), read_only)


def _open_file_path(path: str, options: dict[str, bool], read_only: bool) -> Storage:
    from amberdb.storage.file import FileStorage

    if read_only:
        options["read_only"] = True
    return FileStorage(path, **options)


def _open_client(uri: str, read_only: bool) -> Storage:
    from amberdb.server.client import open_client_uri

    return open_client_uri(uri, read_only)


def _open_sqlite(uri: str, read_only: bool) -> Storage:
    from amberdb.storage.sql.sqlite import open_sqlite_uri

    return open_sqlite_uri(uri, read_only)


def _open_postgresql(uri: str, read_only: bool) -> Storage:
    from amberdb.storage.sql.postgresql import open_postgresql_uri

    return open_postgresql_uri(uri, read_only)


_BUILT_IN: dict[str, Opener] = {
    "memory": _open_memory,
    "file": _open_file,
    "amberdb": _open_client,
    "amberdbs": _open_client,
    "amberdb+unix": _open_client,
    "sqlite": _open_sqlite,
    "postgresql": _open_postgresql,
    "postgres": _open_postgresql,
}


def _entry_points() -> list[Any]:
    """The installed storages' entry points (importlib.metadata is costly to import: on demand)."""
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))
