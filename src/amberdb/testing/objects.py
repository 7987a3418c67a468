"""Persistent classes the object-level suite stores (any storage must keep them faithfully)."""

from __future__ import annotations

from typing import Any

from amberdb.persistent import Persistent

__all__ = ["Account", "MergingCounter"]


class Account(Persistent):
    """A balance; concurrent changes to one account conflict (no resolver)."""

    def __init__(self, balance: int = 0) -> None:
        self.balance = balance


class MergingCounter(Persistent):
    """A count whose concurrent increments add up (``_p_resolveConflict``)."""

    def __init__(self) -> None:
        self.count = 0

    def _p_resolveConflict(self, old: Any, saved: Any, new: Any) -> Any:
        """Both sides' increments, applied to the committed state."""
        return {**saved, "count": saved["count"] + new["count"] - old["count"]}
