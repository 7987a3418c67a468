"""Storages: where records live.  Every storage implements :class:`amberdb.storage.base.Storage`."""

from amberdb.storage.base import DataRecord, IterableStorage, Storage, TransactionMeta, TransactionRecord

__all__ = ["DataRecord", "IterableStorage", "Storage", "TransactionMeta", "TransactionRecord"]
