"""Relational storages: records kept in PostgreSQL or SQLite tables.

:mod:`amberdb.storage.sql.core` holds what both share (the commit protocol, polling, the
record cache, history and pack written as SQL); :mod:`~amberdb.storage.sql.sqlite` and
:mod:`~amberdb.storage.sql.postgresql` hold each database's schema and dialect.  Importing
this package imports neither driver: ``psycopg`` is needed only when a PostgreSQLStorage is
made (``pip install amberdb[postgresql]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["PostgreSQLStorage", "SQLiteStorage"]

if TYPE_CHECKING:
    from amberdb.storage.sql.postgresql import PostgreSQLStorage
    from amberdb.storage.sql.sqlite import SQLiteStorage


def __getattr__(name: str) -> Any:
    if name == "SQLiteStorage":
        from amberdb.storage.sql.sqlite import SQLiteStorage

        return SQLiteStorage
    if name == "PostgreSQLStorage":
        from amberdb.storage.sql.postgresql import PostgreSQLStorage

        return PostgreSQLStorage
    raise AttributeError(name)
