"""Unpickling untrusted record states: nothing runs, nothing is imported, memory stays bounded.

A record's state is a pickle, and a pickle is a program for a small stack machine.  Anyone
who can write a record (a tampered file, a hostile client of a server) writes that program.
:func:`load_state` runs it so that:

* every global it names goes through the caller's allow-list, and pickle's extension codes
  (EXT1/EXT2/EXT4), which resolve through :mod:`copyreg`'s process-wide cache without asking
  anyone, are refused;
* no module is imported while it runs, except through :func:`permitted_import` (the
  allow-list importing a module it allows) or one the allow-list says may be -- an import
  hook checks;
* memory and time stay proportional to the record: no memo table sized by a number in the
  record, no constructor turning a few bytes into a gigabyte, no nesting deep enough to
  overflow the C stack when a nested tuple is hashed.

Two machines can run the program.  CPython's C unpickler is fast, and runs a record only
when a pre-check shows it cannot reach its dangers: no byte of the record could be an
opcode that makes it allocate by a number in the record (PUT and LONG_BINPUT size its memo
table by their index; BINBYTES, BINBYTES8 and BYTEARRAY8 allocate the length they announce
before reading it) or -- once :mod:`copyreg` has any -- an extension opcode, or else a walk
over the opcodes shows those are harmless; and the record has too few nesting opcodes to
nest deeply.  If it meets a global whose calls need
their arguments checked (containers, ``bytes``, ``str``, ``int``, ``Fraction``, see
:mod:`amberdb.checked_unpickler`), it gives up and the checked machine starts over --
``Decimal`` only in a record with a LONG4 byte, the one opcode that can make an integer too
big for it.  The
checked machine runs everything else: legacy protocols, ``defaultdict(list)``, hostile input.
Both produce the same states for every pickle AmberDB's writer makes; a test runs them side
by side.

Not prevented: hash flooding (many integer keys of one dict sharing a hash) costs time
quadratic in the record's size; a record may make a constructor iterate over an object it
references (loading that object); allowed application classes run their own code.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import enum
import io
import pickle
import re
import sys
import types
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Any, Protocol

from amberdb.checked_unpickler import FIXED, LEN1, LEN4, LEN8, LINE, LINES2, OPCODES, CheckedUnpickler
from amberdb.checked_unpickler import build as _build
from amberdb.checked_unpickler import checks_only_big_ints as _checks_only_big_ints
from amberdb.checked_unpickler import needs_checked_calls as _needs_checked_calls
from amberdb.exceptions import RecordDecodeError

__all__ = [
    "FAST_NESTING_BUDGET",
    "GlobalFinder",
    "ImportRefusedError",
    "install_import_guard",
    "load_state",
    "permitted_import",
]

FAST_NESTING_BUDGET = 1000
"""At most this many nesting opcodes for the C unpickler: hashing a nested tuple recurses in
C once per level, about 70 bytes of stack each, and 1,000 levels fit in the smallest thread
stacks in use (128 KiB on musl)."""


class GlobalFinder(Protocol):
    """What the allow-list gives :func:`load_state`."""

    def find(self, module: str, qualname: str) -> Any:
        """The object named ``module``/``qualname``; UnsafeGlobalError if not allowed."""
        ...

    def import_allowed(self, module: str) -> bool:
        """Whether code running during a load may import ``module``."""
        ...


class ImportRefusedError(ImportError):
    """Something tried to import a module while a record was being loaded."""


# -- the pre-check -------------------------------------------------------------------------

_MEMO_PUTS = frozenset(b"pr")  # PUT, LONG_BINPUT
_EXTENSIONS = frozenset(b"\x82\x83\x84")
# The danger of nesting is C recursion: hashing a tuple hashes its items, so a chain of
# tuples inside tuples (or of what wraps its arguments in one: namedtuples, slices) recurses
# once a level.  Each level of such a chain needs one of these opcodes: TUPLE1-3 and TUPLE
# build tuples (also the argument tuple any REDUCE or NEWOBJ call needs), OBJ and INST call
# with arguments taken from the stack, NEWOBJ_EX with keyword arguments too.  Lists and
# dicts are not hashed; a frozenset keeps the hashes of its items (so it ends a chain).
_NESTING_OPS = frozenset(b"\x85\x86\x87toi\x92")
_NOT_NESTING_OPS = bytes(sorted(set(range(256)) - _NESTING_OPS))

# Scan steps: > 0 is the opcode's whole size; the negative codes name the argument layout.
_S_LEN1, _S_LEN4, _S_LEN8, _S_LINE, _S_LINES2, _S_STOP, _S_UNSAFE, _S_UNKNOWN = range(-1, -9, -1)
_LAYOUT_STEPS = {LEN1: _S_LEN1, LEN4: _S_LEN4, LEN8: _S_LEN8, LINE: _S_LINE, LINES2: _S_LINES2}


def _scan_steps() -> tuple[int, ...]:
    steps = [_S_UNKNOWN] * 256
    for code, layout, size in OPCODES.values():
        steps[code[0]] = 1 + size if layout == FIXED else _LAYOUT_STEPS[layout]
    for op in _MEMO_PUTS | _EXTENSIONS:
        steps[op] = _S_UNSAFE
    steps[OPCODES["STOP"][0][0]] = _S_STOP
    return tuple(steps)


_SCAN_STEPS = _scan_steps()
_INST = OPCODES["INST"][0][0]


_MEMOIZE = OPCODES["MEMOIZE"][0][0]
_FRAME = OPCODES["FRAME"][0][0]
_NOT_SAFE = -1


# hot path: every record holding a byte that could be one of those opcodes (any text with a
# "p" or an "r" in it), so it is written for speed: about 60 ns an opcode.
def _scan(data: bytes, count_nesting: bool = False, steps: Sequence[int] = _SCAN_STEPS) -> int:
    """Whether the C unpickler may run ``data``: a walk over its opcodes up to STOP.

    Returns -1 for a memo or extension opcode, an unknown opcode, a length running past the
    end (which the C unpickler would allocate before noticing), or an argument running past
    the end of its FRAME -- the C unpickler of Python before 3.13.15/3.14.7 then reads the
    argument from after the frame, so a walk over the bytes in order would not see the
    opcodes it runs.  The checked machine deals with all of those.  Otherwise 0, or with
    ``count_nesting`` the number of opcodes that can add a level of nesting.
    """
    pos = 0
    end = len(data)  # of the current frame, or of the data outside frames
    nesting = 0
    nesting_ops = _NESTING_OPS
    try:
        while True:
            op = data[pos]
            step = steps[op]
            if step == _S_LEN1:  # short strings and bytes, nearly always memoized next
                pos += 2 + data[pos + 1]
                if pos < end and data[pos] == _MEMOIZE:
                    pos += 1
            elif step > 0:
                if op == _FRAME:
                    if end != len(data):
                        return _NOT_SAFE  # a frame inside a frame
                    end = pos + 9 + int.from_bytes(data[pos + 1 : pos + 9], "little")
                    if end > len(data):
                        return _NOT_SAFE
                elif count_nesting and op in nesting_ops:
                    nesting += 1
                pos += step
            elif step == _S_STOP:
                return nesting
            elif step == _S_LEN4:
                pos += 5 + int.from_bytes(data[pos + 1 : pos + 5], "little")
            elif step == _S_LEN8:
                pos += 9 + int.from_bytes(data[pos + 1 : pos + 9], "little")
            elif step == _S_LINE:
                nesting += op == _INST
                pos = data.index(b"\n", pos, end) + 1
            elif step == _S_LINES2:
                nesting += op == _INST
                pos = data.index(b"\n", data.index(b"\n", pos, end) + 1, end) + 1
            else:
                return _NOT_SAFE
            if pos >= end:
                if pos > end:
                    return _NOT_SAFE  # past the data, or an argument across a frame's end
                end = len(data)
    except (IndexError, ValueError):
        return _NOT_SAFE  # ran off the end: the checked machine reports the truncation


# copyreg's extension tables: mutated in place by copyreg.add_extension, never replaced.
_EXTENSION_CODES: dict[int, tuple[str, str]] = getattr(copyreg, "_inverted_registry")  # noqa: B009
_EXTENSION_CACHE: dict[int, Any] = getattr(copyreg, "_extension_cache")  # noqa: B009

# The bytes of the opcodes by which the C unpickler could size an allocation by a number in
# the record: PUT and LONG_BINPUT (its memo table grows to twice their index), BINBYTES,
# BINBYTES8 and BYTEARRAY8 (it allocates the length they announce before reading them); and,
# once copyreg has any, the extension opcodes.  A record with none of these byte values
# cannot reach them, however its opcodes are parsed.  Marked too: the memo-get opcodes
# (BINGET, LONG_BINGET, GET), since without them the memo's numbering does not matter.
# translate() keeping only the marked bytes is the cheapest test for their presence.
_SIZING_OPS = frozenset(b"prB\x8e\x96")
_MEMO_GETS = b"hjg"
_ALL_BUT_MARKED = bytes(sorted(set(range(256)) - _SIZING_OPS - set(_MEMO_GETS)))
_ALL_BUT_MARKED_OR_EXTENSION = bytes(sorted(set(_ALL_BUT_MARKED) - _EXTENSIONS))


# How AmberDB writes a reference in a version 2 state: BINGET 0 (the function), the index,
# TUPLE1, MEMOIZE (the argument tuple), REDUCE, MEMOIZE (the ghost).
_REFERENCE_CALL = rb"h\x00(?:K.|M..|J....)\x85\x94R\x94"


def _token_alternatives(without: str = "", capture: bool = False) -> list[bytes]:
    """Regular expressions for the opcodes of an ordinary record, none of which sizes an
    allocation: each starts with its own opcode byte (and, for short strings, length byte),
    so at each position exactly one matches -- the parse the C unpickler makes.  A reference
    call is one token (its BINGET otherwise another), a group of its own if ``capture``;
    short strings come first: they are most of a record's opcodes.

    Only a pattern that is not repeated may capture: CPython releases with
    python/cpython#101955 (3.11.7 among them) raise SystemError for a capturing group inside
    a possessive repeat, which made records holding references, an "r" and a memo get fail
    to load."""
    short: set[int] = set()
    by_argument_size: dict[int, set[int]] = {0: set(), 1: set(), 2: set(), 4: set(), 8: set()}
    for name, (code, layout, size) in OPCODES.items():
        if name in ("STOP", "LONG_BINPUT", "EXT1", "EXT2", "EXT4", "FRAME", "BINGET", without):
            continue
        if layout == LEN1:
            short.add(code[0])
        elif layout == FIXED:
            by_argument_size[size].add(code[0])

    def any_of(codes: set[int]) -> bytes:
        return b"[" + b"".join(re.escape(bytes([code])) for code in sorted(codes)) + b"]"

    lengths = b"|".join(re.escape(bytes([n])) + b".{%d}" % n for n in range(256))
    # The MEMOIZE that nearly always follows a short string joins its token, possessively
    # (Python 3.11 on): one step fewer, and still one way to match.
    memoized = re.escape(OPCODES["MEMOIZE"][0]) + b"?+" if sys.version_info >= (3, 11) else b""
    alternatives = [
        any_of(short) + b"(?:" + lengths + b")" + memoized,
        any_of(by_argument_size[0]),
        (b"(" if capture else b"(?:") + _REFERENCE_CALL + b")",
        b"h(?!" + _REFERENCE_CALL[1:] + b").",  # any other BINGET
    ]
    alternatives += [any_of(by_argument_size[size]) + b"." * size for size in (1, 2, 4, 8)]
    return alternatives


# Compiled on first use: they take milliseconds.
_ordinary_tokens: list[re.Pattern[bytes]] = []
_FRAMED = OPCODES["PROTO"][0] + b"\x05" + OPCODES["FRAME"][0]
_FRAMED_BODY = 3 + 8  # where the opcodes start after PROTO 5 and FRAME n


def _patterns() -> list[re.Pattern[bytes]]:
    """[a record of ordinary opcodes up to STOP; one opcode, reference calls captured]."""
    if not _ordinary_tokens:
        token = b"(?:" + b"|".join(_token_alternatives()) + b")"
        stop = re.escape(OPCODES["STOP"][0])
        # One way to match at each position, so a failing match backtracks in linear time
        # (and from Python 3.11 not at all: a possessive repeat keeps no state to go back to).
        repeat = b"*+" if sys.version_info >= (3, 11) else b"*"
        _ordinary_tokens.append(re.compile(token + repeat + stop, re.DOTALL))
        capturing = b"(?:" + b"|".join(_token_alternatives(capture=True)) + b")"
        _ordinary_tokens.append(re.compile(capturing, re.DOTALL))
    return _ordinary_tokens


def _ordinary(data: bytes) -> bool:
    """Whether ``data`` is one frame of ordinary opcodes ending in STOP: what AmberDB writes.

    A regular expression walks the opcodes in C, about three times as fast as :func:`_scan`;
    whatever it does not know goes to the scan.  The frame must end where the data ends, so
    no argument can run past it.
    """
    return (
        data.startswith(_FRAMED)
        and int.from_bytes(data[3:_FRAMED_BODY], "little") == len(data) - _FRAMED_BODY
        and _patterns()[0].fullmatch(data, _FRAMED_BODY) is not None
    )


def _nesting_bound(data: bytes, reference_in_memo: bool) -> int:
    """An upper bound on how deeply the containers ``data`` builds can nest.

    Each level needs an opcode whose byte is one of the nesting opcodes, so their count
    bounds it.  A reference call has one of them (its TUPLE1) yet nests nothing -- the tuple
    holds a lone integer -- and a record of more than a thousand references would go to the
    slow machines for them: in an ordinary version 2 record, each reference call the parse
    really makes takes its one off.  Really makes: found as a token among tokens read one
    after the other from the start, in step with the C unpickler.  The same bytes elsewhere
    are no reference call -- after a POP, say, their TUPLE1 wraps whatever lay below.
    """
    count = len(data.translate(None, _NOT_NESTING_OPS))
    if count > FAST_NESTING_BUDGET and reference_in_memo and _ordinary(data):
        tokens = _patterns()[1].findall(data, _FRAMED_BODY)  # each a reference call or b""
        count -= len(tokens) - tokens.count(b"")
    return count


def _fast_unpickler_may_run(data: bytes, marked: bytes, reference_in_memo: bool) -> bool:
    """Whether the C unpickler can run ``data`` without reaching one of its dangers.

    ``marked`` is what :func:`load_state` found of the marked bytes.
    """
    if len(data) > FAST_NESTING_BUDGET and _nesting_bound(data, reference_in_memo) > FAST_NESTING_BUDGET:
        return 0 <= _scan(data, count_nesting=True) <= FAST_NESTING_BUDGET
    return not marked.strip(_MEMO_GETS) or _ordinary(data) or _scan(data) == 0


# -- the import guard ----------------------------------------------------------------------


class _ImportGuard(MetaPathFinder):
    """Refuses imports made, in the same thread, while :func:`load_state` runs.

    It costs nothing per load: only an actual import (a module not yet in ``sys.modules``)
    consults it, and it then looks through the calling thread's frames for ``load_state``.
    """

    def find_spec(
        self, fullname: str, path: Any = None, target: types.ModuleType | None = None
    ) -> ModuleSpec | None:
        """Raise ImportRefusedError when a record load is importing ``fullname``."""
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if code is _PERMITTED_IMPORT_CODE:
                return None  # the allow-list importing a module it allows
            if code is _LOAD_STATE_CODE:
                finder = frame.f_locals.get("finder")
                if finder is not None and finder.import_allowed(fullname):
                    return None
                raise ImportRefusedError(
                    f"loading a record tried to import module {fullname!r}, which is neither "
                    "imported yet nor in allowed_modules; import it before loading if it is "
                    "yours to trust",
                    name=fullname,
                )
            frame = frame.f_back
        return None


_GUARD = _ImportGuard()


def install_import_guard() -> None:
    """Put the import guard first in ``sys.meta_path`` (again, if something moved it)."""
    meta_path = sys.meta_path
    if not meta_path or meta_path[0] is not _GUARD:
        if _GUARD in meta_path:
            meta_path.remove(_GUARD)
        meta_path.insert(0, _GUARD)


def permitted_import(module: str) -> types.ModuleType:
    """Import ``module`` on behalf of the allow-list, past the import guard."""
    __import__(module)
    return sys.modules[module]


_PERMITTED_IMPORT_CODE = permitted_import.__code__


# -- loading -------------------------------------------------------------------------------


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global a protocol 0-2 pickle names the Python 2 way."""
    renamed = _compat_pickle.NAME_MAPPING.get((module, name))
    if renamed is not None:
        return renamed
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _NeedsCheckedLoad(Exception):  # noqa: N818 - a signal between the machines
    """The C unpickler met a global whose calls need checking: start over, checked."""


class _NeedsGuardedBuild(Exception):  # noqa: N818 - a signal between the machines
    """The C unpickler met a class pickle's BUILD could change: start over, BUILDs guarded."""


class _FastUnpickler(pickle.Unpickler):
    """The C unpickler behind the allow-list.

    Constructed per record with the C initializer (no Python ``__init__``: this is on the
    path of every load); :func:`load_state` sets the attributes.  Reusing one instance would
    be cheaper still, but clearing the C unpickler's memo costs more than a new one.
    """

    __slots__ = ("finder", "ghosts", "guarded", "record", "reference")
    finder: GlobalFinder
    record: bytes  # the record's pickle, as load_state was given it
    ghosts: list[Any]
    reference: tuple[str, str]
    guarded: bool  # its BUILDs come as persistent ids (see _guard_builds)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == self.reference:
            # Any index names one of the record's own references: a tampered record can
            # point at the wrong one of them, never at anything else.
            return self.ghosts.__getitem__
        found = self.finder.find(*_python3_name(module, name))
        verdict = _fast_verdicts.get(id(found))
        if verdict is None or verdict[0] is not found:
            verdict = _fast_verdicts[id(found)] = (found, _verdict(found))
        if verdict[1] != _FAST:
            if verdict[1] == _CHECKED:
                raise _NeedsCheckedLoad
            if verdict[1] == _CHECKED_IF_LONG4:
                if _LONG4 in self.record:
                    raise _NeedsCheckedLoad
                return found
            if not self.guarded:
                raise _NeedsGuardedBuild
        return found

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is tuple and self.guarded:
            # A BUILD, rewritten by _guard_builds: (the object, its state).
            if len(pid) != 2:
                raise RecordDecodeError("a persistent id must be an integer")
            _build(*pid)
            return pid[0]
        return _persistent_load(self.ghosts, pid)


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined in Python, its attributes settable
_IMMUTABLETYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE (3.10): ... unless this is set too

# Which machine may run a record naming a global: the C unpickler as it is, the C
# unpickler with BUILDs guarded, only the checked machine, or the checked machine if the
# record may hold an integer too big for the global's calls (it has a LONG4 byte).
_FAST, _GUARDED, _CHECKED, _CHECKED_IF_LONG4 = range(4)
_LONG4 = OPCODES["LONG4"][0]
# The verdict for each global met, by the global's id (the global kept with it).
_fast_verdicts: dict[int, tuple[Any, int]] = {}
# Methods the C unpickler's APPEND(S) and ADDITEMS would call on a class, as its functions.
_FILLING_METHODS = ("append", "extend", "add")


def _verdict(found: Any) -> int:
    """Which machine may run a record naming ``found``: one of _FAST, _GUARDED, _CHECKED,
    _CHECKED_IF_LONG4."""
    if _needs_checked_calls(found):
        return _CHECKED_IF_LONG4 if _checks_only_big_ints(found) and not _fillable(found) else _CHECKED
    if not _fillable(found):
        return _FAST
    if (
        isinstance(found, type)
        and type(found) in (type, enum.EnumMeta)  # no metaclass that could take SETITEM
        and not any(hasattr(found, method) for method in _FILLING_METHODS)
    ):
        return _GUARDED  # BUILD is all that could change it: rewritten into a checked one
    return _CHECKED


def _fillable(found: Any) -> bool:
    """Whether pickle's BUILD (or APPEND, SETITEM) on the global ``found`` could change it.

    The C unpickler fills in whatever is on its stack, so a tampered record naming a class
    could set that class's attributes for the whole process.  Classes implemented in C and
    builtin functions refuse; so does a class whose own ``__setstate__`` needs an instance
    (BUILD calls it with the state alone).  Anything else is left to the checked machine,
    which refuses to fill in what the record did not build.
    """
    if isinstance(found, type):
        flags = found.__flags__
        if not flags & _HEAPTYPE or flags & _IMMUTABLETYPE:
            return False
        setstate = found.__dict__.get("__setstate__") if type(found) is type else None
        if isinstance(setstate, types.FunctionType):
            code = setstate.__code__
            return code.co_argcount - len(setstate.__defaults__ or ()) < 2
        return True
    return not isinstance(found, types.BuiltinFunctionType)


def _persistent_load(ghosts: list[Any], pid: Any) -> Any:
    if type(pid) is not int or not 0 <= pid < len(ghosts):
        raise RecordDecodeError(f"reference {pid!r} is not in the record's reference table")
    return ghosts[pid]


_MEMOIZE_AND_POP = OPCODES["MEMOIZE"][0] + OPCODES["POP"][0]
# Puts None at memo index 0, for a version 2 record without references.
_PLACEHOLDER_PROLOGUE = OPCODES["NONE"][0] + _MEMOIZE_AND_POP
_reference_prologues: dict[tuple[str, str], bytes] = {}


def _reference_prologue(reference: tuple[str, str]) -> bytes:
    """Opcodes putting the global ``reference`` at memo index 0, before a record's state."""
    prologue = _reference_prologues.get(reference)
    if prologue is None:
        parts = []
        for name in reference:
            raw = name.encode("utf-8")
            parts.append(OPCODES["SHORT_BINUNICODE"][0] + bytes([len(raw)]) + raw)
        prologue = _reference_prologues[reference] = (
            b"".join(parts) + OPCODES["STACK_GLOBAL"][0] + _MEMOIZE_AND_POP
        )
    return prologue


def _build_patterns() -> list[re.Pattern[bytes]]:
    """[opcodes of an ordinary record up to a BUILD or to its final STOP]."""
    if not _build_pattern:
        other = b"(?:" + b"|".join(_token_alternatives(without="BUILD")) + b")"
        repeat = b"*+" if sys.version_info >= (3, 11) else b"*"
        build = re.escape(OPCODES["BUILD"][0])
        stop = re.escape(OPCODES["STOP"][0])
        pattern = other + repeat + b"(?:(" + build + b")|" + stop + b"\\Z)"
        _build_pattern.append(re.compile(pattern, re.DOTALL))
    return _build_pattern


_build_pattern: list[re.Pattern[bytes]] = []
_GUARDED_BUILD = OPCODES["TUPLE2"][0] + OPCODES["BINPERSID"][0]


def _guard_builds(data: bytes) -> bytes | None:
    """``data`` with each BUILD turned into TUPLE2 BINPERSID, or None if it is not ordinary.

    The C unpickler then hands each BUILD's object and state to ``persistent_load``, which
    refuses to fill in a class (a tampered record setting a class's attributes for the whole
    process) and does the BUILD otherwise.  Only an ordinary record (see :func:`_ordinary`)
    is rewritten: the matches must follow one another from the first opcode to the final
    STOP, so the opcodes are read one after the other, as the C unpickler reads them, and
    only real BUILDs change.
    """
    if not (
        data.startswith(_FRAMED)
        and int.from_bytes(data[3:_FRAMED_BODY], "little") == len(data) - _FRAMED_BODY
    ):
        return None
    parts = [_PROTOCOL_5]
    position = _FRAMED_BODY
    for match in _build_patterns()[0].finditer(data, _FRAMED_BODY):  # (it ends at the STOP)
        if match.start() != position:
            return None  # not one opcode after the other
        position = match.end()
        parts.append(data[match.start() : position - 1])
        if match[_BUILD_GROUP] is None:  # the final STOP
            parts.append(_STOP)
            return b"".join(parts)
        parts.append(_GUARDED_BUILD)
    return None


_PROTOCOL_5 = OPCODES["PROTO"][0] + b"\x05"
_BUILD_GROUP = 1
_STOP = OPCODES["STOP"][0]


# hot path: every load of every object passes here.
def _fast_load(
    pickled: bytes,
    finder: GlobalFinder,
    ghosts: list[Any],
    reference: tuple[str, str],
    record: bytes,
    guarded: bool,
) -> Any:
    """Run ``pickled`` (``record``, maybe with a prologue or BUILDs guarded) on the C unpickler."""
    unpickler = _FastUnpickler(io.BytesIO(pickled))
    unpickler.finder = finder
    unpickler.ghosts = ghosts
    unpickler.reference = reference
    unpickler.record = record
    unpickler.guarded = guarded
    return unpickler.load()


def load_state(
    data: bytes,
    finder: GlobalFinder,
    ghosts: list[Any],
    reference: tuple[str, str],
    reference_in_memo: bool = False,
) -> Any:
    """Run the pickle ``data`` safely (see the module docstring) and return what it builds.

    ``ghosts`` are the objects the record's references stand for: the global
    ``reference`` (``(module, name)``) called with an index yields one of them.
    ``reference_in_memo``: the pickle expects that function at memo index 0 instead
    (:mod:`amberdb.record`, version 2).  Raises what ``finder`` raises for globals it
    refuses, ImportRefusedError, or RecordDecodeError (and whatever an allowed constructor
    raises) for the rest.
    """
    # With copyreg's tables empty (unless the application registered extension codes), an
    # extension opcode only raises "unregistered extension code".
    marked = data.translate(
        None, _ALL_BUT_MARKED_OR_EXTENSION if _EXTENSION_CODES or _EXTENSION_CACHE else _ALL_BUT_MARKED
    )
    # hot path: most records hold none of the marked bytes and are small.
    if (not marked and len(data) <= FAST_NESTING_BUDGET) or _fast_unpickler_may_run(
        data, marked, reference_in_memo
    ):
        prologue = b""
        if reference_in_memo and (ghosts or marked):
            # The prologue is ours: the checks above looked at the record's bytes alone.
            prologue = _reference_prologue(reference) if ghosts else _PLACEHOLDER_PROLOGUE
        try:
            return _fast_load(prologue + data if prologue else data, finder, ghosts, reference, data, False)
        except _NeedsCheckedLoad:
            pass
        except _NeedsGuardedBuild:
            guarded = _guard_builds(data)
            if guarded is not None:
                try:
                    return _fast_load(prologue + guarded, finder, ghosts, reference, data, True)
                except _NeedsCheckedLoad:
                    pass

    def find_global(module: str, name: str) -> Any:
        if (module, name) == reference:
            return ghosts.__getitem__
        return finder.find(*_python3_name(module, name))

    memo = {0: ghosts.__getitem__} if reference_in_memo else None
    return CheckedUnpickler(data, find_global, lambda pid: _persistent_load(ghosts, pid), memo).load()


_LOAD_STATE_CODE = load_state.__code__
install_import_guard()
