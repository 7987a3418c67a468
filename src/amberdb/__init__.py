"""AmberDB: a transactional object database for Python.

Keep ordinary Python objects in a database: everything reachable from the root is saved when
the transaction commits and loaded, lazily, when code touches it::

    import amberdb
    import amberdb.transaction as transaction

    conn = amberdb.connection("books.fs")
    conn.root.books = amberdb.PersistentList()
    transaction.commit()
"""

from typing import TYPE_CHECKING, Any

from amberdb.broken import Broken
from amberdb.connection import Connection
from amberdb.containers import PersistentList, PersistentMapping
from amberdb.db import DB, connection
from amberdb.exceptions import (
    AlreadyInTransaction,
    AlreadyInTransactionError,
    AuthenticationError,
    BrokenModified,
    ClientDisconnected,
    ConflictError,
    ConnectionStateError,
    CorruptedDataError,
    DatabaseError,
    DoomedTransaction,
    DoomedTransactionError,
    FileFormatError,
    InvalidObjectReference,
    InvalidSavepointRollbackError,
    NoTransaction,
    NoTransactionError,
    POSKeyError,
    ReadConflictError,
    ReadOnlyError,
    RecordDecodeError,
    SerializationError,
    StateVersionError,
    StorageError,
    StorageForkedError,
    StorageLockedError,
    StorageTransactionError,
    TransactionError,
    TransactionFailedError,
    TransientError,
    TransientStorageError,
    UndoError,
    UnsafeGlobalError,
    VoteConflictError,
)
from amberdb.persistent import Persistent
from amberdb.storage.file import FileStorage
from amberdb.storage.memory import MemoryStorage
from amberdb.storage.uri import open_storage

__version__ = "0.1.0"

# Imported on first use: the network and SQL storages bring asyncio, ssl and sqlite3, which
# an embedded application never needs.
_LAZY = {
    "ClientStorage": "amberdb.server",
    "StorageServer": "amberdb.server",
    "PostgreSQLStorage": "amberdb.storage.sql.postgresql",
    "SQLiteStorage": "amberdb.storage.sql.sqlite",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'amberdb' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from amberdb.server import ClientStorage, StorageServer
    from amberdb.storage.sql.postgresql import PostgreSQLStorage
    from amberdb.storage.sql.sqlite import SQLiteStorage

__all__ = [
    "DB",
    "AlreadyInTransaction",
    "AlreadyInTransactionError",
    "AuthenticationError",
    "Broken",
    "BrokenModified",
    "ClientDisconnected",
    "ClientStorage",
    "ConflictError",
    "Connection",
    "ConnectionStateError",
    "CorruptedDataError",
    "DatabaseError",
    "DoomedTransaction",
    "DoomedTransactionError",
    "FileFormatError",
    "FileStorage",
    "InvalidObjectReference",
    "InvalidSavepointRollbackError",
    "MemoryStorage",
    "NoTransaction",
    "NoTransactionError",
    "POSKeyError",
    "Persistent",
    "PersistentList",
    "PersistentMapping",
    "PostgreSQLStorage",
    "ReadConflictError",
    "ReadOnlyError",
    "RecordDecodeError",
    "SQLiteStorage",
    "SerializationError",
    "StateVersionError",
    "StorageError",
    "StorageForkedError",
    "StorageLockedError",
    "StorageServer",
    "StorageTransactionError",
    "TransactionError",
    "TransactionFailedError",
    "TransientError",
    "TransientStorageError",
    "UndoError",
    "UnsafeGlobalError",
    "VoteConflictError",
    "connection",
    "open_storage",
]
