"""Helpers for the storage tests (the storage-independent suite itself is amberdb.testing)."""

from __future__ import annotations

from amberdb.testing import commit

__all__ = ["commit"]
