"""BTrees 6.5's and transaction 5.1's own test suites, run against AmberDB.

Each suite runs in a subprocess (``tests/peer/runner.py``): its import shim makes ``import
BTrees`` and ``import transaction`` mean AmberDB, which must not happen in this interpreter,
where other tests use the real packages as oracles.  The runner fails when a test that
``exclusions.txt`` does not name fails, when a test it names passes, or when a line names no
test; the message lists which.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peer.runner import PROBLEMS
from tests.peer.sdists import ROOT


@pytest.mark.timeout(1200)  # the BTrees suite takes ~25 s here; pyproject's 300 s is per test
@pytest.mark.parametrize("suite", ["BTrees", "transaction"])
def test_peer_suite(
    suite: str, peer_trees: dict[str, Path], peer_summaries: list[str], tmp_path: Path
) -> None:
    """Every test of the suite passes, except exactly those excluded, each with its reason."""
    result = tmp_path / "verdict.json"
    process = subprocess.run(
        [sys.executable, "-m", "tests.peer.runner", suite, "--json", str(result)],
        cwd=ROOT,  # so that ``tests.peer.runner`` imports; the runner then works in a scratch folder
        capture_output=True,
        text=True,
        check=False,
    )
    peer_summaries.append(process.stdout.strip() or f"{suite}: no summary (exit {process.returncode})")
    assert process.returncode == 0, process.stdout + process.stderr
    verdict = json.loads(result.read_text())["verdict"]
    assert not any(verdict[key] for key in PROBLEMS)
    assert verdict["passed"] > 0
