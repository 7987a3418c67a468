"""Reading ``exclusions.txt``: which tests of the peer suites are expected to fail, and why.

The file is a list of sections, one per category, each line a test-id pattern (``fnmatch``
syntax, matched against the whole unittest id) and a one-line reason::

    [internals]
    BTrees.tests.test__base.*   tests the real package's private _base module

A pattern written once for every family (``BTrees.tests.test_*BTree.*.testFoo``) covers the
families added later too.  A test matched by no pattern must pass; a test matched by one
must not (see ``runner.py``): the list describes exactly what fails, and why.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CATEGORIES", "Exclusion", "load", "match"]

#: Category key -> what it means, in the order the summaries list them.
CATEGORIES = {
    "notrun": "not run: tests of the sdist's own helper modules, which the shim loads as test data",
    "internals": "internals only (the package's private modules, bucket layout, reprs, helpers)",
    "zodb": "needs ZODB itself (its storages, Connection internals), not its API",
    "difference": "a difference kept on purpose, documented in Coming from ZODB",
    "defect": "defect or missing API being fixed (issue 10): remove the line when it passes",
}

_SECTION = re.compile(r"^\[(\w+)\]$")


@dataclass
class Exclusion:
    """One pattern line of the file, and the tests it matched in a run."""

    pattern: str
    category: str
    reason: str
    line: int
    matched: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._regex = re.compile(fnmatch.translate(self.pattern))

    def matches(self, test_id: str) -> bool:
        """Whether ``test_id`` is one of the tests this line excludes."""
        return self._regex.match(test_id) is not None


def load(path: Path) -> list[Exclusion]:
    """Parse the file; every pattern needs a known category above it and a reason after it."""
    exclusions: list[Exclusion] = []
    category = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section = _SECTION.match(line)
        if section:
            category = section.group(1)
            if category not in CATEGORIES:
                raise ValueError(f"{path}:{number}: unknown category [{category}]")
            continue
        pattern, _, reason = line.partition(" ")
        if category is None or not reason.strip():
            raise ValueError(f"{path}:{number}: a pattern needs a [category] above it and a reason after it")
        exclusions.append(Exclusion(pattern, category, reason.strip(), number))
    return exclusions


def match(exclusions: list[Exclusion], test_id: str) -> list[Exclusion]:
    """The lines excluding ``test_id``, each recording the match (the first one counts).

    More than one line is fine within a category; lines of two categories for one test
    are a contradiction the runner reports.
    """
    found = [exclusion for exclusion in exclusions if exclusion.matches(test_id)]
    for exclusion in found:
        exclusion.matched.append(test_id)
    return found
