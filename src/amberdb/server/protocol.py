"""The wire format between ``amberdb serve`` and ``ClientStorage``: frames, values, messages.

No pickle and no code cross the wire: records are opaque bytes, and everything around them
is one of a few value types written with :mod:`struct`.  This module is a leaf (it imports
only the standard library and :mod:`amberdb.exceptions`), so the server and the client
storage both speak it without importing each other or the object layer.  Everything here is
written for hostile input: a peer that sends garbage gets :class:`WireError` naming what was
wrong, never another exception, and no length it claims is allocated before its bytes are
there.

Integers are big-endian.

Frames
======

Each direction is a stream of frames::

    offset  size  meaning
         0     4  length L of the payload (unsigned); at most the receiver's frame limit
         4     L  payload

A receiver checks L against its limit as soon as the 4 bytes are in, before buffering any
of the payload: a frame claiming 4 GiB is refused at once.

Payload = message::

    offset  size  meaning
         0     1  kind (what the message asks or answers; the server module lists them)
         1     4  request id (unsigned): a reply carries its request's id; 0 for messages
                  that are not replies and expect none (the server's invalidations)
         5     -  fields: values, back to back, up to the end of the payload

Values
======

One tag byte, then::

    tag   type        body
    0x00  None        -
    0x01  False       -
    0x02  True        -
    0x03  int         8 bytes, signed
    0x04  oid/tid     8 bytes (an oid or tid: Python ``bytes`` of length 8)
    0x05  bytes       4-byte length n, then n bytes
    0x06  str         4-byte length n, then n bytes of UTF-8
    0x07  list        4-byte count n, then n values
    0x08  float       8 bytes, IEEE 754 double

A length or count may not run past the end of the payload (a list's count is checked against
the bytes left, one per element at least), lists nest at most :data:`MAX_DEPTH` deep, and
``bytes`` of length 8 are always written with tag 0x04 (a reader gets ``bytes`` either way).

Errors
======

A request that fails is answered with the fields ``[code, message, details]``: ``code`` a
str naming the error (one of :data:`ERROR_CODES`), ``message`` its text, ``details`` a list
whose shape the code fixes (the oid of a POSKeyError, the oid, class and serials of a
ConflictError, ...).  :func:`error_fields` writes them, :func:`error_from_fields` rebuilds
the exception on the other side -- only these classes, never one the peer names: an unknown
code comes back as a StorageError quoting it.

Versions
========

The first frame each side sends is a hello: the payload :data:`MAGIC` followed by a
protocol version (1 byte).  Both sides send theirs at once, without waiting for the other's.
A version adds message kinds and never changes older ones, so speaking version *n* means
speaking every version from 1 to *n*:

* the server's hello offers the newest version it speaks (:data:`PROTOCOL_VERSION`), and it
  accepts a client greeting with any version from 1 up to that;
* the client greets with :data:`OLDEST_PROTOCOL_VERSION` (1), the version every server
  accepts, and sends a newer kind only on a connection whose server offered a version that
  has it; asked for something the server's version lacks, it raises StorageError saying
  so, without sending anything (a server drops a client that sends an unknown kind).

Version 1 is the original protocol.  Version 2 adds CURRENT_RECORDS.  A version 1 client
accepts only a version 1 server: upgrade clients before their server.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Iterator, Sequence
from typing import Union

from amberdb.exceptions import (
    AuthenticationError,
    ConflictError,
    CorruptedDataError,
    DatabaseError,
    POSKeyError,
    ReadOnlyError,
    StorageError,
    StorageTransactionError,
    UndoError,
    VoteConflictError,
)

__all__ = [
    "DEFAULT_FRAME_LIMIT",
    "ERROR_CODES",
    "MAGIC",
    "MAX_DEPTH",
    "OLDEST_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "FrameReader",
    "Kind",
    "Message",
    "Value",
    "WireError",
    "decode_hello",
    "decode_message",
    "decode_values",
    "encode_frame",
    "encode_hello",
    "encode_message",
    "encode_values",
    "error_fields",
    "error_from_fields",
]

MAGIC = b"AMBERDB-WIRE"
PROTOCOL_VERSION = 2
"""The newest protocol version this code speaks (it speaks every older one too)."""
OLDEST_PROTOCOL_VERSION = 1
"""The version a client greets with: every server accepts it."""
DEFAULT_FRAME_LIMIT = 64 << 20
"""Frames larger than this (payload bytes) are refused unless the receiver raises its limit."""
MAX_DEPTH = 8
"""How deep lists may nest."""

Value = Union[None, bool, int, float, bytes, str, "list[Value]"]

_LEN = struct.Struct(">I")
_HEAD = struct.Struct(">BI")
_INT = struct.Struct(">q")
_FLOAT = struct.Struct(">d")
_MIN_INT, _MAX_INT = -(1 << 63), (1 << 63) - 1
_MAX_LEN = 0xFFFFFFFF

_NONE, _FALSE, _TRUE, _INTEGER, _ID, _BYTES, _STR, _LIST, _FLOAT_TAG = range(9)


class WireError(DatabaseError):
    """A peer sent something that is not this protocol (or broke one of its limits)."""


class Message(tuple):  # type: ignore[type-arg]
    """``(kind, request_id, fields)`` as :func:`decode_message` returns it."""

    __slots__ = ()

    def __new__(cls, kind: int, request_id: int, fields: list[Value]) -> Message:
        return super().__new__(cls, (kind, request_id, fields))

    @property
    def kind(self) -> int:
        """What the message asks or answers."""
        return int(self[0])

    @property
    def request_id(self) -> int:
        """The id a reply carries back; 0 for messages that expect none."""
        return int(self[1])

    @property
    def fields(self) -> list[Value]:
        """The message's values, in order."""
        fields: list[Value] = self[2]
        return fields


class Kind(enum.IntEnum):
    """Message kinds.  Requests (client to server) carry a request id above 0, except
    BEGIN, STORE and ABORT, which expect no reply (id 0; an error they cause is reported by
    the next VOTE).  The server answers a request with REPLY or ERROR under its id, and
    pushes INVALIDATE, PROGRESS and CLOSING with id 0.

    =============  ==============================================  =============================
    kind           request fields                                  reply fields
    =============  ==============================================  =============================
    AUTH           token|None, last tid|None, client name          access ("rw"|"ro"), last tid,
                                                                   changed oids|None, packed
                                                                   tid|None, cache stale (bool)
    LOAD           oid, before tid|None                            record, tid
    LOAD_MANY      [oid, ...]                                      [[oid, record|None, tid|None]]
    NEW_OIDS       count (1..1000)                                 [oid, ...]
    BEGIN          user, description, extension, tid|None,         (none)
                   packed tid the client knows|None
    STORE          oid, base tid, record                           (none)
    VOTE           -                                               -
    FINISH         -                                               tid
    ABORT          -                                               (none)
    ITERATE        start|None, stop|None, records to skip          [[tid, user, description,
                                                                   extension, [[oid, record]],
                                                                   complete]], more
    UNDO_LOG       first, last                                     [[tid, user, description,
                                                                   extension]]
    HISTORY        oid, size                                       [[tid, user, description,
                                                                   extension, size]]
    PACK           pack tid (8 bytes) or POSIX time (float)        -
    SIZE           -                                               objects, bytes
    MARK_PACKED    tid                                             -
    PING           -                                               last tid
    INVALIDATE     (pushed) tid, [oid, ...]|None, packed           -
                   tid|None, more (bool: more oids of this tid
                   follow in the next INVALIDATE), since (the
                   tid of the previous INVALIDATE: the oids
                   changed in one or more transactions after it)
    PROGRESS       (pushed) request id, done, total                -
    CLOSING        (pushed) reason                                 -
    =============  ==============================================  =============================

    Version 2 adds CURRENT_RECORDS (17): request ``after`` (oid|None), ``limit`` (an int,
    at least 1; the server takes at most 10000), reply ``[[[oid, tid, record], ...]]`` --
    the storage's ``current_records`` as of the last announced tid, in oid order, perhaps
    fewer than asked (a reply carries about 4 MiB of records at most) and empty only when
    no oid lies above ``after``.

    A client applies an INVALIDATE (the last of a ``more`` run) as one step: its last tid
    and the oids changed up to it move together, in wire order with the replies around it.
    Its ``since`` must be the client's last tid; anything else means an invalidation was
    lost, and the client drops its whole cache.
    """

    AUTH = 1
    LOAD = 2
    LOAD_MANY = 3
    NEW_OIDS = 4
    BEGIN = 5
    STORE = 6
    VOTE = 7
    FINISH = 8
    ABORT = 9
    ITERATE = 10
    UNDO_LOG = 11
    HISTORY = 12
    PACK = 13
    SIZE = 14
    MARK_PACKED = 15
    PING = 16
    CURRENT_RECORDS = 17
    REPLY = 64
    ERROR = 65
    INVALIDATE = 66
    PROGRESS = 67
    CLOSING = 68


# -- values ---------------------------------------------------------------------------------


def encode_values(values: Sequence[Value]) -> bytes:
    """The wire form of ``values``, back to back; TypeError/ValueError for what has none."""
    out = bytearray()
    for value in values:
        _encode(value, out, 0)
    return bytes(out)


def _encode(value: Value, out: bytearray, depth: int) -> None:
    if value is None:
        out.append(_NONE)
    elif value is True:
        out.append(_TRUE)
    elif value is False:
        out.append(_FALSE)
    elif type(value) is int:
        if not _MIN_INT <= value <= _MAX_INT:
            raise ValueError(f"integer {value} does not fit in 64 bits")
        out.append(_INTEGER)
        out += _INT.pack(value)
    elif type(value) is bytes:
        if len(value) == 8:
            out.append(_ID)
            out += value
        else:
            _check_length(len(value))
            out.append(_BYTES)
            out += _LEN.pack(len(value))
            out += value
    elif type(value) is str:
        data = value.encode("utf-8")
        _check_length(len(data))
        out.append(_STR)
        out += _LEN.pack(len(data))
        out += data
    elif type(value) is list:
        if depth >= MAX_DEPTH:
            raise ValueError(f"lists nest deeper than {MAX_DEPTH}")
        _check_length(len(value))
        out.append(_LIST)
        out += _LEN.pack(len(value))
        for item in value:
            _encode(item, out, depth + 1)
    elif type(value) is float:
        out.append(_FLOAT_TAG)
        out += _FLOAT.pack(value)
    else:
        raise TypeError(f"{type(value).__name__} cannot go on the wire: {value!r:.80}")


def _check_length(length: int) -> None:
    if length > _MAX_LEN:
        raise ValueError(f"{length} bytes or items are more than one value may hold")


def decode_values(payload: bytes | bytearray | memoryview, start: int = 0) -> list[Value]:
    """The values of ``payload[start:]``; WireError for anything that is not exactly that."""
    data = bytes(payload)
    values: list[Value] = []
    pos = start
    end = len(data)
    while pos < end:
        value, pos = _decode(data, pos, end, 0)
        values.append(value)
    return values


def _decode(data: bytes, pos: int, end: int, depth: int) -> tuple[Value, int]:
    if pos >= end:
        raise WireError(f"a list's items are cut short by the end of the message at byte {pos}")
    tag = data[pos]
    pos += 1
    if tag == _NONE:
        return None, pos
    if tag == _TRUE:
        return True, pos
    if tag == _FALSE:
        return False, pos
    if tag in (_INTEGER, _FLOAT_TAG, _ID):
        if pos + 8 > end:
            raise WireError(f"a value at byte {pos - 1} is cut short by the end of the message")
        chunk = data[pos : pos + 8]
        if tag == _ID:
            return chunk, pos + 8
        if tag == _INTEGER:
            return _INT.unpack(chunk)[0], pos + 8
        number: float = _FLOAT.unpack(chunk)[0]
        return number, pos + 8
    if tag in (_BYTES, _STR, _LIST):
        if pos + 4 > end:
            raise WireError(f"a length at byte {pos} is cut short by the end of the message")
        (length,) = _LEN.unpack_from(data, pos)
        pos += 4
        if tag == _LIST:
            if depth >= MAX_DEPTH:
                raise WireError(f"lists nest deeper than {MAX_DEPTH} at byte {pos - 5}")
            if length > end - pos:  # every element takes a byte at least
                raise WireError(f"a list at byte {pos - 5} claims {length} items, more than the bytes left")
            items: list[Value] = []
            for _ in range(length):
                item, pos = _decode(data, pos, end, depth + 1)
                items.append(item)
            return items, pos
        if length > end - pos:
            raise WireError(f"a value at byte {pos - 5} claims {length} bytes, more than the message holds")
        body = data[pos : pos + length]
        pos += length
        if tag == _BYTES:
            if length == 8:
                raise WireError(f"8 bytes at byte {pos - 13} are not written as an oid or tid")
            return body, pos
        try:
            return body.decode("utf-8"), pos
        except UnicodeDecodeError:
            raise WireError(f"a string at byte {pos - length - 5} is not UTF-8") from None
    raise WireError(f"unknown value tag {tag:#04x} at byte {pos - 1}")


# -- messages and frames --------------------------------------------------------------------


def encode_message(kind: int, request_id: int, fields: Sequence[Value]) -> bytes:
    """A whole frame (length included) carrying one message."""
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"message kind {kind} is not a byte")
    if not 0 <= request_id <= _MAX_LEN:
        raise ValueError(f"request id {request_id} does not fit in 32 bits")
    return encode_frame(_HEAD.pack(kind, request_id) + encode_values(fields))


def decode_message(payload: bytes | bytearray | memoryview) -> Message:
    """The message a frame's payload holds; WireError when it holds none."""
    if len(payload) < _HEAD.size:
        raise WireError(f"a message of {len(payload)} bytes is shorter than its {_HEAD.size}-byte head")
    kind, request_id = _HEAD.unpack_from(payload, 0)
    return Message(kind, request_id, decode_values(payload, _HEAD.size))


def encode_frame(payload: bytes | bytearray | memoryview) -> bytes:
    """``payload`` behind its 4-byte length."""
    if len(payload) > _MAX_LEN:
        raise ValueError(f"a frame of {len(payload)} bytes is larger than the format allows")
    return _LEN.pack(len(payload)) + bytes(payload)


def encode_hello(version: int = PROTOCOL_VERSION) -> bytes:
    """The first frame a side sends."""
    if not 0 < version <= 0xFF:
        raise ValueError(f"protocol version {version} is not a byte")
    return encode_frame(MAGIC + bytes([version]))


def decode_hello(payload: bytes | bytearray | memoryview) -> int:
    """The protocol version a hello offers; WireError when the payload is not a hello (the
    peer speaks something else: an HTTP client, an old or foreign program)."""
    data = bytes(payload)
    if len(data) != len(MAGIC) + 1 or not data.startswith(MAGIC):
        raise WireError(f"the peer does not speak the AmberDB protocol (it began with {data[:16]!r})")
    return data[-1]


class FrameDecoder:
    """Splits a byte stream into frame payloads, whatever pieces it arrives in.

    ``feed(data)`` returns the payloads completed by ``data``.  A frame longer than
    ``limit`` raises WireError as soon as its length is read; the decoder then refuses
    everything (the stream cannot be resynchronised), and the connection should be closed.
    What it buffers is at most one frame: ``limit`` plus 4 bytes.
    """

    def __init__(self, limit: int = DEFAULT_FRAME_LIMIT) -> None:
        if not 0 < limit <= _MAX_LEN:
            raise ValueError(f"frame limit must be between 1 and {_MAX_LEN}, got {limit}")
        self.limit = limit
        self._buffer = bytearray()
        self._needed: int | None = None  # payload length of the frame being read
        self._failed: WireError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take in ``data``; return the payloads of the frames it completes, in order."""
        if self._failed is not None:
            raise self._failed
        self._buffer += data
        return list(self._frames())

    def _frames(self) -> Iterator[bytes]:
        buffer = self._buffer
        while True:
            if self._needed is None:
                if len(buffer) < 4:
                    return
                (length,) = _LEN.unpack_from(buffer, 0)
                if length > self.limit:
                    self._failed = WireError(
                        f"a frame of {length} bytes is larger than the limit of {self.limit}"
                    )
                    buffer.clear()
                    raise self._failed
                del buffer[:4]
                self._needed = length
            if len(buffer) < self._needed:
                return
            payload = bytes(buffer[: self._needed])
            del buffer[: self._needed]
            self._needed = None
            yield payload

    @property
    def buffered(self) -> int:
        """Bytes held for frames not yet complete."""
        return len(self._buffer)


READ_BUFFER = 256 << 10
"""Bytes read from a socket at a time, into one buffer per connection."""


class FrameReader(asyncio.BufferedProtocol):
    """An asyncio protocol that reads into one buffer for the connection's life and hands
    each read to ``data_received``: the default Protocol makes asyncio allocate 256 KiB for
    every read, which cost more than the rest of a round trip here."""

    def __init__(self) -> None:
        self.read_buffer = memoryview(bytearray(READ_BUFFER))

    def get_buffer(self, sizehint: int) -> memoryview:
        """The connection's one read buffer."""
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        """Pass what was just read on to ``data_received``."""
        self.data_received(self.read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        """What a subclass does with the bytes read."""
        raise NotImplementedError


# -- errors ---------------------------------------------------------------------------------

# Most specific first: an error is sent under the first class it is an instance of.
_ERROR_CLASSES: tuple[tuple[str, type[DatabaseError]], ...] = (
    ("VoteConflictError", VoteConflictError),
    ("ConflictError", ConflictError),
    ("POSKeyError", POSKeyError),
    ("ReadOnlyError", ReadOnlyError),
    ("AuthenticationError", AuthenticationError),
    ("UndoError", UndoError),
    ("CorruptedDataError", CorruptedDataError),
    ("StorageTransactionError", StorageTransactionError),
    ("WireError", WireError),
    ("StorageError", StorageError),
)
ERROR_CODES = tuple(code for code, _ in _ERROR_CLASSES)
"""The codes an error reply may carry (anything else arrives as a StorageError)."""


def error_fields(exc: BaseException) -> list[Value]:
    """The fields of an error reply for ``exc`` (any other exception goes as StorageError,
    with its class named in the message)."""
    for code, cls in _ERROR_CLASSES:
        if isinstance(exc, cls):
            return [code, str(exc), _details(exc)]
    return ["StorageError", f"{type(exc).__name__}: {exc}", []]


def _details(exc: BaseException) -> list[Value]:
    if isinstance(exc, VoteConflictError):
        return [[oid, committed, base] for oid, (committed, base) in exc.conflicts.items()]
    if isinstance(exc, ConflictError):
        committed, base = exc.serials if exc.serials is not None else (None, None)
        return [exc.oid, exc.class_name, committed, base]
    if isinstance(exc, POSKeyError):
        return [exc.oid]
    if isinstance(exc, UndoError):
        return list(exc.oids)
    if isinstance(exc, CorruptedDataError):
        return [exc.path, exc.offset, exc.oid, exc.problem]
    return []


def error_from_fields(fields: Sequence[Value]) -> DatabaseError:
    """The exception an error reply describes; WireError when its fields make no sense."""
    if len(fields) != 3:
        raise WireError("an error reply must hold [code, message, details]")
    code, message, details = fields
    if not isinstance(code, str) or not isinstance(message, str) or not isinstance(details, list):
        raise WireError("an error reply must hold [code, message, details] as str, str, list")
    try:
        return _rebuild(code, message, details)
    except (TypeError, ValueError):
        raise WireError(f"the details of a {code[:80]!r} reply do not fit it: {details!r:.200}") from None


def _oid(value: Value) -> bytes:
    if type(value) is not bytes or len(value) != 8:
        raise ValueError("not an oid")
    return value


def _optional_oid(value: Value) -> bytes | None:
    return None if value is None else _oid(value)


def _rebuild(code: str, message: str, details: list[Value]) -> DatabaseError:
    if code == "VoteConflictError":
        conflicts = {}
        for item in details:
            if not isinstance(item, list) or len(item) != 3:
                raise ValueError("a conflict is [oid, committed, base]")
            conflicts[_oid(item[0])] = (_oid(item[1]), _oid(item[2]))
        return VoteConflictError(conflicts, message)
    if code == "ConflictError":
        oid, class_name, committed, base = details
        if class_name is not None and not isinstance(class_name, str):
            raise ValueError("class name")
        serials = None if committed is None or base is None else (_oid(committed), _oid(base))
        return ConflictError(message, oid=_optional_oid(oid), class_name=class_name, serials=serials)
    if code == "POSKeyError":
        (oid,) = details
        error = POSKeyError(_oid(oid))
        error.args = (message,)
        return error
    if code == "UndoError":
        return UndoError(message, tuple(_oid(oid) for oid in details))
    if code == "CorruptedDataError":
        path, offset, oid, problem = details
        if not isinstance(path, str) or not isinstance(problem, str):
            raise ValueError("path and problem are strings")
        if offset is not None and type(offset) is not int:
            raise ValueError("offset")
        return CorruptedDataError(message, path=path, offset=offset, oid=_optional_oid(oid), problem=problem)
    simple = {
        "ReadOnlyError": ReadOnlyError,
        "AuthenticationError": AuthenticationError,
        "StorageTransactionError": StorageTransactionError,
        "WireError": WireError,
        "StorageError": StorageError,
    }
    if code in simple:
        return simple[code](message)
    return StorageError(f"the server reported {code[:80]!r}: {message}")
