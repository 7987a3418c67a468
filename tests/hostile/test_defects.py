"""Loading hostile records: each defect found by trying, as a test that fails on the old code.

Import checks run in a fresh process (this one has imported half the standard library by
the time they run); the rest load through a real database and connection.
"""

from __future__ import annotations

import collections
import copyreg
import dataclasses
import enum
import json
import pickle
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.exceptions import DatabaseError, RecordDecodeError, SerializationError, UnsafeGlobalError
from amberdb.persistent import class_name
from amberdb.record import encode_record
from amberdb.storage.base import TransactionMeta
from amberdb.utils import p64, z64
from tests.hostile import sentinels
from tests.hostile.assemble import call, data, framed, name, number, op, program, text
from tests.models import Book

ROOT = Path(__file__).resolve().parents[2]
BOOK = class_name(Book)
OID = p64(0x42)


def store_raw(db: amberdb.DB, oid: bytes, record: bytes) -> None:
    """Write ``record`` under ``oid`` behind the object layer's back, as a tampered file would."""
    storage = db.storage
    try:
        base = storage.load(oid)[1]
    except KeyError:
        base = z64
    storage.begin(TransactionMeta(description="tampering"))
    storage.store(oid, base, record)
    storage.vote()
    storage.finish()


def book_record(state: bytes, refs: list[tuple[bytes, str]] | None = None, cls: str = BOOK) -> bytes:
    """A record of class ``cls`` whose pickled state is ``state``."""
    return encode_record(cls, refs or [], state)


def load_fails(db: amberdb.DB, oid: bytes = OID) -> DatabaseError:
    """Load ``oid`` on a fresh connection; the DatabaseError it raises (naming the oid)."""
    conn = db.open(transaction.TransactionManager())
    try:
        with pytest.raises(DatabaseError) as caught:
            conn.get(oid)._p_activate()
    finally:
        conn.close()
    assert f"oid {hex(int.from_bytes(oid, 'big'))}" in str(caught.value)
    return caught.value


@pytest.fixture(autouse=True)
def _no_sentinel_calls() -> Iterator[None]:
    sentinels.CALLS.clear()
    yield
    assert sentinels.CALLS == [], "a hostile record ran code it had no right to"


# -- imports -------------------------------------------------------------------------------

_LOADER = textwrap.dedent(
    """
    import json, sys
    import amberdb, amberdb.transaction as transaction
    import tests.models
    db = amberdb.DB(sys.argv[1])
    root = db.open().root()
    root["pending"] = "uncommitted"        # must stay uncommitted whatever the load does
    before = set(sys.modules)
    argv = list(sys.argv)
    conn = db.open(transaction.TransactionManager())
    try:
        conn.get(bytes.fromhex(sys.argv[2]))._p_activate()
        error = None
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    transaction.abort()
    print(json.dumps({"error": error, "new_modules": sorted(set(sys.modules) - before),
                      "argv_unchanged": sys.argv == argv}))
    """
)


def load_in_fresh_process(path: Path, oid: bytes = OID) -> dict[str, Any]:
    """Load ``oid`` from the file database at ``path`` in a new interpreter; what happened."""
    done = subprocess.run(
        [sys.executable, "-c", _LOADER, str(path), oid.hex()],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def file_db_with(path: Path, record: bytes) -> None:
    with amberdb.DB(str(path)) as db:
        store_raw(db, OID, record)


@pytest.mark.parametrize(
    ("where", "record"),
    [
        ("record class", book_record(program(op("EMPTY_DICT")), cls="amberdb.demo.__main__:Book")),
        ("reference class", book_record(program(op("EMPTY_DICT")), [(p64(7), "amberdb.demo.__main__:Book")])),
        ("global in the state", book_record(program(call("amberdb.demo.__main__", "main")))),
        ("allowed module's __main__", book_record(program(name("tests.__main__", "x")))),
    ],
    ids=["record-class", "reference-class", "global", "allowed-module-main"],
)
def test_record_naming_a_main_module_imports_nothing_and_runs_nothing(
    tmp_path: Path, where: str, record: bytes
) -> None:
    path = tmp_path / "data.fs"
    file_db_with(path, record)
    outcome = load_in_fresh_process(path)
    if where in ("record class", "reference class"):
        # A class that cannot be loaded makes a broken object (amberdb.broken), nothing else.
        assert outcome["error"] is None, where
    else:
        assert outcome["error"] is not None and "UnsafeGlobalError" in outcome["error"], where
        assert "__main__" in outcome["error"]
    assert outcome["new_modules"] == []
    assert outcome["argv_unchanged"]
    with amberdb.DB(str(path), read_only=True) as db:
        conn = db.open(transaction.TransactionManager())
        assert "pending" not in conn.root()  # the host's uncommitted change stayed so
        conn.close()


def test_main_module_is_never_imported_even_inside_allowed_modules(db: amberdb.DB) -> None:
    resolver = amberdb.DB(None, allowed_modules=["amberdb", "tests"])._resolver
    for module in ("amberdb.demo.__main__", "tests.__main__", "tests.hostile.__main__"):
        with pytest.raises(UnsafeGlobalError):
            resolver.find(module, "main")
        assert module not in sys.modules


@pytest.mark.parametrize(
    ("what", "state"),
    [
        ("idna codec", program(call("builtins", "str", data(b"xn--bcher-kva"), text("idna")))),
        ("codec via bytes", program(call("builtins", "bytes", text("abc"), text("punycode")))),
        ("module never imported", program(call("tests.hostile.never_imported", "anything"))),
    ],
    ids=["idna", "punycode", "never-imported"],
)
def test_loading_imports_no_module(tmp_path: Path, what: str, state: bytes) -> None:
    path = tmp_path / "data.fs"
    file_db_with(path, book_record(state))
    outcome = load_in_fresh_process(path)
    assert outcome["error"] is not None, what
    assert outcome["new_modules"] == [], what


def test_amberdb_btrees_load_without_the_application_importing_them(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    script = (
        "from amberdb.btrees import OOBTree; import amberdb, amberdb.transaction as t\n"
        f"c = amberdb.connection({str(path)!r}); c.root.tree = OOBTree({{'a': 1}}); t.commit(); c.close()"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)
    check = "import amberdb, sys; c = amberdb.connection(sys.argv[1]); print(dict(c.root.tree))"
    done = subprocess.run(
        [sys.executable, "-c", check, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.stdout.strip() == "{'a': 1}", done.stderr


# -- extension codes -----------------------------------------------------------------------


@pytest.fixture
def sentinel_extension() -> Iterator[int]:
    """The sentinel registered as a copyreg extension, already resolved once (so cached)."""
    code = 0x7ABC
    copyreg.add_extension(sentinels.__name__, "sentinel", code)
    try:
        assert pickle.loads(b"\x80\x02\x83" + code.to_bytes(2, "little") + b".") is sentinels.sentinel
        yield code
    finally:
        copyreg.remove_extension(sentinels.__name__, "sentinel", code)


@pytest.mark.parametrize("opcode", ["EXT1", "EXT2", "EXT4"])
def test_extension_codes_are_refused_even_when_cached(db: amberdb.DB, opcode: str) -> None:
    copyreg.add_extension(sentinels.__name__, "SentinelClass", 0x7F)
    try:
        pickle.loads(b"\x80\x02\x82\x7f.")  # the cache now holds it
        size = {"EXT1": 1, "EXT2": 2, "EXT4": 4}[opcode]
        state = program(op(opcode, (0x7F).to_bytes(size, "little")), op("EMPTY_TUPLE"), op("REDUCE"))
        store_raw(db, OID, book_record(state))
        error = load_fails(db)
        assert "extension code" in str(error)
    finally:
        copyreg.remove_extension(sentinels.__name__, "SentinelClass", 0x7F)


def test_extension_code_of_a_dangerous_function_runs_nothing(db: amberdb.DB, sentinel_extension: int) -> None:
    code = sentinel_extension.to_bytes(2, "little")
    state = program(op("EXT2", code), text("rm -rf /"), op("TUPLE1"), op("REDUCE"))
    store_raw(db, OID, book_record(state))
    load_fails(db)


def test_writer_refuses_what_would_need_an_extension_code(conn: amberdb.Connection) -> None:
    copyreg.add_extension(sentinels.__name__, "sentinel", 0x7ABD)
    try:
        conn.root.book = book = Book("x")
        book.hook = sentinels.sentinel
        with pytest.raises(SerializationError, match=r"copyreg\.add_extension.*attribute 'hook'|hook"):
            transaction.commit()
    finally:
        transaction.abort()
        copyreg.remove_extension(sentinels.__name__, "sentinel", 0x7ABD)


# -- resource bombs ------------------------------------------------------------------------

MEMORY_LIMIT = 32 << 20

HUGE_RANGE = call("builtins", "range", number(10**10))
HUGE_DECIMAL = call("decimal", "Decimal", text("1e100000000"))
DEEP_TUPLE = op("NONE") + op("TUPLE1") * 500_000
MEGABYTE_INTEGER = number((1 << (8 << 20)) - 3)  # unguarded, each call below takes minutes

BOMBS = {
    "Fraction with a huge exponent": program(call("fractions", "Fraction", text("1e100000000"))),
    "Fraction of a huge Decimal": program(call("fractions", "Fraction", HUGE_DECIMAL)),
    "int of a huge Decimal": program(call("builtins", "int", HUGE_DECIMAL)),
    "Fraction of two megabyte integers": program(
        call("fractions", "Fraction", MEGABYTE_INTEGER, number((1 << (8 << 20)) - 1))
    ),
    "Decimal of a megabyte integer": program(call("decimal", "Decimal", MEGABYTE_INTEGER)),
    "Decimal of a megabyte integer, framed as the writer does": framed(
        call("decimal", "Decimal", MEGABYTE_INTEGER)
    ),
    "bytearray(10**9)": program(call("builtins", "bytearray", number(10**9))),
    "bytes(10**9)": program(call("builtins", "bytes", number(10**9))),
    "list(range(10**10))": program(call("builtins", "list", HUGE_RANGE)),
    "tuple(range(10**10))": program(call("builtins", "tuple", HUGE_RANGE)),
    "frozenset(range(10**10))": program(call("builtins", "frozenset", HUGE_RANGE)),
    "Counter(range(10**10))": program(call("collections", "Counter", HUGE_RANGE)),
    "deque(range(10**10))": program(call("collections", "deque", HUGE_RANGE)),
    "NEWOBJ tuple of a range": program(name("builtins", "tuple"), HUGE_RANGE, op("TUPLE1"), op("NEWOBJ")),
    "LONG_BINPUT 2**26": program(op("NONE"), op("LONG_BINPUT", (2**26).to_bytes(4, "little"))),
    "LONG_BINPUT 2**32-1": program(op("NONE"), op("LONG_BINPUT", (2**32 - 1).to_bytes(4, "little"))),
    "PUT 2**26": b"(N" + b"p67108864\n.",
    "BINBYTES of 2**31 bytes": program(op("BINBYTES", (2**31).to_bytes(4, "little") + b"abc")),
    "BYTEARRAY8 of 10**9 bytes": program(op("BYTEARRAY8", (10**9).to_bytes(8, "little") + b"abc")),
    "BINBYTES8 of 10**9 bytes": program(op("BINBYTES8", (10**9).to_bytes(8, "little") + b"abc")),
    "FRAME of 2**62 bytes": b"\x80\x05\x95" + (2**62).to_bytes(8, "little") + b"N.",
    # An argument running past the end of its frame: older C unpicklers read it from after the
    # frame, so the LONG_BINPUT a walk in byte order sees as bytes data is what they run.
    "LONG_BINPUT hidden by a frame": b"\x80\x05\x95\x05\x00\x00\x00\x00\x00\x00\x00NC\x05ZZQQQC\x08r"
    + (2**26).to_bytes(4, "little")
    + b"0N..",
    "500,000-deep tuple as a dict key": program(op("EMPTY_DICT"), DEEP_TUPLE, op("NONE"), op("SETITEM")),
    "500,000-deep tuple in a frozenset": program(op("MARK"), DEEP_TUPLE, op("FROZENSET")),
    "5,000-deep tuple(list) calls as a dict key": program(
        op("EMPTY_DICT"),
        (name("builtins", "tuple") + op("EMPTY_LIST")) * 5000,
        op("NONE"),
        (op("APPEND") + op("TUPLE1") + op("REDUCE")) * 5000,
        op("NONE"),
        op("SETITEM"),
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_resource_bomb_fails_quickly_in_bounded_memory_naming_the_oid(db: amberdb.DB, bomb: str) -> None:
    store_raw(db, OID, book_record(BOMBS[bomb]))
    tracemalloc.start()
    try:
        error = load_fails(db)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{bomb}: {peak / 1e6:.0f} MB"
    assert isinstance(error, (RecordDecodeError, UnsafeGlobalError))
    assert BOOK.replace(":", ".") in str(error)


def test_nesting_within_the_limit_loads(db: amberdb.DB) -> None:
    deep: Any = "leaf"
    for _ in range(900):
        deep = (deep,)
    store_raw(db, OID, book_record(pickle.dumps({"deep": deep, "key": {deep: 1}}, protocol=5)))
    conn = db.open(transaction.TransactionManager())
    loaded = conn.get(OID)
    assert loaded.deep == deep and loaded.key == {deep: 1}
    conn.close()


def test_standard_constructors_still_load_what_their_pickling_writes(db: amberdb.DB) -> None:
    import collections
    import fractions

    values = {
        "fraction": fractions.Fraction(-22, 7),
        "counter": collections.Counter("abracadabra"),
        "deque": collections.deque([1, 2, 3], maxlen=5),
        "lists": collections.defaultdict(list, {"a": [1]}),
        "sets": collections.defaultdict(set),
        "types": [int, str, bytes, frozenset, tuple],
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        store_raw(db, OID, book_record(pickle.dumps(values, protocol=protocol)))
        conn = db.open(transaction.TransactionManager())
        book = conn.get(OID)
        book._p_activate()  # the pooled connection's copy was invalidated: a ghost now
        loaded = book.__dict__
        assert loaded == values, protocol
        assert loaded["lists"].default_factory is list and loaded["deque"].maxlen == 5
        conn.close()


# -- the allow-list --------------------------------------------------------------------------


def test_allowed_module_does_not_reach_what_it_imported(db: amberdb.DB) -> None:
    """``allowed_modules=["tests"]`` allows what tests define, not ``os.system`` via ``tests.x.os``."""
    allowed = amberdb.DB(None, allowed_modules=["tests"])
    for module, qualname in [
        ("tests.hostile.test_defects", "subprocess.run"),  # a module this one imported
        ("tests.hostile.test_defects", "pickle.loads"),
        ("tests.hostile.test_defects", "Book.__init__.__globals__"),  # dunder paths lead anywhere
        ("tests.hostile.test_defects", "__builtins__"),
        ("tests.hostile.sentinels", "Any"),  # typing.Any, imported there
    ]:
        with pytest.raises(UnsafeGlobalError):
            allowed._resolver.find(module, qualname)
    assert allowed._resolver.find("tests.hostile.sentinels", "sentinel") is sentinels.sentinel
    allowed.close()


def test_every_amberdb_persistent_class_loads_without_importing_its_module_first() -> None:
    """The own modules a load may import are exactly those defining AmberDB's persistent classes."""
    import amberdb.btrees
    from amberdb import serialize
    from amberdb.persistent import Persistent

    defined = {
        cls.__module__
        for cls in _subclasses(Persistent)
        # The demo's and the conformance kit's classes are allow-listed by who uses them.
        if cls.__module__.startswith("amberdb.")
        and not cls.__module__.startswith(("amberdb.demo", "amberdb.testing"))
        and not issubclass(cls, amberdb.Broken)  # stand-ins made for missing classes
    }
    assert defined <= serialize._LOADABLE_OWN_MODULES


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


# -- conflict resolution reads states too ----------------------------------------------------


class Tally(amberdb.Persistent):
    """A counter whose concurrent increments merge."""

    def __init__(self) -> None:
        self.count = 0

    def _p_resolveConflict(self, old: Any, saved: Any, new: Any) -> Any:
        return {**new, "count": saved["count"] + new["count"] - old["count"]}


RESOLUTION_BOMBS = ["bytearray(10**9)", "LONG_BINPUT 2**26", "500,000-deep tuple as a dict key"]


@pytest.mark.parametrize("bomb", RESOLUTION_BOMBS)
def test_conflict_resolution_reads_hostile_states_as_safely_as_loads(
    db: amberdb.DB, sentinel_extension: int, bomb: str
) -> None:
    writer = db.open(transaction.TransactionManager())
    writer.root()["tally"] = Tally()
    writer.transaction_manager.commit()
    oid = writer.root()["tally"]._p_oid
    reader = db.open(transaction.TransactionManager())
    tally = reader.root()["tally"]
    assert tally.count == 0
    store_raw(db, oid, encode_record(class_name(Tally), [], BOMBS[bomb]))  # what "saved" will be
    tally.count += 1
    tracemalloc.start()
    try:
        with pytest.raises(amberdb.ConflictError, match="cannot be read for resolution"):
            reader.transaction_manager.commit()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        reader.transaction_manager.abort()
    assert peak < MEMORY_LIMIT
    reader.close()
    writer.close()


# -- references do not count as nesting; what only looks like them does -------------------


def test_many_references_load_on_the_fast_machine(db: amberdb.DB, monkeypatch: pytest.MonkeyPatch) -> None:
    from amberdb import unpickler
    from amberdb.btrees import OOBTree

    conn = db.open(transaction.TransactionManager())
    conn.root()["books"] = amberdb.PersistentList(Book(f"b{i}") for i in range(5000))
    conn.root()["tree"] = tree = OOBTree()
    for i in range(3000):
        tree[f"k{i:05}"] = Book(f"t{i}")
    conn.transaction_manager.commit()
    conn.close()

    def no_checked_machine(*args: Any) -> Any:
        raise AssertionError("a record of references went to the checked machine")

    monkeypatch.setattr(unpickler, "CheckedUnpickler", no_checked_machine)
    reader = db.open(transaction.TransactionManager())
    assert [book.title for book in reader.root()["books"]][-1] == "b4999"
    assert reader.root()["tree"]["k02999"].title == "t2999"
    reader.close()


@pytest.mark.parametrize("decoys", [False, True], ids=["plain", "with-reference-lookalikes"])
def test_deep_nesting_is_refused_even_among_reference_lookalikes(db: amberdb.DB, decoys: bool) -> None:
    """Bytes that look like reference calls inside string arguments must not hide real nesting."""
    depth = 3000
    lookalike = op("SHORT_BINBYTES", b"\x07h\x00K\x00\x85\x94R") + op("POP") if decoys else b""
    body = (
        name("builtins", "slice")
        + op("MEMOIZE")  # memo 1 (0 holds the reference function)
        + op("POP")
        + op("BINGET", b"\x01") * depth
        + op("NONE")
        + (op("TUPLE1") + op("REDUCE") + lookalike) * depth
        + op("STOP")
    )
    state = b"\x80\x05\x95" + len(body).to_bytes(8, "little") + body
    store_raw(db, OID, encode_record(BOOK, [(p64(7), BOOK)], state, reference_in_memo=True))
    error = load_fails(db)
    assert "nested more than 1000" in str(error)


Pair = collections.namedtuple("Pair", "a b")


def test_deep_namedtuples_built_from_keyword_arguments_are_refused() -> None:
    """NEWOBJ_EX builds a tuple (subclass) from keyword arguments, with no TUPLE opcode."""
    db = amberdb.DB(None, allowed_classes=[Pair])
    depth = 3000
    body = (
        name(__name__, "Pair")
        + op("MEMOIZE")  # memo 1
        + op("POP")
        + (op("BINGET", b"\x01") + op("EMPTY_TUPLE") + op("EMPTY_DICT") + text("a")) * depth
        + op("NONE")
        + (op("SETITEM") + text("b") + op("NONE") + op("SETITEM") + op("NEWOBJ_EX")) * depth
        + op("STOP")
    )
    state = b"\x80\x05\x95" + len(body).to_bytes(8, "little") + body
    store_raw(db, OID, encode_record(BOOK, [], state, reference_in_memo=True))
    assert "nested more than 1000" in str(load_fails(db))
    db.close()


Wrap = collections.namedtuple("Wrap", "x")


def test_reference_call_lookalikes_after_a_pop_do_not_hide_nesting() -> None:
    """The bytes of a reference call, entered after a POP: their TUPLE1 wraps what lay below."""
    db = amberdb.DB(None, allowed_classes=[Wrap])
    depth = 3000
    level = op("SHORT_BINBYTES", b"\x03h\x00K") + op("POP") + op("TUPLE1") + op("MEMOIZE")
    level += op("REDUCE") + op("MEMOIZE")  # Wrap(whatever lay below the bytes)
    assert b"h\x00K0\x85\x94R\x94" in level  # what a reference call looks like, misread
    body = (
        op("EMPTY_DICT")
        + name(__name__, "Wrap")
        + op("MEMOIZE")  # memo 1
        + op("BINGET", b"\x01") * (depth - 1)
        + op("NONE")
        + level * depth
        + op("NONE")
        + op("SETITEM")  # {Wrap(Wrap(...)): None} hashes the chain
        + op("STOP")
    )
    state = b"\x80\x05\x95" + len(body).to_bytes(8, "little") + body
    store_raw(db, OID, encode_record(BOOK, [(p64(7), BOOK)], state, reference_in_memo=True))
    assert "nested more than 1000" in str(load_fails(db))
    db.close()


# -- a record fills in only what it builds -----------------------------------------------------

Colour = enum.Enum("Colour", "RED GREEN")


@dataclasses.dataclass
class Point:
    """A value class the application allows, stored inline."""

    x: int
    y: int


class Gauge:
    """A value class pickled through a factory function and a state (as numpy arrays are)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.level = 0

    def __reduce__(self) -> tuple[Any, ...]:
        return make_gauge, (self.label,), {"level": self.level}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Gauge) and (other.label, other.level) == (self.label, self.level)

    __hash__ = None  # type: ignore[assignment]


def make_gauge(label: str) -> Gauge:
    """Gauge's factory: what its pickles call."""
    return Gauge(label)


def _set_attribute_of(target: bytes, attribute: str) -> bytes:
    """BUILD on ``target`` with a slot state setting ``attribute`` to ``builtins.object``."""
    return (
        target
        + op("NONE")
        + op("EMPTY_DICT")
        + text(attribute)
        + name("builtins", "object")
        + op("SETITEM")
        + op("TUPLE2")
        + op("BUILD")
        + op("POP")
    )


@pytest.mark.parametrize(
    ("module", "qualname", "attribute"),
    [
        ("fractions", "Fraction", "patched"),  # the checked machine runs it (Fraction's calls are checked)
        ("pathlib", "PurePosixPath", "patched"),  # a class defined in Python
        ("uuid", "SafeUUID", "patched"),
        (__name__, "Point", "patched"),  # an allowed application class
        (__name__, "Colour", "patched"),
        ("uuid", "UUID", "patched"),
    ],
)
@pytest.mark.parametrize("assemble", [program, framed], ids=["unframed", "framed"])
def test_record_cannot_patch_a_class_for_the_whole_process(
    module: str, qualname: str, attribute: str, assemble: Callable[..., bytes]
) -> None:
    """Unframed, the checked machine runs the record; framed as the writer frames, the C one."""
    db = amberdb.DB(None, allowed_classes=[Point, Colour])
    owner = db._resolver.find(module, qualname)
    before = dict(vars(owner))
    store_raw(
        db, OID, book_record(assemble(_set_attribute_of(name(module, qualname), attribute), op("EMPTY_DICT")))
    )
    error = load_fails(db)
    assert isinstance(error, RecordDecodeError)
    assert dict(vars(owner)) == before
    db.close()


def test_record_cannot_fill_in_an_enum_member_or_a_function(db: amberdb.DB) -> None:
    allowed = amberdb.DB(None, allowed_classes=[Colour], allowed_modules=["tests.hostile.sentinels"])
    member = name(__name__, "Colour") + number(1) + op("TUPLE1") + op("REDUCE")
    function = name("tests.hostile.sentinels", "sentinel")
    for target in (member, function):
        store_raw(allowed, OID, book_record(program(_set_attribute_of(target, "label"), op("EMPTY_DICT"))))
        assert isinstance(load_fails(allowed), RecordDecodeError)
    assert not hasattr(Colour.RED, "label") and not hasattr(sentinels.sentinel, "label")
    allowed.close()


_REFERENCE = name("amberdb.record", "ref") + number(0) + op("TUPLE1") + op("REDUCE")
_REFERENCE_IN_MEMO = op("BINGET", b"\x00") + number(0) + op("TUPLE1") + op("REDUCE")


def _slot_build(attribute: str, value: bytes) -> bytes:
    """BUILD with a slot state setting ``attribute`` to ``value``, then POP."""
    return (
        op("NONE")
        + op("EMPTY_DICT")
        + text(attribute)
        + value
        + op("SETITEM")
        + op("TUPLE2")
        + op("BUILD")
        + op("POP")
    )


_TAMPERINGS = {
    "setitems": op("MARK") + text("balance") + number(0) + op("SETITEMS") + op("POP"),
    "setitem": text("evil") + op("NEWTRUE") + op("SETITEM") + op("POP"),
    "build": op("EMPTY_DICT") + text("balance") + number(0) + op("SETITEM") + op("BUILD") + op("POP"),
    "build-volatile": _slot_build("_v_cache", number(0)),
    "build-serial": _slot_build("_p_serial", data(b"\xff" * 8)),
}


# Naming Fraction sends a record to the checked machine.
_CHECKED_MACHINE = call("fractions", "Fraction", number(1), number(3)) + op("POP")


@pytest.mark.parametrize("tampering", sorted(_TAMPERINGS))
@pytest.mark.parametrize("in_memo", [False, True], ids=["ref-global", "ref-in-memo"])
@pytest.mark.parametrize("loaded", [False, True], ids=["ghost", "loaded"])
@pytest.mark.parametrize("machine", ["c", "checked"])
def test_record_cannot_change_an_object_it_refers_to(
    tmp_path: Path, tampering: str, in_memo: bool, loaded: bool, machine: str
) -> None:
    """A tampered record filling in the root it refers to: refused, and nothing of it is ever stored."""
    path = str(tmp_path / "data.fs")
    db = amberdb.DB(path)
    with db.transaction() as conn:
        conn.root()["balance"] = 100
    target = _REFERENCE_IN_MEMO if in_memo else _REFERENCE
    prefix = _CHECKED_MACHINE if machine == "checked" else b""
    state = framed(prefix, target + _TAMPERINGS[tampering], op("EMPTY_DICT"))
    root_class = class_name(amberdb.PersistentMapping)
    store_raw(db, OID, encode_record(BOOK, [(z64, root_class)], state, reference_in_memo=in_memo))
    manager = transaction.TransactionManager()
    conn = db.open(manager)
    root = conn.root()
    if loaded:
        assert root["balance"] == 100
    serial = root._p_serial
    with pytest.raises(RecordDecodeError, match="oid 0x42"):
        conn.get(OID)._p_activate()
    assert root._p_changed in ((False,) if loaded else (None, False))
    assert root["balance"] == 100 and "evil" not in root and root._p_serial == serial
    assert not hasattr(root, "_v_cache")
    root["unrelated"] = 1
    manager.commit()
    conn.close()
    db.close()
    reopened = amberdb.DB(path)
    with reopened.transaction() as check:
        assert dict(check.root()) == {"balance": 100, "unrelated": 1}
    reopened.close()


def test_value_classes_enums_and_standard_values_still_load_and_save(db: amberdb.DB) -> None:
    import pathlib
    import uuid

    allowed = amberdb.DB(None, allowed_classes=[Point, Colour, Gauge, make_gauge])
    gauge = Gauge("pressure")
    gauge.level = 3
    values = {
        "gauge": gauge,
        "point": Point(1, 2),
        "colour": Colour.GREEN,
        "uuid": uuid.UUID(int=7),
        "safe": uuid.SafeUUID.safe,
        "path": pathlib.PurePosixPath("/a/b"),
        "points": [Point(i, -i) for i in range(50)],
    }
    with allowed.transaction() as conn:
        conn.root()["values"] = amberdb.PersistentMapping(values)
    reader = allowed.open(transaction.TransactionManager())
    loaded = dict(reader.root()["values"])
    assert loaded == values and loaded["colour"] is Colour.GREEN and loaded["safe"] is uuid.SafeUUID.safe
    reader.close()
    allowed.close()
