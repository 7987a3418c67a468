"""BTrees: scalable persistent sorted containers, for every family, with set algebra.

For each family prefix (first letter keys, second values: ``O`` object, ``I`` 32-bit and
``L`` 64-bit signed integer, ``Q`` 64-bit unsigned integer, ``F`` float) there are four
classes: ``<P>BTree`` (a mapping), ``<P>Bucket`` (a small mapping in one record),
``<P>TreeSet`` (a set) and ``<P>Set`` (a small set in one record)::

    from amberdb.btrees import IOBTree, OOTreeSet, Length, union, family64

Prefixes: OO, IO, OI, II, IF, LO, OL, LL, LF, QQ, QO, OQ.  ``family32`` and ``family64``
group them the way ZODB code picks them (``family64.IO.BTree`` is ``LOBTree``), each
family namespace with its set operations (``family32.II.multiunion``).  Porting from ZODB
means changing the imports; see the modules for what differs (64-bit floats; range errors
are both OverflowError and TypeError).

Trees are B+trees of separate records: interior nodes (instances of the tree class, the
tree object being the root) and buckets chained for range scans.  ``check(tree)`` verifies
one.  Buckets and sets merge concurrent commits that change different keys
(``_p_resolveConflict``); ``Length`` is a counter whose concurrent changes add up.
"""

from __future__ import annotations

from amberdb.btrees._conflict import BTreesConflictError
from amberdb.btrees._families import FAMILIES, family32, family64
from amberdb.btrees._kinds import BTreesOverflowError
from amberdb.btrees._setops import (
    difference,
    intersection,
    multiunion,
    union,
    weightedIntersection,
    weightedUnion,
)
from amberdb.btrees.check import check
from amberdb.btrees.length import Length

OOBTree = FAMILIES["OO"].BTree
OOBucket = FAMILIES["OO"].Bucket
OOTreeSet = FAMILIES["OO"].TreeSet
OOSet = FAMILIES["OO"].Set
IOBTree = FAMILIES["IO"].BTree
IOBucket = FAMILIES["IO"].Bucket
IOTreeSet = FAMILIES["IO"].TreeSet
IOSet = FAMILIES["IO"].Set
OIBTree = FAMILIES["OI"].BTree
OIBucket = FAMILIES["OI"].Bucket
OITreeSet = FAMILIES["OI"].TreeSet
OISet = FAMILIES["OI"].Set
IIBTree = FAMILIES["II"].BTree
IIBucket = FAMILIES["II"].Bucket
IITreeSet = FAMILIES["II"].TreeSet
IISet = FAMILIES["II"].Set
IFBTree = FAMILIES["IF"].BTree
IFBucket = FAMILIES["IF"].Bucket
IFTreeSet = FAMILIES["IF"].TreeSet
IFSet = FAMILIES["IF"].Set
LOBTree = FAMILIES["LO"].BTree
LOBucket = FAMILIES["LO"].Bucket
LOTreeSet = FAMILIES["LO"].TreeSet
LOSet = FAMILIES["LO"].Set
OLBTree = FAMILIES["OL"].BTree
OLBucket = FAMILIES["OL"].Bucket
OLTreeSet = FAMILIES["OL"].TreeSet
OLSet = FAMILIES["OL"].Set
LLBTree = FAMILIES["LL"].BTree
LLBucket = FAMILIES["LL"].Bucket
LLTreeSet = FAMILIES["LL"].TreeSet
LLSet = FAMILIES["LL"].Set
LFBTree = FAMILIES["LF"].BTree
LFBucket = FAMILIES["LF"].Bucket
LFTreeSet = FAMILIES["LF"].TreeSet
LFSet = FAMILIES["LF"].Set
QQBTree = FAMILIES["QQ"].BTree
QQBucket = FAMILIES["QQ"].Bucket
QQTreeSet = FAMILIES["QQ"].TreeSet
QQSet = FAMILIES["QQ"].Set
QOBTree = FAMILIES["QO"].BTree
QOBucket = FAMILIES["QO"].Bucket
QOTreeSet = FAMILIES["QO"].TreeSet
QOSet = FAMILIES["QO"].Set
OQBTree = FAMILIES["OQ"].BTree
OQBucket = FAMILIES["OQ"].Bucket
OQTreeSet = FAMILIES["OQ"].TreeSet
OQSet = FAMILIES["OQ"].Set

__all__ = [
    "FAMILIES",
    "BTreesConflictError",
    "BTreesOverflowError",
    "IFBTree",
    "IFBucket",
    "IFSet",
    "IFTreeSet",
    "IIBTree",
    "IIBucket",
    "IISet",
    "IITreeSet",
    "IOBTree",
    "IOBucket",
    "IOSet",
    "IOTreeSet",
    "LFBTree",
    "LFBucket",
    "LFSet",
    "LFTreeSet",
    "LLBTree",
    "LLBucket",
    "LLSet",
    "LLTreeSet",
    "LOBTree",
    "LOBucket",
    "LOSet",
    "LOTreeSet",
    "Length",
    "OIBTree",
    "OIBucket",
    "OISet",
    "OITreeSet",
    "OLBTree",
    "OLBucket",
    "OLSet",
    "OLTreeSet",
    "OOBTree",
    "OOBucket",
    "OOSet",
    "OOTreeSet",
    "OQBTree",
    "OQBucket",
    "OQSet",
    "OQTreeSet",
    "QOBTree",
    "QOBucket",
    "QOSet",
    "QOTreeSet",
    "QQBTree",
    "QQBucket",
    "QQSet",
    "QQTreeSet",
    "check",
    "difference",
    "family32",
    "family64",
    "intersection",
    "multiunion",
    "union",
    "weightedIntersection",
    "weightedUnion",
]
