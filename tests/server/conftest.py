"""Fixtures of the server tests: processes that are always killed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.procs import Processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Start servers and clients with this; whatever still runs at the end is killed."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.cleanup()
