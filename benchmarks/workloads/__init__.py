"""The workloads, one module per family.  Each task runs inside a worker process.

A task is ``task(engine, directory, **sizes) -> {metric key: value}``; it checks its own
results (counts of objects read, sums) and raises if they are wrong, so a fast but broken
run can never be reported.  :data:`TASKS` maps task names to functions for the worker.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.workloads import (
    attribute,
    bigtxn,
    btree,
    commit,
    concurrency,
    evolve,
    groupcommit,
    objects,
    opening,
    pack,
    server,
    sql,
)

__all__ = ["PREPARE", "TASKS", "Task"]

Task = Callable[..., dict[str, float]]

PREPARE: dict[str, Callable[[], None]] = {"group_commit": groupcommit.prepare}
"""Steps a task needs before its engine is imported in the worker."""

TASKS: dict[str, Task] = {
    "objects": objects.add_update_read,
    "cold_read": objects.cold_read,
    "attribute": attribute.attribute_access,
    "btree_memory": btree.in_memory,
    "btree_build": btree.persisted_build,
    "btree_cold_scan": btree.persisted_cold_scan,
    "scale_build": btree.scale_build,
    "scale_scan": btree.scale_scan,
    "commit": commit.commit_latency,
    "big_transaction": bigtxn.big_transaction,
    "open_build": opening.build,
    "open": opening.open_database,
    "concurrency": concurrency.writers,
    "group_commit": groupcommit.suite_workload,
    "pack_build": pack.build,
    "pack": pack.pack_database,
    "evolve_build": evolve.build,
    "evolve": evolve.migrate,
    "evolve_check": evolve.check,
    "server": server.server_workload,
    "server_client": server.client,
    "sql_objects": sql.objects,
    "sql_cold_read": sql.cold_read,
    "sql_counter": sql.counter,
    "sql_client": sql.client,
    "sql_pack_build": sql.pack_build,
    "sql_pack": sql.pack,
}
