"""PersistentList and PersistentMapping behave as list and dict, and mark their changes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amberdb
import amberdb.transaction as transaction
from amberdb import PersistentList, PersistentMapping

LIST_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers()),
        st.tuples(st.just("extend"), st.lists(st.integers(), max_size=3)),
        st.tuples(st.just("insert"), st.integers(-5, 5), st.integers()),
        st.tuples(
            st.just("pop"),
        ),
        st.tuples(st.just("setitem"), st.integers(-5, 5), st.integers()),
        st.tuples(st.just("delitem"), st.integers(-5, 5)),
        st.tuples(st.just("iadd"), st.lists(st.integers(), max_size=3)),
        st.tuples(st.just("imul"), st.integers(0, 2)),
        st.tuples(
            st.just("reverse"),
        ),
        st.tuples(
            st.just("sort"),
        ),
        st.tuples(st.just("remove"), st.integers(0, 3)),
        st.tuples(
            st.just("clear"),
        ),
        st.tuples(
            st.just("commit"),
        ),
        st.tuples(
            st.just("abort"),
        ),
    ),
    max_size=25,
)


def _apply_list(target: Any, op: tuple[Any, ...]) -> None:
    name, *args = op
    if name == "setitem":
        target[args[0]] = args[1]
    elif name == "delitem":
        del target[args[0]]
    elif name == "iadd":
        target += args[0]
    elif name == "imul":
        target *= args[0]
    else:
        getattr(target, name)(*args)


@settings(max_examples=60, deadline=None)
@given(LIST_OPS)
def test_persistent_list_matches_list_across_commits_and_aborts(ops: list[tuple[Any, ...]]) -> None:
    conn = amberdb.connection(None)
    conn.root.items = items = PersistentList()
    transaction.commit()
    committed: list[int] = []
    model: list[int] = []
    for op in ops:
        if op[0] == "commit":
            transaction.commit()
            committed = list(model)
            continue
        if op[0] == "abort":
            transaction.abort()
            model = list(committed)
            continue
        changed_before = items._p_changed
        outcomes = []
        for target in (model, items):
            try:
                _apply_list(target, op)
                outcomes.append(None)
            except (IndexError, ValueError) as exc:
                outcomes.append(type(exc))
        assert outcomes[0] == outcomes[1]
        assert list(items) == model
        if outcomes[0] is None and op[0] not in ("imul",):
            assert items._p_changed is True
        if outcomes[0] is not None:  # a failed change marks nothing
            assert (items._p_changed is True) == (changed_before is True)
    transaction.commit()
    conn.cache_minimize()
    assert list(conn.root.items) == model
    conn.close()


MAP_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from("abcde"), st.integers()),
        st.tuples(st.just("del"), st.sampled_from("abcde")),
        st.tuples(st.just("pop"), st.sampled_from("abcde")),
        st.tuples(st.just("setdefault"), st.sampled_from("abcde"), st.integers()),
        st.tuples(st.just("update"), st.dictionaries(st.sampled_from("abcde"), st.integers(), max_size=3)),
        st.tuples(
            st.just("popitem"),
        ),
        st.tuples(
            st.just("clear"),
        ),
        st.tuples(
            st.just("commit"),
        ),
        st.tuples(
            st.just("abort"),
        ),
    ),
    max_size=25,
)


def _apply_map(target: Any, op: tuple[Any, ...]) -> Any:
    name, *args = op
    if name == "set":
        target[args[0]] = args[1]
        return None
    if name == "del":
        del target[args[0]]
        return None
    return getattr(target, name)(*args)


@settings(max_examples=60, deadline=None)
@given(MAP_OPS)
def test_persistent_mapping_matches_dict_across_commits_and_aborts(ops: list[tuple[Any, ...]]) -> None:
    conn = amberdb.connection(None)
    conn.root.m = m = PersistentMapping()
    transaction.commit()
    committed: dict[str, int] = {}
    model: dict[str, int] = {}
    for op in ops:
        if op[0] == "commit":
            transaction.commit()
            committed = dict(model)
            continue
        if op[0] == "abort":
            transaction.abort()
            model = dict(committed)
            continue
        changed_before = m._p_changed
        results = []
        for target in (model, m):
            try:
                results.append(("ok", _apply_map(target, op)))
            except KeyError:
                results.append(("KeyError", None))
        assert results[0] == results[1]
        assert dict(m) == model
        if results[0][0] == "ok" and op[0] in ("set", "del", "update", "popitem", "clear"):
            assert m._p_changed is True
        if results[0][0] != "ok":  # a failed change marks nothing
            assert (m._p_changed is True) == (changed_before is True)
    transaction.commit()
    conn.cache_minimize()
    assert dict(conn.root.m) == model
    conn.close()


def test_mapping_helpers() -> None:
    m: PersistentMapping[str, int] = PersistentMapping(a=1)
    assert m.has_key("a") and not m.has_key("b")
    copy = m.copy()
    assert copy == m and copy is not m and type(copy) is PersistentMapping
    m |= {"b": 2}
    assert dict(m) == {"a": 1, "b": 2}
    with pytest.raises(KeyError):
        m.pop("zz")
    assert m.pop("zz", 5) == 5


def test_list_slicing_and_concatenation_give_persistent_lists() -> None:
    items = PersistentList([1, 2, 3])
    assert isinstance(items[1:], PersistentList) and items[1:] == [2, 3]
    assert isinstance(items + [4], PersistentList)  # noqa: RUF005 - concatenation is what is tested
