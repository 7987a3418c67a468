"""What is measured: workload names, the metrics each reports, and the targets.

Every metric row compares the AmberDB median with the ZODB median (the ``zodb`` column is
ZEO in the server workload, RelStorage in the postgresql and sqlite ones: :data:`PEERS`).
``ratio`` is always expressed so that > 1 means AmberDB is better: AmberDB/ZODB for rates,
ZODB/AmberDB for times and sizes.  A target is a minimum for that ratio, a maximum or
minimum for AmberDB's own value (for figures that are already relative: commit vs floor,
read vs plain object, memory growth), or AmberDB's figure below the other's (for counts that
may well be zero on both sides, where a ratio means nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "METRICS",
    "PEERS",
    "WORKLOADS",
    "Metric",
    "Target",
    "amber_at_least",
    "at_least",
    "at_most",
    "fewer",
]

WORKLOADS = (
    "add",
    "update",
    "cold_read",
    "warm_read",
    "hot_read",
    "attribute",
    "btree_memory",
    "btree_persisted",
    "btree_scale",
    "commit",
    "big_transaction",
    "open",
    "concurrency",
    "group_commit",
    "pack",
    "evolve",
    "server",
    "postgresql",
    "sqlite",
)

PEERS = {"server": "ZEO", "postgresql": "RelStorage", "sqlite": "RelStorage"}
"""What the ``zodb`` column holds in these workloads (ZODB on FileStorage elsewhere)."""


@dataclass(frozen=True)
class Target:
    """``ratio_min``: ratio >= value; ``amber_max`` / ``amber_min``: AmberDB's median <= / >= value;
    ``fewer``: AmberDB's median below the other engine's (or both zero: none can be fewer)."""

    kind: str
    value: float
    text: str

    def verdict(self, amber: float | None, ratio: float | None, zodb: float | None = None) -> str:
        """OK, MISSED, or n/a when a figure it needs is missing."""
        if self.kind == "fewer":
            if amber is None or zodb is None:
                return "n/a"
            return "OK" if amber < zodb or amber == zodb == 0 else "MISSED"
        figure = ratio if self.kind == "ratio_min" else amber
        if figure is None:
            return "n/a"
        passed = figure <= self.value if self.kind == "amber_max" else figure >= self.value
        return "OK" if passed else "MISSED"


def at_least(times: float, text: str | None = None) -> Target:
    """AmberDB at least ``times`` as good as ZODB (ratio >= times)."""
    return Target("ratio_min", times, text or f">= {times:g}x")


def at_most(value: float, text: str) -> Target:
    """AmberDB's own figure at most ``value``."""
    return Target("amber_max", value, text)


def amber_at_least(value: float, text: str) -> Target:
    """AmberDB's own figure at least ``value``."""
    return Target("amber_min", value, text)


def fewer(text: str) -> Target:
    """AmberDB's own figure below the other engine's (both zero also passes)."""
    return Target("fewer", 0.0, text)


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    key: str
    workload: str
    label: str
    unit: str
    higher_is_better: bool
    target: Target | None = None

    def ratio(self, amber: float | None, zodb: float | None) -> float | None:
        """> 1 means AmberDB is better."""
        if amber is None or zodb is None or amber <= 0 or zodb <= 0:
            return None
        return amber / zodb if self.higher_is_better else zodb / amber


def _concurrency() -> list[Metric]:
    rows = []
    for mode in ("disjoint", "counter"):
        for threads in (1, 2, 4):
            key = f"conc_{mode}_{threads}"
            rows.append(Metric(key, "concurrency", f"{mode}, {threads} thr", "commit/s", True))
            rows.append(
                Metric(f"{key}_conflicts", "concurrency", f"{mode}, {threads} thr", "confl/commit", False)
            )
    return rows


def _group_commit() -> list[Metric]:
    rows = []
    devices = {"disk": "disk", "slow": "1 ms sync"}
    for device, shown in devices.items():
        for threads in (1, 16, 32):
            key = f"group_{device}_{threads}"
            rows.append(Metric(f"{key}_rate", "group_commit", f"{shown}, {threads} thr", "commit/s", True))
            per_sync = amber_at_least(8.0, "amber >= 8") if device == "slow" and threads == 16 else None
            rows.append(
                Metric(
                    f"{key}_per_sync",
                    "group_commit",
                    f"{shown}, {threads} thr",
                    "commit/sync",
                    True,
                    per_sync,
                )
            )
        wanted = 5.0 if device == "slow" else 2.0
        rows.append(
            Metric(
                f"group_{device}_16_vs_1",
                "group_commit",
                f"{shown}, 16 thr / 1 thr",
                "x",
                True,
                amber_at_least(wanted, f"amber >= {wanted:g}x"),
            )
        )
        rows.append(
            Metric(
                f"group_{device}_32_p99_vs_p50",
                "group_commit",
                f"{shown}, 32 thr p99 / p50",
                "x",
                False,
                at_most(3.0, "amber <= 3x"),
            )
        )
    return rows


def _sql(workload: str, prefix: str) -> list[Metric]:
    """The rows of the postgresql and sqlite workloads ("zodb" is RelStorage 4 there)."""
    latency = at_least(2.0, ">= 2x (<= RS/2)") if workload == "postgresql" else None
    rows = [
        Metric(f"{prefix}_commit_p50_ms", workload, "commit p50", "ms", False, latency),
        Metric(f"{prefix}_commit_mean_ms", workload, "commit mean", "ms", False, latency),
    ]
    if workload == "sqlite":
        rows.append(Metric("sqlite_commit_p50_default_ms", workload, "commit p50, RS at NORMAL", "ms", False))
    rows += [
        Metric(f"{prefix}_add", workload, "add", "obj/s", True, at_least(2.0)),
        Metric(f"{prefix}_update", workload, "update", "obj/s", True, at_least(2.0)),
        Metric(f"{prefix}_cold_read", workload, "cold read, plain loads", "obj/s", True, at_least(2.0)),
        Metric(f"{prefix}_cold_read_prefetch", workload, "cold read, both prefetch", "obj/s", True),
        Metric(f"{prefix}_counter", workload, "2 procs, counter", "commit/s", True, at_least(2.0)),
        Metric(
            f"{prefix}_counter_conflicts",
            workload,
            "2 procs, counter",
            "confl/commit",
            False,
            fewer("< RS (0 = 0 ok)"),
        ),
        Metric(f"{prefix}_pack_s", workload, "pack time", "s", False),
    ]
    return rows


METRICS: tuple[Metric, ...] = (
    Metric("add", "add", "add", "obj/s", True, at_least(1.5)),
    Metric("update", "update", "update", "obj/s", True, at_least(1.5)),
    Metric("cold_read", "cold_read", "cold read", "obj/s", True, at_least(1.5)),
    Metric("warm_read", "warm_read", "warm read", "obj/s", True, at_least(1.0)),
    Metric("hot_read", "hot_read", "hot read", "obj/s", True, at_least(1.0)),
    Metric("attr_read", "attribute", "attr read", "ns", False, at_least(2.0)),
    Metric("attr_read_vs_plain", "attribute", "read / plain", "x", False, at_most(1.5, "amber <= 1.5x")),
    Metric("attr_write", "attribute", "attr write", "ns", False, at_least(1 / 3, ">= 0.33x")),
    Metric("attr_plain_read", "attribute", "plain read", "ns", False),
    Metric("attr_plain_write", "attribute", "plain write", "ns", False),
    Metric("btree_insert", "btree_memory", "insert", "key/s", True, at_least(1 / 3, ">= 0.33x")),
    Metric("btree_lookup", "btree_memory", "lookup", "key/s", True, at_least(1 / 3, ">= 0.33x")),
    Metric("btree_range", "btree_memory", "range scan", "item/s", True, at_least(1.0)),
    Metric("btree_build", "btree_persisted", "build", "entry/s", True, at_least(1.5)),
    Metric("btree_cold_scan", "btree_persisted", "cold range", "item/s", True),
    Metric("scale_build", "btree_scale", "build", "entry/s", True),
    *(Metric(f"scale_rss_q{q}", "btree_scale", f"peak RSS @{q * 25}%", "MB", False) for q in (1, 2, 3, 4)),
    Metric("scale_rss_growth", "btree_scale", "RSS growth", "x", False, at_most(1.2, "amber <= 1.2x")),
    Metric("scale_scan", "btree_scale", "full scan", "item/s", True),
    Metric("scale_scan_rss", "btree_scale", "scan peak RSS", "MB", False),
    Metric("commit_ms", "commit", "commit", "ms", False),
    Metric("commit_floor_ms", "commit", "write+sync", "ms", False),
    Metric("commit_vs_floor", "commit", "commit/floor", "x", False, at_most(1.2, "amber <= 1.2x")),
    Metric("big_wall_s", "big_transaction", "wall time", "s", False),
    Metric("big_peak_rss_mb", "big_transaction", "peak RSS", "MB", False, at_least(1.0, "<= zodb")),
    Metric("big_rss_growth", "big_transaction", "RSS growth", "x", False, at_most(1.2, "amber <= 1.2x")),
    Metric("big_rss_per_object", "big_transaction", "RSS slope", "B/obj", False),
    Metric("open_index_ms", "open", "with index", "ms", False),
    Metric("open_noindex_ms", "open", "no index", "ms", False, at_least(1.5)),
    *_concurrency(),
    *_group_commit(),
    Metric("pack_s", "pack", "pack time", "s", False, at_least(2.0)),
    Metric("pack_peak_rss_mb", "pack", "peak RSS", "MB", False),
    Metric("pack_rss_growth_mb", "pack", "RSS the pack adds", "MB", False, at_least(4.0)),
    Metric("pack_p99_ms", "pack", "p99 commit, packing", "ms", False),
    Metric("pack_p99_base_ms", "pack", "p99 commit, idle", "ms", False),
    Metric("pack_p99_vs_base", "pack", "p99 packing/idle", "x", False, at_most(5.0, "amber <= 5x")),
    Metric("pack_shrink", "pack", "file shrink", "x", True),
    # amberdb.evolve.each against a hand-written ZODB loop over an IOBTree, commit every 1,000.
    Metric("evolve_rate", "evolve", "migrate", "obj/s", True, at_least(1.5)),
    Metric("evolve_peak_rss_mb", "evolve", "peak RSS", "MB", False, at_least(1.0, "<= zodb")),
    Metric("evolve_rss_added_mb", "evolve", "RSS the migration adds", "MB", False),
    # The server workload: "zodb" is ZEO's runzeo here, both on a FileStorage.
    Metric("srv_commit_p50_ms", "server", "commit p50", "ms", False, at_least(2.0, ">= 2x (<= ZEO/2)")),
    Metric("srv_commit_mean_ms", "server", "commit mean", "ms", False, at_least(2.0, ">= 2x (<= ZEO/2)")),
    Metric("srv_add", "server", "add", "obj/s", True, at_least(2.0)),
    Metric("srv_update", "server", "update", "obj/s", True, at_least(2.0)),
    Metric("srv_cold_read", "server", "cold read, prefetch vs ZEO loads", "obj/s", True, at_least(5.0)),
    Metric("srv_cold_read_plain", "server", "cold read, plain loads", "obj/s", True),
    Metric("srv_cold_read_prefetch", "server", "cold read, both prefetch", "obj/s", True),
    Metric("srv_disjoint_1", "server", "1 client, disjoint", "commit/s", True),
    Metric("srv_disjoint_8", "server", "8 clients, disjoint", "commit/s", True, at_least(2.0)),
    Metric(
        "srv_disjoint_8_vs_1", "server", "8 clients / 1 client", "x", True, amber_at_least(3.0, "amber >= 3x")
    ),
    Metric("srv_counter", "server", "2 clients, counter", "commit/s", True),
    Metric("srv_counter_conflicts", "server", "2 clients, counter", "confl/commit", False),
    # The relational storages: "zodb" is RelStorage 4 on the same database.
    *_sql("postgresql", "pg"),
    *_sql("sqlite", "sqlite"),
)
