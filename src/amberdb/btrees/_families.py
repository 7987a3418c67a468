"""The family classes: ``<P>BTree``, ``<P>Bucket``, ``<P>TreeSet``, ``<P>Set`` for each prefix.

Generated from the generic implementation, each a proper module-level class of
``amberdb.btrees`` (records name classes ``amberdb.btrees:IOBTree``), plus one namespace per
prefix (``FAMILIES["IO"]``, also ``family32.IO``) holding the four classes and the set
operations bound to that family, like the modules of ZODB's BTrees.

Size bounds (``max_leaf_size`` keys per bucket, ``max_internal_size`` children per interior
node: class attributes of the trees and tree sets, which a subclass may set, as in ZODB's
BTrees).  Pure Python pays per level and per split, not per item moved by ``list.insert``,
so buckets are larger than BTrees' (30 object keys, 120 integer keys); larger buckets make
records and the chance that two transactions touch the same bucket larger too.  Numeric
keys pack into compact records (4 or 8 bytes a key), so a 512-key bucket is a 4-8 KB
record.  Measured with ``benchmarks/bench_btrees.py``.
"""

from __future__ import annotations

from typing import Any

from amberdb.btrees import _setops
from amberdb.btrees._kinds import KINDS, Kind
from amberdb.btrees._leaves import BucketBase, SetBase
from amberdb.btrees._setops import MappingOperators, SetOperators
from amberdb.btrees._tree import BTreeBase, TreeSetBase, _by_value, hot_methods

__all__ = ["FAMILIES", "PREFIXES", "Family", "FamilyNamespace", "family32", "family64"]

MODULE = "amberdb.btrees"
# The 21 families of ZODB's BTrees (all but its FileStorage-internal fsBTree).
PREFIXES = (
    *("OO", "IO", "OI", "II", "IF", "LO", "OL", "LL", "LF", "QQ", "QO", "OQ"),
    *("IU", "UI", "UU", "UO", "OU", "UF", "LQ", "QL", "QF"),
)

# (max bucket size, max node size) by key kind
NUMERIC_KEY_SIZES = (512, 512)
OBJECT_KEY_SIZES = (64, 256)


class Family:
    """One prefix's classes and set operations, like a module of ZODB's BTrees (``IIBTree``)."""

    BTree: Any
    Bucket: Any
    TreeSet: Any
    Set: Any
    family: Any = None  # family32 or family64

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.key_kind: Kind = KINDS[prefix[0]]
        self.value_kind: Kind = KINDS[prefix[1]]

    def union(self, c1: Any, c2: Any) -> Any:
        """See :func:`amberdb.btrees.union`; this family's result when no argument is a collection."""
        return _setops.union(c1, c2, self)

    def intersection(self, c1: Any, c2: Any) -> Any:
        """See :func:`amberdb.btrees.intersection`."""
        return _setops.intersection(c1, c2, self)

    def difference(self, c1: Any, c2: Any) -> Any:
        """See :func:`amberdb.btrees.difference`."""
        return _setops.difference(c1, c2, self)

    def weightedUnion(self, c1: Any, c2: Any, weight1: Any = 1, weight2: Any = 1) -> tuple[Any, Any]:
        """See :func:`amberdb.btrees.weightedUnion`."""
        return _setops.weightedUnion(c1, c2, weight1, weight2, self)

    def weightedIntersection(self, c1: Any, c2: Any, weight1: Any = 1, weight2: Any = 1) -> tuple[Any, Any]:
        """See :func:`amberdb.btrees.weightedIntersection`."""
        return _setops.weightedIntersection(c1, c2, weight1, weight2, self)

    def multiunion(self, seq: Any) -> Any:
        """See :func:`amberdb.btrees.multiunion`."""
        return _setops.multiunion(seq, self)

    def __repr__(self) -> str:
        return f"<amberdb.btrees family {self.prefix}>"


def _make_class(name: str, base: type, namespace: dict[str, Any], operators: type) -> Any:
    for attribute, value in namespace.items():
        if callable(value) and "<locals>" in getattr(value, "__qualname__", ""):
            value.__qualname__ = f"{name}.{attribute}"
            value.__module__ = MODULE
    namespace.update({"__slots__": (), "__module__": MODULE, "__qualname__": name})
    return type(name, (base, operators), namespace)


def _make_family(prefix: str) -> Family:
    family = Family(prefix)
    kkind, vkind = family.key_kind, family.value_kind
    bucket_size, node_size = NUMERIC_KEY_SIZES if kkind.numeric else OBJECT_KEY_SIZES
    common = {"_kkind": kkind, "_family": family}
    numeric = {"byValue": _by_value} if vkind.numeric else {}
    family.Bucket = _make_class(
        f"{prefix}Bucket",
        BucketBase,
        {
            **common,
            **numeric,
            "_vkind": vkind,
            "__doc__": (
                f"A small sorted mapping of {kkind.description} keys to {vkind.description} values, "
                "one record."
            ),
        },
        MappingOperators,
    )
    family.Set = _make_class(
        f"{prefix}Set",
        SetBase,
        {**common, "_vkind": None, "__doc__": f"A small sorted set of {kkind.description} keys, one record."},
        SetOperators,
    )
    family.BTree = _make_class(
        f"{prefix}BTree",
        BTreeBase,
        {
            **common,
            **numeric,
            **hot_methods(kkind, vkind),
            "_vkind": vkind,
            "_bucket_class": family.Bucket,
            "max_leaf_size": bucket_size,
            "max_internal_size": node_size,
            "__doc__": (
                f"A scalable sorted mapping of {kkind.description} keys to {vkind.description} values."
            ),
        },
        MappingOperators,
    )
    family.TreeSet = _make_class(
        f"{prefix}TreeSet",
        TreeSetBase,
        {
            **common,
            **hot_methods(kkind, None),
            "_vkind": None,
            "_bucket_class": family.Set,
            "max_leaf_size": bucket_size,
            "max_internal_size": node_size,
            "__doc__": f"A scalable sorted set of {kkind.description} keys.",
        },
        SetOperators,
    )
    return family


FAMILIES: dict[str, Family] = {prefix: _make_family(prefix) for prefix in PREFIXES}


class FamilyNamespace:
    """``family32`` or ``family64``: the integer width ZODB code picks its modules by.

    ``I`` stands for the signed integers of that width and ``U`` for the unsigned ones:
    ``family32.IU`` is the ``IU`` family, ``family64.IU`` the ``LQ`` one.  Both are
    singletons: pickling or copying one gives the same object back, and a record holding one
    (``self.family = family64``) names the global ``amberdb.btrees.family64``.
    """

    # Pickle stores what __reduce__ names as a global of the object's __module__: the
    # public module, where records may name the two families (see amberdb.serialize).
    __module__ = MODULE

    IO: Family
    OI: Family
    II: Family
    IF: Family
    IU: Family
    UI: Family
    UU: Family
    UO: Family
    OU: Family
    UF: Family
    OO: Family

    def __init__(self, bits: int, names: dict[str, str]) -> None:
        self.bits = bits
        self.minint = -(2 ** (bits - 1))
        self.maxint = 2 ** (bits - 1) - 1
        self.maxuint = 2**bits - 1
        for name, prefix in names.items():
            setattr(self, name, FAMILIES[prefix])

    def __reduce__(self) -> str:
        return f"family{self.bits}"

    def __repr__(self) -> str:
        return f"<amberdb.btrees.family{self.bits}>"


_NAMES = ("IO", "OI", "II", "IF", "IU", "UI", "UU", "UO", "OU", "UF", "OO")
family32 = FamilyNamespace(32, {name: name for name in _NAMES})
# 64 bits: I is L and U is Q (family64.IU is LQ, family64.UF is QF).
family64 = FamilyNamespace(64, {name: name.replace("I", "L").replace("U", "Q") for name in _NAMES})
for _family in FAMILIES.values():
    _family.family = family32 if "L" not in _family.prefix and "Q" not in _family.prefix else family64
