"""Attribute access on a loaded persistent object next to a plain one (workload 6).

A thin wrapper around the suite, kept so the old command still works:
``python benchmarks/bench_attribute.py [options]`` is ``./scripts/bench --only attribute [options]``
(same options: ``--repeat N``, ``--quick``, ``--json PATH``, ...; see ``./scripts/bench --help``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main(["--only", "attribute", *sys.argv[1:]]))
