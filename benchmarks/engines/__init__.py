"""The two databases behind one small interface, so that each workload is written once.

``load("amberdb")`` / ``load("zodb")`` import only the engine asked for: a worker process
measuring AmberDB never imports ZODB, so peak-memory figures are not skewed by the other
engine's modules.  Both engines define the same module-level classes (``Item`` with five
attributes, ``Counter`` with a conflict resolver, ``Book`` for the evolve workload), so records
name importable classes.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

__all__ = ["ENGINE_NAMES", "Engine", "UnavailableError", "load", "relstorage_missing", "zodb_available"]

ENGINE_NAMES = ("amberdb", "zodb")


class UnavailableError(Exception):
    """A workload cannot run on this engine (e.g. a package is not installed yet)."""


class Engine(Protocol):
    """What a workload needs from a database implementation."""

    name: str
    Item: type[Any]
    Counter: type[Any]
    Book: type[Any]
    PersistentList: type[Any]
    ConflictError: type[BaseException]

    def open_db(self, path: str | None, cache_size: int) -> Any:
        """A database on a FileStorage at ``path`` (None: in memory) with that cache size."""

    def transaction_manager(self) -> Any:
        """A new explicit-object (but implicitly beginning) transaction manager."""

    def subtransaction(self, manager: Any) -> None:
        """Spill the changes so far to a temporary file (``commit(True)`` / ``savepoint(True)``)."""

    def btree_class(self) -> type[Any]:
        """The integer-to-integer BTree class; raises :class:`UnavailableError` if it is missing."""

    def object_btree_class(self) -> type[Any]:
        """The integer-to-object BTree class (``IOBTree``)."""

    def minimize_cache(self, conn: Any) -> None:
        """Turn every unchanged loaded object of ``conn`` into a ghost."""

    def incremental_gc(self, conn: Any) -> None:
        """Shrink ``conn``'s cache to its size now, in the middle of a transaction."""

    def object_count(self, db: Any) -> int:
        """How many objects the database's storage holds."""

    def pack(self, db: Any) -> None:
        """Pack the database at the current time (old revisions and garbage go)."""

    def server(self, path: str, log_path: str, python_options: list[str] | None = None) -> Any:
        """A not yet started :class:`benchmarks.servers.ServerProcess` serving a FileStorage
        at ``path`` (AmberDB: ``amberdb serve``; ZODB: ZEO's ``runzeo``); raises
        :class:`UnavailableError` if the server package is missing."""

    def open_client_db(self, address: tuple[str, int], cache_size: int) -> Any:
        """A database on a client storage of the server at ``address`` (empty client cache)."""

    def open_sql_db(self, database: str, location: str, cache_size: int, full_sync: bool = True) -> Any:
        """A database on a relational storage with its default options: ``database`` is
        ``postgresql`` (``location`` a DSN; AmberDB: PostgreSQLStorage, ZODB: RelStorage with
        psycopg2) or ``sqlite`` (``location`` a folder the storage keeps its files in; AmberDB:
        SQLiteStorage, ZODB: RelStorage's sqlite3 adapter, ``synchronous=FULL`` unless
        ``full_sync`` is False); raises :class:`UnavailableError` if a package is missing."""

    def sql_counts(self, database: str, location: str) -> tuple[int, int]:
        """``(objects, revisions)`` the relational storage at ``location`` holds, counted in
        its tables with a connection of its own."""


def load(name: str) -> Engine:
    """The engine called ``name`` (``amberdb`` or ``zodb``)."""
    if name == "amberdb":
        from benchmarks.engines.amber import ENGINE
    elif name == "zodb":
        from benchmarks.engines.zodb import ENGINE
    else:
        raise ValueError(f"unknown engine {name!r}; expected one of {ENGINE_NAMES}")
    return ENGINE


def relstorage_missing(database: str) -> str | None:
    """Why RelStorage cannot run on ``database`` (``postgresql``, ``sqlite``) here, or None."""
    needed = ["relstorage"] + (["psycopg2"] if database == "postgresql" else [])
    absent = [name for name in needed if importlib.util.find_spec(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed (./scripts/bench installs the bench extra)"
    return None


def zodb_available() -> bool:
    """Whether ZODB, persistent, BTrees and transaction are importable (the ``bench`` extra)."""
    return all(
        importlib.util.find_spec(name) is not None for name in ("ZODB", "persistent", "BTrees", "transaction")
    )
