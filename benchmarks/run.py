"""The benchmark suite: AmberDB next to ZODB 6 on the same workloads, in one run.

Run it with ``./scripts/bench [options]`` (installs the ``bench`` extra, then runs
``python -m benchmarks``).  Every sample runs in a fresh worker process
(``python -m benchmarks.worker``), so memory figures and caches are isolated; within each
repeat the engines alternate (amberdb, zodb, amberdb, zodb, ...).  The table shows medians;
``--json PATH`` writes every sample for comparisons between commits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.engines import zodb_available
from benchmarks.sizes import DEFAULT, FULL, QUICK, Sizes
from benchmarks.spec import WORKLOADS
from benchmarks.worker import RESULT_PREFIX

ROOT = Path(__file__).resolve().parent.parent


class WorkerError(RuntimeError):
    """A worker process failed; carries its stderr."""


class Results:
    """Samples per metric key and engine, the peak RSS of the process behind each."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.rss: dict[str, dict[str, list[float]]] = {}
        self.skipped: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def add(self, engine: str, result: dict[str, Any]) -> None:
        for key, value in result["metrics"].items():
            self.samples.setdefault(key, {}).setdefault(engine, []).append(float(value))
            self.rss.setdefault(key, {}).setdefault(engine, []).append(float(result["peak_rss_mb"]))


class Runner:
    """Runs the workloads' tasks in worker processes and collects their results."""

    def __init__(self, sizes: Sizes, engines: Sequence[str], repeat: int, base_dir: str | None) -> None:
        self.sizes = sizes
        self.engines = list(engines)
        self.repeat = repeat
        self.base_dir = base_dir
        self.results = Results()

    def task(self, task: str, engine: str, directory: str, **params: Any) -> dict[str, Any]:
        """Run one task in a fresh process; its result record."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        spec = json.dumps({"task": task, "engine": engine, "directory": directory, "params": params})
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", spec],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if proc.returncode or not lines:
            raise WorkerError(
                f"worker for task {task!r} on {engine} failed (exit {proc.returncode}):\n"
                + proc.stderr.strip()
            )
        result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
        return result

    def tempdir(self) -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix="amberdb-bench-", dir=self.base_dir)

    def measure(self, workload: str, task: str, engine: str, directory: str, **params: Any) -> bool:
        """Run a measuring task and keep its figures; False if the workload was skipped."""
        result = self.task(task, engine, directory, **params)
        if "skipped" in result:
            self.results.skipped[workload] = result["skipped"]
            return False
        self.results.add(engine, result)
        return True

    def rounds(self, workload: str) -> list[tuple[int, str]]:
        """(repeat, engine) pairs in running order: the engines alternate within each repeat."""
        return [(r, engine) for r in range(self.repeat) for engine in self.engines]

    def progress(self, workload: str, r: int, engine: str, began: float) -> None:
        print(
            f"  {workload:<16} repeat {r + 1}/{self.repeat}  {engine:<8} {time.perf_counter() - began:6.1f}s",
            file=sys.stderr,
            flush=True,
        )

    # -- the workloads --------------------------------------------------------------------

    def objects(self, cold: bool) -> None:
        s = self.sizes
        for r, engine in self.rounds("objects"):
            began = time.perf_counter()
            with self.tempdir() as directory:
                self.measure("add", "objects", engine, directory, n=s.objects, batch=s.objects_batch)
                if cold:
                    self.measure("cold_read", "cold_read", engine, directory, n=s.objects)
            self.progress("add..hot read", r, engine, began)

    def simple(self, workload: str, task: str, **params: Any) -> None:
        for r, engine in self.rounds(workload):
            began = time.perf_counter()
            with self.tempdir() as directory:
                if not self.measure(workload, task, engine, directory, **params):
                    return
            self.progress(workload, r, engine, began)

    def btree_persisted(self) -> None:
        s = self.sizes
        for r, engine in self.rounds("btree_persisted"):
            began = time.perf_counter()
            with self.tempdir() as directory:
                params = {"n": s.btree_persisted}
                if not self.measure(
                    "btree_persisted",
                    "btree_build",
                    engine,
                    directory,
                    per_commit=s.btree_per_commit,
                    **params,
                ):
                    return
                self.measure("btree_persisted", "btree_cold_scan", engine, directory, **params)
            self.progress("btree_persisted", r, engine, began)

    def btree_scale(self) -> None:
        s = self.sizes
        for r, engine in self.rounds("btree_scale"):
            began = time.perf_counter()
            with self.tempdir() as directory:
                params = {"n": s.scale_entries, "per_commit": s.scale_per_commit}
                if not self.measure("btree_scale", "scale_build", engine, directory, **params):
                    return
                self.measure("btree_scale", "scale_scan", engine, directory, **params)
            self.progress("btree_scale", r, engine, began)

    def open(self) -> None:
        s = self.sizes
        directories = {engine: self.tempdir() for engine in self.engines}
        try:
            for engine, directory in directories.items():
                began = time.perf_counter()
                self.task("open_build", engine, directory.name, n=s.open_objects, batch=s.open_batch)
                print(f"  open: built {s.open_objects} objects for {engine} in "
                      f"{time.perf_counter() - began:.1f}s", file=sys.stderr)  # fmt: skip
            for r, engine in self.rounds("open"):
                began = time.perf_counter()
                for index in (True, False):
                    self.measure(
                        "open", "open", engine, directories[engine].name, n=s.open_objects, index=index
                    )
                self.progress("open", r, engine, began)
        finally:
            for directory in directories.values():
                directory.cleanup()

    def pack(self) -> None:
        s = self.sizes
        directories = {engine: self.tempdir() for engine in self.engines}
        try:
            for engine, directory in directories.items():
                began = time.perf_counter()
                self.task("pack_build", engine, directory.name, n=s.pack_objects, batch=s.pack_batch)
                print(f"  pack: built {s.pack_objects} objects for {engine} in "
                      f"{time.perf_counter() - began:.1f}s", file=sys.stderr)  # fmt: skip
            for r, engine in self.rounds("pack"):
                began = time.perf_counter()
                self.measure("pack", "pack", engine, directories[engine].name, n=s.pack_objects)
                self.progress("pack", r, engine, began)
        finally:
            for directory in directories.values():
                directory.cleanup()

    def evolve(self) -> None:
        """Build each engine's database once (not timed); per sample, migrate a fresh copy of
        it in one worker, then check every object in another (outside the measurement)."""
        s = self.sizes
        directories = {engine: self.tempdir() for engine in self.engines}
        try:
            for engine, directory in directories.items():
                began = time.perf_counter()
                sizes = {"n": s.evolve_objects, "build_batch": s.evolve_build_batch}
                self.task("evolve_build", engine, directory.name, **sizes)
                print(f"  evolve: built {s.evolve_objects} objects for {engine} in "
                      f"{time.perf_counter() - began:.1f}s", file=sys.stderr)  # fmt: skip
            for r, engine in self.rounds("evolve"):
                began = time.perf_counter()
                where = directories[engine].name
                self.measure("evolve", "evolve", engine, where, n=s.evolve_objects, batch=s.evolve_batch)
                self.measure("evolve", "evolve_check", engine, where, n=s.evolve_objects)
                self.progress("evolve", r, engine, began)
        finally:
            for directory in directories.values():
                directory.cleanup()

    def server(self) -> None:
        """Like :meth:`simple`, but an engine without its server package (ZEO) is left out
        and the other still measured."""
        s = self.sizes
        params = {
            "objects": s.server_objects,
            "batch": s.objects_batch,
            "commits": s.server_commits,
            "client_commits": s.server_client_commits,
        }
        engines = list(self.engines)
        for r in range(self.repeat):
            for engine in list(engines):
                began = time.perf_counter()
                with self.tempdir() as directory:
                    if not self.measure("server", "server", engine, directory, **params):
                        engines.remove(engine)
                        continue
                self.progress("server", r, engine, began)

    def sql(self, database: str) -> None:
        """The postgresql or sqlite workload (:mod:`benchmarks.workloads.sql`): per repeat and
        engine, fresh databases on one server (PostgreSQL: a throwaway cluster for the whole
        workload) or in a new folder (SQLite).  An engine whose packages are missing
        (RelStorage, psycopg2) is left out and the other still measured; without PostgreSQL's
        server binaries the postgresql workload is skipped."""
        try:
            server = SQLServer(database)
        except RuntimeError as unavailable:
            self.results.skipped[database] = str(unavailable).splitlines()[0]
            return
        with server:
            engines = list(self.engines)
            for r in range(self.repeat):
                for engine in list(engines):
                    began = time.perf_counter()
                    with self.tempdir() as directory:
                        if not self.sql_sample(server, engine, directory, f"{engine}_{r}"):
                            engines.remove(engine)
                            continue
                    self.progress(database, r, engine, began)

    def sql_sample(self, server: SQLServer, engine: str, directory: str, tag: str) -> bool:
        """One sample of every part of the SQL workload; False if the engine was skipped."""
        s = self.sizes
        database = server.database
        with server.location(f"bench_{tag}", directory) as location:
            common: dict[str, Any] = {"database": database, "location": location}
            sizes = {"n": s.sql_objects, "batch": s.objects_batch, "commits": s.sql_commits}
            if not self.measure(database, "sql_objects", engine, directory, **common, **sizes):
                return False
            for prefetch in (False, True):
                self.measure(
                    database, "sql_cold_read", engine, directory, **common, n=s.sql_objects, prefetch=prefetch
                )
            self.measure(database, "sql_counter", engine, directory, **common, commits=s.sql_client_commits)
        with server.location(f"bench_{tag}_pack", os.path.join(directory, "pack")) as location:
            common = {"database": database, "location": location}
            sizes = {"n": s.sql_pack_objects, "batch": s.objects_batch}
            self.task("sql_pack_build", engine, directory, **common, **sizes)
            self.measure(database, "sql_pack", engine, directory, **common, **sizes)
        return True

    def run(self, workloads: Sequence[str]) -> None:
        """Run the selected workloads, in the order of the issue."""
        s = self.sizes
        selected = set(workloads)
        plan: dict[str, Callable[[], None]] = {
            "attribute": lambda: self.simple("attribute", "attribute", loops=s.attribute_loops),
            "btree_memory": lambda: self.simple("btree_memory", "btree_memory", n=s.btree_keys),
            "btree_persisted": self.btree_persisted,
            "btree_scale": self.btree_scale,
            "commit": lambda: self.simple("commit", "commit", n=s.commits),
            "big_transaction": lambda: self.simple(
                "big_transaction",
                "big_transaction",
                n=s.big_objects,
                every=s.big_every,
                cache_size=s.big_cache,
            ),
            "open": self.open,
            "concurrency": lambda: self.simple("concurrency", "concurrency", commits=s.concurrency_commits),
            "group_commit": lambda: self.simple("group_commit", "group_commit", commits=s.group_commits),
            "pack": self.pack,
            "evolve": self.evolve,
            "server": self.server,
            "postgresql": lambda: self.sql("postgresql"),
            "sqlite": lambda: self.sql("sqlite"),
        }
        if selected & {"add", "update", "cold_read", "warm_read", "hot_read"}:
            began = time.perf_counter()
            self.objects(cold="cold_read" in selected)
            self.results.seconds["objects"] = time.perf_counter() - began
        for workload, action in plan.items():
            if workload in selected:
                began = time.perf_counter()
                action()
                self.results.seconds[workload] = time.perf_counter() - began


class SQLServer:
    """Where the databases of the postgresql or sqlite workload live.

    PostgreSQL: a throwaway cluster (:class:`amberdb.testing.pgcluster.PostgreSQLCluster`, in
    the system's temporary folder: as root it must be open to the ``postgres`` user), started
    here and removed by :meth:`close`; a :meth:`location` is a new database on it, dropped
    afterwards.  SQLite: a location is a new folder.  Raises RuntimeError (saying why) when
    PostgreSQL's server binaries are missing or the cluster does not start.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self.cluster: Any = None
        if database == "postgresql":
            from amberdb.testing.pgcluster import PostgreSQLCluster, find_bindir

            find_bindir()
            began = time.perf_counter()
            self.cluster = PostgreSQLCluster()
            print(
                f"  postgresql: PostgreSQL {self.cluster.version} cluster on port {self.cluster.port} "
                f"started in {time.perf_counter() - began:.1f}s",
                file=sys.stderr,
            )

    @contextlib.contextmanager
    def location(self, name: str, directory: str) -> Iterator[str]:
        """A DSN of a new database ``name`` (PostgreSQL) or the new folder ``directory``."""
        if self.cluster is None:
            os.makedirs(directory, exist_ok=True)
            yield directory
            return
        self.cluster.drop_database(name)
        dsn: str = self.cluster.create_database(name)
        try:
            yield dsn
        finally:
            self.cluster.drop_database(name)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> SQLServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./scripts/bench",
        description="Run the same workloads on AmberDB and ZODB 6 and print medians and ratios "
        "(ratio > 1 means AmberDB is better).",
    )
    parser.add_argument("--only", help=f"comma-separated workloads (default: all): {', '.join(WORKLOADS)}")
    parser.add_argument("--repeat", type=int, default=3, help="samples per engine and workload (default 3)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    size.add_argument("--full", action="store_true", help="the issue's sizes (slower than the defaults)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every count by this factor")
    parser.add_argument("--json", metavar="PATH", help="also write every sample and verdict to PATH as JSON")
    parser.add_argument("--dir", help="where the temporary databases go (default: the system temp dir)")
    parser.add_argument("--amberdb-only", action="store_true", help="do not run ZODB even if it is installed")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.scale <= 0:
        parser.error("--scale must be positive")
    workloads = WORKLOADS if not args.only else tuple(w.strip() for w in args.only.split(",") if w.strip())
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    args.workloads = workloads
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; 0 when every selected workload ran (missed targets are not errors)."""
    args = parse_args(argv)
    base = QUICK if args.quick else FULL if args.full else DEFAULT
    sizes = base.scaled(args.scale) if args.scale != 1.0 else base
    engines = ["amberdb"] + (["zodb"] if zodb_available() and not args.amberdb_only else [])
    header = report.header(sizes, engines, args, base_dir=args.dir or tempfile.gettempdir())
    print(header, flush=True)
    runner = Runner(sizes, engines, args.repeat, args.dir)
    began = time.perf_counter()
    runner.run(args.workloads)
    elapsed = time.perf_counter() - began
    rows = report.rows(runner.results, args.workloads, engines)
    print(report.table(rows, runner.results, elapsed), flush=True)
    if args.json:
        document = report.document(rows, runner.results, sizes, engines, args, elapsed)
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
