"""Changing a tree's keys while iterating over it raises RuntimeError, as dicts do.

Every family, every container kind (trees, tree sets, buckets, sets) and every iteration API
(``iter``, ``keys``/``values``/``items`` views and their slices, ``iterkeys``/``itervalues``/
``iteritems``, range-limited walks): inserting ahead of the walk, inserting behind it, and
deleting all raise instead of walking for ever or skipping keys.  Replacing the value of an
existing key is not a change of the keys and goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from amberdb.btrees import FAMILIES
from tests.btrees.families import PREFIXES, key, small_classes, value

SIZE = 40
MAX_STEPS = 10 * SIZE  # a walk that runs past this never ends


def _walks(container: Any, prefix: str) -> dict[str, Callable[[], Iterator[Any]]]:
    """Every lazy walk over ``container`` (a bucket's ``keys()`` is a list: a copy, not a walk)."""
    lo, hi = key(prefix, 0), key(prefix, SIZE)
    walks: dict[str, Callable[[], Iterator[Any]]] = {
        "iter": lambda: iter(container),
        "iterkeys": lambda: container.iterkeys(),
        "iterkeys range": lambda: container.iterkeys(lo, hi, excludemin=True),
    }
    if hasattr(container, "itervalues"):
        walks["itervalues"] = lambda: container.itervalues()
        walks["iteritems range"] = lambda: container.iteritems(lo, hi)
    if hasattr(container, "_children"):  # trees: keys(), values(), items() are lazy views
        walks["keys"] = lambda: iter(container.keys())
        walks["keys range"] = lambda: iter(container.keys(lo, hi))
        walks["keys slice"] = lambda: iter(container.keys()[1 : SIZE - 1])
        if hasattr(container, "items"):
            walks["values"] = lambda: iter(container.values())
            walks["items"] = lambda: iter(container.items())
    return walks


def _containers(prefix: str) -> dict[str, Callable[[], Any]]:
    family = FAMILIES[prefix]
    small_tree, small_set = small_classes(prefix)
    keys = [key(prefix, i) for i in range(SIZE)]
    return {
        "BTree": lambda: family.BTree({k: value(prefix, i) for i, k in enumerate(keys)}),
        "small BTree": lambda: small_tree({k: value(prefix, i) for i, k in enumerate(keys)}),
        "TreeSet": lambda: family.TreeSet(keys),
        "small TreeSet": lambda: small_set(keys),
        "Bucket": lambda: family.Bucket({k: value(prefix, i) for i, k in enumerate(keys)}),
        "Set": lambda: family.Set(keys),
    }


def _insert(container: Any, prefix: str, i: int) -> None:
    if hasattr(container, "add"):
        container.add(key(prefix, i))
    else:
        container[key(prefix, i)] = value(prefix, i)


CASES = [
    (prefix, kind)
    for prefix in PREFIXES
    for kind in ("BTree", "small BTree", "TreeSet", "small TreeSet", "Bucket", "Set")
]


def _ids(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_inserting_ahead_while_iterating_raises(case: tuple[str, str]) -> None:
    prefix, kind = case
    for name in _walks(_containers(prefix)[kind](), prefix):
        container = _containers(prefix)[kind]()
        walk = _walks(container, prefix)[name]
        with pytest.raises(RuntimeError, match="changed during iteration"):
            for steps, _ in enumerate(walk()):
                assert steps < MAX_STEPS, f"{name}: the walk never ends"
                _insert(container, prefix, SIZE + 100 + steps)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_inserting_behind_or_deleting_while_iterating_raises(case: tuple[str, str]) -> None:
    prefix, kind = case
    names = list(_walks(_containers(prefix)[kind](), prefix))
    for name in names:
        for change in ("insert behind", "delete"):
            container = _containers(prefix)[kind]()
            walk = _walks(container, prefix)[name]
            with pytest.raises(RuntimeError, match="changed during iteration"):
                for steps, _ in enumerate(walk()):
                    assert steps < MAX_STEPS, f"{name}: the walk never ends"
                    if steps == 2:
                        if change == "delete":
                            if hasattr(container, "remove"):
                                container.remove(key(prefix, 30))
                            else:
                                del container[key(prefix, 30)]
                        else:
                            _insert(container, prefix, -5)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_replacing_values_while_iterating_goes_on(prefix: str) -> None:
    for kind in ("BTree", "small BTree", "Bucket"):
        container = _containers(prefix)[kind]()
        seen = []
        for k in container.keys():  # noqa: SIM118 - the keys view is what is tested
            container[k] = value(prefix, 7)
            seen.append(k)
        assert seen == [key(prefix, i) for i in range(SIZE)]
        assert set(container.values()) == {value(prefix, 7)}


@pytest.mark.parametrize("prefix", ["OO", "II"])
def test_iteration_after_the_error_sees_the_changed_tree(prefix: str) -> None:
    container = _containers(prefix)["small BTree"]()
    with pytest.raises(RuntimeError):
        for k in container.keys():  # noqa: SIM118 - the keys view is what is tested
            _insert(container, prefix, SIZE + 1)
            del container[k]
    assert len(list(container.keys())) == len(container)
    container._check()


def test_the_issue_example_ends() -> None:
    tree = FAMILIES["II"].BTree({k: 1 for k in range(1000)})
    with pytest.raises(RuntimeError):
        for k in tree.keys():  # noqa: SIM118 - the keys view is what is tested
            tree[k + 10000] = 1


def test_abandoned_iterations_do_not_affect_later_ones() -> None:
    tree = FAMILIES["OO"].BTree({key("OO", i): i for i in range(SIZE)})
    walk = iter(tree.keys())
    next(walk)
    tree[key("OO", SIZE + 1)] = 1  # the abandoned walk would raise; a new one must not
    assert len(list(tree.keys())) == SIZE + 1
    del walk
    with pytest.raises(RuntimeError):
        for k in tree:
            del tree[k]
