"""Things a hostile record would love to reach: calling or importing any of them is a failure."""

from __future__ import annotations

from typing import Any

CALLS: list[tuple[Any, ...]] = []


def sentinel(*args: Any) -> str:
    """Records that it ran; no allow-list lets a record name it."""
    CALLS.append(args)
    return "the sentinel ran"


class SentinelClass:
    """Records its construction (for records that name it and call it)."""

    def __init__(self, *args: Any) -> None:
        CALLS.append(args)
