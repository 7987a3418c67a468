"""Attribute access on a loaded persistent object, next to a plain object (and ZODB's, if installed).

Run: ``python benchmarks/bench_attribute.py`` (install the ``bench`` extra to include ZODB's
``persistent`` C implementation in the same run).  Prints ns per operation, median of
several repeats, and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from typing import Any

import amberdb
import amberdb.transaction as transaction


class AmberItem(amberdb.Persistent):
    def __init__(self) -> None:
        self.a = 1
        self.b = 2
        self.c = 3


class PlainItem:
    def __init__(self) -> None:
        self.a = 1
        self.b = 2
        self.c = 3


def _loaded_amber_item() -> Any:
    conn = amberdb.connection(None)
    conn.root.item = AmberItem()
    transaction.commit()
    conn.cache_minimize()
    item = conn.root.item
    item._p_activate()
    return item


try:
    import persistent
    import ZODB

    import transaction as zodb_transaction
except ImportError:  # the bench extra is not installed: measure without the incumbent
    ZODB = None
else:

    class ZodbItem(persistent.Persistent):  # ZODB cannot store classes defined in functions
        def __init__(self) -> None:
            self.a = 1
            self.b = 2
            self.c = 3


def _loaded_zodb_item() -> Any:
    if ZODB is None:
        return None
    conn = ZODB.connection(None)
    conn.root.item = ZodbItem()
    zodb_transaction.commit()
    conn.cacheMinimize()
    item = conn.root.item
    item._p_activate()
    return item


def _ns_per_op(statement: str, obj: Any, number: int, repeat: int) -> float:
    times = timeit.repeat(statement, globals={"obj": obj}, number=number, repeat=repeat)
    return statistics.median(times) / number * 1e9


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    subjects = {"plain": PlainItem(), "amberdb": _loaded_amber_item()}
    zodb_item = _loaded_zodb_item()
    if zodb_item is not None:
        subjects["zodb"] = zodb_item
    results: dict[str, dict[str, float]] = {name: {} for name in subjects}
    # Alternate subjects within each round so machine noise hits them alike.
    for op, statement in (("read", "obj.a"), ("write", "obj.a = 5")):
        for name, obj in subjects.items():
            results[name][op] = _ns_per_op(statement, obj, args.number, args.repeat)
    print(f"{'subject':<10}{'read ns':>10}{'write ns':>10}")
    for name, row in results.items():
        print(f"{name:<10}{row['read']:>10.1f}{row['write']:>10.1f}")
    amber, plain = results["amberdb"], results["plain"]
    read_vs_plain = amber["read"] / plain["read"]
    verdict = "OK" if read_vs_plain <= 1.5 else "MISSED"
    print(f"amberdb/plain read: {read_vs_plain:.2f}x  (target <= 1.5x) {verdict}")
    if "zodb" in results:
        zodb = results["zodb"]
        speedup = zodb["read"] / amber["read"]
        write_ratio = amber["write"] / zodb["write"]
        print(f"read speed-up over zodb: {speedup:.2f}x  (target >= 2x) {'OK' if speedup >= 2 else 'MISSED'}")
        verdict = "OK" if write_ratio <= 3 else "MISSED"
        print(f"amberdb/zodb write: {write_ratio:.2f}x  (target <= 3x) {verdict}")
    transaction.abort()


if __name__ == "__main__":
    main()
