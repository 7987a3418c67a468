"""``evolve.each`` over 200,000 objects in a FileStorage, its first run killed abruptly in the
middle (``os._exit`` inside the function, a real process dying): the rerun in another process
continues after the last committed batch, every object is migrated exactly once, and the
rerun's memory stays far below what holding the objects would take."""

from __future__ import annotations

from pathlib import Path

import amberdb
from amberdb.record import decode_header
from amberdb.storage.history import iter_current_records
from tests.evolve.helpers import child_code, run_child, state_reader, write_module
from tests.server.procs import Processes

OBJECTS = 200_000
BATCH = 1000
CRASH_AT = 100_000  # the function's call that kills the process (inside batch 100)
RERUN_GROWTH_LIMIT_MB = 40
# Calibration (this machine, 2 cores): holding the 200,000 loaded objects takes about 127 MB
# of resident memory, the ~101,000 of the rerun about 64 MB; each's batches, about none.

COUNTERS = """
    from amberdb import Persistent


    class Item(Persistent):
        def __init__(self, n):
            self.n = n
            self.count = 0
"""

CREATE_AND_CRASH = """
    from amberdb.btrees import IOBTree
    from amberdb import evolve
    from counters import Item
    objects, batch, crash_at = map(int, sys.argv[2:5])
    db = amberdb.DB(sys.argv[1])
    conn = db.open()
    tree = conn.root()["items"] = IOBTree()
    transaction.commit()
    for start in range(0, objects, 25_000):
        for n in range(start, min(objects, start + 25_000)):
            tree[n] = Item(n)
        transaction.commit()
        conn.cache_minimize()
    print("CREATED", flush=True)
    calls = 0


    def bump(item):
        global calls
        calls += 1
        if calls == crash_at:
            os._exit(1)  # dies with the batch half done: no cleanup, no commit, no abort
        item.count += 1


    evolve.each(db, "counters.Item", bump, batch_size=batch, name="bump counters")
    out("not killed")
"""

RERUN = """
    import resource

    import counters  # noqa: F401 - the application's class
    from amberdb import evolve


    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


    calls = 0


    def bump(item):
        global calls
        calls += 1
        item.count += 1


    peak = 0


    def progress(done, total):
        global peak
        peak = max(peak, resident())


    db = amberdb.DB(sys.argv[1])
    base, base_max = resident(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = evolve.each(db, "counters.Item", bump, batch_size=int(sys.argv[2]), progress=progress,
                         name="bump counters")
    growth = (max(peak, resident()) - base) / 2**20
    max_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_max) / 1024
    again = evolve.each(db, "counters.Item", bump, batch_size=int(sys.argv[2]), name="bump counters")
    out({"count": int(result), "calls": calls, "batches": result.batches, "growth_mb": growth,
         "max_growth_mb": max_growth, "again": [int(again), again.already_done]})
    db.close()
"""


def test_each_interrupted_by_a_crash_continues_and_migrates_each_object_once(
    tmp_path: Path, procs: Processes
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    write_module(modules, "counters", COUNTERS)
    path = tmp_path / "data.fs"

    crashed = procs.run(
        child_code(CREATE_AND_CRASH),
        str(path),
        str(OBJECTS),
        str(BATCH),
        str(CRASH_AT),
        timeout=120,
        extra_path=[modules],
    )
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert "CREATED" in crashed.stdout and "not killed" not in crashed.stdout

    # batches 1..99 committed before the crash; the rerun does the rest, in about one go
    committed = (CRASH_AT - 1) // BATCH * BATCH
    rerun = run_child(procs, modules, RERUN, path, BATCH, timeout=120)
    assert rerun["count"] == rerun["calls"] == OBJECTS - committed
    assert rerun["batches"] >= (OBJECTS - committed) // BATCH
    assert rerun["again"] == [0, True]  # a finished run is not repeated
    assert rerun["growth_mb"] < RERUN_GROWTH_LIMIT_MB, rerun
    assert rerun["max_growth_mb"] < RERUN_GROWTH_LIMIT_MB, rerun

    counts: dict[int, int] = {}
    with amberdb.DB(amberdb.FileStorage(str(path), read_only=True), read_only=True) as db:
        reader = state_reader(db)  # Items refer to nothing
        for oid, _tid, record in iter_current_records(db.storage):
            header = decode_header(record)
            if header.class_name == "counters:Item":
                state = reader.state(oid, record, header)
                counts[state["n"]] = state["count"]
    assert len(counts) == OBJECTS
    wrong = {n: count for n, count in counts.items() if count != 1}
    assert wrong == {}, f"{len(wrong)} objects not migrated exactly once, e.g. {list(wrong.items())[:10]}"
