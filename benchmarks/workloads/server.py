"""Workload 14: the network server -- ``amberdb serve`` against ZEO's ``runzeo``.

Each engine's server runs in a process of its own on a FileStorage (fsync on every commit),
on 127.0.0.1; the worker process is the first client, and more client processes are
started for the multi-client parts.  In order, on one server:

* commit latency -- ``n`` transactions each changing one attribute of one Item, each timed
  from the change to the return of ``commit()`` (so including what the next transaction's
  start costs the engine, e.g. AmberDB's ``server_sync`` round trip); p50 and mean;
* add -- ``objects`` new Items appended to one PersistentList, ``batch`` per commit;
  update -- attribute ``a`` of each changed, ``batch`` per commit;
* cold read -- a new client (empty client cache, new connection) reads ``a`` of every Item
  of that list: with plain loads (one round trip per object), and after
  ``conn.prefetch(list(items))`` (AmberDB: LOAD_MANY batches; ZEO: its ``prefetch``, which sends
  every load without waiting).  The target compares AmberDB's prefetch with ZEO's plain
  loads, the way ZODB applications read;
* disjoint writers -- 1, then 8 client processes, each incrementing an Item of its own in
  ``client_commits`` transactions, all started together: commits/s over all of them;
* counter -- 2 client processes incrementing one shared Counter that resolves conflicts
  (ZEO resolves on the server, AmberDB on the client): ConflictErrors that reached the
  application per commit (each retried), and commits/s.

Every figure is checked (sums, counters) before it is reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

from benchmarks.engines import Engine
from benchmarks.measure import clock, commit_times

CLIENTS = 8
COUNTER_CLIENTS = 2
READY = "READY"


def _sum_a(items: Any) -> tuple[int, int]:
    count = total = 0
    for item in items:
        total += item.a
        count += 1
    return count, total


def _latency(engine: Engine, address: tuple[str, int], n: int) -> dict[str, float]:
    db = engine.open_client_db(address, cache_size=1000)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    conn.root()["latency"] = item = engine.Item(0)
    manager.commit()
    times = commit_times(manager, item, n)
    conn.close()
    db.close()
    return {
        "srv_commit_p50_ms": statistics.median(times) * 1e3,
        "srv_commit_mean_ms": statistics.fmean(times) * 1e3,
    }


def _add_update(engine: Engine, address: tuple[str, int], n: int, batch: int) -> dict[str, float]:
    db = engine.open_client_db(address, cache_size=n + 1000)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    root = conn.root()
    root["items"] = items = engine.PersistentList()
    manager.commit()
    item_class = engine.Item
    began = clock()
    for start in range(0, n, batch):
        items.extend([item_class(i) for i in range(start, min(n, start + batch))])
        manager.commit()
    add = clock() - began
    began = clock()
    for start in range(0, n, batch):
        for item in items[start : start + batch]:
            item.a += 1
        manager.commit()
    update = clock() - began
    conn.close()
    db.close()
    return {"srv_add": n / add, "srv_update": n / update}


def _cold_read(engine: Engine, address: tuple[str, int], n: int, prefetch: bool) -> float:
    """Objects/s of a new client reading every Item (timed from its first load of the list)."""
    db = engine.open_client_db(address, cache_size=n + 1000)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    root = conn.root()
    began = clock()
    items = root["items"]
    if prefetch:
        # The values, not the list: prefetch(items) asks only for the list itself (both engines).
        conn.prefetch(list(items))
    got = _sum_a(items)
    elapsed = clock() - began
    expected = (n, n * (n - 1) // 2 + n)
    if got != expected:
        raise AssertionError(f"cold read: read (objects, sum of a) = {got}, expected {expected}")
    manager.abort()
    conn.close()
    db.close()
    return n / elapsed


def run_clients(
    engine: Engine,
    directory: str,
    mode: str,
    count: int,
    commits: int,
    task: str = "server_client",
    params: dict[str, Any] | None = None,
) -> tuple[float, int]:
    """Start ``count`` client processes (worker ``task`` with ``params`` plus mode, index and
    commits), let them go at once: (commits/s, conflicts)."""
    env = dict(os.environ)
    root_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root_dir, env.get("PYTHONPATH")]))
    procs: list[subprocess.Popen[str]] = []
    with ExitStack() as stack:
        for index in range(count):
            spec = {
                "task": task,
                "engine": engine.name,
                "directory": directory,
                "params": {**(params or {}), "mode": mode, "index": index, "commits": commits},
            }
            errors = stack.enter_context(open(os.path.join(directory, f"client-{mode}-{index}.err"), "w"))
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env=env,
            )
            stack.callback(_reap, proc)
            procs.append(proc)
        for index, proc in enumerate(procs):
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != READY:
                raise RuntimeError(
                    f"client {index} ({mode}) did not get ready: {line!r}\n{_errors(directory, mode, index)}"
                )
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for index, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=600)
            lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"client {index} ({mode}) failed:\n{_errors(directory, mode, index)}")
            results.append(json.loads(lines[-1][len("RESULT ") :])["metrics"])
    began = min(r["began"] for r in results)
    ended = max(r["ended"] for r in results)
    return count * commits / (ended - began), int(sum(r["conflicts"] for r in results))


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _errors(directory: str, mode: str, index: int) -> str:
    with open(os.path.join(directory, f"client-{mode}-{index}.err")) as file:
        return file.read()


def client(
    engine: Engine, directory: str, address: list[Any], mode: str, index: int, commits: int
) -> dict[str, float]:
    """A client process: connect, say READY, wait for ``go`` on stdin, commit ``commits`` times."""
    db = engine.open_client_db((address[0], int(address[1])), cache_size=1000)
    return increment(engine, db, mode, index, commits)


def increment(engine: Engine, db: Any, mode: str, index: int, commits: int) -> dict[str, float]:
    """The body of a client process on ``db`` (closed at the end): say READY, wait for ``go``
    on stdin, then increment the Item ``w<index>`` (mode ``disjoint``) or the shared Counter
    (mode ``counter``) in ``commits`` transactions, retrying each ConflictError that reaches
    the application; its start, end and conflict count."""
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    key = f"w{index}" if mode == "disjoint" else "counter"
    _ = conn.root()[key].__dict__  # loaded before the start
    manager.abort()
    print(READY, flush=True)
    if sys.stdin.readline().strip() != "go":
        raise RuntimeError("no go")
    conflicts = 0
    began = time.monotonic()
    for _ in range(commits):
        while True:
            try:
                obj = conn.root()[key]
                if mode == "disjoint":
                    obj.a += 1
                else:
                    obj.count += 1
                manager.commit()
                break
            except engine.ConflictError:
                manager.abort()
                conflicts += 1
    ended = time.monotonic()
    conn.close()
    db.close()
    return {"began": began, "ended": ended, "conflicts": conflicts}


def server_workload(
    engine: Engine, directory: str, objects: int, batch: int, commits: int, client_commits: int
) -> dict[str, float]:
    """Everything the module docstring lists, on one server process of ``engine``."""
    path = os.path.join(directory, "server.fs")
    results: dict[str, float] = {}
    with engine.server(path, os.path.join(directory, "server.log")) as server:
        address = server.address
        results.update(_latency(engine, address, commits))
        results.update(_add_update(engine, address, objects, batch))
        plain = _cold_read(engine, address, objects, prefetch=False)
        prefetched = _cold_read(engine, address, objects, prefetch=True)
        results["srv_cold_read_plain"] = plain
        results["srv_cold_read_prefetch"] = prefetched
        # The target row: AmberDB with its prefetch against ZEO as ZODB applications read.
        results["srv_cold_read"] = prefetched if engine.name == "amberdb" else plain

        db = engine.open_client_db(address, cache_size=1000)
        manager = engine.transaction_manager()
        conn = db.open(transaction_manager=manager)
        root = conn.root()
        for index in range(CLIENTS):
            root[f"w{index}"] = engine.Item(0)
        root["counter"] = engine.Counter()
        manager.commit()
        conn.close()

        on_server = {"address": list(address)}
        one, _ = run_clients(engine, directory, "disjoint", 1, client_commits, params=on_server)
        many, _ = run_clients(engine, directory, "disjoint", CLIENTS, client_commits, params=on_server)
        counter, conflicts = run_clients(
            engine, directory, "counter", COUNTER_CLIENTS, client_commits, params=on_server
        )

        conn = db.open(transaction_manager=manager)
        root = conn.root()
        writes = [root[f"w{index}"].a for index in range(CLIENTS)]
        count = root["counter"].count
        manager.abort()
        conn.close()
        db.close()
        expected = [2 * client_commits] + [client_commits] * (CLIENTS - 1)
        if writes != expected or count != COUNTER_CLIENTS * client_commits:
            raise AssertionError(
                f"increments landed: items {writes}, counter {count};"
                f" expected {expected}, {COUNTER_CLIENTS * client_commits}"
            )
    results["srv_disjoint_1"] = one
    results[f"srv_disjoint_{CLIENTS}"] = many
    results[f"srv_disjoint_{CLIENTS}_vs_1"] = many / one
    results["srv_counter"] = counter
    results["srv_counter_conflicts"] = conflicts / (COUNTER_CLIENTS * client_commits)
    return results
