"""Workload 6: read and write an attribute on a loaded persistent object and on a plain one.

The persistent object is committed to an in-memory database, turned into a ghost and
loaded again (the state users meet after a load).  Each statement is unrolled ten times
per loop turn so that the loop's own cost weighs less; figures are ns per attribute
access, median of ``rounds`` timeit rounds, loop overhead included.
"""

from __future__ import annotations

import statistics
import timeit
from typing import Any

from benchmarks.engines import Engine

UNROLL = 10


class Plain:
    """The plain-object reference, same attributes as ``Item``."""

    def __init__(self, n: int) -> None:
        self.a = n
        self.b = f"item {n}"
        self.c = n * 0.5
        self.d = n % 7
        self.e = "x"


def _loaded(engine: Engine) -> tuple[Any, Any, Any]:
    db = engine.open_db(None, cache_size=1000)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    conn.root()["item"] = engine.Item(1)
    manager.commit()
    engine.minimize_cache(conn)
    item = conn.root()["item"]
    item._p_activate()
    if item._p_changed is not False:
        raise AssertionError(f"the item should be loaded and unchanged, _p_changed={item._p_changed!r}")
    return db, manager, item


def _ns(statement: str, obj: Any, loops: int, rounds: int) -> float:
    times = timeit.repeat("; ".join([statement] * UNROLL), globals={"obj": obj}, number=loops, repeat=rounds)
    return statistics.median(times) / (loops * UNROLL) * 1e9


def attribute_access(engine: Engine, directory: str, loops: int, rounds: int = 5) -> dict[str, float]:
    """ns per read and per write of ``obj.a``, persistent and plain, alternating subjects."""
    db, manager, item = _loaded(engine)
    plain = Plain(1)
    read = _ns("obj.a", item, loops, rounds)
    plain_read = _ns("obj.a", plain, loops, rounds)
    write = _ns("obj.a = 5", item, loops, rounds)
    plain_write = _ns("obj.a = 5", plain, loops, rounds)
    if item.a != 5 or plain.a != 5:
        raise AssertionError("the writes did not land")
    manager.abort()
    db.close()
    return {
        "attr_read": read,
        "attr_write": write,
        "attr_read_vs_plain": read / plain_read,
        "attr_plain_read": plain_read,
        "attr_plain_write": plain_write,
    }
