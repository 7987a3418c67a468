"""Renaming classes inside records without unpickling them (amberdb.rename)."""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amberdb import Persistent, unpickler
from amberdb.exceptions import RecordDecodeError
from amberdb.persistent import class_name
from amberdb.record import REFERENCE_GLOBAL, decode_header, encode_record, ref
from amberdb.rename import record_globals, rename_in_record
from amberdb.serialize import ClassResolver, ObjectReader, ObjectWriter
from amberdb.utils import Oid, p64

M = __name__


class Value:
    """A plain value object: equal to another of the very same class with equal attributes."""

    def __init__(self, v: Any) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(type(self).__qualname__)

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({self.v!r})"


class Book(Value):
    pass


class Publication(Value):
    pass


class Author(Value):
    pass


class Writer(Value):
    pass


class Outer:
    class Inner(Value):
        pass


class Moved:
    class Inner(Value):
        pass


class Shelf(Persistent):
    pass


class Rack(Persistent):
    pass


class Library:
    class Room(Persistent):
        pass


class Hall(Persistent):
    pass


@dataclass(frozen=True)
class Ghost:
    """What a reference loads as here: its oid and the class name the header gives it."""

    oid: bytes
    name: str


# Old names -> new names; the new names are real classes of this module or names registered
# (for classes of this module) in READER.
RENAMES = {
    f"{M}:Book": "catalog:Publication",
    f"{M}:Author": f"{M}:Writer",
    f"{M}:Outer.Inner": f"{M}:Moved.Inner",
    f"{M}:Shelf": f"{M}:Rack",
    f"{M}:Library.Room": "catalog.rooms:Hall",
}
REGISTERED = {"catalog:Publication": Publication, "catalog.rooms:Hall": Hall}
TARGETS: dict[str, Any] = {
    **REGISTERED,
    f"{M}:Writer": Writer,
    f"{M}:Moved.Inner": Moved.Inner,
    f"{M}:Rack": Rack,
    f"{M}:Book": Book,
    f"{M}:Author": Author,
    f"{M}:Outer.Inner": Outer.Inner,
    f"{M}:Shelf": Shelf,
    f"{M}:Library.Room": Library.Room,
}
RECORD_CLASS = f"{M}:Shelf"
WRITER = ClassResolver(allowed_modules=[M])
READER = ClassResolver(allowed_modules=[M], allowed_classes=REGISTERED)
ZERO = Oid(bytes(8))


_persistent: dict[tuple[type, int], Persistent] = {}


def stored(cls: type[Persistent], key: int) -> Persistent:
    """The one persistent object of ``cls`` numbered ``key`` (its oid follows from both)."""
    obj = _persistent.get((cls, key))
    if obj is None:
        obj = _persistent[(cls, key)] = cls()
        obj.key = key
    return obj


def oid_of(obj: Persistent) -> Oid:
    index = [Shelf, Rack, Library.Room, Hall].index(type(obj))
    return p64(obj.key * 10 + index)


def write(state: Any, record_class: str = RECORD_CLASS) -> bytes:
    """A version 2 record, as a connection writes it."""
    return ObjectWriter(WRITER, oid_of).serialize_state(record_class, state)


def write_v1(state: Any, record_class: str = RECORD_CLASS, protocol: int = 5) -> bytes:
    """A version 1 record: references are calls of the global amberdb.record.ref."""
    refs: list[tuple[Oid, str]] = []

    class V1Pickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, Persistent):
                entry = (oid_of(obj), class_name(type(obj)))
                if entry not in refs:
                    refs.append(entry)
                return ref, (refs.index(entry),)
            return NotImplemented

    buffer = io.BytesIO()
    V1Pickler(buffer, protocol).dump(state)
    return encode_record(record_class, refs, buffer.getvalue())


def load(record: bytes, resolver: ClassResolver = READER) -> Any:
    reader = ObjectReader(resolver, Ghost)
    return reader.state(ZERO, record, reader.header(ZERO, record))


def expected(value: Any, renames: Mapping[str, str]) -> Any:
    """``value`` as a record of it loads after ``renames``: the renamed classes in place."""

    def target(cls: type) -> Any:
        name = class_name(cls)
        return TARGETS[renames[name]] if name in renames else cls

    if isinstance(value, Persistent):
        name = class_name(type(value))
        return Ghost(oid_of(value), renames.get(name, name))
    if isinstance(value, Value):
        return target(type(value))(expected(value.v, renames))
    if isinstance(value, type):
        return target(value)
    if isinstance(value, dict):
        return {expected(k, renames): expected(v, renames) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(expected(item, renames) for item in value)
    return value


def state_of(record: bytes) -> bytes:
    return record[decode_header(record).state_offset :]


def frame_count(record: bytes) -> int:
    return sum(op.name == "FRAME" for op, _, _ in pickletools.genops(state_of(record)))


@pytest.fixture
def no_checked_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if a load falls back to the Python unpickler."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the checked machine ran")

    monkeypatch.setattr(unpickler, "CheckedUnpickler", refuse)


# -- examples -------------------------------------------------------------------------------


def sample_state() -> dict[str, Any]:
    return {
        "book": Book(1),
        "books": [Book(2), Author("x"), Outer.Inner(3)],
        "kinds": (Book, Author, Outer.Inner, Shelf, Library.Room),
        "shelf": stored(Shelf, 1),
        "room": stored(Library.Room, 2),
        "nested": {"author": Author(Book(4)), "set": {Book(5), 7}},
        "rack": stored(Rack, 3),
    }


@pytest.mark.parametrize("writer", [write, write_v1], ids=["v2", "v1"])
def test_rename_values_references_and_header(writer: Any) -> None:
    state = sample_state()
    record = writer(state)
    assert record_globals(record) == {
        f"{M}:{name}" for name in ("Shelf", "Rack", "Library.Room", "Book", "Author", "Outer.Inner")
    }
    assert load(record) == expected(state, {})

    renamed = rename_in_record(record, RENAMES)
    assert renamed is not None
    assert record_globals(renamed) == {
        f"{M}:Rack",
        "catalog.rooms:Hall",
        "catalog:Publication",
        f"{M}:Writer",
        f"{M}:Moved.Inner",
    }
    header = decode_header(renamed)
    assert header.class_name == f"{M}:Rack"
    assert header.version == decode_header(record).version
    # Shelf and Rack merged into one class-table entry; the references keep oids and order.
    assert [oid for oid, _ in header.refs] == [oid for oid, _ in decode_header(record).refs]
    assert {name for _, name in header.refs} == {f"{M}:Rack", "catalog.rooms:Hall"}
    assert renamed.count(f"{M}:Rack".encode()) == 2  # the record's class and one table entry
    assert load(renamed) == expected(state, RENAMES)
    assert ObjectReader(READER, Ghost).record_class(ZERO, header) is Rack


def test_written_records_stay_on_the_fast_path(no_checked_machine: None) -> None:
    state = {"book": Book(1), "kinds": [Author, Outer.Inner], "ref": stored(Shelf, 1), "pr": "pr"}
    record = write(state)
    assert unpickler._ordinary(state_of(record))
    renamed = rename_in_record(record, RENAMES)
    assert renamed is not None
    # One frame ending with the data, ordinary opcodes: the regular expression's path.
    assert unpickler._ordinary(state_of(renamed))
    assert load(renamed) == expected(state, RENAMES)
    twice = rename_in_record(renamed, {v: k for k, v in RENAMES.items()})
    assert twice is not None and unpickler._ordinary(state_of(twice))
    assert load(twice, WRITER) == expected(state, {})


def test_renaming_back_and_forth_does_not_grow() -> None:
    record = write({"a": Book(1), "b": Author(2)})
    there = rename_in_record(record, RENAMES)
    assert there is not None
    back = rename_in_record(there, {v: k for k, v in RENAMES.items()})
    assert back is not None
    again = rename_in_record(back, RENAMES)
    assert again is not None
    # The first rename inserts POP POP and two pushes; later ones rewrite those pushes.
    assert len(again) == len(there)
    assert load(again) == load(there)


@pytest.mark.parametrize("data_first", [True, False])
def test_memoized_module_string_keeps_its_data_value(data_first: bool) -> None:
    items: list[tuple[str, Any]] = [("module", M), ("qualname", "Book"), ("book", Book(1))]
    state = dict(items if data_first else items[::-1])
    record = write(state)
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(state_of(record))]
    # The strings are shared: one of the two uses fetches them from the memo.
    assert sum(name == "SHORT_BINUNICODE" and arg == M for name, arg in ops) == 1
    assert sum(name == "BINGET" for name, _ in ops) >= 2
    renamed = rename_in_record(record, {f"{M}:Book": "catalog:Publication"})
    assert renamed is not None
    loaded = load(renamed)
    assert loaded == {"module": M, "qualname": "Book", "book": Publication(1)}
    assert list(loaded) == list(state)


def test_swapping_two_names() -> None:
    state = [Book(1), Author(2), Book, Author]
    renamed = rename_in_record(write(state), {f"{M}:Book": f"{M}:Author", f"{M}:Author": f"{M}:Book"})
    assert renamed is not None
    assert load(renamed) == [Author(1), Book(2), Author, Book]


def test_unrelated_and_empty_renames_return_none() -> None:
    record = write(sample_state())
    assert rename_in_record(record, {"elsewhere:Thing": "catalog:Thing"}) is None
    assert rename_in_record(record, {}) is None
    assert rename_in_record(record, {f"{M}:Book": f"{M}:Book"}) is None
    assert rename_in_record(write({"plain": [1, "Book", M]}, f"{M}:Hall"), RENAMES) is None


def test_header_only_rename() -> None:
    record = write({"x": 1, "r": stored(Library.Room, 5)}, record_class=f"{M}:Library.Room")
    renamed = rename_in_record(record, {f"{M}:Library.Room": "catalog.rooms:Hall"})
    assert renamed is not None
    assert state_of(renamed) == state_of(record)
    header = decode_header(renamed)
    assert header.class_name == "catalog.rooms:Hall"
    assert header.refs == [(oid_of(stored(Library.Room, 5)), "catalog.rooms:Hall")]


@pytest.mark.parametrize(
    "renames",
    [
        {"Book": "catalog:Book"},
        {f"{M}:Book": "catalog:"},
        {f"{M}:Book": ":Book"},
        {f"{M}:Book": "cata\nlog:Book"},
        {f"{M}:Book": "catalog:\ud800"},
        {f"{M}:Book": "catalog:" + "x" * 70000},
        {":".join(REFERENCE_GLOBAL): "elsewhere:ref"},
    ],
)
def test_malformed_renames_are_refused(renames: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        rename_in_record(write({"a": Book(1)}), renames)


def test_long_names_and_non_ascii_names() -> None:
    long_name = "catalog:" + "Publication" * 30  # more than 255 bytes: BINUNICODE
    resolver = ClassResolver(
        allowed_modules=[M], allowed_classes={long_name: Publication, "katalog:Büch": Writer}
    )
    record = write({"a": Book(1), "b": Author(2)})
    renamed = rename_in_record(record, {f"{M}:Book": long_name, f"{M}:Author": "katalog:Büch"})
    assert renamed is not None
    assert record_globals(renamed) == {RECORD_CLASS, long_name, "katalog:Büch"}
    assert load(renamed, resolver) == {"a": Publication(1), "b": Writer(2)}


# -- legacy protocols: GLOBAL, INST, OBJ ------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, 2, 3])
def test_legacy_protocols_rewrite_global_arguments(protocol: int) -> None:
    # Instances need NEWOBJ (protocol 2 on): before it they pickle through copyreg, which no
    # record may name; nested classes need STACK_GLOBAL (protocol 4).
    state: dict[str, Any] = {"kinds": [Author, Book], "r": stored(Shelf, 1)}
    if protocol >= 2:
        state["book"] = Book(1)
    record = write_v1(state, protocol=protocol)
    assert f"{M}:Book" in record_globals(record)
    renamed = rename_in_record(record, RENAMES)
    assert renamed is not None
    assert f"{M}:Book" not in record_globals(renamed)
    assert load(renamed) == expected(state, RENAMES)


def protocol0(body: str) -> bytes:
    return encode_record(RECORD_CLASS, [], body.encode("latin-1"))


def test_inst_and_obj() -> None:
    # INST: the class in its argument; OBJ: the class a GLOBAL pushed after the MARK.
    inst = protocol0(f"(i{M}\nBook\n(dVv\nI7\nsb.")
    obj = protocol0(f"(c{M}\nAuthor\no(dVv\nI8\nsb.")
    assert load(inst, WRITER) == Book(7) and load(obj, WRITER) == Author(8)
    assert record_globals(inst) == {RECORD_CLASS, f"{M}:Book"}
    assert record_globals(obj) == {RECORD_CLASS, f"{M}:Author"}
    new_inst = rename_in_record(inst, RENAMES)
    new_obj = rename_in_record(obj, RENAMES)
    assert new_inst is not None and new_obj is not None
    assert load(new_inst) == Publication(7) and load(new_obj) == Writer(8)
    with pytest.raises(ValueError, match="INST"):
        rename_in_record(inst, {f"{M}:Book": "katalog:Büch"})


def test_names_from_legacy_string_opcodes() -> None:
    # STACK_GLOBAL's names pushed by STRING, BINUNICODE and fetched with GET.
    record = protocol0(f"S'{M}'\np0\n0V{M}\ng0\nX\x04\x00\x00\x00Book\x93.")
    assert record_globals(record) == {RECORD_CLASS, f"{M}:Book"}
    renamed = rename_in_record(record, RENAMES)
    assert renamed is not None
    assert load(renamed) is Publication


def test_the_reference_global_is_not_reported() -> None:
    record = write_v1({"r": stored(Shelf, 1)})
    assert b"amberdb.record" in record
    assert record_globals(record) == {RECORD_CLASS}


def test_names_that_cannot_be_told_are_refused() -> None:
    # The module name is built by a call: only running the record would tell it.
    record = protocol0(f"cbuiltins\nstr\n(V{M}\ntRVBook\n\x93.")
    assert load(record, WRITER) is Book
    with pytest.raises(RecordDecodeError, match="cannot be told"):
        record_globals(record)


# -- big states: several frames -----------------------------------------------------------------


def big_state() -> dict[str, Any]:
    rows = [{"n": i, "text": f"{i:06d}" * 8, "book": Book(i) if i % 1000 == 0 else i} for i in range(3000)]
    return {"rows": rows, "kinds": [Book, Author], "blob": b"y" * 100_000, "last": Author(M)}


@pytest.mark.parametrize("writer", [write, write_v1], ids=["v2", "v1"])
def test_big_states_keep_their_frames_valid(writer: Any) -> None:
    state = big_state()
    record = writer(state)
    assert len(record) > 200_000
    assert frame_count(record) >= 3
    renamed = rename_in_record(record, RENAMES)
    assert renamed is not None
    assert frame_count(renamed) == frame_count(record)
    assert load(renamed) == expected(state, RENAMES)
    assert record_globals(renamed) == {f"{M}:Rack", "catalog:Publication", f"{M}:Writer"}


def test_plain_pickle_wrapped_as_a_record() -> None:
    state = [Book(i) if i % 5000 == 0 else ("k", i) for i in range(30_000)] + [Outer.Inner]
    data = pickle.dumps(state, protocol=5)
    record = encode_record(RECORD_CLASS, [], data)
    assert frame_count(record) >= 2
    renamed = rename_in_record(record, RENAMES)
    assert renamed is not None
    loaded = load(renamed)
    assert loaded == expected(state, RENAMES)


# -- hypothesis: random states ----------------------------------------------------------------

PLAIN = [Book, Author, Outer.Inner]
NAME_STRINGS = [M, "Book", "Author", "Outer.Inner", "Inner", "Outer", "catalog", "Publication", "Shelf"]

texts = st.sampled_from(NAME_STRINGS) | st.text(max_size=6)
keys = st.integers(-1000, 1000) | texts | st.builds(lambda c, v: c(v), st.sampled_from(PLAIN), texts)
leaves = (
    st.integers(-(2**70), 2**70)
    | texts
    | st.builds(lambda c, v: c(v), st.sampled_from(PLAIN), st.integers(0, 3) | texts)
    | st.sampled_from([*PLAIN, Shelf, Library.Room])
    | st.builds(stored, st.sampled_from([Shelf, Rack, Library.Room]), st.integers(1, 4))
)
states = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(keys, inner, max_size=4)
        | st.sets(keys, max_size=3)
        | st.builds(lambda c, v: c(v), st.sampled_from(PLAIN), inner)
    ),
    max_leaves=25,
)
rename_subsets = st.sets(st.sampled_from(sorted(RENAMES))).map(lambda olds: {o: RENAMES[o] for o in olds})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=states, renames=rename_subsets, v1=st.booleans())
def test_random_states(state: Any, renames: dict[str, str], v1: bool) -> None:
    record = write_v1({"s": state}) if v1 else write({"s": state})
    before = record_globals(record)
    renamed = rename_in_record(record, renames)
    if not before & set(renames):
        assert renamed is None
        return
    assert renamed is not None
    assert load(renamed) == {"s": expected(state, renames)}
    assert record_globals(renamed) == {renames.get(name, name) for name in before}
    if before & set(renames.values()):
        return  # Shelf renamed to Rack with Racks already there: renaming back cannot tell them apart
    back = rename_in_record(renamed, {new: old for old, new in renames.items()})
    assert back is not None
    assert load(back, WRITER) == {"s": expected(state, {})}


# -- hostile input ----------------------------------------------------------------------------


def canonical(value: Any, classes: Mapping[str, str], refs: Mapping[str, str]) -> Any:
    """A comparable form of a loaded state: NaN-safe, cycle-safe, class names mapped through
    ``classes`` and reference class names through ``refs``."""
    seen: set[int] = set()  # containers being walked: a damaged record can build cycles

    def walk(value: Any) -> Any:
        if isinstance(value, type):
            name = class_name(value)
            return ("class", classes.get(name, name))
        if isinstance(value, Ghost):
            return ("ghost", value.oid, refs.get(value.name, value.name))
        if isinstance(value, float):
            return ("float", "nan" if math.isnan(value) else value)
        if isinstance(value, (int, str, bytes, bytearray, type(None))):
            return value
        if id(value) in seen:
            return ("cycle",)
        seen.add(id(value))
        try:
            if isinstance(value, (Value, Persistent)):
                name = class_name(type(value))
                return ("object", classes.get(name, name), walk(getattr(value, "__dict__", None)))
            if isinstance(value, dict):
                return ("dict", [(walk(k), walk(v)) for k, v in value.items()])
            if isinstance(value, (list, tuple)):
                return (type(value).__name__, [walk(item) for item in value])
            if isinstance(value, (set, frozenset)):
                return (type(value).__name__, sorted(repr(walk(item)) for item in value))
            return ("other", type(value).__qualname__)
        finally:
            seen.discard(id(value))

    return walk(value)


# The classes a record's objects load as after RENAMES, by the names they had before.
OBJECT_RENAMES = {old: class_name(TARGETS[new]) for old, new in RENAMES.items()}


def outcome(record: bytes, resolver: ClassResolver) -> tuple[bool, Any]:
    try:
        return True, load(record, resolver)
    except Exception as exc:  # any load failure: only that it failed is compared
        return False, type(exc)


def check_hostile(record: bytes) -> None:
    """Either RecordDecodeError, or a result that loads as the original would."""
    try:
        names = record_globals(record)
    except RecordDecodeError:
        names = None
    try:
        renamed = rename_in_record(record, RENAMES)
    except RecordDecodeError:
        assert names is None
        return
    assert names is not None
    if renamed is None:
        assert not names & set(RENAMES)
        return
    assert record_globals(renamed) == {RENAMES.get(name, name) for name in names}
    ok_before, before = outcome(record, READER)
    ok_after, after = outcome(renamed, READER)
    assert ok_before == ok_after, (before, after)
    if ok_before:
        assert canonical(before, OBJECT_RENAMES, RENAMES) == canonical(after, {}, {})


def hostile_samples() -> Iterator[bytes]:
    yield write({"b": Book(1), "k": Author, "r": stored(Shelf, 1), "m": M})
    yield write_v1([Outer.Inner(2), stored(Library.Room, 1)])
    yield write_v1({"b": Book(3)}, protocol=2)
    yield protocol0(f"(i{M}\nBook\n(dVv\nI7\nsb.")


@pytest.mark.parametrize("record", list(hostile_samples()), ids=["v2", "v1", "protocol2", "inst"])
def test_every_truncation_and_byte_change(record: bytes) -> None:
    for end in range(len(record)):
        check_hostile(record[:end])
    mutable = bytearray(record)
    for position in range(len(record)):
        original = mutable[position]
        for value in range(256):
            if value != original:
                mutable[position] = value
                check_hostile(bytes(mutable))
        mutable[position] = original


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300), version=st.sampled_from([1, 2]))
def test_random_bytes_after_a_valid_header(data: bytes, version: int) -> None:
    check_hostile(encode_record(RECORD_CLASS, [], data, reference_in_memo=version == 2))
    check_hostile(data)


OPCODE_BYTES = [op.code.encode("latin-1") for op in pickletools.opcodes]


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from(OPCODE_BYTES) | st.binary(max_size=3), max_size=60))
def test_random_opcode_soup(data: list[bytes]) -> None:
    check_hostile(encode_record(RECORD_CLASS, [], pickle.PROTO + b"\x05" + b"".join(data) + pickle.STOP))


@pytest.mark.parametrize(
    "body",
    [
        pickle.MARK * 200_000 + pickle.NONE + pickle.STOP,
        pickle.EMPTY_LIST + (pickle.MARK + pickle.NONE * 3 + pickle.APPENDS) * 50_000 + pickle.STOP,
        pickle.NONE + pickle.DUP * 200_000 + pickle.STOP,
        pickle.NONE + pickle.MEMOIZE * 200_000 + pickle.STOP,
        b"S'" + b"\\x41" * 200_000 + b"'\n.",
        b"V" + b"x" * 1_000_000,  # a line without its end
        b"B\xff\xff\xff\x7f" + b"x" * 100,  # a length far past the data
        b"\x95" + (2**63).to_bytes(8, "little") + b"N.",
    ],
)
def test_big_hostile_records_take_linear_time(body: bytes) -> None:
    record = encode_record(RECORD_CLASS, [], body)
    started = time.perf_counter()
    try:
        record_globals(record)
        rename_in_record(record, RENAMES)
    except RecordDecodeError:
        pass
    # Seconds even on a busy machine; anything quadratic in these sizes would take hours.
    assert time.perf_counter() - started < 30


def test_random_damage_to_a_big_record() -> None:
    record = write(big_state())
    rng = random.Random(5)
    for _ in range(10):
        damaged = bytearray(record)
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        check_hostile(bytes(damaged))


def test_extension_codes_are_refused() -> None:
    record = protocol0("\x82\x01.")
    with pytest.raises(RecordDecodeError, match="extension codes"):
        record_globals(record)
    with pytest.raises(RecordDecodeError):
        load(record)
