"""Runs one task of one workload for one engine, in a fresh process, and prints its results.

Usage (the runner does this): ``python -m benchmarks.worker '{"task": ..., "engine": ...,
"directory": ..., "params": {...}}'``.  The last line of output is ``RESULT <json>`` with
the metrics, the process's peak RSS (MB) and, for a task that cannot run, ``skipped``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

RESULT_PREFIX = "RESULT "


def run_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the task ``spec`` describes in this process and return the result record."""
    from benchmarks.engines import UnavailableError, load
    from benchmarks.measure import peak_rss_mb
    from benchmarks.workloads import PREPARE, TASKS

    task = TASKS[spec["task"]]
    prepare = PREPARE.get(spec["task"])
    if prepare is not None:
        prepare()
    engine = load(spec["engine"])
    try:
        metrics = task(engine, spec["directory"], **spec["params"])
    except UnavailableError as exc:
        return {"skipped": str(exc)}
    return {"metrics": metrics, "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    """Entry point: one JSON argument, one ``RESULT`` line out."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(__doc__)
    result = run_task(json.loads(args[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
