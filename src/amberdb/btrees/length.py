"""Length: a counter that concurrent transactions can all change without conflicting.

Keep one next to a large tree, since ``len(tree)`` reads every bucket::

    self.count = Length()
    self.tree[key] = value
    self.count.change(1)

Two transactions that both change the counter merge: the result adds both deltas.  Its
record state is the integer itself.
"""

from __future__ import annotations

from typing import Any

from amberdb.persistent import Persistent

__all__ = ["Length"]


class Length(Persistent):
    """A persistent integer whose concurrent changes add up instead of conflicting."""

    __slots__ = ("value",)
    value: int

    def __init__(self, v: int = 0) -> None:
        self.value = v

    def __getstate__(self) -> Any:
        return self.value

    def __setstate__(self, state: Any) -> None:
        self.value = state

    def set(self, v: int) -> None:
        """Set the value to ``v``."""
        self.value = v

    def change(self, delta: int) -> None:
        """Add ``delta`` (negative to subtract)."""
        self.value += delta

    def __call__(self, *args: Any) -> int:
        """The value."""
        return self.value

    def _p_resolveConflict(self, oldState: Any, savedState: Any, newState: Any) -> Any:
        """Both transactions' deltas added to the committed value."""
        return savedState + newState - oldState

    def __repr__(self) -> str:
        return f"<{self.__class__.__module__}.{self.__class__.__qualname__} value {self.value!r}>"
