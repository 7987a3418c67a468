"""Trees against a dict / sorted-list model: random inserts, deletes, range searches, commits
and aborts through a real connection, with tiny buckets and nodes so that splits, unlinks
and root collapses happen all the time."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import amberdb
import amberdb.transaction as transaction
from amberdb.btrees import FAMILIES, check
from tests.btrees.families import small_classes


def _keys(prefix: str) -> st.SearchStrategy[Any]:
    letter = prefix[0]
    if letter == "O":
        return st.integers(0, 60).map(lambda i: f"k{i:02d}")
    if letter == "Q":
        return st.integers(2**64 - 60, 2**64 - 1) | st.integers(0, 30)
    if letter == "U":
        return st.integers(2**32 - 60, 2**32 - 1) | st.integers(0, 30)
    if letter == "L":
        return st.integers(-30, 30) | st.sampled_from([-(2**63), 2**63 - 1])
    return st.integers(-30, 30)


def _values(prefix: str) -> st.SearchStrategy[Any]:
    letter = prefix[1]
    if letter == "O":
        return st.tuples(st.integers(0, 3)) | st.text(max_size=2)
    if letter == "F":
        return st.integers(-5, 5) | st.floats(-10, 10, allow_nan=False)
    if letter == "Q":
        return st.integers(0, 2**64 - 1)
    if letter == "U":
        return st.integers(0, 2**32 - 1)
    if letter == "L":
        return st.integers(-(2**63), 2**63 - 1)
    return st.integers(-(2**31), 2**31 - 1)


def _range(keys: list[Any], lo: Any, hi: Any, excludemin: bool, excludemax: bool) -> list[Any]:
    """The sorted ``keys`` in range; an excluded missing bound leaves out the smallest (largest)."""
    found = [k for k in keys if (lo is None or k >= lo) and (hi is None or k <= hi)]
    if found and excludemin and (lo is None or found[0] == lo):
        del found[0]
    if found and excludemax and (hi is None or found[-1] == hi):
        del found[-1]
    return found


def machine(prefix: str, is_set: bool, big: bool = False) -> type[RuleBasedStateMachine]:
    """A state machine testing the (small-node, unless ``big``) tree or tree set of ``prefix``."""
    tree_class = (
        getattr(FAMILIES[prefix], "TreeSet" if is_set else "BTree") if big else small_classes(prefix)[is_set]
    )
    keys, values = _keys(prefix), _values(prefix)
    convert = float if prefix[1] == "F" else (lambda v: v)

    class TreeMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.db = amberdb.DB(None)
            self.tm = transaction.TransactionManager()
            self.conn = self.db.open(transaction_manager=self.tm)
            self.tree = tree_class()
            self.conn.root()["tree"] = self.tree
            self.tm.commit()
            self.model: dict[Any, Any] = {}
            self.committed: dict[Any, Any] = {}

        def teardown(self) -> None:
            self.tm.abort()
            self.conn.close()
            self.db.close()

        @property
        def t(self) -> Any:
            return self.conn.root()["tree"]

        @rule(k=keys, v=values)
        def store(self, k: Any, v: Any) -> None:
            if is_set:
                assert self.t.add(k) == (k not in self.model)
                self.model[k] = None
            else:
                self.t[k] = v
                self.model[k] = convert(v)

        @rule(k=keys, v=values)
        def insert(self, k: Any, v: Any) -> None:
            added = self.t.insert(k) if is_set else self.t.insert(k, v)
            assert added == (k not in self.model)
            if added:
                self.model[k] = None if is_set else convert(v)

        @rule(k=keys)
        def delete(self, k: Any) -> None:
            if k in self.model:
                if is_set:
                    self.t.remove(k)
                else:
                    assert self.t.pop(k) == self.model[k]
                del self.model[k]
            else:
                with pytest.raises(KeyError):
                    if is_set:
                        self.t.remove(k)
                    else:
                        del self.t[k]

        @rule(data=st.data())
        def delete_many(self, data: st.DataObject) -> None:
            present = sorted(self.model)
            if present:
                lo = data.draw(st.integers(0, len(present) - 1))
                for k in present[lo : lo + data.draw(st.integers(1, 12))]:
                    (self.t.remove if is_set else self.t.__delitem__)(k)
                    del self.model[k]

        @rule(lo=st.none() | keys, hi=st.none() | keys, excludemin=st.booleans(), excludemax=st.booleans())
        def range_search(self, lo: Any, hi: Any, excludemin: bool, excludemax: bool) -> None:
            expected = _range(sorted(self.model), lo, hi, excludemin, excludemax)
            view = self.t.keys(lo, hi, excludemin=excludemin, excludemax=excludemax)
            assert list(view) == expected
            assert len(view) == len(expected)
            assert list(self.t.iterkeys(lo, hi, excludemin, excludemax)) == expected
            if expected:
                assert view[-1] == expected[-1] and view[len(expected) // 2] == expected[len(expected) // 2]
                assert list(view[1:-1]) == expected[1:-1]
            if not is_set:
                items = list(self.t.items(lo, hi, excludemin=excludemin, excludemax=excludemax))
                assert items == [(k, self.model[k]) for k in expected]
                assert list(self.t.itervalues(lo, hi, excludemin, excludemax)) == [
                    self.model[k] for k in expected
                ]

        @rule(k=keys)
        def min_max(self, k: Any) -> None:
            above = [x for x in sorted(self.model) if x >= k]
            below = [x for x in sorted(self.model) if x <= k]
            if above:
                assert self.t.minKey(k) == above[0]
            else:
                with pytest.raises(ValueError):
                    self.t.minKey(k)
            if below:
                assert self.t.maxKey(k) == below[-1]
            else:
                with pytest.raises(ValueError):
                    self.t.maxKey(k)

        @rule()
        def commit(self) -> None:
            self.tm.commit()
            self.committed = dict(self.model)

        @rule()
        def abort(self) -> None:
            self.tm.abort()
            self.model = dict(self.committed)

        @rule()
        def commit_and_unload(self) -> None:
            self.tm.commit()
            self.committed = dict(self.model)
            self.conn.cache_minimize()

        @precondition(lambda self: len(self.model) > 0)
        @rule()
        def pop_smallest(self) -> None:
            smallest = min(self.model)
            if is_set:
                assert self.t.pop() == smallest
            else:
                assert self.t.popitem() == (smallest, self.model[smallest])
            del self.model[smallest]

        @invariant()
        def matches_model(self) -> None:
            t = self.t
            assert list(t) == sorted(self.model)
            if not is_set:
                assert [t[k] for k in sorted(self.model)] == [self.model[k] for k in sorted(self.model)]
            assert len(t) == len(self.model) and bool(t) == bool(self.model)
            check(t)

    TreeMachine.__name__ = f"{tree_class.__name__}Machine"
    return TreeMachine


SETTINGS = settings(
    max_examples=40, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)


@pytest.mark.parametrize("prefix", ["II", "OO", "LF", "QO", "OL", "UI"])
def test_btree_matches_model(prefix: str) -> None:
    run_state_machine_as_test(machine(prefix, False), settings=SETTINGS)


@pytest.mark.parametrize("prefix", ["IO", "OQ", "LL", "QQ", "UU"])
def test_tree_set_matches_model(prefix: str) -> None:
    run_state_machine_as_test(machine(prefix, True), settings=SETTINGS)


def test_default_sized_tree_matches_model() -> None:
    run_state_machine_as_test(machine("II", False, big=True), settings=SETTINGS)
