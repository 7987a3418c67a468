"""Fixtures of the PostgreSQL tests: one throwaway cluster per session, a fresh database per test.

``pg_cluster`` is the session's server (amberdb.testing.pgcluster), ``pg_database`` and
``pg_dsn`` a database made for the test and dropped after it, ``pg_replica`` a streaming hot
standby of ``pg_cluster`` for the whole session.  Without PostgreSQL's server binaries these
tests are skipped, unless ``AMBERDB_REQUIRE_POSTGRESQL=1`` (CI sets it): then they fail, so a
broken setup fails loudly instead of passing with these tests skipped.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from amberdb.testing.pgcluster import PostgreSQLCluster, PostgreSQLReplica, find_bindir

REQUIRE = "AMBERDB_REQUIRE_POSTGRESQL"

_database_numbers = itertools.count(1)
# The replicas made this session, so that each test can leave theirs replaying.
_replicas: list[PostgreSQLReplica] = []


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{reason}\n({REQUIRE}=1: PostgreSQL must be there)", pytrace=False)
    pytest.skip(f"no PostgreSQL: {reason} (set {REQUIRE}=1 to fail instead)")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgreSQLCluster]:
    """The session's PostgreSQL server: trust auth on 127.0.0.1 and a socket, fsync on."""
    try:
        find_bindir()
    except RuntimeError as missing:
        _unavailable(str(missing))
    cluster = PostgreSQLCluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def pg_database(pg_cluster: PostgreSQLCluster) -> Iterator[str]:
    """The name of a new, empty database for this test; dropped after it."""
    name = f"amberdb_test_{os.getpid()}_{next(_database_numbers)}"
    pg_cluster.create_database(name)
    yield name
    # A test may have stopped the server (or been interrupted while it was down).
    if not pg_cluster.is_running():
        pg_cluster.start()
    pg_cluster.drop_database(name)


@pytest.fixture
def pg_dsn(pg_cluster: PostgreSQLCluster, pg_database: str) -> str:
    """A libpq DSN of a new, empty database for this test (``pg_database``)."""
    return pg_cluster.dsn(pg_database)


@pytest.fixture(scope="session")
def pg_replica(pg_cluster: PostgreSQLCluster) -> Iterator[PostgreSQLReplica]:
    """A streaming hot standby of ``pg_cluster``, for the session; replaying at each test's start.

    Connect with ``pg_replica.dsn(pg_database)`` after ``pg_replica.wait_for_replay()``.
    """
    replica = pg_cluster.make_replica()
    _replicas.append(replica)
    try:
        yield replica
    finally:
        _replicas.remove(replica)
        replica.close()


@pytest.fixture(autouse=True)
def _replicas_replaying() -> Iterator[None]:
    """A test that paused or stopped the replica (and failed before undoing it) does not pass that on."""
    yield
    for replica in _replicas:
        if replica.closed:
            continue
        if not replica.is_running():
            replica.start()
        elif replica.replay_paused:
            replica.resume_replay()
