"""Workload sizes: the issue's (``--full``), the defaults, and tiny ones (``--quick``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["DEFAULT", "FULL", "QUICK", "Sizes"]


@dataclass(frozen=True)
class Sizes:
    """Every size parameter of the suite."""

    objects: int = 10_000  # add / update / cold, warm, hot read
    objects_batch: int = 1_000
    attribute_loops: int = 200_000  # timeit loops of 10 accesses, 5 rounds per subject
    btree_keys: int = 1_000_000
    btree_persisted: int = 200_000
    btree_per_commit: int = 10_000
    scale_entries: int = 10_000_000
    scale_per_commit: int = 100_000
    commits: int = 500
    big_objects: int = 1_000_000
    big_every: int = 10_000
    big_cache: int = 5_000
    open_objects: int = 1_000_000
    open_batch: int = 10_000
    concurrency_commits: int = 200  # per thread
    group_commits: int = 60  # per thread, at 1, 16 and 32 threads, on each device
    pack_objects: int = 1_000_000  # half garbage, every live one with 3 old revisions
    pack_batch: int = 10_000
    evolve_objects: int = 200_000  # instances migrated (evolve.each vs a loop over an IOBTree)
    evolve_batch: int = 1_000  # objects per migration commit
    evolve_build_batch: int = 10_000  # objects per commit while building (not timed)
    server_objects: int = 10_000  # add / update / cold read through the server
    server_commits: int = 500  # one-object commits timed through the server
    server_client_commits: int = 200  # per client process (disjoint writers, counter)
    sql_objects: int = 10_000  # postgresql, sqlite: add / update / cold read, batch objects_batch
    sql_commits: int = 200  # one-object commits timed
    sql_client_commits: int = 100  # per counter client process
    sql_pack_objects: int = 10_000  # half garbage, every live one with 3 old revisions

    # The counts --scale multiplies (batch sizes and cache sizes stay).
    SCALED = (
        "objects",
        "attribute_loops",
        "btree_keys",
        "btree_persisted",
        "scale_entries",
        "commits",
        "big_objects",
        "open_objects",
        "concurrency_commits",
        "group_commits",
        "pack_objects",
        "evolve_objects",
        "server_objects",
        "server_commits",
        "server_client_commits",
        "sql_objects",
        "sql_commits",
        "sql_client_commits",
        "sql_pack_objects",
    )

    def scaled(self, factor: float) -> Sizes:
        """These sizes with every count multiplied by ``factor`` (at least 10)."""
        changes = {name: max(10, round(getattr(self, name) * factor)) for name in self.SCALED}
        return dataclasses.replace(self, **changes)

    def differences(self, other: Sizes) -> dict[str, tuple[int, int]]:
        """``{name: (mine, other's)}`` for every size that differs."""
        return {
            field.name: (getattr(self, field.name), getattr(other, field.name))
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
        }

    def as_dict(self) -> dict[str, int]:
        """Plain dict for the JSON output."""
        return dataclasses.asdict(self)


FULL = Sizes()
"""The sizes the issue states."""

DEFAULT = dataclasses.replace(FULL, big_objects=200_000, open_objects=200_000, pack_objects=100_000)
"""What ``./scripts/bench`` runs: the issue's sizes, except the two million-object
workloads, cut to 200,000 objects, so that a run takes a few minutes on two cores.  The
BTree scale workload keeps its 10 million entries: a smaller tree does not reach the
steady state whose flatness it shows."""

QUICK = Sizes(
    objects=300,
    objects_batch=100,
    attribute_loops=2_000,
    btree_keys=3_000,
    btree_persisted=3_000,
    btree_per_commit=1_000,
    scale_entries=4_000,
    scale_per_commit=500,
    commits=10,
    big_objects=3_000,
    big_every=1_000,
    big_cache=500,
    open_objects=2_000,
    open_batch=1_000,
    concurrency_commits=5,
    group_commits=3,
    pack_objects=2_000,
    pack_batch=500,
    evolve_objects=2_000,
    evolve_batch=500,
    evolve_build_batch=1_000,
    server_objects=300,
    server_commits=10,
    server_client_commits=5,
    sql_objects=300,
    sql_commits=10,
    sql_client_commits=5,
    sql_pack_objects=400,
)
"""Tiny sizes for smoke tests: does every workload run, are the results sane."""
