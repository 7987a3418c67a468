"""A tiny pickle assembler for writing hostile records by hand (opcode names as in pickletools)."""

from __future__ import annotations

import struct

from amberdb.checked_unpickler import OPCODES

PROTO5 = b"\x80\x05"


def op(name: str, argument: bytes = b"") -> bytes:
    """One opcode with its raw argument bytes."""
    return OPCODES[name][0] + argument


def text(value: str) -> bytes:
    """Push a str."""
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) < 256:
        return op("SHORT_BINUNICODE", bytes([len(raw)]) + raw)
    return op("BINUNICODE", struct.pack("<I", len(raw)) + raw)


def data(value: bytes) -> bytes:
    """Push bytes."""
    if len(value) < 256:
        return op("SHORT_BINBYTES", bytes([len(value)]) + value)
    return op("BINBYTES", struct.pack("<I", len(value)) + value)


def number(value: int) -> bytes:
    """Push an int."""
    if 0 <= value < 256:
        return op("BININT1", bytes([value]))
    if -(2**31) <= value < 2**31:
        return op("BININT", struct.pack("<i", value))
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) < 256:
        return op("LONG1", bytes([len(raw)]) + raw)
    return op("LONG4", struct.pack("<i", len(raw)) + raw)


def name(module: str, qualname: str) -> bytes:
    """Push the global ``module.qualname`` (STACK_GLOBAL)."""
    return text(module) + text(qualname) + op("STACK_GLOBAL")


def call(module: str, qualname: str, *arguments: bytes) -> bytes:
    """Push ``module.qualname(*arguments)`` (each argument already assembled)."""
    return name(module, qualname) + op("MARK") + b"".join(arguments) + op("TUPLE") + op("REDUCE")


def program(*parts: bytes) -> bytes:
    """A protocol 5 pickle of ``parts`` followed by STOP."""
    return PROTO5 + b"".join(parts) + op("STOP")


def framed(*parts: bytes) -> bytes:
    """A protocol 5 pickle of ``parts`` and STOP in one frame, as AmberDB's writer makes them."""
    body = b"".join(parts) + op("STOP")
    return PROTO5 + op("FRAME", struct.pack("<Q", len(body))) + body
