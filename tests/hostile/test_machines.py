"""The two unpickling machines agree with CPython on every honest pickle, and their tables are right."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import pickle
import pickletools
import uuid
from pathlib import PurePosixPath
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amberdb import unpickler
from amberdb.checked_unpickler import FIXED, LEN1, LEN4, LEN8, LINE, LINES2, OPCODES, CheckedUnpickler
from amberdb.record import REFERENCE_GLOBAL
from amberdb.serialize import ClassResolver, ObjectReader, ObjectWriter
from amberdb.unpickler import load_state
from amberdb.utils import p64
from tests.models import Node


@dataclasses.dataclass
class Point:
    """A value class: NEWOBJ, then BUILD with a dict state."""

    x: Any
    y: Any


class Slotted:
    """A value class with slots: BUILD with a (None, slots) state."""

    __slots__ = ("a", "b")

    def __init__(self, a: Any, b: Any) -> None:
        self.a = a
        self.b = b

    def __eq__(self, other: object) -> bool:
        return type(other) is Slotted and (other.a, other.b) == (self.a, self.b)

    __hash__ = None  # type: ignore[assignment]


class Factory:
    """Pickled through a module function and a state (REDUCE, then BUILD)."""

    def __init__(self, label: Any) -> None:
        self.label = label
        self.extra: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        return make_factory, (self.label,), {"extra": self.extra}

    def __eq__(self, other: object) -> bool:
        return type(other) is Factory and (other.label, other.extra) == (self.label, self.extra)

    __hash__ = None  # type: ignore[assignment]


def make_factory(label: Any) -> Factory:
    """Factory's pickles call this."""
    return Factory(label)


class Shade(enum.Enum):
    """An enum: REDUCE on the class."""

    LIGHT = 1
    DARK = 2


Pair = collections.namedtuple("Pair", "left right")

RESOLVER = ClassResolver(allowed_classes=[Point, Slotted, Factory, make_factory, Shade, Pair])

# Hypothesis may describe these (deeply nested) strategies while running; the text is long.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

_LAYOUTS = {
    pickletools.UP_TO_NEWLINE: LINE,
    pickletools.TAKEN_FROM_ARGUMENT1: LEN1,
    pickletools.TAKEN_FROM_ARGUMENT4: LEN4,
    pickletools.TAKEN_FROM_ARGUMENT4U: LEN4,
    pickletools.TAKEN_FROM_ARGUMENT8U: LEN8,
}


def test_opcode_table_matches_pickletools() -> None:
    documented = {}
    for opcode in pickletools.opcodes:
        argument = opcode.arg
        if argument is None:
            layout, size = FIXED, 0
        elif argument.n >= 0:
            layout, size = FIXED, argument.n
        elif argument.name == "stringnl_noescape_pair":
            layout, size = LINES2, 0
        else:
            layout, size = _LAYOUTS[argument.n], 0
        documented[opcode.name] = (opcode.code.encode("latin-1"), layout, size)
    assert documented == OPCODES


def test_every_opcode_has_a_handler() -> None:
    for name in OPCODES:
        assert callable(getattr(CheckedUnpickler, "op_" + name.lower()))


# -- honest values ---------------------------------------------------------------------------

# Values every protocol writes with standard globals only.  Protocols 0-2 also write bytes
# (and datetimes, UUIDs, complex numbers, Decimals) through _codecs.encode and
# copyreg._reconstructor, which records never need and the allow-list does not grant.
_portable_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.fractions(),
    st.timedeltas(),
    st.builds(range, st.integers(-5, 5), st.integers(-5, 50), st.integers(1, 3)),
    st.builds(PurePosixPath, st.text(alphabet="abc/", max_size=10)),
)
_modern_leaves = st.one_of(
    _portable_leaves,
    st.binary(max_size=20),
    st.complex_numbers(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.datetimes(timezones=st.just(datetime.timezone.utc) | st.none()),
    st.dates(),
    st.times(),
    st.uuids(),
    st.sampled_from(Shade),
)


def _with_value_classes(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(Point, inner, inner),
        st.builds(Slotted, inner, inner),
        st.builds(Factory, inner).flatmap(lambda made: inner.map(lambda extra: _with_extra(made, extra))),
        st.builds(Pair, inner, inner),
    )


def _with_extra(made: Factory, extra: Any) -> Factory:
    made.extra = extra
    return made


def _values(leaves: st.SearchStrategy[Any], modern: bool) -> st.SearchStrategy[Any]:
    hashables = st.recursive(
        leaves,
        lambda inner: st.tuples(inner) | st.tuples(inner, inner) | st.frozensets(inner, max_size=4),
        max_leaves=8,
    )

    def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        kinds = [
            st.lists(inner, max_size=5),
            st.lists(inner, max_size=5).map(tuple),
            st.dictionaries(hashables, inner, max_size=4),
            st.sets(hashables, max_size=4),
            st.dictionaries(st.text(max_size=5), inner, max_size=4).map(collections.OrderedDict),
            st.lists(st.text(max_size=3), max_size=6).map(collections.Counter),
            st.lists(inner, max_size=4).map(lambda items: collections.deque(items, maxlen=6)),
            st.dictionaries(st.text(max_size=5), st.lists(st.integers(), max_size=3), max_size=3).map(
                lambda d: collections.defaultdict(list, d)
            ),
            st.tuples(inner, inner, inner).map(lambda t: slice(*t)),
        ]
        if modern:
            kinds.append(st.binary(max_size=20).map(bytearray))
            kinds.append(_with_value_classes(inner))
        return st.one_of(kinds)

    return st.recursive(hashables, containers, max_leaves=25)


modern_values = _values(_modern_leaves, modern=True)
portable_values = _values(_portable_leaves, modern=False)


def same(a: Any, b: Any) -> bool:
    """Equal, of the same types all the way down (and the same extras where == ignores them)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, collections.defaultdict) and a.default_factory is not b.default_factory:
        return False
    if isinstance(a, collections.deque) and a.maxlen != b.maxlen:
        return False
    if isinstance(a, (list, tuple, collections.deque)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, slice):
        return same(a.start, b.start) and same(a.stop, b.stop) and same(a.step, b.step)
    if isinstance(a, decimal.Decimal):
        return a.as_tuple() == b.as_tuple()
    return bool(a == b)


def checked_load(data: bytes) -> Any:
    """Run ``data`` through the checked machine alone, with the allow-list load_state uses."""

    def find_global(module: str, name: str) -> Any:
        return RESOLVER.find(*unpickler._python3_name(module, name))

    return CheckedUnpickler(data, find_global, lambda pid: pytest.fail("no references here")).load()


def _loads_alike(value: Any, protocol: int) -> None:
    data = pickle.dumps(value, protocol=protocol)
    assert same(pickle.loads(data), value)
    assert same(checked_load(data), value)
    assert same(load_state(data, RESOLVER, [], REFERENCE_GLOBAL), value)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(modern_values, st.integers(3, pickle.HIGHEST_PROTOCOL))
def test_both_machines_load_what_pickle_writes(value: Any, protocol: int) -> None:
    _loads_alike(value, protocol)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(portable_values, st.integers(0, 2))
def test_both_machines_load_legacy_protocols(value: Any, protocol: int) -> None:
    _loads_alike(value, protocol)


def test_shared_and_recursive_references_keep_their_identity() -> None:
    shared = [1, 2]
    cyclic: list[Any] = ["head"]
    cyclic.append(cyclic)
    value = {"a": shared, "b": shared, "cycle": cyclic, "pair": (shared, shared)}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(value, protocol=protocol)
        for loaded in (checked_load(data), load_state(data, RESOLVER, [], REFERENCE_GLOBAL)):
            assert loaded["a"] is loaded["b"] is loaded["pair"][0] is loaded["pair"][1]
            assert loaded["cycle"][1] is loaded["cycle"]


def test_fast_machine_runs_ordinary_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common records never fall back to the slow machine (the speed of every load)."""
    ordinary = [
        {"a": 1, "b": "item 1", "c": 0.5, "d": 1, "e": "x"},
        {"title": "The quick brown fox", "authors": ["Peter Parker"], "price": 12.5},  # has p and r
        {"data": list(range(1000))},
        {"shared": ["x"] * 3, "pairs": [(i, str(i)) for i in range(100)]},
        (b"\x00" * 4096, b"B" * 2048),
        {"long text": "pr" * 5000},
    ]

    def no_checked_machine(*args: Any) -> Any:
        raise AssertionError("went to the checked machine")

    monkeypatch.setattr(unpickler, "CheckedUnpickler", no_checked_machine)
    for value in ordinary:
        assert same(load_state(pickle.dumps(value, protocol=5), RESOLVER, [], REFERENCE_GLOBAL), value)


@pytest.mark.parametrize(
    "value",
    [
        fractions.Fraction(1, 3),
        collections.defaultdict(list),
        collections.Counter("ab"),
        collections.deque([1]),
        [int, str],
        datetime.datetime(2026, 1, 1),
        uuid.UUID(int=5),
        decimal.Decimal("1.5"),
    ],
    ids=repr,
)
def test_standard_values_load_through_either_machine(value: Any) -> None:
    data = pickle.dumps(value, protocol=5)
    assert same(load_state(data, RESOLVER, [], REFERENCE_GLOBAL), value)
    assert same(checked_load(data), value)


# -- what AmberDB's own writer makes -------------------------------------------------------

# Persistent objects a state may refer to: the writer turns each into a reference call.
_REFERRED = [Node(index) for index in range(3)]
for _index, _node in enumerate(_REFERRED):
    _node._p_oid = p64(100 + _index)
_BY_OID = {node._p_oid: node for node in _REFERRED}
_records_with_references = _values(
    st.one_of(_modern_leaves, st.sampled_from(_REFERRED), st.sampled_from([datetime.date, datetime.time])),
    modern=True,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_records_with_references)
def test_every_record_the_writer_makes_loads_back(state: Any) -> None:
    # The family of a CPython regex bug (a capturing group inside a possessive repeat raised
    # SystemError for records with references, an "r" in a string and a memo get): whatever
    # shape the writer gives a state -- references, globals named twice, value classes --
    # the reader's checks and machines load it back.
    writer = ObjectWriter(RESOLVER, lambda obj: obj._p_oid)
    record = writer.serialize_state("tests.models:Node", {"value": state})
    reader = ObjectReader(RESOLVER, lambda oid, name: _BY_OID[oid])
    loaded = reader.state(p64(1), record, reader.header(p64(1), record))
    assert same(loaded, {"value": state})
