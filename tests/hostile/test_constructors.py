"""Every standard global a record may call, called with every kind of hostile argument.

A record may name the safe standard types (:data:`amberdb.serialize.SAFE_GLOBALS`) and call
them with whatever arguments it builds.  Each such call must cost time and memory in
proportion to the record: a call that turns a few bytes into a gigabyte (``bytes(10**9)``)
or a quarter megabyte into seconds of work (``Decimal`` of a two-million-bit integer, the
gcd in ``Fraction(a, b)``) must be refused.  The arguments below are each about a quarter of
a megabyte (or a few bytes standing for something huge); a call taking more than a second or
a few megabytes is a defect, at least ten times over the bound for anything linear.
"""

from __future__ import annotations

import random
import time
import tracemalloc

import pytest

from amberdb.serialize import SAFE_GLOBALS, ClassResolver
from amberdb.unpickler import load_state
from tests.hostile.assemble import call, data, framed, number, op, program, text

SIZE = 256 << 10
SECONDS = 1.0
MEMORY = 16 * SIZE

_RANDOM = random.Random(9)
# Random: the gcd of two integers is quick when their bits have a pattern.
ARGUMENTS = {
    "big int": number(_RANDOM.getrandbits(8 * SIZE)),
    "big negative int": number(-_RANDOM.getrandbits(8 * SIZE)),
    "int just too big for a Fraction": number(_RANDOM.getrandbits(32769) | 1 << 32768),
    "long digits": text("7" * SIZE),
    "long digits with a slash": text("7" * (SIZE // 2) + "/" + "3" * (SIZE // 2)),
    "huge exponent": text("1e100000000"),
    "huge negative exponent": text("-1e-999999999"),
    "long path": text("a/" * (SIZE // 2)),
    "big bytes": data(b"\xff" * SIZE),
    "huge count": number(10**12),
    "huge range": call("builtins", "range", number(10**18)),
    "huge Decimal": call("decimal", "Decimal", text("1e100000000")),
    "huge float": op("BINFLOAT", b"\x7f\xef\xff\xff\xff\xff\xff\xff"),
    "long list": op("EMPTY_LIST") + op("MARK") + number(7) * (SIZE // 64) + op("APPENDS"),
    "long text": text("x" * SIZE),
}
SMALL = {"small int": number(36), "small text": text("utf-8"), "none": op("NONE")}

# The callables among the safe globals: classes and functions a record may call.
CALLABLES = sorted(
    (module, qualname)
    for module, qualname in SAFE_GLOBALS
    if callable(ClassResolver().find(module, qualname))
)


def _calls(module: str, qualname: str) -> list[tuple[str, bytes]]:
    """Each hostile argument alone, beside the next one, and beside each small one, on either
    side."""
    calls = []
    labels = list(ARGUMENTS)
    for label, next_label in zip(labels, labels[1:] + labels[:1]):
        argument = ARGUMENTS[label]
        calls.append((f"{qualname}({label})", call(module, qualname, argument)))
        calls.append(
            (f"{qualname}({label}, {next_label})", call(module, qualname, argument, ARGUMENTS[next_label]))
        )
        for small_label, small in SMALL.items():
            calls.append((f"{qualname}({label}, {small_label})", call(module, qualname, argument, small)))
            calls.append((f"{qualname}({small_label}, {label})", call(module, qualname, small, argument)))
    return calls


def _run(record: bytes) -> None:
    try:
        load_state(record, ClassResolver(), [], ("amberdb.record", "ref"))
    except (MemoryError, RecursionError):
        raise
    except Exception:
        pass  # refused, or the constructor's own complaint: both fine


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("module", "qualname"), CALLABLES, ids=[":".join(pair) for pair in CALLABLES])
def test_standard_global_called_with_hostile_arguments_costs_what_the_record_weighs(
    module: str, qualname: str
) -> None:
    too_costly = []
    for label, body in _calls(module, qualname):
        # As AmberDB writes a state (one frame, the C unpickler's way in) and unframed.
        for record in (framed(body, op("POP"), op("NONE")), program(body, op("POP"), op("NONE"))):
            tracemalloc.start()
            started = time.process_time()
            try:
                _run(record)
            finally:
                seconds = time.process_time() - started
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            if seconds > SECONDS or peak > MEMORY + 2 * len(record):
                too_costly.append(f"{label}: {seconds:.1f} s, {peak / 1e6:.0f} MB")
    assert not too_costly, "\n".join(too_costly)


def test_every_callable_safe_global_is_covered() -> None:
    # The list above is computed, so a new safe global joins the test by itself; this keeps
    # the computation honest.
    assert ("decimal", "Decimal") in CALLABLES and ("fractions", "Fraction") in CALLABLES
    assert ("builtins", "bytearray") in CALLABLES and len(CALLABLES) >= 25
