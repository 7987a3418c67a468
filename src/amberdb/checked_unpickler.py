"""A pickle machine in Python that enforces every limit itself, for records the C one cannot run.

CPython's C unpickler is fast but trusts its input: its memo table is sized by an index in
the pickle (9 bytes can make it allocate gigabytes), extension codes bypass ``find_class``,
and any callable a pickle names is called with whatever arguments the pickle builds.
:class:`CheckedUnpickler` runs the same opcodes (``pickletools`` documents them; a test checks
:data:`OPCODES` against it) with:

* a dict for the memo;
* extension opcodes (EXT1/EXT2/EXT4) refused;
* the callables in :data:`ARGUMENT_CHECKS` -- constructors that could turn a few bytes into
  a lot (``bytearray(10**9)``, ``list(range(10**10))``, ``Fraction("1e100000000")``,
  ``str(data, "idna")`` importing a codec) or spend time quadratic in the record's size
  (``Fraction(a, b)`` and ``Decimal(a)`` of integers of a megabyte) -- called only with the
  arguments their own pickling writes, integers of at most :data:`BIG_INT_BITS` bits;
* every container's nesting depth counted, refused beyond :data:`MAX_NESTING` (hashing a
  deeply nested tuple overflows the C stack);
* lengths checked against the data before anything is allocated;
* BUILD, APPEND(S), SETITEM(S) and ADDITEMS refused on anything the pickle did not build:
  the globals it names (classes, functions), the objects it refers to, enum members.  A
  record fills in its own objects; a tampered one could otherwise patch a class for the
  whole process (BUILD on ``fractions.Fraction``) or rewrite an object it merely mentions.

It is about ten times slower than the C unpickler; :mod:`amberdb.unpickler` decides which of
the two runs a record.
"""

from __future__ import annotations

import codecs
import enum
import pickle
import re
import struct
import sys
import types
from collections.abc import Callable, Container
from typing import Any

from amberdb.exceptions import RecordDecodeError

__all__ = [
    "ARGUMENT_CHECKS",
    "BIG_INT_BITS",
    "MAX_NESTING",
    "OPCODES",
    "CheckedUnpickler",
    "argument_check",
    "build",
    "checks_only_big_ints",
    "needs_checked_calls",
]

MAX_NESTING = 1000
"""The deepest container nesting a state may have (AmberDB's writer cannot write deeper)."""

# Argument layouts of the opcodes.
FIXED = "fixed"  # a fixed number of bytes
LEN1 = "len1"  # a 1-byte length, then that many bytes
LEN4 = "len4"  # a 4-byte little-endian length, then that many bytes
LEN8 = "len8"  # an 8-byte little-endian length, then that many bytes
LINE = "line"  # bytes up to a newline
LINES2 = "lines2"  # two newline-terminated lines

OPCODES: dict[str, tuple[bytes, str, int]] = {
    "MARK": (b"(", FIXED, 0), "STOP": (b".", FIXED, 0), "POP": (b"0", FIXED, 0),
    "POP_MARK": (b"1", FIXED, 0), "DUP": (b"2", FIXED, 0), "FLOAT": (b"F", LINE, 0),
    "INT": (b"I", LINE, 0), "BININT": (b"J", FIXED, 4), "BININT1": (b"K", FIXED, 1),
    "LONG": (b"L", LINE, 0), "BININT2": (b"M", FIXED, 2), "NONE": (b"N", FIXED, 0),
    "PERSID": (b"P", LINE, 0), "BINPERSID": (b"Q", FIXED, 0), "REDUCE": (b"R", FIXED, 0),
    "STRING": (b"S", LINE, 0), "BINSTRING": (b"T", LEN4, 0), "SHORT_BINSTRING": (b"U", LEN1, 0),
    "UNICODE": (b"V", LINE, 0), "BINUNICODE": (b"X", LEN4, 0), "APPEND": (b"a", FIXED, 0),
    "BUILD": (b"b", FIXED, 0), "GLOBAL": (b"c", LINES2, 0), "DICT": (b"d", FIXED, 0),
    "EMPTY_DICT": (b"}", FIXED, 0), "APPENDS": (b"e", FIXED, 0), "GET": (b"g", LINE, 0),
    "BINGET": (b"h", FIXED, 1), "INST": (b"i", LINES2, 0), "LONG_BINGET": (b"j", FIXED, 4),
    "LIST": (b"l", FIXED, 0), "EMPTY_LIST": (b"]", FIXED, 0), "OBJ": (b"o", FIXED, 0),
    "PUT": (b"p", LINE, 0), "BINPUT": (b"q", FIXED, 1), "LONG_BINPUT": (b"r", FIXED, 4),
    "SETITEM": (b"s", FIXED, 0), "TUPLE": (b"t", FIXED, 0), "EMPTY_TUPLE": (b")", FIXED, 0),
    "SETITEMS": (b"u", FIXED, 0), "BINFLOAT": (b"G", FIXED, 8), "PROTO": (b"\x80", FIXED, 1),
    "NEWOBJ": (b"\x81", FIXED, 0), "EXT1": (b"\x82", FIXED, 1), "EXT2": (b"\x83", FIXED, 2),
    "EXT4": (b"\x84", FIXED, 4), "TUPLE1": (b"\x85", FIXED, 0), "TUPLE2": (b"\x86", FIXED, 0),
    "TUPLE3": (b"\x87", FIXED, 0), "NEWTRUE": (b"\x88", FIXED, 0), "NEWFALSE": (b"\x89", FIXED, 0),
    "LONG1": (b"\x8a", LEN1, 0), "LONG4": (b"\x8b", LEN4, 0), "BINBYTES": (b"B", LEN4, 0),
    "SHORT_BINBYTES": (b"C", LEN1, 0), "SHORT_BINUNICODE": (b"\x8c", LEN1, 0),
    "BINUNICODE8": (b"\x8d", LEN8, 0), "BINBYTES8": (b"\x8e", LEN8, 0),
    "EMPTY_SET": (b"\x8f", FIXED, 0), "ADDITEMS": (b"\x90", FIXED, 0),
    "FROZENSET": (b"\x91", FIXED, 0), "NEWOBJ_EX": (b"\x92", FIXED, 0),
    "STACK_GLOBAL": (b"\x93", FIXED, 0), "MEMOIZE": (b"\x94", FIXED, 0),
    "FRAME": (b"\x95", FIXED, 8), "BYTEARRAY8": (b"\x96", LEN8, 0),
    "NEXT_BUFFER": (b"\x97", FIXED, 0), "READONLY_BUFFER": (b"\x98", FIXED, 0),
}  # fmt: skip
"""Every opcode of pickle protocols 0-5: its byte, and the layout and size of its argument."""

# -- constructors whose arguments are checked ---------------------------------------------

_SAFE_ENCODINGS = frozenset({"ascii", "latin-1", "latin1", "iso-8859-1", "utf-8", "utf8", "utf_8"})
for _encoding in (*_SAFE_ENCODINGS, "raw-unicode-escape"):
    # Codecs load their module on first use, and a load imports nothing: look them up now.
    codecs.lookup(_encoding)
_FRACTION_TEXT = re.compile(r"\s*[+-]?\d{1,4300}(?:/\d{1,4300})?\s*\Z")
_INT_TEXT_LIMIT = 4300  # CPython's default int <-> str digit limit

BIG_INT_BITS = 1 << 15
"""The most bits of an integer a record may pass to ``Fraction(a, b)`` or ``Decimal(a)``.

Their greatest common divisor and base conversion take time quadratic in the bits: a few
milliseconds at this size, a second at a megabit.  It is above what an integer written as
text can reach (CPython's 4300 digits), so only LONG4 ever brings a larger one.  AmberDB's
writer refuses to store a Fraction beyond it (a Decimal pickles as text, of any length)."""


def _is_concrete(value: Any) -> bool:
    """A value whose size is already paid for: no lazy ``range``, no ghost to load."""
    return isinstance(value, (list, tuple, set, frozenset, dict, str, bytes, bytearray))


def _check_container(args: tuple[Any, ...], extra: int = 0) -> bool:
    if not args:
        return True
    return _is_concrete(args[0]) and len(args) <= 1 + extra


def _check_deque(args: tuple[Any, ...]) -> bool:
    return _check_container(args, extra=1) and (len(args) < 2 or args[1] is None or type(args[1]) is int)


def _check_bytes(args: tuple[Any, ...]) -> bool:
    if not args:
        return True
    first = args[0]
    if len(args) == 1:
        return isinstance(first, (bytes, bytearray, list, tuple))
    return (
        len(args) == 2
        and isinstance(first, str)
        and isinstance(args[1], str)
        and args[1].lower() in _SAFE_ENCODINGS
    )


def _check_str(args: tuple[Any, ...]) -> bool:
    if not args:
        return True
    if len(args) == 1:
        return isinstance(args[0], str)
    return (
        len(args) == 2
        and isinstance(args[0], (bytes, bytearray))
        and isinstance(args[1], str)
        and args[1].lower() in _SAFE_ENCODINGS
    )


def _check_int(args: tuple[Any, ...]) -> bool:
    if not args:
        return True
    first = args[0]
    if type(first) in (int, bool, float):
        return len(args) == 1
    if isinstance(first, str) and len(first) <= _INT_TEXT_LIMIT:
        return len(args) == 1 or (len(args) == 2 and type(args[1]) is int)
    return False


def _is_small_int(value: Any) -> bool:
    return type(value) is int and value.bit_length() <= BIG_INT_BITS


def _check_fraction(args: tuple[Any, ...]) -> bool:
    if len(args) == 2:
        return _is_small_int(args[0]) and _is_small_int(args[1])
    if not args:
        return True
    return len(args) == 1 and (
        type(args[0]) in (int, float)  # one integer is the numerator as it is: no gcd
        or (isinstance(args[0], str) and _FRACTION_TEXT.match(args[0]) is not None)
    )


def _check_decimal(args: tuple[Any, ...]) -> bool:
    # Refuses big integers only: what the C unpickler can make without LONG4 always passes,
    # so a record holding no LONG4 byte may run there (see amberdb.unpickler).
    return not any(type(arg) is int and not _is_small_int(arg) for arg in args)


ARGUMENT_CHECKS: dict[tuple[str, str], Callable[[tuple[Any, ...]], bool]] = {
    ("builtins", "list"): _check_container,
    ("builtins", "tuple"): _check_container,
    ("builtins", "set"): _check_container,
    ("builtins", "frozenset"): _check_container,
    ("builtins", "dict"): _check_container,
    ("collections", "Counter"): _check_container,
    ("collections", "deque"): _check_deque,
    ("builtins", "bytes"): _check_bytes,
    ("builtins", "bytearray"): _check_bytes,
    ("builtins", "str"): _check_str,
    ("builtins", "int"): _check_int,
    ("fractions", "Fraction"): _check_fraction,
    ("decimal", "Decimal"): _check_decimal,
}
"""Callables a record may name whose calls could turn a few bytes into a lot, by module and
qualified name: each may run only with the arguments its own pickling writes."""


def _check_of(obj: Any) -> Callable[[tuple[Any, ...]], bool] | None:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if type(module) is not str or type(qualname) is not str:
        return None
    return ARGUMENT_CHECKS.get((module, qualname))


def argument_check(func: Any, new_only: bool) -> Callable[[tuple[Any, ...]], bool] | None:
    """The check for calling ``func`` (or, ``new_only``, its ``__new__``), if it needs one."""
    check = _check_of(func)
    if check is not None or not isinstance(func, type):
        return check
    # A subclass of a checked type that keeps the base's constructor consumes its
    # arguments the same way (a list subclass fed a range, say).
    for base in func.__mro__[1:]:
        base_check = _check_of(base)
        if base_check is not None:
            inherited = func.__new__ is base.__new__ and (new_only or func.__init__ is base.__init__)  # type: ignore[misc]
            return base_check if inherited else None
    return None


def checks_only_big_ints(obj: Any) -> bool:
    """Whether calls of ``obj`` are refused only for integers beyond :data:`BIG_INT_BITS`."""
    checks = {argument_check(obj, new_only=True), argument_check(obj, new_only=False)} - {None}
    return checks == {_check_decimal}


def needs_checked_calls(obj: Any) -> bool:
    """Whether calls of ``obj`` must go through :class:`CheckedUnpickler`'s argument checks."""
    return argument_check(obj, new_only=True) is not None or argument_check(obj, new_only=False) is not None


def _refuse_call(func: Any, args: tuple[Any, ...]) -> RecordDecodeError:
    shown = ", ".join(type(arg).__qualname__ for arg in args)
    name = getattr(func, "__qualname__", type(func).__qualname__)
    module = getattr(func, "__module__", "")
    big = [arg.bit_length() for arg in args if type(arg) is int and not _is_small_int(arg)]
    if big:
        why = (
            f"an integer of {max(big)} bits, more than {BIG_INT_BITS} (a record may not make it "
            "spend time quadratic in its size)"
        )
    else:
        why = (
            "not the arguments its own pickling writes (a record may not make a large object "
            "out of a few bytes)"
        )
    return RecordDecodeError(f"refused to call {module}.{name}({shown}): {why}")


# -- the machine --------------------------------------------------------------------------


# What a pickle never fills in, whoever built it: classes, functions and modules are shared
# by the whole process, and enum members are singletons.
_NEVER_FILLED = (
    type,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    types.ModuleType,
    enum.Enum,
)


def _refuse_change(target: Any, operation: str) -> RecordDecodeError:
    if isinstance(target, type):
        what = f"class {target.__module__}.{target.__qualname__}"
    else:
        what = f"{type(target).__module__}.{type(target).__qualname__} object"
    return RecordDecodeError(
        f"{operation} on a {what} the record did not build (a record only fills in the objects "
        "it builds itself)"
    )


def build(inst: Any, state: Any, foreign: Container[int] = ()) -> None:
    """Pickle's BUILD: give ``inst`` its ``state``, as CPython's unpicklers do.

    Refused on what a pickle never fills in (see ``_NEVER_FILLED``) and on objects whose id
    is in ``foreign`` (what the pickle did not build).
    """
    if isinstance(inst, _NEVER_FILLED) or id(inst) in foreign:
        raise _refuse_change(inst, "BUILD")
    setstate = getattr(inst, "__setstate__", None)
    if setstate is not None:
        setstate(state)
        return
    slotstate = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slotstate = state
    if state:
        inst_dict = inst.__dict__
        for key, value in state.items():
            inst_dict[sys.intern(key) if type(key) is str else key] = value
    if slotstate:
        for key, value in slotstate.items():
            setattr(inst, key, value)


_UNPACK_I4 = struct.Struct("<i").unpack_from
_UNPACK_U4 = struct.Struct("<I").unpack_from
_UNPACK_U8 = struct.Struct("<Q").unpack_from
_UNPACK_F8 = struct.Struct(">d").unpack_from


class CheckedUnpickler:
    """Runs a pickle with every safeguard in Python (see the module docstring).

    Follows CPython's unpickler opcode for opcode (``pickletools`` documents them), with a
    dict for the memo, extension codes refused, the risky constructors' arguments checked,
    and the nesting depth of every container built counted.
    """

    def __init__(
        self,
        data: bytes,
        find_global: Callable[[str, str], Any],
        persistent_load: Callable[[Any], Any],
        memo: dict[int, Any] | None = None,
    ) -> None:
        """Ready to run ``data``; ``memo`` holds entries the pickle expects to find there."""
        self._data = data
        self._pos = 0
        self._find_global = find_global
        self._persistent_load = persistent_load
        self._stack: list[Any] = []
        self._marks: list[int] = []
        self._memo: dict[int, Any] = dict(memo or {})
        # Objects that come from outside the pickle (globals, references, the memo given), by
        # id; kept alive by whoever handed them over for as long as the load runs.
        self._foreign: dict[int, Any] = {id(value): value for value in self._memo.values()}
        # Nesting depth of each container built here, by id; _built keeps them alive so an
        # id is never reused while the load runs.
        self._depths: dict[int, int] = {}
        self._built: list[Any] = []
        self._stopped = False
        self._result: Any = None
        self._frame_end: int | None = None

    # -- reading ------------------------------------------------------------------------

    def _take(self, size: int) -> bytes:
        start = self._pos
        end = start + size
        if size < 0 or end > len(self._data):
            raise RecordDecodeError("pickle data was truncated")
        self._check_frame(end)
        self._pos = end
        return self._data[start:end]

    def _line(self) -> bytes:
        data = self._data
        start = self._pos
        end = data.find(b"\n", start)
        if end < 0:
            raise RecordDecodeError("pickle data was truncated (a line without its end)")
        self._check_frame(end + 1)
        self._pos = end + 1
        return data[start:end]

    def _check_frame(self, end: int) -> None:
        # As Python's own unpicklers do (the C one since 3.13.15 / 3.14.7): an argument may
        # not run past the end of the frame it starts in.
        if self._frame_end is not None and end > self._frame_end:
            raise RecordDecodeError(f"an argument runs past the end of its frame at offset {self._frame_end}")

    def _length(self, size: int) -> int:
        raw = self._take(size)
        return raw[0] if size == 1 else (_UNPACK_U4(raw)[0] if size == 4 else _UNPACK_U8(raw)[0])

    # -- the stack ----------------------------------------------------------------------

    def _pop_mark(self) -> list[Any]:
        if not self._marks:
            raise RecordDecodeError("could not find MARK")
        start = self._marks.pop()
        items = self._stack[start:]
        del self._stack[start:]
        return items

    def _top(self) -> Any:
        if len(self._stack) <= (self._marks[-1] if self._marks else 0):
            raise RecordDecodeError("unpickling stack underflow")
        return self._stack[-1]

    def _pop(self) -> Any:
        self._top()
        return self._stack.pop()

    def _depth(self, value: Any) -> int:
        return self._depths.get(id(value), 0)

    def _built_from(self, container: Any, items: Any) -> Any:
        """Note that ``container`` holds ``items``; refuse nesting beyond MAX_NESTING."""
        depth = 1 + max(map(self._depth, items), default=0)
        return self._set_depth(container, depth)

    def _set_depth(self, container: Any, depth: int) -> Any:
        if depth > MAX_NESTING:
            raise RecordDecodeError(f"containers nested more than {MAX_NESTING} levels deep")
        key = id(container)
        if depth > self._depths.get(key, 0):
            if key not in self._depths:
                self._built.append(container)
            self._depths[key] = depth
        return container

    def _grew(self, container: Any, item: Any) -> None:
        self._set_depth(container, 1 + self._depth(item))

    def _outside(self, value: Any) -> Any:
        """Note that ``value`` came from outside the pickle, which may not fill it in."""
        self._foreign[id(value)] = value
        return value

    def _target(self, operation: str) -> Any:
        """The object on top of the stack, which ``operation`` is about to fill in."""
        target = self._top()
        if id(target) in self._foreign or isinstance(target, _NEVER_FILLED):
            raise _refuse_change(target, operation)
        return target

    # -- running ------------------------------------------------------------------------

    def load(self) -> Any:
        """Run the pickle and return the object it builds."""
        data = self._data
        handlers = _HANDLERS
        while not self._stopped:
            if self._pos >= len(data):
                raise RecordDecodeError("pickle data was truncated (no STOP opcode)")
            if self._frame_end is not None and self._pos >= self._frame_end:
                self._frame_end = None
            op = data[self._pos]
            self._pos += 1
            handler = handlers.get(op)
            if handler is None:
                raise RecordDecodeError(f"invalid load key {bytes([op])!r} at offset {self._pos - 1}")
            handler(self)
        return self._result

    # -- calls ----------------------------------------------------------------------------

    def _call(self, func: Any, args: Any, kwargs: dict[str, Any] | None = None) -> Any:
        if not isinstance(args, tuple):
            raise RecordDecodeError(f"call arguments must be a tuple, not {type(args).__qualname__}")
        check = argument_check(func, new_only=False)
        if check is not None and (kwargs or not check(args)):
            raise _refuse_call(func, args)
        result = func(*args, **(kwargs or {}))
        if type(getattr(func, "__self__", None)) is list:
            # A list's method given from outside (the record's references, ``ghosts.__getitem__``)
            # hands back one of the list's items.
            self._outside(result)
        return self._built_from(result, args)

    def _new(self, cls: Any, args: Any, kwargs: Any = None) -> Any:
        if not isinstance(cls, type):
            raise RecordDecodeError(f"NEWOBJ class argument must be a type, not {type(cls).__qualname__}")
        if not isinstance(args, tuple) or (kwargs is not None and not isinstance(kwargs, dict)):
            raise RecordDecodeError("NEWOBJ arguments must be a tuple (and a dict)")
        check = argument_check(cls, new_only=True)
        if check is not None and (kwargs or not check(args)):
            raise _refuse_call(cls, args)
        obj: Any = cls.__new__(cls, *args, **(kwargs or {}))
        return self._built_from(obj, (*args, *kwargs.values()) if kwargs else args)

    def _global(self, module: Any, name: Any) -> Any:
        if type(module) is not str or type(name) is not str:
            raise RecordDecodeError("STACK_GLOBAL requires str")
        return self._outside(self._find_global(module, name))

    # -- opcode handlers (named after the opcodes; see pickletools) ------------------------

    def op_mark(self) -> None:
        self._marks.append(len(self._stack))

    def op_stop(self) -> None:
        self._result = self._pop()
        self._stopped = True

    def op_pop(self) -> None:
        if self._marks and self._marks[-1] == len(self._stack):
            self._marks.pop()
        else:
            self._pop()

    def op_pop_mark(self) -> None:
        self._pop_mark()

    def op_dup(self) -> None:
        self._stack.append(self._top())

    def op_float(self) -> None:
        self._stack.append(float(self._line().decode("ascii")))

    def op_int(self) -> None:
        line = self._line()
        if line == b"00":
            self._stack.append(False)
        elif line == b"01":
            self._stack.append(True)
        else:
            self._stack.append(self._parse_int(line))

    def op_long(self) -> None:
        line = self._line()
        self._stack.append(self._parse_int(line[:-1] if line.endswith(b"L") else line))

    @staticmethod
    def _parse_int(line: bytes) -> int:
        if len(line) > _INT_TEXT_LIMIT + 2:
            raise RecordDecodeError(f"integer of {len(line)} digits is longer than {_INT_TEXT_LIMIT}")
        return int(line.decode("ascii"))

    def op_binint(self) -> None:
        self._stack.append(_UNPACK_I4(self._take(4))[0])

    def op_binint1(self) -> None:
        self._stack.append(self._take(1)[0])

    def op_binint2(self) -> None:
        self._stack.append(int.from_bytes(self._take(2), "little"))

    def op_long1(self) -> None:
        self._stack.append(int.from_bytes(self._take(self._length(1)), "little", signed=True))

    def op_long4(self) -> None:
        size = _UNPACK_I4(self._take(4))[0]
        if size < 0:
            raise RecordDecodeError("LONG pickle has negative byte count")
        self._stack.append(int.from_bytes(self._take(size), "little", signed=True))

    def op_none(self) -> None:
        self._stack.append(None)

    def op_newtrue(self) -> None:
        self._stack.append(True)

    def op_newfalse(self) -> None:
        self._stack.append(False)

    def op_binfloat(self) -> None:
        self._stack.append(_UNPACK_F8(self._take(8))[0])

    def op_string(self) -> None:
        line = self._line()
        if len(line) < 2 or line[0] != line[-1] or line[0] not in b"\"'":
            raise RecordDecodeError("the STRING opcode argument must be quoted")
        raw: bytes = codecs.escape_decode(line[1:-1])[0]
        self._stack.append(raw.decode("ascii"))

    def op_binstring(self) -> None:
        size = _UNPACK_I4(self._take(4))[0]
        if size < 0:
            raise RecordDecodeError("BINSTRING pickle has negative byte count")
        self._stack.append(self._take(size).decode("ascii"))

    def op_short_binstring(self) -> None:
        self._stack.append(self._take(self._length(1)).decode("ascii"))

    def op_unicode(self) -> None:
        self._stack.append(self._line().decode("raw-unicode-escape"))

    def op_binunicode(self) -> None:
        self._stack.append(self._take(self._length(4)).decode("utf-8", "surrogatepass"))

    def op_short_binunicode(self) -> None:
        self._stack.append(self._take(self._length(1)).decode("utf-8", "surrogatepass"))

    def op_binunicode8(self) -> None:
        self._stack.append(self._take(self._length(8)).decode("utf-8", "surrogatepass"))

    def op_binbytes(self) -> None:
        self._stack.append(self._take(self._length(4)))

    def op_short_binbytes(self) -> None:
        self._stack.append(self._take(self._length(1)))

    def op_binbytes8(self) -> None:
        self._stack.append(self._take(self._length(8)))

    def op_bytearray8(self) -> None:
        self._stack.append(bytearray(self._take(self._length(8))))

    def op_next_buffer(self) -> None:
        raise RecordDecodeError("pickle stream refers to out-of-band data but no buffers were given")

    op_readonly_buffer = op_next_buffer

    def op_persid(self) -> None:
        self._stack.append(self._outside(self._persistent_load(self._line().decode("ascii"))))

    def op_binpersid(self) -> None:
        self._stack.append(self._outside(self._persistent_load(self._pop())))

    def op_reduce(self) -> None:
        args = self._pop()
        func = self._pop()
        self._stack.append(self._call(func, args))

    def op_newobj(self) -> None:
        args = self._pop()
        cls = self._pop()
        self._stack.append(self._new(cls, args))

    def op_newobj_ex(self) -> None:
        kwargs = self._pop()
        args = self._pop()
        cls = self._pop()
        self._stack.append(self._new(cls, args, kwargs))

    def op_global(self) -> None:
        module = self._line().decode("utf-8")
        name = self._line().decode("utf-8")
        self._stack.append(self._outside(self._find_global(module, name)))

    def op_stack_global(self) -> None:
        name = self._pop()
        module = self._pop()
        self._stack.append(self._global(module, name))

    def op_inst(self) -> None:
        module = self._line().decode("ascii")
        name = self._line().decode("ascii")
        cls = self._outside(self._find_global(module, name))
        self._stack.append(self._instantiate(cls, tuple(self._pop_mark())))

    def op_obj(self) -> None:
        items = self._pop_mark()
        if not items:
            raise RecordDecodeError("OBJ without a class")
        self._stack.append(self._instantiate(items[0], tuple(items[1:])))

    def _instantiate(self, cls: Any, args: tuple[Any, ...]) -> Any:
        if args or not isinstance(cls, type) or hasattr(cls, "__getinitargs__"):
            return self._call(cls, args)
        return self._new(cls, ())

    def op_build(self) -> None:
        state = self._pop()
        inst = self._target("BUILD")
        build(inst, state)
        self._grew(inst, state)

    def op_empty_dict(self) -> None:
        self._stack.append({})

    def op_empty_list(self) -> None:
        self._stack.append([])

    def op_empty_tuple(self) -> None:
        self._stack.append(())

    def op_empty_set(self) -> None:
        self._stack.append(set())

    def op_dict(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise RecordDecodeError("odd number of items for DICT")
        built = {items[i]: items[i + 1] for i in range(0, len(items), 2)}
        self._stack.append(self._built_from(built, items))

    def op_list(self) -> None:
        items = self._pop_mark()
        self._stack.append(self._built_from(items, items))

    def op_tuple(self) -> None:
        items = tuple(self._pop_mark())
        self._stack.append(self._built_from(items, items))

    def _tuple_of(self, count: int) -> None:
        stack = self._stack
        if len(stack) - count < (self._marks[-1] if self._marks else 0):
            raise RecordDecodeError("unpickling stack underflow")
        items = tuple(stack[-count:])
        del stack[-count:]
        stack.append(self._built_from(items, items))

    def op_tuple1(self) -> None:
        self._tuple_of(1)

    def op_tuple2(self) -> None:
        self._tuple_of(2)

    def op_tuple3(self) -> None:
        self._tuple_of(3)

    def op_frozenset(self) -> None:
        items = self._pop_mark()
        built = frozenset(items)
        self._stack.append(self._built_from(built, items))

    def op_append(self) -> None:
        value = self._pop()
        target = self._target("APPEND")
        target.append(value)
        self._grew(target, value)

    def op_appends(self) -> None:
        items = self._pop_mark()
        target = self._target("APPENDS")
        if type(target) is list:
            target.extend(items)
        else:
            extend = getattr(target, "extend", None)
            if extend is not None:
                extend(items)
            else:
                for item in items:
                    target.append(item)
        self._set_depth(target, 1 + max(map(self._depth, items), default=0))

    def op_setitem(self) -> None:
        value = self._pop()
        key = self._pop()
        target = self._target("SETITEM")
        target[key] = value
        self._set_depth(target, 1 + max(self._depth(key), self._depth(value)))

    def op_setitems(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise RecordDecodeError("odd number of items for SETITEMS")
        target = self._target("SETITEMS")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
        self._set_depth(target, 1 + max(map(self._depth, items), default=0))

    def op_additems(self) -> None:
        items = self._pop_mark()
        target = self._target("ADDITEMS")
        if isinstance(target, set):
            target.update(items)
        else:
            for item in items:
                target.add(item)
        self._set_depth(target, 1 + max(map(self._depth, items), default=0))

    def op_get(self) -> None:
        self._get(self._parse_int(self._line()))

    def op_binget(self) -> None:
        self._get(self._take(1)[0])

    def op_long_binget(self) -> None:
        self._get(_UNPACK_U4(self._take(4))[0])

    def _get(self, index: int) -> None:
        try:
            self._stack.append(self._memo[index])
        except KeyError:
            raise RecordDecodeError(f"memo value not found at index {index}") from None

    def op_put(self) -> None:
        self._put(self._parse_int(self._line()))

    def op_binput(self) -> None:
        self._put(self._take(1)[0])

    def op_long_binput(self) -> None:
        self._put(_UNPACK_U4(self._take(4))[0])

    def _put(self, index: int) -> None:
        # A pickler numbers memo entries from 0, one per entry: an index as large as the
        # record is not from one (and would make the C unpickler allocate a table that big).
        if not 0 <= index < max(len(self._data), 256):
            raise RecordDecodeError(f"memo index {index} is out of range for a {len(self._data)}-byte pickle")
        self._memo[index] = self._top()

    def op_memoize(self) -> None:
        self._memo[len(self._memo)] = self._top()

    def op_ext1(self) -> None:
        raise RecordDecodeError(
            "the pickle uses an extension code (EXT1/EXT2/EXT4), which resolves through copyreg "
            "without the allow-list; AmberDB records never use them"
        )

    op_ext2 = op_ext4 = op_ext1

    def op_proto(self) -> None:
        proto = self._take(1)[0]
        if proto > pickle.HIGHEST_PROTOCOL:
            raise RecordDecodeError(f"unsupported pickle protocol: {proto}")

    def op_frame(self) -> None:
        if self._frame_end is not None:
            raise RecordDecodeError("a FRAME begins before the previous frame ends")
        size = _UNPACK_U8(self._take(8))[0]
        if size > len(self._data) - self._pos:
            raise RecordDecodeError("pickle frame runs past the end of the data")
        self._frame_end = self._pos + size


_HANDLERS: dict[int, Callable[[CheckedUnpickler], None]] = {
    code[0]: getattr(CheckedUnpickler, "op_" + name.lower()) for name, (code, _, _) in OPCODES.items()
}
