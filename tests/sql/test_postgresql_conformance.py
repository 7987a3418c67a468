"""The conformance kit against PostgreSQLStorage, history-preserving and history-free, on the
session's throwaway cluster (each factory in a schema of its own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from amberdb.testing import PostgreSQLHistoryFreeFactory, PostgreSQLStorageFactory, conformance_suite
from amberdb.testing.pgcluster import PostgreSQLCluster


@pytest.fixture(scope="module", autouse=True)
def _kit_database(pg_cluster: PostgreSQLCluster) -> Iterator[None]:
    pg_cluster.create_database("amberdb_kit")
    PostgreSQLStorageFactory.base_uri = (
        f"postgresql://{pg_cluster.user}@{pg_cluster.host}:{pg_cluster.port}/amberdb_kit"
    )
    try:
        yield
    finally:
        PostgreSQLStorageFactory.base_uri = None
        pg_cluster.drop_database("amberdb_kit")


TestPostgreSQLStorage = conformance_suite(PostgreSQLStorageFactory)
TestPostgreSQLHistoryFree = conformance_suite(PostgreSQLHistoryFreeFactory)
