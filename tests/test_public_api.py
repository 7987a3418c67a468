"""The public names users import: changing them breaks users, so a test pins them."""

from __future__ import annotations

import amberdb
import amberdb.exceptions
import amberdb.transaction as transaction
import amberdb.utils


def test_top_level_exports_are_pinned() -> None:
    assert sorted(amberdb.__all__) == sorted(
        [
            "DB", "AlreadyInTransaction", "AlreadyInTransactionError", "AuthenticationError",
                "Broken", "BrokenModified", "StateVersionError",
            "ClientDisconnected", "ClientStorage", "ConflictError", "Connection",
            "ConnectionStateError", "CorruptedDataError", "DatabaseError",
            "DoomedTransaction", "DoomedTransactionError", "FileFormatError", "FileStorage",
            "InvalidObjectReference", "InvalidSavepointRollbackError", "MemoryStorage",
            "NoTransaction", "NoTransactionError", "POSKeyError", "PostgreSQLStorage",
            "ReadConflictError", "Persistent", "PersistentList",
            "PersistentMapping",
            "ReadOnlyError", "RecordDecodeError", "SQLiteStorage", "SerializationError",
            "StorageError",
            "StorageForkedError", "StorageLockedError", "StorageServer", "StorageTransactionError",
            "TransactionError",
            "TransactionFailedError", "TransientError", "TransientStorageError",
            "UndoError", "UnsafeGlobalError", "VoteConflictError",
            "connection", "open_storage",
        ]
    )  # fmt: skip
    for name in amberdb.__all__:
        assert getattr(amberdb, name) is not None


def test_every_exception_derives_from_database_error() -> None:
    for name in amberdb.exceptions.__all__:
        error = getattr(amberdb.exceptions, name)
        assert issubclass(error, amberdb.DatabaseError), name
        assert getattr(amberdb, name) is error
    assert issubclass(amberdb.POSKeyError, KeyError)
    assert issubclass(amberdb.ConflictError, amberdb.TransientError)
    # As in the transaction package: ``except TransactionError`` catches conflicts too.
    assert issubclass(amberdb.TransientError, amberdb.TransactionError)
    # attempts() retries a lost server; a refused token is not retried.
    assert issubclass(amberdb.ClientDisconnected, amberdb.TransientError)
    assert issubclass(amberdb.ClientDisconnected, amberdb.StorageError)
    assert not issubclass(amberdb.AuthenticationError, amberdb.TransientError)
    # A SQL storage's lost connection or lock timeout, and a history-free snapshot miss.
    assert issubclass(amberdb.TransientStorageError, amberdb.TransientError)
    assert issubclass(amberdb.ReadConflictError, amberdb.ConflictError)


def test_transaction_module_api() -> None:
    for name in (
        "begin", "get", "commit", "abort", "savepoint", "doom", "isDoomed", "manager",
        "TransactionManager", "ThreadTransactionManager", "Transaction", "Savepoint",
    ):  # fmt: skip
        assert hasattr(transaction, name), name


def test_utils() -> None:
    assert amberdb.utils.z64 == b"\0" * 8
    assert amberdb.utils.p64(1) == b"\0" * 7 + b"\1"
    assert amberdb.utils.u64(amberdb.utils.p64(2**64 - 1)) == 2**64 - 1
