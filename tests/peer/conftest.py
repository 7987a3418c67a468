"""Fetching the pinned sdists once per session, and printing the peer suites' counts at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peer.sdists import SDISTS, prepare

#: The summary each peer suite printed, shown after pytest's own summary (even with -q).
SUMMARIES = pytest.StashKey[list[str]]()

# The shim packages are imported only by the runner's subprocess, never collected here.
collect_ignore = ["shim"]


@pytest.fixture(scope="session")
def peer_trees() -> dict[str, Path]:
    """Both sdists fetched (first run only), verified and extracted; each suite needs both."""
    return {name: prepare(name) for name in SDISTS}


@pytest.fixture
def peer_summaries(request: pytest.FixtureRequest) -> list[str]:
    """Where a peer test leaves its suite's summary for the terminal report."""
    return request.config.stash.setdefault(SUMMARIES, [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print the per-suite counts: how many tests ran, passed, and were excluded for what."""
    summaries = config.stash.get(SUMMARIES, [])
    if summaries:
        terminalreporter.section("peer suites: BTrees and transaction's own tests on AmberDB")
        for summary in summaries:
            terminalreporter.write_line(summary)
