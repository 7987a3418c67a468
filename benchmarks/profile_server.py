"""Where the time of one commit and one cold load through ``amberdb serve`` goes.

Not part of the suite: a tool for working on the server.  ``python -m benchmarks.profile_server
[--commits N] [--loads N] [--profile DIR]`` starts ``amberdb serve`` on a FileStorage in a
temporary directory (under cProfile when ``--profile`` is given: the server's loop thread,
and this client process, each write a ``.prof`` file there and the top functions are printed)
and, in this process as the client, measures:

* round trips of PING (the floor of any request), write+fdatasync on the same disk;
* one-object commits, split into the storage calls the connection makes (the PING of
  ``server_sync``, VOTE, FINISH, ...), with the voluntary/involuntary context switches and
  CPU time per commit of this process and of each server thread (``/proc``);
* cold loads of single objects from a new client (one LOAD round trip each), the same way.
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks.engines.amber import ENGINE, Item
from benchmarks.servers import amberdb_server

_sync = getattr(os, "fdatasync", os.fsync)
TICK = os.sysconf("SC_CLK_TCK")


def _switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of ``pid`` so far."""
    voluntary = involuntary = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        involuntary += int(line.split()[1])
        except FileNotFoundError:
            pass
    return voluntary, involuntary


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


class Counters:
    """Context switches and per-thread CPU of the client (this process) and the server."""

    def __init__(self, server_pid: int) -> None:
        self.pids = {"client": os.getpid(), "server": server_pid}

    def snapshot(self) -> dict[str, Any]:
        return {name: (_switches(pid), _thread_cpu(pid)) for name, pid in self.pids.items()}

    def report(self, before: dict[str, Any], after: dict[str, Any], per: int, what: str) -> None:
        for name, pid in self.pids.items():
            (v0, i0), cpu0 = before[name]
            (v1, i1), cpu1 = after[name]
            threads = []
            for tid, seconds in sorted(cpu1.items()):
                spent = (seconds - cpu0.get(tid, 0.0)) / per * 1e6
                if spent > 0:
                    threads.append(f"{'main' if tid == pid else tid}: {spent:.0f} us")
            print(
                f"  {name:<6} per {what}: {(v1 - v0) / per:.2f} voluntary + {(i1 - i0) / per:.2f} involuntary"
                f" context switches; CPU by thread {', '.join(threads) or '-'}"
            )


def _timed(store: dict[str, list[float]], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            store[name].append(time.perf_counter() - t0)

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=500)
    parser.add_argument("--loads", type=int, default=2000)
    parser.add_argument("--profile", metavar="DIR", help="run both sides under cProfile, .prof files here")
    args = parser.parse_args()
    import cProfile

    import amberdb
    from amberdb.server import ClientStorage

    with tempfile.TemporaryDirectory(prefix="amberdb-prof-") as directory:
        options = ["-m", "cProfile", "-o", os.path.join(args.profile, "server.prof")] if args.profile else []
        path = os.path.join(directory, "p.fs")
        with amberdb_server(path, os.path.join(directory, "server.log"), options) as server:
            counters = Counters(server.pid)
            profiler = cProfile.Profile() if args.profile else None
            storage = ClientStorage(server.address)
            calls: dict[str, list[float]] = collections.defaultdict(list)
            for name in ("poll_invalidations", "begin", "store", "vote", "finish", "load", "new_oid"):
                setattr(storage, name, _timed(calls, name, getattr(storage, name)))
            db = amberdb.DB(storage, cache_size=20_000)
            manager = ENGINE.transaction_manager()
            conn = db.open(transaction_manager=manager)
            root = conn.root()
            root["item"] = item = Item(0)
            root["items"] = items = amberdb.PersistentList(Item(i) for i in range(args.loads))
            manager.commit()
            for i in range(20):
                item.a = -i
                manager.commit()

            pings = []
            for _ in range(args.commits):
                t0 = time.perf_counter()
                storage.ping()
                pings.append(time.perf_counter() - t0)
            fd = os.open(os.path.join(directory, "floor.bin"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            floor = []
            for _ in range(100):
                t0 = time.perf_counter()
                os.write(fd, b"y" * 200)
                _sync(fd)
                floor.append(time.perf_counter() - t0)
            os.close(fd)

            calls.clear()
            commits = []
            before = counters.snapshot()
            if profiler is not None:
                profiler.enable()
            for i in range(args.commits):
                t0 = time.perf_counter()
                item.a = i
                manager.commit()
                commits.append(time.perf_counter() - t0)
            if profiler is not None:
                profiler.disable()
            after = counters.snapshot()
            n = args.commits
            print(f"PING round trip p50 {statistics.median(pings) * 1e6:.0f} us")
            print(f"write+fdatasync p50 {statistics.median(floor) * 1e6:.0f} us")
            p50, mean = statistics.median(commits) * 1e6, statistics.fmean(commits) * 1e6
            print(
                f"commit p50 {p50:.0f} us, mean {mean:.0f} us; storage calls per commit (count, p50, total):"
            )
            for name, times in calls.items():
                print(
                    f"  {name:<20} {len(times) / n:.2f} x {statistics.median(times) * 1e6:7.0f} us"
                    f" = {sum(times) / n * 1e6:7.0f} us"
                )
            counters.report(before, after, n, "commit")
            manager.abort()
            conn.close()
            db.close()

            # Cold loads: a new client, one LOAD round trip per object.
            storage = ClientStorage(server.address)
            calls = collections.defaultdict(list)
            storage.load = _timed(calls, "load", storage.load)  # type: ignore[method-assign]
            db = amberdb.DB(storage, cache_size=20_000)
            conn = db.open(transaction_manager=manager)
            items = conn.root()["items"]
            list(items)
            before = counters.snapshot()
            if profiler is not None:
                profiler.enable()
            t0 = time.perf_counter()
            total = sum(obj.a for obj in items)
            elapsed = time.perf_counter() - t0
            if profiler is not None:
                profiler.disable()
            after = counters.snapshot()
            assert total == sum(range(args.loads))
            loads = calls["load"]
            print(
                f"cold load: {elapsed / args.loads * 1e6:.0f} us per object ({args.loads / elapsed:.0f}/s),"
                f" storage.load p50 {statistics.median(loads) * 1e6:.0f} us"
            )
            counters.report(before, after, args.loads, "load")
            manager.abort()
            conn.close()
            db.close()
        if args.profile and profiler is not None:
            client_path = os.path.join(args.profile, "client.prof")
            profiler.dump_stats(client_path)
            for name in ("client.prof", "server.prof"):
                print(f"\n== {name}: top by own time")
                pstats.Stats(os.path.join(args.profile, name)).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
