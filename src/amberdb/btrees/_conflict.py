"""Conflict resolution for buckets and sets: merge two commits that changed different keys.

The connection calls ``_p_resolveConflict(oldState, savedState, newState)`` on a bare
instance when a commit finds that another transaction changed the same bucket: ``old`` is
what both started from, ``saved`` what the other transaction committed, ``new`` what this
one wants to write.  The merge is a pure function of the three states; references inside
them (values of object-valued buckets, the next-bucket link) are placeholders compared with
``==`` only.

Rules (those ZODB's BTrees apply; each refusal names its reason):

* the next-bucket link must be the same in all three states: a change means a bucket was
  split or removed, which also changed an interior node: **split involved**;
* neither side may leave the bucket empty (the tree unlinks empty buckets, changing its
  nodes): **bucket emptied**; nor may the merge;
* a key changed on one side only is taken from that side: inserts, deletes and value
  updates of different keys merge;
* a key changed on both sides refuses, even to the same value: updated by both, inserted by
  both, deleted by both, or deleted by one and updated by the other.

Unlike BTrees, deleting the first key of a bucket merges: AmberDB trees never rewrite
separator keys on deletion, so the interior nodes are unaffected.
"""

from __future__ import annotations

from typing import Any

from amberdb.btrees._kinds import Kind
from amberdb.exceptions import ConflictError

__all__ = ["BTreesConflictError", "resolve_bucket", "resolve_extra"]

_ABSENT: Any = object()


class BTreesConflictError(ConflictError):
    """A bucket merge was refused; ``reason`` is a short phrase saying why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"BTrees conflict: {reason}" + (f": {detail}" if detail else ""))


def _decode(kkind: Kind, vkind: Kind | None, state: Any) -> tuple[list[Any], list[Any] | None, Any, Any]:
    keys = kkind.unpack_keys(state[0])
    if vkind is None:
        return keys, None, state[1], state[2] if len(state) > 2 else None
    return keys, vkind.unpack(state[1]), state[2], state[3] if len(state) > 3 else None


def resolve_extra(old: Any, saved: Any, new: Any) -> Any:
    """Merge the extra attributes (a subclass's ``__dict__``) of the three states."""
    if saved == old:
        return new
    if new in (old, saved):
        return saved
    raise BTreesConflictError("attributes changed in both transactions", f"{sorted(saved or {})}")


def resolve_bucket(kkind: Kind, vkind: Kind | None, old: Any, saved: Any, new: Any) -> Any:
    """The merged state of a bucket (``vkind`` given) or a set (``vkind`` None)."""
    old_keys, old_values, old_next, old_extra = _decode(kkind, vkind, old)
    saved_keys, saved_values, saved_next, saved_extra = _decode(kkind, vkind, saved)
    new_keys, new_values, new_next, new_extra = _decode(kkind, vkind, new)
    if saved_next != old_next or new_next != old_next:
        raise BTreesConflictError(
            "bucket split involved", "the link to the next bucket changed, so a bucket was split or removed"
        )
    if old_keys and (not saved_keys or not new_keys):
        raise BTreesConflictError("bucket emptied", "one transaction removed every key of the bucket")
    extra = resolve_extra(old_extra, saved_extra, new_extra)

    keys: list[Any] = []
    values: list[Any] = []
    o = s = n = 0
    lo, ls, ln = len(old_keys), len(saved_keys), len(new_keys)
    while o < lo or s < ls or n < ln:
        # the smallest key at the head of the three lists, and which lists have it
        key = _ABSENT
        for seq, pos, size in ((old_keys, o, lo), (saved_keys, s, ls), (new_keys, n, ln)):
            if pos < size and (key is _ABSENT or seq[pos] < key):
                key = seq[pos]
        in_old = o < lo and old_keys[o] == key
        in_saved = s < ls and saved_keys[s] == key
        in_new = n < ln and new_keys[n] == key
        old_value = saved_value = new_value = None
        if vkind is not None:
            old_value = old_values[o] if in_old else None  # type: ignore[index]
            saved_value = saved_values[s] if in_saved else None  # type: ignore[index]
            new_value = new_values[n] if in_new else None  # type: ignore[index]
        if in_old:
            if in_saved and in_new:
                if saved_value == old_value:
                    value = new_value
                elif new_value == old_value:
                    value = saved_value
                else:
                    raise BTreesConflictError("same key changed in both transactions", f"key {key!r}")
            elif in_saved or in_new:
                # deleted on one side: only if the other side left it unchanged
                kept = saved_value if in_saved else new_value
                if kept != old_value:
                    raise BTreesConflictError(
                        "same key deleted in one transaction and changed in the other", f"key {key!r}"
                    )
                value = _ABSENT
            else:
                raise BTreesConflictError("same key deleted in both transactions", f"key {key!r}")
        elif in_saved and in_new:
            raise BTreesConflictError("same key inserted in both transactions", f"key {key!r}")
        else:
            value = saved_value if in_saved else new_value
        if value is not _ABSENT:
            keys.append(key)
            values.append(value)
        o += in_old
        s += in_saved
        n += in_new

    if not keys:
        raise BTreesConflictError("bucket emptied", "the merge leaves the bucket empty")
    packed_keys = kkind.pack_keys(keys)
    if vkind is None:
        state: tuple[Any, ...] = (packed_keys, old_next)
    else:
        state = (packed_keys, vkind.pack(values), old_next)
    return state if extra is None else (*state, extra)
