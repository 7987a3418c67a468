"""Class names inside stored records: list them, and rename classes without unpickling.

A record names classes in two places.  Its header (:mod:`amberdb.record`) names the record's
own class and the classes of its references, as ``"module:qualname"``.  Its pickled state
names every other class or function it uses -- plain value objects, class objects stored
as values -- with the opcodes GLOBAL and INST (module and qualname in the argument) or
STACK_GLOBAL (the two strings taken from the stack, pushed just before or fetched from the
memo).  :func:`record_globals` lists them all and :func:`rename_in_record` rewrites them,
both by reading the opcodes and simulating only what the stack and the memo hold: no class
is imported, nothing in the record runs, and time and memory stay linear in its length.

How a rename rewrites the pickle:

* GLOBAL and INST get the new names in their argument;
* a STACK_GLOBAL keeps the opcodes that pushed its two strings -- they may be memoized and
  fetched again later as ordinary data, and memo indexes must not move -- and gets
  ``POP POP <module> <qualname>`` inserted right before it, the new strings unmemoized;
* each FRAME's length is recomputed (frames hold whole opcodes), so a record shaped as
  AmberDB writes it (one frame ending with the data) keeps that shape, and with it the
  loader's fast path (:mod:`amberdb.unpickler`).

The header is rebuilt by :func:`amberdb.record.encode_record` when one of its names
changes: references keep their order and oids, and two class-table entries that become
equal merge into one.
"""

from __future__ import annotations

import codecs
import pickle
import pickletools
from collections.abc import Mapping
from typing import NamedTuple

from amberdb.exceptions import RecordDecodeError
from amberdb.record import MAX_NAME_BYTES, REFERENCE_GLOBAL, REFERENCE_IN_MEMO, decode_header, encode_record

__all__ = ["record_globals", "rename_in_record"]

# -- the opcode table, from pickletools ------------------------------------------------------

# How an opcode's argument is laid out.
_NO_ARG, _FIXED, _LINE, _LINES2, _LEN1, _LEN4_SIGNED, _LEN4, _LEN8 = range(8)

# What an opcode does that the walk must follow; everything else is _OTHER, whose stack
# effect comes from pickletools' description (items popped, to a mark or not, items pushed).
_OTHER, _MARK, _POP, _DUP, _MEMOIZE, _PUT, _GET, _TEXT = range(8)
_STACK_GLOBAL, _GLOBAL, _INST, _FRAME, _STOP, _EXTENSION = range(8, 14)

_ACTIONS = {
    "MARK": _MARK, "POP": _POP, "DUP": _DUP, "MEMOIZE": _MEMOIZE,
    "PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET,
    "STRING": _TEXT, "BINSTRING": _TEXT, "SHORT_BINSTRING": _TEXT, "UNICODE": _TEXT,
    "BINUNICODE": _TEXT, "SHORT_BINUNICODE": _TEXT, "BINUNICODE8": _TEXT,
    "STACK_GLOBAL": _STACK_GLOBAL, "GLOBAL": _GLOBAL, "INST": _INST, "FRAME": _FRAME, "STOP": _STOP,
    "EXT1": _EXTENSION, "EXT2": _EXTENSION, "EXT4": _EXTENSION,
}  # fmt: skip
_LENGTH_WIDTHS = {_LEN1: 1, _LEN4_SIGNED: 4, _LEN4: 4, _LEN8: 8}


class _Op(NamedTuple):
    name: str
    layout: int
    size: int  # of a _FIXED argument
    action: int
    below_mark: int  # items popped below the topmost mark, or -1: the opcode takes no mark
    pops: int  # items popped when it takes no mark
    pushes: int


def _layout(info: pickletools.OpcodeInfo) -> tuple[int, int]:
    arg = info.arg
    if arg is None:
        return _NO_ARG, 0
    if arg.n > 0:
        return _FIXED, arg.n
    if arg.n == pickletools.UP_TO_NEWLINE:
        # GLOBAL and INST read two lines (pickletools describes them as one pair).
        return (_LINES2 if info.name in ("GLOBAL", "INST") else _LINE), 0
    layouts = {
        pickletools.TAKEN_FROM_ARGUMENT1: _LEN1,
        pickletools.TAKEN_FROM_ARGUMENT4: _LEN4_SIGNED,
        pickletools.TAKEN_FROM_ARGUMENT4U: _LEN4,
        pickletools.TAKEN_FROM_ARGUMENT8U: _LEN8,
    }
    return layouts[arg.n], 0


def _opcode_table() -> tuple[_Op | None, ...]:
    table: list[_Op | None] = [None] * 256
    for info in pickletools.opcodes:
        layout, size = _layout(info)
        before = info.stack_before
        if pickletools.markobject in before:
            below_mark, pops = before.index(pickletools.markobject), 0
        else:
            below_mark, pops = -1, len(before)
        action = _ACTIONS.get(info.name, _OTHER)
        table[ord(info.code)] = _Op(info.name, layout, size, action, below_mark, pops, len(info.stack_after))
    return tuple(table)


_OPCODES = _opcode_table()


# -- the walk --------------------------------------------------------------------------------


class _Global(NamedTuple):
    """A global the pickle names: where its opcode is, and the names it carries."""

    opcode: str  # GLOBAL, INST or STACK_GLOBAL
    start: int  # offset of the opcode
    end: int  # offset after its argument
    module: str
    qualname: str
    # STACK_GLOBAL: where the unmemoized pushes of its two names start, when they are the
    # two opcodes right before it (in its frame); else ``start``.
    pushes_start: int


class _Pickle(NamedTuple):
    globals: list[_Global]
    frames: list[tuple[int, int]]  # (offset of the FRAME opcode, offset where the frame ends)


def _text(op: _Op, data: bytes, start: int, body: int, end: int) -> str:
    """The str a string opcode pushes, decoded as AmberDB's loader decodes it."""
    try:
        if op.layout == _LINE:
            line = data[start + 1 : end - 1]
            if op.name == "UNICODE":
                return line.decode("raw-unicode-escape")
            if len(line) < 2 or line[0] != line[-1] or line[0] not in b"\"'":
                raise RecordDecodeError(f"STRING at offset {start} is not quoted")
            raw: bytes = codecs.escape_decode(line[1:-1])[0]
            return raw.decode("ascii")
        if op.name in ("BINSTRING", "SHORT_BINSTRING"):
            return data[body:end].decode("ascii")
        return data[body:end].decode("utf-8", "surrogatepass")
    except ValueError as exc:  # UnicodeDecodeError, or a bad escape
        raise RecordDecodeError(f"{op.name} at offset {start} cannot be decoded: {exc}") from None


def _memo_index(op: _Op, data: bytes, start: int, end: int) -> int:
    if op.layout == _LINE:  # PUT, GET: a decimal line
        line = data[start + 1 : end - 1]
        if not line.isdigit():  # int() would take signs, spaces and underscores too
            raise RecordDecodeError(f"{op.name} at offset {start} has a bad memo index {line[:20]!r}")
        if len(line) > 20:  # far beyond any memo a record can make, and int() of it is cheap
            raise RecordDecodeError(f"{op.name} at offset {start} has a memo index too large")
        return int(line)
    return int.from_bytes(data[start + 1 : end], "little")


def _walk(data: bytes, reference_in_memo: bool) -> _Pickle:
    """Read the opcodes of ``data`` up to STOP, following what the stack and memo hold.

    Only strings are tracked (None stands for any other value): enough to know the names
    each STACK_GLOBAL takes.  Raises RecordDecodeError where the loader would fail to parse
    -- truncation, unknown opcodes, an argument across a frame's end, stack underflow, a
    memo get of nothing -- and where the names of a global cannot be told without running
    the record.
    """
    table = _OPCODES
    size = len(data)
    limit = size  # end of the current frame, or of the data
    in_frame = False
    stack: list[str | None] = []
    marks: list[int] = []  # stack lengths at each MARK, as the C unpickler keeps them
    # Version 2 records find ``ref`` at memo index 0 and number their own entries from 1.
    memo: dict[int, str | None] = {0: None} if reference_in_memo else {}
    found: list[_Global] = []
    frames: list[tuple[int, int]] = []
    pos = 0
    segment_start = 0  # where the current frame's opcodes, or the unframed ones, begin
    # Offsets of the last two string pushes not memoized, each None once another opcode came.
    text_before, text_last = None, None

    def pop(count: int, start: int) -> list[str | None]:
        fence = marks[-1] if marks else 0
        if len(stack) - count < fence:
            raise RecordDecodeError(f"stack underflow at offset {start}")
        taken = stack[len(stack) - count :]
        del stack[len(stack) - count :]
        return taken

    while True:
        if pos >= limit:
            if in_frame:
                in_frame, limit = False, size
                segment_start = pos
                continue
            raise RecordDecodeError("pickle data was truncated (no STOP opcode)")
        start = pos
        op = table[data[pos]]
        if op is None:
            raise RecordDecodeError(f"unknown pickle opcode {data[pos : pos + 1]!r} at offset {pos}")
        pos += 1
        body = pos
        layout = op.layout
        if layout == _NO_ARG:
            end = pos
        elif layout == _FIXED:
            end = pos + op.size
        elif layout in (_LINE, _LINES2):
            newline = data.find(b"\n", pos, limit)
            if newline >= 0 and layout == _LINES2:
                newline = data.find(b"\n", newline + 1, limit)
            if newline < 0:
                raise RecordDecodeError(f"{op.name} at offset {start}: its line has no end")
            end = newline + 1
        else:
            width = _LENGTH_WIDTHS[layout]
            body = pos + width
            if body > limit:
                raise RecordDecodeError(f"{op.name} at offset {start}: truncated length")
            length = int.from_bytes(data[pos:body], "little", signed=layout == _LEN4_SIGNED)
            if length < 0:
                raise RecordDecodeError(f"{op.name} at offset {start}: negative length")
            end = body + length
        if end > limit:
            where = "its frame" if in_frame else "the data"
            raise RecordDecodeError(f"{op.name} at offset {start} runs past the end of {where}")
        pos = end

        action = op.action
        if action == _TEXT:
            stack.append(_text(op, data, start, body, end))
            text_before, text_last = text_last, start
            continue
        pushes = text_before if text_before is not None and text_before >= segment_start else start
        text_before = text_last = None
        if action in (_MEMOIZE, _PUT):
            top = pop(1, start)[0]
            stack.append(top)
            memo[len(memo) if action == _MEMOIZE else _memo_index(op, data, start, end)] = top
        elif action == _GET:
            index = _memo_index(op, data, start, end)
            if index not in memo:
                raise RecordDecodeError(f"{op.name} at offset {start}: memo entry {index} was never set")
            stack.append(memo[index])
        elif action == _STACK_GLOBAL:
            module, qualname = pop(2, start)
            if module is None or qualname is None:
                raise RecordDecodeError(
                    f"STACK_GLOBAL at offset {start} takes names that are not strings the record "
                    "pushes: which global it names cannot be told without running the record"
                )
            found.append(_Global(op.name, start, end, module, qualname, pushes))
            stack.append(None)
        elif action in (_GLOBAL, _INST):
            first = data.index(b"\n", body, end)
            encoding = "utf-8" if action == _GLOBAL else "ascii"  # as the unpicklers read them
            try:
                module = data[body:first].decode(encoding)
                qualname = data[first + 1 : end - 1].decode(encoding)
            except UnicodeDecodeError as exc:
                raise RecordDecodeError(f"{op.name} at offset {start}: undecodable name: {exc}") from None
            if action == _INST:
                if not marks:
                    raise RecordDecodeError(f"INST at offset {start} without a MARK")
                del stack[marks.pop() :]
            found.append(_Global(op.name, start, end, module, qualname, start))
            stack.append(None)
        elif action == _MARK:
            marks.append(len(stack))
        elif action == _POP:
            if marks and marks[-1] == len(stack):
                marks.pop()  # POP right after a MARK drops the mark, as the unpicklers do
            else:
                pop(1, start)
        elif action == _DUP:
            stack.append(pop(1, start)[0])
            stack.append(stack[-1])
        elif action == _FRAME:
            if in_frame:
                raise RecordDecodeError(f"FRAME at offset {start} begins inside another frame")
            frame_end = end + int.from_bytes(data[body:end], "little")
            if frame_end > size:
                raise RecordDecodeError(f"FRAME at offset {start} runs past the end of the data")
            frames.append((start, frame_end))
            in_frame, limit = True, frame_end
            segment_start = end
        elif action == _STOP:
            pop(1, start)
            return _Pickle(found, frames)
        elif action == _EXTENSION:
            # Its global is whatever copyreg maps the code to in the process that reads it;
            # AmberDB's loader refuses them, so no record that loads has one.
            raise RecordDecodeError(f"{op.name} at offset {start}: records never use extension codes")
        else:
            if op.below_mark >= 0:
                if not marks:
                    raise RecordDecodeError(f"{op.name} at offset {start} without a MARK")
                del stack[marks.pop() :]
                pop(op.below_mark, start)
            else:
                pop(op.pops, start)
            stack.extend([None] * op.pushes)


# -- the public functions --------------------------------------------------------------------


def record_globals(record: bytes) -> set[str]:
    """Every class or global ``record`` names, as ``"module:qualname"``, without running it.

    The header's class and reference classes, and each global its pickle names (GLOBAL,
    INST, STACK_GLOBAL); the function standing for references is left out.  Names are as
    written: a legacy pickle's Python 2 names (``__builtin__``) are not translated.
    Raises RecordDecodeError for a damaged record.
    """
    header = decode_header(record)
    parsed = _walk(record[header.state_offset :], header.version >= REFERENCE_IN_MEMO)
    names = {header.class_name}
    names.update(ref_class for _, ref_class in header.refs)
    for found in parsed.globals:
        if (found.module, found.qualname) != REFERENCE_GLOBAL:
            names.add(f"{found.module}:{found.qualname}")
    return names


def _split(name: str) -> tuple[str, str]:
    module, _, qualname = name.partition(":")
    return module, qualname


def _checked_renames(renames: Mapping[str, str]) -> dict[str, str]:
    """The renames that change something; ValueError for a name a record cannot hold."""
    reference = ":".join(REFERENCE_GLOBAL)
    changed = {}
    for old, new in renames.items():
        for name in (old, new):
            if not isinstance(name, str):
                raise ValueError(f"class names are str, not {type(name).__qualname__}: {name!r}")
            module, qualname = _split(name)
            if not module or not qualname or "\n" in name:
                raise ValueError(f"not a class name of the form 'module:qualname': {name!r}")
            try:
                encoded = name.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"class name not encodable as UTF-8: {name!r}") from None
            if len(encoded) > MAX_NAME_BYTES:
                raise ValueError(f"class name too long for a record: {name[:80]!r}...")
            if name == reference:
                raise ValueError(f"{reference} stands for references in records and cannot be renamed")
        if old != new:
            changed[old] = new
    return changed


def _push_text(text: str) -> bytes:
    """The opcode pushing ``text``, not memoized (the memo's numbering must not move)."""
    raw = text.encode("utf-8")
    if len(raw) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw
    return pickle.BINUNICODE + len(raw).to_bytes(4, "little") + raw


def _rewritten_global(found: _Global, new_name: str) -> tuple[int, int, bytes]:
    """The edit (start, end, replacement) of ``data[start:end]`` naming ``new_name``."""
    module, qualname = _split(new_name)
    if found.opcode == "STACK_GLOBAL":
        names = _push_text(module) + _push_text(qualname)
        if found.pushes_start < found.start:
            # Pushes nothing else can see (a rename's own, say): written over.
            return found.pushes_start, found.start, names
        return found.start, found.start, pickle.POP + pickle.POP + names  # inserted before it
    if found.opcode == "INST" and not new_name.isascii():
        raise ValueError(f"{new_name!r} cannot be written in an INST opcode, which holds ASCII only")
    opcode = pickle.GLOBAL if found.opcode == "GLOBAL" else pickle.INST
    return found.start, found.end, b"%s%s\n%s\n" % (opcode, module.encode("utf-8"), qualname.encode("utf-8"))


def _rewrite(data: bytes, parsed: _Pickle, renames: Mapping[str, str]) -> bytes | None:
    """``data`` with its globals renamed and its frames' lengths fixed, None if unchanged."""
    edits = []
    for found in parsed.globals:
        new_name = renames.get(f"{found.module}:{found.qualname}")
        if new_name is not None:
            edits.append(_rewritten_global(found, new_name))
    if not edits:
        return None
    # Each frame grows by what the edits inside it add; found globals come in offset order.
    frame_edits = []
    edit_index = 0
    for frame_start, frame_end in parsed.frames:
        growth = 0
        while edit_index < len(edits) and edits[edit_index][0] < frame_end:
            start, end, replacement = edits[edit_index]
            if start >= frame_start + 9:  # inside the frame, not before it
                growth += len(replacement) - (end - start)
            edit_index += 1
        if growth:
            new_length = frame_end - (frame_start + 9) + growth
            frame_edits.append((frame_start + 1, frame_start + 9, new_length.to_bytes(8, "little")))
    parts = []
    position = 0
    for start, end, replacement in sorted(edits + frame_edits, key=lambda edit: edit[0]):
        parts.append(data[position:start])
        parts.append(replacement)
        position = end
    parts.append(data[position:])
    return b"".join(parts)


def rename_in_record(record: bytes, renames: Mapping[str, str]) -> bytes | None:
    """``record`` with every class named by a key of ``renames`` renamed to its value.

    Names are ``"module:qualname"``; all renames apply at once (``{a: b, b: a}`` swaps).
    Returns None when the record names none of them.  The result loads, through the same
    allow-list with the new names allowed, to the state ``record`` loaded to, with the
    renamed classes in place of the old ones.  Raises RecordDecodeError for a damaged
    record, ValueError for a malformed name in ``renames`` (or a non-ASCII one a legacy
    INST opcode would have to hold).
    """
    changes = _checked_renames(renames)
    header = decode_header(record)
    state = record[header.state_offset :]
    parsed = _walk(state, header.version >= REFERENCE_IN_MEMO)
    if not changes:
        return None
    new_state = _rewrite(state, parsed, changes)  # (_checked_renames keeps ``ref`` out of them)
    class_name = changes.get(header.class_name, header.class_name)
    refs = [(oid, changes.get(ref_class, ref_class)) for oid, ref_class in header.refs]
    if class_name == header.class_name and refs == header.refs:
        if new_state is None:
            return None
        return record[: header.state_offset] + new_state
    in_memo = header.version >= REFERENCE_IN_MEMO
    new_state = state if new_state is None else new_state
    return encode_record(class_name, refs, new_state, reference_in_memo=in_memo)
