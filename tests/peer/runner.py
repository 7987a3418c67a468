"""Run one peer suite (BTrees' or transaction's own tests) against AmberDB and judge it.

Started by ``test_peer_suites.py`` in a subprocess: it puts ``tests/peer/shim`` first on
``sys.path`` (so ``import BTrees`` is AmberDB), which must not happen in the interpreter of
AmberDB's other tests, where the real packages serve as oracles.  By hand, from the
checkout (the sdists are fetched on first use)::

    .venv/bin/python -m tests.peer.runner BTrees --only '*testBTrees*'

The unittest loader runs the modules, not pytest: BTrees generates most of its test classes
in ``test_dynamic_btrees`` through the ``load_tests`` protocol, which pytest ignores.

Every test is run, the excluded ones too, so that the verdict can check the exclusion list
both ways: a test no line excludes must pass, and an excluded test must not pass (a stale
line is reported with the ids to delete).  A line that excludes nothing is stale too.
Exit status 0 when all holds; the counts go to stdout and, as JSON, to ``--json``.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
import unittest
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.peer.exclusions import CATEGORIES, Exclusion, load, match
from tests.peer.sdists import SDISTS, prepare

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim"
#: The verdict's lists that must be empty for the suite to pass.
PROBLEMS = ("unexpected_failures", "stale_exclusions", "unused_patterns", "contradictions")
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


class Recorder(unittest.TestResult):
    """Keeps one outcome per test id: passed, failed (failure or error) or skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: dict[str, str] = {}
        self.details: dict[str, str] = {}
        self.tracebacks: dict[str, str] = {}

    def _set(self, test: unittest.TestCase, outcome: str, detail: str = "") -> None:
        test_id = _test_id(test)
        # A failed subtest or tearDown fails the test even if something later "passed".
        if self.outcomes.get(test_id) != "failed":
            self.outcomes[test_id] = outcome
            if detail:
                self.details[test_id] = detail

    def _last_line(self, err: ExcInfo) -> str:
        kind, value = err[0], err[1]
        name = kind.__name__ if kind is not None else "?"
        return f"{name}: {value}".splitlines()[0][:300] if str(value) else name

    def addSuccess(self, test: unittest.TestCase) -> None:
        self._set(test, "passed")

    def _failed(self, test: unittest.TestCase, err: ExcInfo, prefix: str = "") -> None:
        self._set(test, "failed", prefix + self._last_line(err))
        if err[0] is not None:
            text = "".join(traceback.format_exception(err[1]))
            self.tracebacks.setdefault(_test_id(test), text)

    def addFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:
        self._failed(test, err)

    def addError(self, test: unittest.TestCase, err: ExcInfo) -> None:
        self._failed(test, err)

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        self._set(test, "skipped", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:
        self._set(test, "passed")  # the package's own expectation held

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        self._set(test, "failed", "unexpected success")

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: ExcInfo | None) -> None:
        if err is not None:
            self._failed(test, err, f"subtest {subtest.id()}: ")


def _test_id(test: unittest.TestCase) -> str:
    """The id, with a module that failed to import named as the module itself."""
    test_id = test.id()
    for prefix in ("unittest.loader._FailedTest.", "unittest.loader.ModuleImportFailure."):
        if test_id.startswith(prefix):
            return test_id[len(prefix) :]
    return test_id


def _flatten(suite: unittest.TestSuite | unittest.TestCase) -> Iterator[unittest.TestCase]:
    if isinstance(suite, unittest.TestSuite):
        for test in suite:
            yield from _flatten(test)
    else:
        yield suite


class ModuleImportFailed(unittest.TestCase):
    """Stands for a test module that fails to import (e.g. on a missing class attribute).

    The loader turns only ImportError into a failed test and lets other errors propagate;
    here any import error fails this one test, whose id is the module's name.
    """

    def __init__(self, module: str, error: BaseException) -> None:
        super().__init__("test_import")
        self.module = module
        self.error = error

    def id(self) -> str:
        """The module name: what ``exclusions.txt`` names."""
        return self.module

    def test_import(self) -> None:
        """Fails with the error the import raised."""
        raise self.error


def _load(package: str, tree: Path) -> unittest.TestSuite:
    """Every ``test*.py`` module of the extracted ``<package>/tests``, through ``load_tests``."""
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for path in sorted((tree / package / "tests").glob("test*.py")):
        name = f"{package}.tests.{path.stem}"
        try:
            module = importlib.import_module(name)
        except Exception as error:
            suite.addTest(ModuleImportFailed(name, error))
        else:
            suite.addTest(loader.loadTestsFromModule(module))
    return suite


def judge(outcomes: dict[str, str], exclusions: list[Exclusion], prefix: str) -> dict[str, Any]:
    """Counts per outcome and category, and the two ways the list can be wrong."""
    counts: Counter[str] = Counter()
    unexpected: list[str] = []
    stale: list[str] = []
    contradictions: list[str] = []
    for test_id, outcome in sorted(outcomes.items()):
        counts[outcome] += 1
        found = match(exclusions, test_id)
        if not found:
            if outcome == "failed":
                unexpected.append(test_id)
            continue
        exclusion = found[0]
        counts[f"excluded:{exclusion.category}"] += 1
        if outcome == "passed":  # "notrun" lines cannot go stale: their tests never run
            stale.append(f"{test_id}  (line {exclusion.line}: {exclusion.pattern})")
        if len({e.category for e in found}) > 1:
            lines = ", ".join(f"{e.line} [{e.category}]" for e in found)
            contradictions.append(f"{test_id}  (lines {lines})")
    unused = [
        f"line {e.line}: {e.pattern}" for e in exclusions if e.pattern.startswith(prefix) and not e.matched
    ]
    return {
        "total": len(outcomes),
        "passed": counts["passed"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],
        "run": len(outcomes) - counts["notrun"],
        "excluded": {category: counts[f"excluded:{category}"] for category in CATEGORIES},
        "unexpected_failures": unexpected,
        "stale_exclusions": stale,
        "unused_patterns": unused,
        "contradictions": contradictions,
    }


def report(suite: str, verdict: dict[str, Any], details: dict[str, str]) -> str:
    """The human summary: counts first, then what is wrong, if anything."""
    lines = [
        f"{suite}: {verdict['total']} tests, {verdict['run']} run, {verdict['passed']} passed, "
        f"{verdict['failed']} failed, {verdict['skipped']} skipped by the suite itself; "
        f"{verdict['seconds']:.0f} s",
        "  excluded by category: " + ", ".join(f"{c} {n}" for c, n in verdict["excluded"].items()),
    ]
    if verdict.get("missing_families"):
        lines.append(
            "  families AmberDB lacks (their tests not generated): " + " ".join(verdict["missing_families"])
        )
    for key, title in (
        ("unexpected_failures", "FAILED and not excluded (fix AmberDB, or add a line with a reason)"),
        ("stale_exclusions", "PASSED but excluded (delete these from exclusions.txt)"),
        ("unused_patterns", "patterns excluding no test (delete or correct)"),
        ("contradictions", "tests excluded by lines of different categories (keep one)"),
    ):
        if verdict[key]:
            lines.append(f"  {title}: {len(verdict[key])}")
            lines.extend(f"    {item}  -- {details.get(item, '')}".rstrip(" -") for item in verdict[key])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print the summary, write the JSON; 0 if the exclusion list is exact."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["BTrees", "transaction"])
    parser.add_argument("--exclusions", type=Path, default=HERE / "exclusions.txt")
    parser.add_argument("--json", type=Path, help="write the verdict and every outcome here")
    parser.add_argument("--only", help="run only the tests whose id matches this fnmatch pattern")
    parser.add_argument("--tracebacks", action="store_true", help="print the traceback of each failed test")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    trees = {name: prepare(name) for name in SDISTS}  # both: each suite imports both shims
    for name, tree in trees.items():
        os.environ[f"AMBERDB_PEER_{name.upper()}"] = str(tree)  # read by the shims
    # BTrees' tests read this to know C classes are absent (they skip the "Py" duplicates).
    os.environ["PURE_PYTHON"] = "1"
    sys.path.insert(0, str(SHIM))  # before site-packages, where the real packages are
    tree = trees[args.suite]
    package = importlib.import_module(args.suite)  # the shim
    exclusions = load(args.exclusions)
    notrun = [e for e in exclusions if e.category == "notrun"]
    recorder = Recorder()
    selected = []
    for test in _flatten(_load(args.suite, tree)):
        test_id = _test_id(test)
        if args.only and not fnmatch.fnmatchcase(test_id, args.only):
            continue
        if any(e.matches(test_id) for e in notrun):
            recorder.outcomes[test_id] = "notrun"
        else:
            selected.append(test)
    suite = unittest.TestSuite(selected)
    # Tests that write files (FileStorage) write them in a scratch folder, not the checkout.
    with tempfile.TemporaryDirectory(prefix="amberdb-peer-") as scratch:
        os.chdir(scratch)
        suite.run(recorder)
    verdict = judge(recorder.outcomes, exclusions, f"{args.suite}.")
    if args.only:  # a partial run cannot tell which patterns are unused
        verdict["unused_patterns"] = []
    verdict["seconds"] = time.perf_counter() - started
    verdict["missing_families"] = list(getattr(package, "MISSING_FAMILIES", ()))
    if args.tracebacks:
        for test_id, text in sorted(recorder.tracebacks.items()):
            print(f"=== {test_id}\n{text}")
    print(report(args.suite, verdict, recorder.details))
    if args.json:
        outcomes = {
            test_id: {"outcome": outcome, "detail": recorder.details.get(test_id, "")}
            for test_id, outcome in recorder.outcomes.items()
        }
        args.json.write_text(json.dumps({"verdict": verdict, "outcomes": outcomes}, indent=1))
    ok = not any(verdict[key] for key in PROBLEMS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
