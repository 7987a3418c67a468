"""Commits/s and conflicts with 1, 2 and 4 writer threads: disjoint objects, a shared counter (workload 12).

A thin wrapper around the suite, kept so the old command still works:
``python benchmarks/bench_concurrency.py [options]`` is ``./scripts/bench --only concurrency [options]``
(same options: ``--repeat N``, ``--quick``, ``--json PATH``, ...; see ``./scripts/bench --help``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main(["--only", "concurrency", *sys.argv[1:]]))
