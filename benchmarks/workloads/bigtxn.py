"""Workload 10: one transaction adding ``n`` Items, with a subtransaction every ``every``.

AmberDB uses ``commit(True)``, ZODB ``savepoint(True)`` (its replacement for it); each spills
the changes to a temporary file and lets the cache shed them.  The program keeps no
reference to the Items it made: they hang off ``root["chunks"]`` in PersistentLists of
``every``.  Cache size for both engines: ``cache_size`` objects.  Reported: wall time
(including the final commit), peak RSS, and how much the peak grew from the end of the
first quarter of the objects to the end of the commit (1.0 = flat), also as bytes per
object added after the first quarter.
"""

from __future__ import annotations

import os

from benchmarks.engines import Engine
from benchmarks.measure import clock, peak_rss_mb


def big_transaction(engine: Engine, directory: str, n: int, every: int, cache_size: int) -> dict[str, float]:
    """Add ``n`` Items in one transaction; wall time and memory figures."""
    db = engine.open_db(os.path.join(directory, "big.fs"), cache_size=cache_size)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    conn.root()["chunks"] = chunks = engine.PersistentList()
    manager.commit()
    item_class, list_class = engine.Item, engine.PersistentList
    quarter = max(every, n // 4)
    quarter_peak = 0.0
    began = clock()
    for start in range(0, n, every):
        chunks.append(list_class([item_class(i) for i in range(start, min(n, start + every))]))
        engine.subtransaction(manager)
        if not quarter_peak and start + every >= quarter:
            quarter_peak = peak_rss_mb()
    manager.commit()
    elapsed = clock() - began
    final_peak = peak_rss_mb()
    conn.close()
    count = engine.object_count(db)
    db.close()
    if count < n:
        raise AssertionError(f"the database holds {count} objects after adding {n}")
    return {
        "big_wall_s": elapsed,
        "big_rate": n / elapsed,
        "big_peak_rss_mb": final_peak,
        "big_rss_growth": final_peak / quarter_peak,
        "big_rss_per_object": (final_peak - quarter_peak) * (1 << 20) / max(1, n - quarter),
    }
