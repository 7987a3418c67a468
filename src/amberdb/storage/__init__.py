"""Storages: where records live.  Every storage implements :class:`amberdb.storage.base.Storage`."""

from amberdb.storage.base import (
    DataRecord,
    IterableStorage,
    Revision,
    Storage,
    TransactionInfo,
    TransactionMeta,
    TransactionRecord,
)

__all__ = [
    "DataRecord",
    "IterableStorage",
    "Revision",
    "Storage",
    "TransactionInfo",
    "TransactionMeta",
    "TransactionRecord",
]
