"""Hostile records by the thousand: generated pickle programs fed to a real connection's loader.

Whatever a program does, loading it must: call nothing outside the allow-list (the sentinels
record any call), import nothing (``sys.modules`` does not grow), stay within bounded memory
(tracemalloc) and time (the test's timeout), and either return a state or raise a
DatabaseError that names the oid.
"""

from __future__ import annotations

import copyreg
import pickle
import pickletools
import sys
import tracemalloc
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amberdb
import amberdb.btrees  # imported on demand otherwise, which is allowed but not what this tests
from amberdb import unpickler
from amberdb.checked_unpickler import OPCODES
from amberdb.exceptions import DatabaseError
from amberdb.persistent import class_name
from amberdb.record import decode_header, encode_record
from amberdb.utils import p64
from tests.hostile import sentinels
from tests.hostile.assemble import call, data, framed, name, number, op, text
from tests.models import Book

EXTENSION_CODE = 0x7FF0
GLOBALS = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("builtins", "open"),
    ("subprocess", "Popen"),
    ("importlib", "import_module"),
    ("codecs", "decode"),
    ("pickle", "loads"),
    ("copyreg", "_reconstructor"),
    ("functools", "partial"),
    ("amberdb.demo.__main__", "main"),
    ("amberdb.demo", "main"),
    ("tests.hostile.sentinels", "sentinel"),
    ("tests.hostile.sentinels", "SentinelClass"),
    ("tests.hostile.never_imported", "anything"),
    ("tests.hostile.test_fuzz", "sentinels.sentinel"),
    ("__builtin__", "eval"),
    ("builtins", "bytearray"),
    ("builtins", "bytes"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "dict"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "range"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "object"),
    ("fractions", "Fraction"),
    ("decimal", "Decimal"),
    ("collections", "Counter"),
    ("collections", "deque"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("datetime", "datetime"),
    ("datetime", "timedelta"),
    ("zoneinfo", "ZoneInfo"),
    ("zoneinfo", "ZoneInfo._unpickle"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "Path"),
    ("uuid", "UUID"),
    ("uuid", "SafeUUID"),
    ("amberdb.record", "ref"),
    ("amberdb.btrees", "OOBTree"),
    (Book.__module__, "Book"),
]
STRINGS = ["", "a", "1e100000000", "1/3", "idna", "latin-1", "utf-8", "punycode", "UTC", "../../etc/passwd"]
STRINGS += ["os", "system", "__main__", "\udcff", "x" * 300]
NUMBERS = [0, 1, 2, 3, -1, 7, 255, 256, 65535, 2**26, 2**31 - 1, 2**31, 2**32 - 1, 10**9, 10**10]
NUMBERS += [2**62, 2**64]

_no_argument = st.sampled_from(
    [opcode for opcode, (_, layout, size) in OPCODES.items() if (layout, size) == ("fixed", 0)]
).filter(lambda opcode: opcode != "STOP")


def _with(opcodes: list[str], arguments: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.tuples(st.sampled_from(opcodes), arguments).map(lambda pair: op(*pair))


def _sized(size: int) -> st.SearchStrategy[bytes]:
    return st.sampled_from(NUMBERS).map(lambda n: (n % 2 ** (8 * size)).to_bytes(size, "little"))


def _lying_length(opcode: str, size: int) -> st.SearchStrategy[bytes]:
    """An opcode announcing a length (often far) beyond the bytes that follow."""
    return st.tuples(st.sampled_from(NUMBERS), st.binary(max_size=8)).map(
        lambda pair: op(opcode, (pair[0] % 2 ** (8 * size)).to_bytes(size, "little") + pair[1])
    )


_plain_value = st.one_of(
    st.sampled_from(STRINGS).map(text),
    st.sampled_from(NUMBERS).map(number),
    st.binary(max_size=12).map(data),
    st.just(op("NONE")),
)
# Values built by calls of calls: bombs need a producer inside a consumer (list(range(...))).
_value = st.recursive(
    _plain_value,
    lambda inner: st.tuples(st.sampled_from(GLOBALS), st.lists(inner, max_size=2)).map(
        lambda g: call(*g[0], *g[1])
    ),
    max_leaves=4,
)
_risky = [g for g in GLOBALS if g[0] in ("builtins", "collections", "fractions") and g[1] != "range"]
_amplifier = st.sampled_from(
    [
        number(10**9),
        call("builtins", "range", number(10**10)),
        text("1e100000000"),
        call("decimal", "Decimal", text("1e100000000")),
    ]
)
_bomb = st.tuples(st.sampled_from(_risky), _amplifier, st.lists(_plain_value, max_size=1)).map(
    lambda b: call(*b[0], b[1], *b[2])
)
_global = st.sampled_from(GLOBALS).map(lambda g: name(*g))
# Something the record did not build: a global a record may name (most of them classes
# defined in Python, whose attributes can be set), or one of its references (index 0 or 1).
_OUTSIDE_GLOBALS = [
    ("fractions", "Fraction"),
    ("collections", "Counter"),
    ("pathlib", "PurePosixPath"),
    ("uuid", "UUID"),
    ("uuid", "SafeUUID"),
    ("amberdb.btrees", "OOBTree"),
    (Book.__module__, "Book"),
    ("builtins", "object"),
    ("datetime", "datetime"),
]
_outsider = st.one_of(
    st.sampled_from(_OUTSIDE_GLOBALS).map(lambda g: name(*g)),
    st.sampled_from(_OUTSIDE_GLOBALS).map(lambda g: name(*g) + number(1) + op("TUPLE1") + op("REDUCE")),
    st.sampled_from([0, 1]).map(
        lambda index: name("amberdb.record", "ref") + number(index) + op("TUPLE1") + op("REDUCE")
    ),
)
# Gadgets filling in an outsider: BUILD with a dict or slot state, SETITEMS, APPEND(S), ADDITEMS.
# (The values are globals the C unpickler may be handed: int would send it to the checked one.)
_filled = st.tuples(
    st.sampled_from(["__str__", "title", "_p_serial", "_v_cache", "__defaults__"]),
    st.sampled_from(["object", "float", "complex"]),
).map(lambda pair: op("EMPTY_DICT") + text(pair[0]) + name("builtins", pair[1]) + op("SETITEM"))
_fill_in = st.one_of(
    st.tuples(_outsider, _filled).map(lambda p: p[0] + op("NONE") + p[1] + op("TUPLE2") + op("BUILD")),
    st.tuples(_outsider, _filled).map(lambda p: p[0] + p[1] + op("BUILD")),
    st.tuples(_outsider, _plain_value).map(
        lambda p: p[0] + op("MARK") + text("title") + p[1] + op("SETITEMS")
    ),
    st.tuples(_outsider, _plain_value).map(lambda p: p[0] + p[1] + op("APPEND")),
    st.tuples(_outsider, _plain_value).map(lambda p: p[0] + op("MARK") + p[1] + op("APPENDS")),
    st.tuples(_outsider, _plain_value).map(lambda p: p[0] + op("MARK") + p[1] + op("ADDITEMS")),
)
_instruction = st.one_of(
    _no_argument.map(op),
    _value,
    _global,
    _bomb,
    _fill_in,
    _with(["BINPUT", "BINGET", "EXT1"], _sized(1)),
    _with(["LONG_BINPUT", "LONG_BINGET", "EXT4"], _sized(4)),
    _with(["EXT2"], _sized(2)),
    _with(["PUT", "GET", "INT", "LONG", "FLOAT", "PERSID"], st.sampled_from([b"%d\n" % n for n in NUMBERS])),
    st.just(op("EXT2", EXTENSION_CODE.to_bytes(2, "little"))),
    st.sampled_from(GLOBALS).map(lambda g: op("GLOBAL", f"{g[0]}\n{g[1]}\n".encode())),
    st.sampled_from(GLOBALS).map(lambda g: op("MARK") + op("INST", f"{g[0]}\n{g[1]}\n".encode())),
    st.just(op("LONG", b"9" * 5000 + b"\n")),
    st.sampled_from(STRINGS).map(lambda s: op("STRING", repr(s).encode("ascii", "backslashreplace") + b"\n")),
    st.sampled_from(STRINGS).map(lambda s: op("UNICODE", s.encode("raw-unicode-escape") + b"\n")),
    st.sampled_from([("BINBYTES", 4), ("BINUNICODE", 4), ("BINSTRING", 4), ("LONG4", 4)]).flatmap(
        lambda pair: _lying_length(*pair)
    ),
    st.sampled_from(["BINBYTES8", "BINUNICODE8", "BYTEARRAY8", "FRAME"]).flatmap(
        lambda opcode: _lying_length(opcode, 8)
    ),
    st.integers(0, 6).map(lambda p: op("PROTO", bytes([p]))),
    st.sampled_from([10, 999, 1001, 3000]).map(lambda depth: op("NONE") + op("TUPLE1") * depth),
)
programs = st.one_of(
    st.lists(_instruction, max_size=25).map(lambda parts: b"\x80\x05" + b"".join(parts) + op("STOP")),
    st.lists(_instruction, max_size=25).map(lambda parts: b"".join(parts) + op("STOP")),
    st.binary(max_size=64),
)
# Fill-in gadgets among honest values: unframed (the checked machine or the C one runs
# them) or framed as the writer frames records (the C one, with its BUILDs guarded).
_fill_in_parts = st.lists(st.one_of(_fill_in, _fill_in, _plain_value, _value), min_size=1, max_size=4)
fill_in_programs = st.one_of(
    _fill_in_parts.map(lambda parts: b"\x80\x05" + b"".join(parts) + op("STOP")),
    _fill_in_parts.map(lambda parts: framed(*parts)),
)

OID = p64(0x99)
MEMORY_LIMIT = 64 << 20


@pytest.fixture(scope="module")
def reader_connection() -> Iterator[amberdb.Connection]:
    """A connection whose loader gets the records, with the sentinel as a cached extension."""
    copyreg.add_extension(sentinels.__name__, "sentinel", EXTENSION_CODE)
    pickle.loads(b"\x80\x02\x83" + EXTENSION_CODE.to_bytes(2, "little") + b".")
    db = amberdb.DB(None)
    conn = db.open(amberdb.transaction.TransactionManager())
    try:
        yield conn
    finally:
        conn.close()
        db.close()
        copyreg.remove_extension(sentinels.__name__, "sentinel", EXTENSION_CODE)


def _process_wide_state() -> dict[str, Any]:
    """What a record could change for the whole process: the globals it may name, as they are."""
    snapshot: dict[str, Any] = {}
    for module, qualname in GLOBALS:
        found = sys.modules.get(module)
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is None:
            continue
        key = f"{module}:{qualname}"
        snapshot[key] = dict(getattr(found, "__dict__", {}))
        for attribute in ("__defaults__", "__kwdefaults__", "__name__", "__qualname__", "__bases__"):
            snapshot[f"{key}.{attribute}"] = getattr(found, attribute, None)
    for member in uuid.SafeUUID:
        snapshot[f"uuid.SafeUUID.{member.name}"] = dict(vars(member))
    return snapshot


def load(conn: amberdb.Connection, state: bytes, refs: list[tuple[bytes, str]]) -> Any:
    record = encode_record(class_name(Book), refs, state)
    return conn._reader.state(OID, record, decode_header(record))


def _run_hostile(conn: amberdb.Connection, state: bytes, with_references: bool) -> None:
    """Load ``state`` and check that it did nothing beyond returning a state or raising."""
    refs = [(p64(0x7), class_name(Book)), (p64(0x8), "amberdb.btrees:OOBTree")] if with_references else []
    modules = set(sys.modules)
    before = _process_wide_state()
    sentinels.CALLS.clear()
    tracemalloc.start()
    try:
        load(conn, state, refs)
    except DatabaseError as exc:
        assert "oid 0x99" in str(exc), exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert sentinels.CALLS == []
    assert set(sys.modules) - modules == set()
    assert peak < MEMORY_LIMIT + 64 * len(state)
    assert _process_wide_state() == before, "a record changed a class or function for the whole process"
    assert conn._registered == []
    for oid, _ in refs:
        referenced = conn._cache.get(oid)
        assert referenced is None or referenced._p_changed is None, (
            "a record filled in an object it refers to"
        )


@pytest.mark.timeout(600)
@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(state=programs, with_references=st.booleans())
def test_hostile_program_runs_nothing_imports_nothing_and_stays_bounded(
    reader_connection: amberdb.Connection, state: bytes, with_references: bool
) -> None:
    _run_hostile(reader_connection, state, with_references)


@pytest.mark.timeout(600)
@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(state=fill_in_programs)
def test_hostile_program_fills_in_only_what_it_builds(
    reader_connection: amberdb.Connection, state: bytes
) -> None:
    """BUILD, SETITEM(S), APPEND(S), ADDITEMS on globals and references change nothing."""
    _run_hostile(reader_connection, state, with_references=True)


# Memo puts size the C memo by their index; extension codes skip the allow-list.  (BINBYTES
# and friends are harmless when pickletools reads them: it refuses a length past the end.)
_UNSAFE_FOR_C = {"PUT", "LONG_BINPUT", "EXT1", "EXT2", "EXT4"}


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    state=st.one_of(
        programs,
        st.lists(_instruction, max_size=25).map(
            lambda parts: (lambda body: b"\x80\x05\x95" + len(body).to_bytes(8, "little") + body)(
                b"".join(parts) + op("STOP")
            )
        ),
    )
)
def test_prechecks_never_pass_a_sizing_opcode(state: bytes) -> None:
    """What the pre-checks wave through to the C unpickler has no opcode sizing an allocation."""
    if not (unpickler._ordinary(state) or unpickler._scan(state) >= 0):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickletools decoding a STRING's bad escapes
            ops = [opcode.name for opcode, _, _ in pickletools.genops(state)]
    except ValueError:
        return  # pickletools stops where the C unpickler would raise: nothing was allocated
    assert not _UNSAFE_FOR_C & set(ops), ops
