"""Helpers shared by the BTrees tests: keys and values of every family, small-node trees."""

from __future__ import annotations

from typing import Any

from amberdb.btrees import FAMILIES
from amberdb.btrees._families import PREFIXES

__all__ = ["PREFIXES", "key", "small_classes", "value"]


def key(prefix: str, i: int) -> Any:
    """The ``i``-th key (ordered like ``i``) for the family ``prefix``."""
    letter = prefix[0]
    if letter == "O":
        return f"k{i + 1000:05d}"
    if letter in "QU":  # unsigned: the negative i some tests use stay in range
        return i + 1000
    return i


def value(prefix: str, i: int) -> Any:
    """A value for the family ``prefix`` derived from ``i``."""
    letter = prefix[1]
    if letter == "O":
        return ("v", i)
    if letter == "F":
        return i / 4
    if letter in "QU":
        return abs(i)
    return i


def _small(prefix: str, kind: str, bucket: int, node: int) -> type:
    base = getattr(FAMILIES[prefix], kind)
    name = f"Small{prefix}{kind}"
    return type(
        name,
        (base,),
        {"max_leaf_size": bucket, "max_internal_size": node, "__module__": __name__, "__qualname__": name},
    )


# Trees whose buckets and nodes split after a handful of keys: module-level classes (their
# records name them), one per family and kind.
SMALL: dict[tuple[str, str], type] = {}
for _prefix in PREFIXES:
    for _kind in ("BTree", "TreeSet"):
        SMALL[_prefix, _kind] = _small(_prefix, _kind, 3, 3)
        globals()[SMALL[_prefix, _kind].__name__] = SMALL[_prefix, _kind]


def small_classes(prefix: str) -> tuple[type, type]:
    """(BTree, TreeSet) of ``prefix`` with buckets of at most 3 keys and nodes of 3 children."""
    return SMALL[prefix, "BTree"], SMALL[prefix, "TreeSet"]
