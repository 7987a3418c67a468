"""BTrees: scalable persistent sorted containers, for every family, with set algebra.

For each family prefix (first letter keys, second values: ``O`` object, ``I`` 32-bit and
``L`` 64-bit signed integer, ``U`` 32-bit and ``Q`` 64-bit unsigned integer, ``F`` float)
there are four classes: ``<P>BTree`` (a mapping), ``<P>Bucket`` (a small mapping in one
record), ``<P>TreeSet`` (a set) and ``<P>Set`` (a small set in one record)::

    from amberdb.btrees import IOBTree, OOTreeSet, Length, union, family64

The 21 prefixes of ZODB's BTrees (all but the FileStorage-internal ``fs``): OO, IO, OI,
II, IF, LO, OL, LL, LF, QQ, QO, OQ, IU, UI, UU, UO, OU, UF, LQ, QL, QF.  ``family32`` and
``family64`` group them the way ZODB code picks them (``family64.IO.BTree`` is
``LOBTree``, ``family64.UF`` is the ``QF`` family), each family namespace with its set
operations (``family32.II.multiunion``).  Porting from ZODB means changing the imports;
see the modules for what differs (64-bit floats; range errors are both OverflowError and
TypeError).

Trees are B+trees of separate records: interior nodes (instances of the tree class, the
tree object being the root) and buckets chained for range scans.  ``check(tree)`` verifies
one.  Buckets and sets merge concurrent commits that change different keys
(``_p_resolveConflict``); ``Length`` is a counter whose concurrent changes add up.
"""

from __future__ import annotations

from amberdb.btrees._conflict import BTreesConflictError
from amberdb.btrees._families import FAMILIES, FamilyNamespace, family32, family64
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
IUBTree = FAMILIES["IU"].BTree
IUBucket = FAMILIES["IU"].Bucket
IUTreeSet = FAMILIES["IU"].TreeSet
IUSet = FAMILIES["IU"].Set
UIBTree = FAMILIES["UI"].BTree
UIBucket = FAMILIES["UI"].Bucket
UITreeSet = FAMILIES["UI"].TreeSet
UISet = FAMILIES["UI"].Set
UUBTree = FAMILIES["UU"].BTree
UUBucket = FAMILIES["UU"].Bucket
UUTreeSet = FAMILIES["UU"].TreeSet
UUSet = FAMILIES["UU"].Set
UOBTree = FAMILIES["UO"].BTree
UOBucket = FAMILIES["UO"].Bucket
UOTreeSet = FAMILIES["UO"].TreeSet
UOSet = FAMILIES["UO"].Set
OUBTree = FAMILIES["OU"].BTree
OUBucket = FAMILIES["OU"].Bucket
OUTreeSet = FAMILIES["OU"].TreeSet
OUSet = FAMILIES["OU"].Set
UFBTree = FAMILIES["UF"].BTree
UFBucket = FAMILIES["UF"].Bucket
UFTreeSet = FAMILIES["UF"].TreeSet
UFSet = FAMILIES["UF"].Set
LQBTree = FAMILIES["LQ"].BTree
LQBucket = FAMILIES["LQ"].Bucket
LQTreeSet = FAMILIES["LQ"].TreeSet
LQSet = FAMILIES["LQ"].Set
QLBTree = FAMILIES["QL"].BTree
QLBucket = FAMILIES["QL"].Bucket
QLTreeSet = FAMILIES["QL"].TreeSet
QLSet = FAMILIES["QL"].Set
QFBTree = FAMILIES["QF"].BTree
QFBucket = FAMILIES["QF"].Bucket
QFTreeSet = FAMILIES["QF"].TreeSet
QFSet = FAMILIES["QF"].Set

__all__ = [
    "FAMILIES",
    "BTreesConflictError",
    "BTreesOverflowError",
    "FamilyNamespace",
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
    "IUBTree",
    "IUBucket",
    "IUSet",
    "IUTreeSet",
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
    "LQBTree",
    "LQBucket",
    "LQSet",
    "LQTreeSet",
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
    "OUBTree",
    "OUBucket",
    "OUSet",
    "OUTreeSet",
    "QFBTree",
    "QFBucket",
    "QFSet",
    "QFTreeSet",
    "QLBTree",
    "QLBucket",
    "QLSet",
    "QLTreeSet",
    "QOBTree",
    "QOBucket",
    "QOSet",
    "QOTreeSet",
    "QQBTree",
    "QQBucket",
    "QQSet",
    "QQTreeSet",
    "UFBTree",
    "UFBucket",
    "UFSet",
    "UFTreeSet",
    "UIBTree",
    "UIBucket",
    "UISet",
    "UITreeSet",
    "UOBTree",
    "UOBucket",
    "UOSet",
    "UOTreeSet",
    "UUBTree",
    "UUBucket",
    "UUSet",
    "UUTreeSet",
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
