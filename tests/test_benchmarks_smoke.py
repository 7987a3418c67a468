"""Smoke run of the benchmark suite: every workload at tiny sizes, results sane.

These are not timed assertions: only that each workload runs, reads the right number of
objects, reports positive figures, and that the JSON output parses.  ZODB is measured too
when it is installed (the ``bench`` extra); without it the suite runs AmberDB alone.  The
server workload compares with ZEO, the postgresql and sqlite ones with RelStorage: without
those packages (the test extra has neither) they run AmberDB alone and say so.  Without
PostgreSQL's server binaries the postgresql workload is skipped, unless
AMBERDB_REQUIRE_POSTGRESQL=1 (CI), which makes it required.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from benchmarks import run
from benchmarks.engines import relstorage_missing, zodb_available
from benchmarks.servers import amberdb_server
from benchmarks.sizes import QUICK
from benchmarks.spec import METRICS, WORKLOADS, amber_at_least, at_least, at_most, fewer

from amberdb.testing.pgcluster import find_bindir

PEER_WORKLOADS = ("server", "postgresql", "sqlite")
"""Workloads whose other engine needs more than ZODB: ZEO, RelStorage."""


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run of the whole suite, its JSON output."""
    directory = tmp_path_factory.mktemp("bench")
    path = directory / "results.json"
    assert run.main(["--quick", "--repeat", "1", "--json", str(path), "--dir", str(directory)]) == 0
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _engines(workload: str = "") -> list[str]:
    if workload == "server" and importlib.util.find_spec("ZEO") is None:
        return ["amberdb"]  # the server workload compares with ZEO, which the test extra lacks
    if workload in ("postgresql", "sqlite") and relstorage_missing(workload):
        return ["amberdb"]  # these compare with RelStorage, which the test extra lacks too
    return ["amberdb", "zodb"] if zodb_available() else ["amberdb"]


def _postgresql() -> bool:
    """Whether the postgresql workload can run here (it must where CI requires PostgreSQL)."""
    if os.environ.get("AMBERDB_REQUIRE_POSTGRESQL") == "1":
        return True
    try:
        find_bindir()
    except RuntimeError:
        return False
    return True


def _ran() -> set[str]:
    return set(WORKLOADS) - (set() if _postgresql() else {"postgresql"})


def test_every_workload_ran(document: dict[str, Any]) -> None:
    assert document["engines"] == _engines()
    ran = {row["workload"] for row in document["results"]}
    # A workload whose other engine is missing says so, and still measures AmberDB.
    skipped = {w for w in PEER_WORKLOADS if len(_engines()) == 2 and _engines(w) == ["amberdb"]}
    if not _postgresql():
        skipped.add("postgresql")
    assert set(document["skipped"]) == skipped
    assert ran == _ran()


def test_figures_are_positive_and_complete(document: dict[str, Any]) -> None:
    by_key = {row["metric"]: row for row in document["results"]}
    for metric in METRICS:
        if metric.workload not in _ran():
            continue
        row = by_key[metric.key]
        for engine in _engines(metric.workload):
            figures = row["engines"][engine]
            assert len(figures["samples"]) == 1
            assert figures["peak_rss_mb"] > 0
            if metric.unit in ("confl/commit", "B/obj"):  # may well be zero
                assert figures["median"] >= 0
            else:
                assert figures["median"] > 0, (metric.key, engine)
        if metric.target is not None:
            allowed = (
                {"OK", "MISSED"}
                if len(_engines(metric.workload)) == 2
                else {"OK", "MISSED", "n/a", "no ZODB"}
            )
            assert row["verdict"] in allowed


def test_every_object_was_read(document: dict[str, Any]) -> None:
    # The workloads check counts and sums themselves and fail the run otherwise; the figure
    # they report must match the size asked for.
    objects_read = document["extras"]["objects_read"]
    for engine in _engines():
        assert objects_read[engine] == [QUICK.objects, QUICK.objects]  # warm/hot, then cold


def test_evolve_migrated_every_object(document: dict[str, Any]) -> None:
    # The check task reads every Book back (each migrated exactly once, or the run fails)
    # and reports how many it read; the build and each sample used the quick size.
    checked = document["extras"]["evolve_checked"]
    for engine in _engines():
        assert checked[engine] == [QUICK.evolve_objects]
    assert document["sizes"]["evolve_objects"] == QUICK.evolve_objects
    assert QUICK.evolve_objects > QUICK.evolve_batch  # several batches, so resuming is exercised


def test_evolve_alone(tmp_path: Path) -> None:
    """``--only evolve`` runs the workload by itself, at a size of our choosing (--scale)."""
    path = tmp_path / "evolve.json"
    argv = ["--quick", "--repeat", "1", "--only", "evolve", "--scale", "0.5", "--json", str(path)]
    assert run.main([*argv, "--dir", str(tmp_path)]) == 0
    document = json.loads(path.read_text())
    assert document["workloads"] == ["evolve"]
    assert {row["workload"] for row in document["results"]} == {"evolve"}
    by_key = {row["metric"]: row for row in document["results"]}
    for engine in _engines():
        assert by_key["evolve_rate"]["engines"][engine]["median"] > 0
        assert by_key["evolve_peak_rss_mb"]["engines"][engine]["median"] > 0
        assert document["extras"]["evolve_checked"][engine] == [QUICK.evolve_objects // 2]
    if len(_engines()) == 2:
        assert by_key["evolve_rate"]["verdict"] in ("OK", "MISSED")


def test_environment_is_recorded(document: dict[str, Any]) -> None:
    env = document["environment"]
    assert env["python"] and env["date"] and env["cpus"]
    assert document["sizes"]["objects"] == QUICK.objects
    assert document["preset"] == "quick"


def test_targets_judge_the_right_figure() -> None:
    assert at_least(1.5).verdict(amber=1.0, ratio=1.6) == "OK"
    assert at_least(1.5).verdict(amber=1.0, ratio=1.4) == "MISSED"
    assert at_most(1.2, "x").verdict(amber=1.3, ratio=5.0) == "MISSED"
    assert at_most(1.2, "x").verdict(amber=1.1, ratio=None) == "OK"
    assert at_least(1.0).verdict(amber=1.0, ratio=None) == "n/a"
    assert amber_at_least(3.0, "x").verdict(amber=3.1, ratio=0.5) == "OK"
    assert amber_at_least(3.0, "x").verdict(amber=2.9, ratio=5.0) == "MISSED"
    # Fewer conflicts than the other engine: a ratio means nothing when either is zero.
    assert fewer("x").verdict(amber=0.0, ratio=None, zodb=0.1) == "OK"
    assert fewer("x").verdict(amber=0.0, ratio=None, zodb=0.0) == "OK"
    assert fewer("x").verdict(amber=0.1, ratio=None, zodb=0.0) == "MISSED"
    assert fewer("x").verdict(amber=0.2, ratio=0.5, zodb=0.1) == "MISSED"
    assert fewer("x").verdict(amber=0.1, ratio=None) == "n/a"


def test_unknown_workload_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run.main(["--only", "nonsense"])
    assert "unknown workload" in capsys.readouterr().err


def test_wrappers_exist() -> None:
    root = Path(run.__file__).resolve().parent
    for name in ("attribute", "commit", "concurrency"):
        assert f'"--only", "{name}"' in (root / f"bench_{name}.py").read_text()


def test_amberdb_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without ZODB (as in CI) the suite still runs, and says which targets it cannot judge."""
    path = tmp_path / "alone.json"
    argv = ["--quick", "--repeat", "1", "--only", "add,commit", "--amberdb-only", "--json", str(path)]
    assert run.main([*argv, "--dir", str(tmp_path)]) == 0
    document = json.loads(path.read_text())
    assert document["engines"] == ["amberdb"]
    verdicts = {row["metric"]: row["verdict"] for row in document["results"]}
    assert verdicts["add"] == "no ZODB"
    assert verdicts["commit_vs_floor"] in ("OK", "MISSED")
    assert "no ZODB" in capsys.readouterr().out


def test_server_process_starts_and_stops(tmp_path: Path) -> None:
    """The server workload's servers listen when started and are gone when the block ends."""
    with amberdb_server(str(tmp_path / "s.fs"), str(tmp_path / "s.log")) as server:
        proc = server.proc
        assert proc is not None
        with socket.create_connection(server.address, timeout=5):
            pass
    assert proc.poll() is not None
    with pytest.raises(OSError), socket.create_connection(server.address, timeout=5):
        pass
