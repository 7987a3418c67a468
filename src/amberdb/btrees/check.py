"""A consistency checker for trees, tree sets, buckets and sets.

``check(tree)`` raises AssertionError naming the first damage it finds:

* every node has one separator fewer than children, sorted strictly increasing, and at most
  ``max_internal_size`` children; only the root may be empty; children are all buckets of
  the tree's bucket class (``_leaf``) or all nodes of the tree's class;
* every key lies within the bounds its ancestors' separators give it;
* every bucket is non-empty, sorted strictly increasing, has a value per key (mappings),
  holds at most ``max_leaf_size`` keys, and keys and values pass the family's checks;
* following ``_next`` from the first bucket visits exactly the tree's buckets in order and
  ends with None.

It reads every record of the tree.  ``display(tree)`` prints the structure: nodes with their
separators, buckets with their keys (and values).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from amberdb.btrees._kinds import key_out
from amberdb.btrees._leaves import LeafBase
from amberdb.btrees._tree import TreeBase
from amberdb.utils import oid_repr

__all__ = ["check", "display"]


def _fail(message: str) -> None:
    raise AssertionError(message)


def _check_leaf(leaf: Any, lo: Any, hi: Any, where: str, bound: int | None) -> None:
    keys = leaf._keys
    name = leaf.__class__.__name__
    for i in range(1, len(keys)):
        if not keys[i - 1] < keys[i]:
            _fail(f"{where}: {name} keys out of order at {i}: {keys[i - 1]!r} then {keys[i]!r}")
    if bound is not None:
        if not keys:
            _fail(f"{where}: empty {name} left in the tree")
        if len(keys) > bound:
            _fail(f"{where}: {name} holds {len(keys)} keys, more than its bound {bound}")
    if keys and lo is not None and keys[0] < lo:
        _fail(f"{where}: key {keys[0]!r} below the separator {lo!r}")
    if keys and hi is not None and not keys[-1] < hi:
        _fail(f"{where}: key {keys[-1]!r} not below the separator {hi!r}")
    kkind = leaf._kkind
    for key in keys:
        checked = kkind.check(key, "key", name)
        if type(checked) is not type(key) or checked != key:
            _fail(f"{where}: key {key!r} was not converted by the family's check")
    if leaf._is_map:
        values = leaf._values
        if len(values) != len(keys):
            _fail(f"{where}: {name} has {len(keys)} keys but {len(values)} values")
        vkind = leaf._vkind
        if vkind.letter != "O":
            for value in values:
                checked = vkind.check(value, "value", name)
                if type(checked) is not type(value):
                    _fail(f"{where}: value {value!r} was not converted by the family's check")


def _check_node(tree: Any, node: Any, lo: Any, hi: Any, where: str, leaves: list[Any], root: bool) -> None:
    keys, children = node._keys, node._children
    if not children:
        if not root:
            _fail(f"{where}: interior node without children")
        if keys:
            _fail(f"{where}: empty node with separators {keys!r}")
        return
    if len(keys) != len(children) - 1:
        _fail(f"{where}: {len(keys)} separators for {len(children)} children")
    if len(children) > tree.max_internal_size:
        _fail(f"{where}: {len(children)} children, more than the bound {tree.max_internal_size}")
    for i in range(1, len(keys)):
        if not keys[i - 1] < keys[i]:
            _fail(f"{where}: separators out of order at {i}: {keys[i - 1]!r} then {keys[i]!r}")
    if keys and lo is not None and keys[0] < lo:
        _fail(f"{where}: separator {keys[0]!r} below the bound {lo!r}")
    if keys and hi is not None and not keys[-1] < hi:
        _fail(f"{where}: separator {keys[-1]!r} not below the bound {hi!r}")
    for i, child in enumerate(children):
        child_lo = keys[i - 1] if i else lo
        child_hi = keys[i] if i < len(keys) else hi
        child_where = f"{where}/{i}"
        if node._leaf:
            if child.__class__ is not tree._bucket_class:
                _fail(
                    f"{child_where}: a {child.__class__.__name__} "
                    f"where a {tree._bucket_class.__name__} belongs"
                )
            _check_leaf(child, child_lo, child_hi, child_where, tree.max_leaf_size)
            leaves.append(child)
        else:
            if child.__class__ is not tree.__class__:
                _fail(
                    f"{child_where}: a {child.__class__.__name__} "
                    f"where a {tree.__class__.__name__} node belongs"
                )
            _check_node(tree, child, child_lo, child_hi, child_where, leaves, False)


def check(obj: Any) -> None:
    """Raise AssertionError if ``obj`` (a tree, tree set, bucket or set) is inconsistent."""
    if isinstance(obj, LeafBase):
        _check_leaf(obj, None, None, obj.__class__.__name__, None)
        return
    if not isinstance(obj, TreeBase):
        raise TypeError(f"check() needs an AmberDB BTrees container, not {type(obj).__name__}")
    leaves: list[Any] = []
    _check_node(obj, obj, None, None, obj.__class__.__name__, leaves, True)
    bucket = leaves[0] if leaves else None
    for i, leaf in enumerate(leaves):
        if bucket is not leaf:
            _fail(f"bucket chain: link {i} leads to {bucket!r}, not to the tree's bucket {leaf!r}")
        bucket = leaf._next
        if bucket is not None and leaf._keys and bucket._keys and not leaf._keys[-1] < bucket._keys[0]:
            _fail(f"bucket chain: bucket {i} ends at {leaf._keys[-1]!r} after the next starts")
    if bucket is not None:
        _fail(f"bucket chain: the last bucket links to {bucket!r} instead of None")


def _describe(obj: Any) -> str:
    oid = obj._p_oid
    return f"{obj.__class__.__name__} at {id(obj):#x}" + ("" if oid is None else f" oid {oid_repr(oid)}")


def _display(obj: Any, indent: str, file: TextIO) -> None:
    if isinstance(obj, LeafBase):
        keys = [key_out(key) for key in obj._keys]
        print(f"{indent}{_describe(obj)}: {len(keys)} keys", file=file)
        if obj._is_map:
            for key, value in zip(keys, obj._values):  # type: ignore[attr-defined]
                print(f"{indent}    {key!r}: {value!r}", file=file)
        else:
            for key in keys:
                print(f"{indent}    {key!r}", file=file)
        return
    children = obj._children
    print(f"{indent}{_describe(obj)}: {len(children)} children", file=file)
    for i, child in enumerate(children):
        if i:  # the separator: the smallest key the next child may hold
            print(f"{indent}    separator {key_out(obj._keys[i - 1])!r}", file=file)
        _display(child, indent + "    ", file)


def display(obj: Any, file: TextIO | None = None) -> None:
    """Print the structure of ``obj`` (a tree, tree set, bucket or set) to ``file`` (stdout).

    Reads every record of the tree.
    """
    if not isinstance(obj, (LeafBase, TreeBase)):
        raise TypeError(f"display() needs an AmberDB BTrees container, not {type(obj).__name__}")
    _display(obj, "", sys.stdout if file is None else file)
