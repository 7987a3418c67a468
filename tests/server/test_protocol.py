"""The wire format (amberdb.server.protocol): round trips, and nothing but WireError from
hostile bytes -- every truncation, every flipped byte, random garbage, claimed lengths that
would exhaust memory, frames split at every point."""

from __future__ import annotations

import math
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amberdb.exceptions import (
    ConflictError,
    CorruptedDataError,
    POSKeyError,
    ReadOnlyError,
    StorageError,
    StorageTransactionError,
    UndoError,
    VoteConflictError,
)
from amberdb.server.protocol import (
    DEFAULT_FRAME_LIMIT,
    MAGIC,
    MAX_DEPTH,
    PROTOCOL_VERSION,
    FrameDecoder,
    Message,
    WireError,
    decode_hello,
    decode_message,
    decode_values,
    encode_frame,
    encode_hello,
    encode_message,
    encode_values,
    error_fields,
    error_from_fields,
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 63) - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=40)
    | st.text(max_size=20)
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5), max_leaves=30)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@given(st.lists(values, max_size=6))
def test_values_round_trip(items: list[object]) -> None:
    assert _same(decode_values(encode_values(items)), items)  # type: ignore[arg-type]


@given(st.integers(0, 255), st.integers(0, 2**32 - 1), st.lists(values, max_size=4))
def test_messages_round_trip_through_frames_split_anywhere(
    kind: int, request_id: int, fields: list[object]
) -> None:
    frame = encode_message(kind, request_id, fields)  # type: ignore[arg-type]
    stream = frame * 3
    for cut in range(0, len(stream) + 1, max(1, len(stream) // 17)):
        decoder = FrameDecoder()
        payloads = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert len(payloads) == 3 and decoder.buffered == 0
        message = decode_message(payloads[0])
        assert isinstance(message, Message)
        assert (message.kind, message.request_id) == (kind, request_id)
        assert _same(message.fields, fields)


def test_byte_at_a_time() -> None:
    frame = encode_message(7, 42, [b"x" * 8, "é", [1, [None, True]], 2.5])
    decoder = FrameDecoder()
    out: list[bytes] = []
    for byte in frame:
        out += decoder.feed(bytes([byte]))
    assert len(out) == 1 and decode_message(out[0]) == (7, 42, [b"x" * 8, "é", [1, [None, True]], 2.5])


def _sample() -> bytes:
    return encode_message(3, 9, [b"\x00" * 8, b"record bytes", "user", [1, -2, [b"", None]], False, 1.5])[4:]


def test_every_truncation_is_a_wire_error() -> None:
    payload = _sample()
    for cut in range(len(payload)):
        try:
            decode_message(payload[:cut])
        except WireError:
            continue
        # A cut exactly between two values is a shorter, valid message: it must then be a
        # prefix of the fields, never something else.
        assert (
            list(decode_message(payload[:cut]).fields)
            == decode_message(payload).fields[: len(decode_message(payload[:cut]).fields)]
        )


def test_every_flipped_byte_decodes_or_is_a_wire_error() -> None:
    payload = _sample()
    for i in range(len(payload)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(payload)
            damaged[i] ^= mask
            try:
                decode_message(bytes(damaged))
            except WireError:
                pass


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    try:
        decode_message(data)
    except WireError:
        pass
    decoder = FrameDecoder(limit=1000)
    try:
        for payload in decoder.feed(data):
            try:
                decode_message(payload)
            except WireError:
                pass
    except WireError:
        pass


def test_claimed_lengths_are_not_allocated() -> None:
    tracemalloc.start()
    try:
        for tag in (0x05, 0x06, 0x07):
            with pytest.raises(WireError, match="claims"):
                decode_values(bytes([tag]) + b"\xff\xff\xff\xff")
        decoder = FrameDecoder()
        with pytest.raises(WireError, match="larger than the limit"):
            decoder.feed(b"\xff\xff\xff\xff" + b"x" * 100)  # a frame claiming 4 GiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    with pytest.raises(WireError):  # the stream cannot be trusted any more
        decoder.feed(encode_hello())
    assert decoder.buffered == 0


def test_limits_and_refusals() -> None:
    deep: object = None
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError):
        encode_values([deep])  # type: ignore[list-item]
    nested = b"\x07\x00\x00\x00\x01" * (MAX_DEPTH + 1) + b"\x00"
    with pytest.raises(WireError, match="nest"):
        decode_values(nested)
    with pytest.raises(WireError, match="tag"):
        decode_values(b"\x99")
    with pytest.raises(WireError, match="oid or tid"):
        decode_values(b"\x05\x00\x00\x00\x08" + b"12345678")  # 8 bytes must use the id tag
    with pytest.raises(WireError, match="UTF-8"):
        decode_values(b"\x06\x00\x00\x00\x01\xff")
    with pytest.raises(WireError, match="head"):
        decode_message(b"\x01\x00")
    for bad in (1 << 63, object(), (1, 2), {"a": 1}, bytearray(b"x")):
        with pytest.raises((TypeError, ValueError)):
            encode_values([bad])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        encode_message(256, 0, [])
    with pytest.raises(ValueError):
        encode_message(1, -1, [])
    with pytest.raises(ValueError):
        FrameDecoder(limit=0)
    assert DEFAULT_FRAME_LIMIT >= 16 << 20


def test_hello() -> None:
    frame = encode_hello()
    (payload,) = FrameDecoder().feed(frame)
    assert payload.startswith(MAGIC) and decode_hello(payload) == PROTOCOL_VERSION
    for foreign in (b"GET / HTTP/1.1\r\n", b"", MAGIC, MAGIC + b"\x01\x02", b"Z5"):
        with pytest.raises(WireError, match="does not speak"):
            decode_hello(foreign)
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


def _through_the_wire(exc: BaseException) -> BaseException:
    frame = encode_message(0x81, 5, error_fields(exc))
    (payload,) = FrameDecoder().feed(frame)
    return error_from_fields(decode_message(payload).fields)


def test_errors_cross_the_wire_as_themselves() -> None:
    oid, t1, t2 = b"\x00" * 7 + b"\x01", b"\x01" * 8, b"\x02" * 8
    conflict = _through_the_wire(ConflictError(oid=oid, class_name="app:Counter", serials=(t2, t1)))
    assert type(conflict) is ConflictError
    assert (conflict.oid, conflict.class_name, conflict.serials) == (oid, "app:Counter", (t2, t1))
    assert "app:Counter" in str(conflict)
    votes = _through_the_wire(VoteConflictError({oid: (t2, t1), t1: (t2, t2)}))
    assert type(votes) is VoteConflictError and votes.conflicts == {oid: (t2, t1), t1: (t2, t2)}
    missing = _through_the_wire(POSKeyError(oid, "no revision before tid 0x5"))
    assert isinstance(missing, KeyError) and missing.oid == oid and "no revision before" in str(missing)
    undo = _through_the_wire(UndoError("cannot undo", (oid, t1)))
    assert type(undo) is UndoError and undo.oids == (oid, t1)
    damage = _through_the_wire(CorruptedDataError("bad", path="/d.fs", offset=77, oid=oid, problem="crc"))
    assert type(damage) is CorruptedDataError and (damage.path, damage.offset, damage.oid) == (
        "/d.fs",
        77,
        oid,
    )
    for simple in (ReadOnlyError("ro"), StorageTransactionError("order"), StorageError("x"), WireError("w")):
        back = _through_the_wire(simple)
        assert type(back) is type(simple) and str(back) == str(simple)
    other = _through_the_wire(ZeroDivisionError("boom"))
    assert type(other) is StorageError and "ZeroDivisionError: boom" in str(other)


def test_hostile_error_replies_are_wire_errors_or_plain_storage_errors() -> None:
    assert type(error_from_fields(["os.system", "rm -rf /", []])) is StorageError  # never a class it names
    for fields in (
        [],
        ["POSKeyError"],
        [1, "m", []],
        ["POSKeyError", "m", "not a list"],
        ["POSKeyError", "m", [b"short"]],
        ["POSKeyError", "m", []],
        ["ConflictError", "m", [None, 5, None, None]],
        ["VoteConflictError", "m", [[b"x" * 8]]],
        ["VoteConflictError", "m", []],
        ["UndoError", "m", [1]],
        ["CorruptedDataError", "m", ["/p", "offset", None, "x"]],
    ):
        with pytest.raises(WireError):
            error_from_fields(fields)  # type: ignore[arg-type]
