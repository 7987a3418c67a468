"""The exceptions AmberDB raises: one tree under :class:`DatabaseError`.

Every message names what went wrong: the oid (as ``0x..``), the class and, where one is
involved, the attribute.  Where a builtin exception fits, the AmberDB exception derives from it
too, so ``except KeyError`` keeps working for a missing oid::

    DatabaseError
    ├── POSKeyError (also KeyError)            an oid with no record
    ├── StorageError
    │   ├── ReadOnlyError                       write to a read-only storage or database
    │   ├── StorageLockedError                  another process holds the storage for writing
    │   ├── FileFormatError                     not an AmberDB file, or a damaged one
    │   │   └── CorruptedDataError              a file failed a check: where, what, how to recover
    │   ├── StorageTransactionError             storage commit protocol used out of order
    │   ├── UndoError                           a transaction that cannot be undone (oids named)
    │   └── StorageForkedError                  a storage used in a child after os.fork()
    ├── SerializationError (also TypeError)     an object cannot be written as a record
    ├── UnsafeGlobalError                       a record names a class or function not allowed
    ├── RecordDecodeError                       a record cannot be read back into an object
    │   └── StateVersionError                   a stored state's version its class cannot read
    ├── BrokenModified                          a change to an object whose class is missing
    ├── InvalidObjectReference                  an object belongs to another connection
    ├── ConnectionStateError                    a closed connection, or one used wrongly
    └── TransactionError                        (as in the ``transaction`` package)
        ├── TransientError                      retrying the transaction may succeed
        │   └── ConflictError                   two transactions wrote the same object
        │       └── VoteConflictError           a storage's vote found conflicts (all of them)
        ├── DoomedTransactionError              commit of a doomed transaction
        ├── TransactionFailedError              a failed commit must be aborted first
        ├── NoTransactionError                  no transaction begun on an explicit manager
        ├── AlreadyInTransactionError           begin() twice on an explicit manager
        └── InvalidSavepointRollbackError       rollback of a savepoint no longer valid

``DoomedTransaction``, ``NoTransaction`` and ``AlreadyInTransaction`` are the names the
``transaction`` package gives to the same classes.
"""

from __future__ import annotations

from amberdb.utils import oid_repr

__all__ = [
    "AlreadyInTransaction",
    "AlreadyInTransactionError",
    "AuthenticationError",
    "BrokenModified",
    "ClientDisconnected",
    "ConflictError",
    "ConnectionStateError",
    "CorruptedDataError",
    "DatabaseError",
    "DoomedTransaction",
    "DoomedTransactionError",
    "FileFormatError",
    "InvalidObjectReference",
    "InvalidSavepointRollbackError",
    "NoTransaction",
    "NoTransactionError",
    "POSKeyError",
    "ReadConflictError",
    "ReadOnlyError",
    "RecordDecodeError",
    "SerializationError",
    "StateVersionError",
    "StorageError",
    "StorageForkedError",
    "StorageLockedError",
    "StorageTransactionError",
    "TransactionError",
    "TransactionFailedError",
    "TransientError",
    "TransientStorageError",
    "UndoError",
    "UnsafeGlobalError",
    "VoteConflictError",
]


class DatabaseError(Exception):
    """Base class of every error AmberDB raises."""


class POSKeyError(KeyError, DatabaseError):
    """No record exists for an oid (or none before the requested transaction)."""

    def __init__(self, oid: bytes, detail: str = "") -> None:
        self.oid = oid
        message = f"no record for oid {oid_repr(oid)}"
        if detail:
            message = f"{message}: {detail}"
        super().__init__(message)

    def __str__(self) -> str:
        # KeyError.__str__ would quote the message; show it plainly.
        return str(self.args[0])


class StorageError(DatabaseError):
    """A storage cannot do what was asked of it."""


class ReadOnlyError(StorageError):
    """A write was attempted on a read-only storage or database."""


class StorageLockedError(StorageError):
    """Another process has the storage open for writing."""


class FileFormatError(StorageError):
    """A file is not an AmberDB file, or its contents are damaged."""


class StorageTransactionError(StorageError):
    """The storage commit protocol was used out of order."""


class AuthenticationError(StorageError):
    """A server refused the client's credentials (a wrong, missing or revoked token).

    Not transient: retrying with the same token cannot succeed, so nothing retries it.
    """


class CorruptedDataError(FileFormatError):
    """A storage file failed a check (a checksum, a length, a pointer); nothing was changed.

    ``path`` and ``offset`` say where, ``oid`` which object when a load found it, ``problem``
    which check failed.  The message also says how to recover.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        offset: int | None = None,
        oid: bytes | None = None,
        problem: str = "",
    ) -> None:
        self.path = path
        self.offset = offset
        self.oid = oid
        self.problem = problem
        super().__init__(message)


class UndoError(StorageError):
    """An undo that cannot be done: ``oids`` are the objects that stand in the way (later
    transactions changed them and their changes did not merge); empty when the transaction
    itself cannot be undone (unknown, or packed away)."""

    def __init__(self, message: str, oids: tuple[bytes, ...] = ()) -> None:
        self.oids = tuple(oids)
        super().__init__(message)


class StorageForkedError(StorageError):
    """A storage opened before ``os.fork()`` was used in the child; open it again there."""


class SerializationError(TypeError, DatabaseError):
    """An object's state cannot be written as a record."""


class UnsafeGlobalError(DatabaseError):
    """A record names a class or function that the application did not allow."""


class RecordDecodeError(DatabaseError):
    """A record's bytes cannot be turned back into an object state."""


class StateVersionError(RecordDecodeError):
    """A stored state has a version (``_p_version``) its class's ``_p_upgrade`` cannot read."""


class BrokenModified(DatabaseError):  # noqa: N818 - the name ZODB users catch
    """A change to a broken object: its class is missing, so it could not be stored back."""


class InvalidObjectReference(DatabaseError):  # noqa: N818 - the name ZODB users catch
    """An object that belongs to another connection or database was stored here."""


class ConnectionStateError(DatabaseError):
    """A connection was used when closed, or from a state that does not allow the call."""


class TransactionError(DatabaseError):
    """The transaction machinery was used in a way it does not allow."""


class TransientError(TransactionError):
    """An error that may go away if the transaction is retried.

    A :class:`TransactionError`, as in the ``transaction`` package, so ``except
    TransactionError`` also catches conflicts.
    """


class ConflictError(TransientError):
    """Two transactions changed the same object; the later commit loses.

    ``oid`` is the object, ``class_name`` its class when known, ``serials`` the pair
    ``(committed tid, tid the loser started from)``.
    """

    def __init__(
        self,
        message: str = "",
        *,
        oid: bytes | None = None,
        class_name: str | None = None,
        serials: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.oid = oid
        self.class_name = class_name
        self.serials = serials
        super().__init__(message or self._describe())

    def _describe(self) -> str:
        parts = ["database conflict error"]
        if self.oid is not None:
            parts.append(f"oid {oid_repr(self.oid)}")
        if self.class_name:
            parts.append(f"class {self.class_name}")
        if self.serials is not None:
            committed, started = self.serials
            parts.append(f"committed tid {oid_repr(committed)}, yours based on {oid_repr(started)}")
        return ", ".join(parts)

    def with_class(self, class_name: str) -> ConflictError:
        """Return a copy of this error that also names the object's class."""
        return type(self)(oid=self.oid, class_name=class_name, serials=self.serials)


class VoteConflictError(ConflictError):
    """A storage's ``vote()`` found conflicts: ``conflicts`` maps each oid to its serials.

    The serials are ``(committed tid, tid the store was based on)`` as in ConflictError;
    ``oid`` and ``serials`` describe the first conflict.  The storage's transaction is still
    open: store resolved records based on the committed tids and vote again, or abort.
    """

    def __init__(self, conflicts: dict[bytes, tuple[bytes, bytes]], message: str = "") -> None:
        if not conflicts:
            raise ValueError("VoteConflictError needs at least one conflict")
        self.conflicts = dict(conflicts)
        oid, serials = next(iter(self.conflicts.items()))
        if not message and len(self.conflicts) > 1:
            others = ", ".join(oid_repr(other) for other in list(self.conflicts)[1:6])
            more = "" if len(self.conflicts) <= 6 else f" and {len(self.conflicts) - 6} more"
            message = f"{ConflictError(oid=oid, serials=serials)}; also oids {others}{more}"
        super().__init__(message, oid=oid, serials=serials)

    def with_class(self, class_name: str) -> ConflictError:
        """A plain ConflictError for the first conflicting oid, naming its class."""
        return ConflictError(oid=self.oid, class_name=class_name, serials=self.serials)


class ClientDisconnected(StorageError, TransientError):  # noqa: N818 - the name ZEO users catch
    """A client storage lost its server (or never reached it within its timeout).

    Transient: the client reconnects by itself, so ``attempts()`` retries the transaction.
    A commit cut off after its vote may or may not have happened; one whose ``finish``
    returned did.
    """


class ReadConflictError(ConflictError):
    """An object's state for this transaction's snapshot is no longer available (a
    history-free storage keeps only current states).  Transient: a retry reads the new one."""


class TransientStorageError(StorageError, TransientError):
    """A storage failed in a way a retry may cure: its database connection dropped or the
    database restarted, or it stayed locked past the timeout.  Nothing was half-committed;
    ``attempts()`` retries the transaction."""


class DoomedTransactionError(TransactionError):
    """A doomed transaction can only be aborted."""


DoomedTransaction = DoomedTransactionError
"""The name the ``transaction`` package users know."""


class TransactionFailedError(TransactionError):
    """A commit of this transaction failed; it must be aborted before anything else."""


class NoTransactionError(TransactionError):
    """An explicit transaction manager was used before ``begin()``."""


NoTransaction = NoTransactionError
"""The name the ``transaction`` package users know."""


class AlreadyInTransactionError(TransactionError):
    """``begin()`` was called on an explicit transaction manager with a transaction in progress."""


AlreadyInTransaction = AlreadyInTransactionError
"""The name the ``transaction`` package users know."""


class InvalidSavepointRollbackError(TransactionError):
    """The savepoint can no longer be rolled back to."""
