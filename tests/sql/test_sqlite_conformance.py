"""The conformance kit against SQLiteStorage, history-preserving and history-free."""

from __future__ import annotations

from amberdb.testing import SQLiteHistoryFreeFactory, SQLiteStorageFactory, conformance_suite

TestSQLiteStorage = conformance_suite(SQLiteStorageFactory)
TestSQLiteHistoryFree = conformance_suite(SQLiteHistoryFreeFactory)
