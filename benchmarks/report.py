"""The printed table, its header and notes, and the JSON document."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.sizes import FULL, Sizes
from benchmarks.spec import METRICS, PEERS, Metric

if TYPE_CHECKING:
    from benchmarks.run import Results

ROOT = Path(__file__).resolve().parent.parent
CACHE_NOTE = (
    "cache sizes (objects, both engines): add..hot read n+1000; BTrees 10,000 (scale: 2,000); "
    "big transaction {big_cache:,}; commit, open, concurrency 1,000; evolve 10,000; postgresql, sqlite n+1000"
)


_SQL_STORAGES = {"postgresql": "PostgreSQLStorage", "sqlite": "SQLiteStorage"}

OBJECT_WORKLOADS = ("add", "update", "cold_read", "warm_read", "hot_read")


@dataclass
class Row:
    """One metric's medians, ratio and verdict."""

    metric: Metric
    amber: float | None
    zodb: float | None
    ratio: float | None
    verdict: str
    rss: dict[str, float | None]


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def rows(results: Results, workloads: tuple[str, ...] | list[str], engines: list[str]) -> list[Row]:
    """The table rows of the selected workloads that produced figures."""
    out = []
    for metric in METRICS:
        samples = results.samples.get(metric.key)
        if metric.workload not in workloads or not samples:
            continue
        amber, zodb = _median(samples.get("amberdb")), _median(samples.get("zodb"))
        ratio = metric.ratio(amber, zodb)
        verdict = "-"
        if metric.target is not None:
            verdict = metric.target.verdict(amber, ratio, zodb)
            if verdict == "n/a" and "zodb" not in engines:
                verdict = "no ZODB"
        rss = {engine: _median(results.rss[metric.key].get(engine)) for engine in ("amberdb", "zodb")}
        out.append(Row(metric, amber, zodb, ratio, verdict, rss))
    return out


def fmt(value: float | None, unit: str = "") -> str:
    """A figure in a few significant digits, with k/M for large rates."""
    if value is None:
        return "-"
    if unit in ("obj/s", "key/s", "item/s", "entry/s", "commit/s") and value >= 10_000:
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in (
        "amberdb",
        "ZODB",
        "persistent",
        "BTrees",
        "transaction",
        "ZEO",
        "RelStorage",
        "psycopg2-binary",
        "psycopg",
    ):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def environment(base_dir: str) -> dict[str, Any]:
    """Where and on what the run happened."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "versions": _versions(),
        "database_dir": base_dir,
        "executable": sys.executable,
    }


def _preset(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "full" if args.full else "default"


def header(sizes: Sizes, engines: list[str], args: argparse.Namespace, base_dir: str) -> str:
    """What is about to run, and how to read the table."""
    env = environment(base_dir)
    versions = env["versions"]
    commit = (env["commit"] or "unknown")[:12] + (" (+ uncommitted changes)" if env["dirty"] else "")
    lines = [
        f"AmberDB benchmark suite  {env['date']}  Python {env['python']}  {env['cpus']} CPUs",
        f"commit {commit}",
        f"engines: amberdb {versions['amberdb']}"
        + (
            f"; ZODB {versions['ZODB']} FileStorage with C persistent {versions['persistent']}, "
            f"BTrees {versions['BTrees']}, transaction {versions['transaction']}"
            + (
                f"; server workload: ZEO {versions['ZEO']} runzeo"
                if versions["ZEO"]
                else "; ZEO not installed"
            )
            if "zodb" in engines
            else "; ZODB not installed (./scripts/bench installs the bench extra): AmberDB only"
        ),
        f"{args.repeat} sample(s) per engine, engines alternating within each repeat; medians shown. "
        "ratio > 1 means AmberDB is better (faster, or smaller for ns/ms/s/MB/x).",
        "every sample runs in a fresh worker process; RSS = peak RSS (MB) of that process.",
        CACHE_NOTE.format(big_cache=sizes.big_cache) + f"; databases in {base_dir}",
    ]
    sql = [w for w in ("postgresql", "sqlite") if w in args.workloads]
    if sql:
        lines.append(
            f"{' and '.join(sql)}: AmberDB's {'/'.join(_SQL_STORAGES[w] for w in sql)} (psycopg "
            f"{versions['psycopg']}) vs RelStorage {versions['RelStorage']} in the zodb column "
            f"(psycopg2 {versions['psycopg2-binary']}), both history-preserving with default options, "
            "each sample on fresh databases; PostgreSQL: one throwaway cluster (fsync, synchronous_commit "
            "on); SQLite: both synchronous=FULL (RelStorage's default NORMAL only in 'commit p50, RS at "
            f"NORMAL'); sqlite3 {sqlite3.sqlite_version}"
        )
    preset = _preset(args)
    differences = sizes.differences(FULL)
    if preset == "quick":
        lines.append("sizes: --quick (tiny, for smoke tests; figures mean little)")
    elif differences:
        cut = ", ".join(f"{name} {mine:,} (issue: {issue:,})" for name, (mine, issue) in differences.items())
        lines.append(
            f"sizes: smaller than the issue's, to finish in minutes: {cut}. --full runs the issue's sizes."
        )
    else:
        lines.append("sizes: the issue's")
    return "\n".join(lines)


def table(table_rows: list[Row], results: Results, elapsed: float) -> str:
    """The results table, then skipped workloads, missed targets and the run time."""
    head = (
        "workload",
        "metric",
        "unit",
        "amberdb",
        "zodb",
        "ratio",
        "target",
        "verdict",
        "RSS amb",
        "RSS zodb",
    )
    body = [
        (
            row.metric.workload,
            row.metric.label,
            row.metric.unit,
            fmt(row.amber, row.metric.unit),
            fmt(row.zodb, row.metric.unit),
            "-" if row.ratio is None else f"{row.ratio:.2f}",
            row.metric.target.text if row.metric.target else "",
            row.verdict,
            fmt(row.rss["amberdb"]),
            fmt(row.rss["zodb"]),
        )
        for row in table_rows
    ]
    widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head))]
    left = {0, 1, 2, 6, 7}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    out = ["", line(head), "  ".join("-" * w for w in widths)]
    previous = None
    for cells in body:
        family = "objects" if cells[0] in OBJECT_WORKLOADS else cells[0]
        if previous is not None and family != previous:
            out.append("")
        previous = family
        out.append(line(cells))
    for workload, reason in results.skipped.items():
        out.append(f"{workload}: skipped: {reason}")
    missed = [row for row in table_rows if row.verdict == "MISSED"]
    out.append("")
    if missed:
        out.append(f"MISSED targets ({len(missed)}):")
        for row in missed:
            m = row.metric
            assert m.target is not None
            amber, zodb = fmt(row.amber, m.unit), fmt(row.zodb, m.unit)
            ratio = "" if row.ratio is None else f", ratio {row.ratio:.2f}"
            peer = PEERS.get(m.workload, "ZODB")
            out.append(
                f"  MISSED {m.workload} {m.label}: AmberDB {amber} {m.unit} vs {peer} {zodb} {m.unit}{ratio}"
                f" (target {m.target.text})"
            )
    elif any(row.verdict == "OK" for row in table_rows):
        out.append("every target with figures was met")
    else:
        out.append("no target could be judged in this run")
    out.append(
        f"total time {elapsed:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in results.seconds.items())})"
    )
    return "\n".join(out)


def document(
    table_rows: list[Row],
    results: Results,
    sizes: Sizes,
    engines: list[str],
    args: argparse.Namespace,
    elapsed: float,
) -> dict[str, Any]:
    """Everything measured, machine-readable, for comparing runs between commits."""
    shown = {row.metric.key for row in table_rows}
    metric_results = []
    for row in table_rows:
        m = row.metric
        per_engine = {}
        for engine in engines:
            samples = results.samples[m.key].get(engine, [])
            rss = results.rss[m.key].get(engine, [])
            per_engine[engine] = {
                "median": _median(samples),
                "samples": samples,
                "unit": m.unit,
                "peak_rss_mb": _median(rss),
                "peak_rss_mb_samples": rss,
            }
        metric_results.append(
            {
                "workload": m.workload,
                "metric": m.key,
                "label": m.label,
                "unit": m.unit,
                "higher_is_better": m.higher_is_better,
                "engines": per_engine,
                "ratio": row.ratio,
                "target": None
                if m.target is None
                else {"kind": m.target.kind, "value": m.target.value, "text": m.target.text},
                "verdict": row.verdict,
            }
        )
    extras = {key: value for key, value in results.samples.items() if key not in shown}
    return {
        "format": "amberdb-bench/1",
        "ratio_meaning": "> 1 means AmberDB is better (amberdb/zodb for rates, zodb/amberdb for costs)",
        "environment": environment(args.dir or ""),
        "preset": _preset(args),
        "scale": args.scale,
        "repeat": args.repeat,
        "sizes": sizes.as_dict(),
        "engines": engines,
        "workloads": list(args.workloads),
        "results": metric_results,
        "skipped": results.skipped,
        "extras": extras,
        "elapsed_s": elapsed,
    }
