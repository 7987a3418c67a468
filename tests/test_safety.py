"""Safe loading: a record runs nothing the application did not allow."""

from __future__ import annotations

import datetime
import decimal
import io
import os
import pickle
import subprocess
import sys
import uuid
import zoneinfo
from collections import OrderedDict, defaultdict, deque
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.checked_unpickler import BIG_INT_BITS
from amberdb.exceptions import RecordDecodeError, SerializationError, UnsafeGlobalError
from amberdb.persistent import class_name
from amberdb.record import decode_header, encode_record, ref, references
from amberdb.storage.base import TransactionMeta
from amberdb.utils import p64, z64
from tests.models import Address, Book, Node


class _Exploit:
    """Pickles as a call of ``func(*args)``, the way a tampered record would."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> Any:
        return (self.func, self.args)


def _write_raw(storage: Any, oid: bytes, record: bytes) -> None:
    base = z64
    try:
        _, base = storage.load(oid)
    except KeyError:
        pass
    storage.begin(TransactionMeta(description="tampering"))
    storage.store(oid, base, record)
    storage.vote()
    storage.finish()


def _tampered_book_record(payload: Any) -> bytes:
    state = pickle.dumps({"title": payload}, protocol=5)
    return encode_record(class_name(Book), [], state)


@pytest.mark.parametrize(
    ("func", "shown"),
    [(os.system, "posix.system"), (eval, "builtins.eval"), (getattr, "builtins.getattr")],
)
def test_record_naming_a_dangerous_global_fails_and_runs_nothing(
    tmp_path: Path, func: Any, shown: str
) -> None:
    marker = tmp_path / "pwned"
    db = amberdb.DB(None)
    conn = db.open()
    conn.root.book = Book("ZODB")
    transaction.commit()
    oid = conn.root.book._p_oid
    argument = f"open({str(marker)!r}, 'w')" if func is eval else f"touch {marker}"
    args = (argument,) if func is not getattr else ("text", "upper")
    _write_raw(db.storage, oid, _tampered_book_record(_Exploit(func, *args)))
    reader = db.open(transaction.TransactionManager())
    with pytest.raises(UnsafeGlobalError) as caught:
        reader.get(oid)
    message = str(caught.value)
    assert shown in message
    assert "oid 0x1" in message and "tests.models.Book" in message
    assert not marker.exists()
    reader.close()
    conn.close()
    db.close()


def test_record_whose_class_is_not_persistent_loads_broken_running_nothing(db: amberdb.DB) -> None:
    _write_raw(
        db.storage, p64(7), encode_record("subprocess:Popen", [], pickle.dumps({"args": "x"}, protocol=5))
    )
    conn = db.open()
    obj = conn.get(p64(7))
    assert isinstance(obj, amberdb.Broken) and not isinstance(obj, subprocess.Popen)
    assert (type(obj).__module__, type(obj).__name__) == ("subprocess", "Popen")
    assert obj.__broken_state__ == {"args": "x"}
    with pytest.raises(amberdb.BrokenModified, match=r"subprocess\.Popen oid 0x7"):
        obj.args = "y"
    conn.close()


def test_reference_to_a_non_persistent_class_is_a_broken_ghost(db: amberdb.DB) -> None:
    state = pickle.dumps({"x": 1}, protocol=5)
    _write_raw(db.storage, p64(8), encode_record(class_name(Book), [(p64(9), "os:_wrap_close")], state))
    conn = db.open()
    book = conn.get(p64(8))
    assert book.x == 1
    assert isinstance(conn.get(p64(8)), Book)
    conn.close()


def test_safe_standard_types_round_trip(conn: amberdb.Connection) -> None:
    values = {
        "when": datetime.datetime(2026, 11, 23, 9, 30, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2026, 1, 2),
        "span": datetime.timedelta(hours=3),
        "money": decimal.Decimal("12.34"),
        "ratio": Fraction(1, 3),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "ordered": OrderedDict(a=1),
        "counts": defaultdict(int, {"x": 2}),
        "queue": deque([1, 2], maxlen=5),
        "path": PurePosixPath("/tmp/x"),
        "misc": {1, 2, frozenset({3})},
        "number": complex(1, 2),
        "raw": bytearray(b"ab"),
        "zone": zoneinfo.ZoneInfo("Europe/Paris"),
        "local": datetime.datetime(2026, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo("America/New_York")),
        "uncached zone": zoneinfo.ZoneInfo.no_cache("Asia/Tokyo"),
    }
    conn.root.values = values
    transaction.commit()
    fresh = conn.db().open(transaction.TransactionManager())
    loaded = fresh.root.values
    # A zone made with no_cache loads as the cached zone of its key: the same rules.
    assert loaded.pop("uncached zone") is zoneinfo.ZoneInfo("Asia/Tokyo")
    assert loaded == {name: value for name, value in values.items() if name != "uncached zone"}
    assert loaded["local"].utcoffset() == datetime.timedelta(hours=-4)
    fresh.close()


def test_records_with_references_text_and_repeated_globals_load() -> None:
    # References, an "r" in the text and a memo get for the repeated module name: records
    # the opcode regexes read, which raised SystemError on CPython 3.11.7 (cpython#101955,
    # a capturing group inside a possessive repeat); the second BUILDs a value object.
    db = amberdb.DB(None, allowed_classes=[Address])
    conn = db.open()
    conn.root.reader, conn.root.writer = Book("a"), Book("b")
    conn.root.kinds = [datetime.date, datetime.time, datetime.timedelta]
    conn.root.reader.friend, conn.root.reader.address = conn.root.writer, Address("rue")
    transaction.commit()
    fresh = db.open(transaction.TransactionManager())
    assert fresh.root.kinds == [datetime.date, datetime.time, datetime.timedelta]
    assert fresh.root.reader.friend is fresh.root.writer and fresh.root.writer.title == "b"
    assert fresh.root.reader.address == Address("rue")
    fresh.close()
    conn.close()
    db.close()


def test_fraction_too_big_to_load_safely_is_refused_at_commit(conn: amberdb.Connection) -> None:
    conn.root.book = Book("x")
    conn.root.book.ratio = Fraction(1, 2**BIG_INT_BITS - 1)  # the largest that may be stored
    transaction.commit()
    conn.root.book.ratio = Fraction(1, 2**BIG_INT_BITS + 1)
    with pytest.raises(SerializationError, match=r"attribute 'ratio'.*Fraction with a 32769-bit"):
        transaction.commit()
    transaction.abort()
    fresh = conn.db().open(transaction.TransactionManager())
    assert fresh.root.book.ratio == Fraction(1, 2**BIG_INT_BITS - 1)
    fresh.close()


def test_plain_application_class_needs_its_module_allowed(tmp_path: Path) -> None:
    path = str(tmp_path / "a.fs")
    db = amberdb.DB(path)
    conn = db.open()
    conn.root.home = Book("x")
    conn.root.home.address = Address("Main St")
    with pytest.raises(SerializationError) as caught:
        transaction.commit()
    message = str(caught.value)
    assert "attribute 'address'" in message and "tests.models.Address" in message
    assert "allowed_modules" in message
    transaction.abort()
    conn.close()
    db.close()

    db = amberdb.DB(path, allowed_modules=["tests.models"])
    conn = db.open()
    conn.root.home = Book("x")
    conn.root.home.address = Address("Main St")
    transaction.commit()
    conn.close()
    db.close()

    db = amberdb.DB(path, allowed_classes=[Address])
    conn = db.open()
    assert conn.root.home.address == Address("Main St")
    conn.close()
    db.close()

    db = amberdb.DB(path)
    conn = db.open()
    with pytest.raises(UnsafeGlobalError, match=r"tests\.models\.Address is not allowed"):
        conn.root.home.address  # noqa: B018
    conn.close()
    db.close()


def test_renamed_class_loads_through_registered_old_name(tmp_path: Path) -> None:
    path = str(tmp_path / "a.fs")

    class Publication(amberdb.Persistent):
        pass

    old_name = "library:Book"
    db = amberdb.DB(path)
    db.register_class(Publication, old_name)
    raw = encode_record(old_name, [], pickle.dumps({"title": "old"}, protocol=5))
    _write_raw(db.storage, p64(50), raw)
    conn = db.open()
    obj = conn.get(p64(50))
    assert isinstance(obj, Publication) and obj.title == "old"  # type: ignore[attr-defined]
    conn.close()
    db.close()


def test_references_are_readable_without_unpickling(conn: amberdb.Connection) -> None:
    tail = Node("tail")
    head = Node("head", tail)
    conn.root.head = head
    transaction.commit()
    record, _ = conn.db().storage.load(head._p_oid)
    header = decode_header(record)
    assert header.class_name == "tests.models:Node"
    assert header.refs == [(tail._p_oid, "tests.models:Node")]
    assert references(record) == [tail._p_oid]


def test_lambda_attribute_is_refused_naming_class_oid_and_attribute(conn: amberdb.Connection) -> None:
    conn.root.book = book = Book("ZODB")
    transaction.commit()
    serial = book._p_serial
    book.callback = lambda: None
    with pytest.raises(SerializationError) as caught:
        transaction.commit()
    message = str(caught.value)
    assert "tests.models:Book" in message and "oid 0x1" in message and "'callback'" in message
    transaction.abort()
    # nothing was written: the stored revision is unchanged
    assert conn.db().storage.load(book._p_oid)[1] == serial
    assert not hasattr(book, "callback")


def test_open_file_attribute_is_refused(conn: amberdb.Connection, tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as handle:
        conn.root.book = book = Book("ZODB")
        book.handle = handle
        with pytest.raises(SerializationError, match="'handle'"):
            transaction.commit()
    transaction.abort()


def test_amberdb_btrees_load_in_a_process_that_never_imported_them(tmp_path: Path) -> None:
    path = str(tmp_path / "trees.fs")
    db = amberdb.DB(path)
    with db.transaction() as conn:
        from amberdb.btrees import IIBTree, Length

        conn.root()["tree"] = IIBTree({1: 2, 3: 4})
        conn.root()["count"] = Length(7)
    db.close()
    program = (
        "import sys, amberdb\n"
        f"db = amberdb.DB({path!r})\n"
        "root = db.open().root()\n"
        "print(dict(root['tree'].items()), root['count'](), 'amberdb.btrees' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["{1:", "2,", "3:", "4}", "7", "True"]


def test_amberdb_functions_that_are_not_persistent_classes_are_still_refused(db: amberdb.DB) -> None:
    record = encode_record("amberdb.utils:p64", [], pickle.dumps({}, protocol=5))
    _write_raw(db.storage, p64(5), record)
    conn = db.open()
    obj = conn.get(p64(5))
    assert isinstance(obj, amberdb.Broken) and "not allowed" in type(obj).__broken_reason__
    conn.close()


def _node_record(state: bytes, refs: list[tuple[bytes, str]]) -> bytes:
    return encode_record(class_name(Node), refs, state)


def test_records_with_persistent_id_references_still_load(db: amberdb.DB) -> None:
    # The first record format wrote references as pickle persistent ids; readers keep it.
    class OldStyle(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return 0 if obj == "<tail>" else None

    buffer = io.BytesIO()
    OldStyle(buffer, 5).dump({"value": "head", "next": "<tail>"})
    _write_raw(db.storage, p64(30), _node_record(pickle.dumps({"value": "tail", "next": None}, 5), []))
    _write_raw(db.storage, p64(31), _node_record(buffer.getvalue(), [(p64(30), class_name(Node))]))
    conn = db.open()
    head = conn.get(p64(31))
    assert head.value == "head"
    assert head.next is conn.get(p64(30))
    assert head.next.value == "tail"
    conn.close()


def test_a_reference_outside_the_records_table_is_a_decode_error(db: amberdb.DB) -> None:
    state = pickle.dumps({"value": "x", "next": _Exploit(ref, 3)}, 5)
    _write_raw(db.storage, p64(32), _node_record(state, [(p64(30), class_name(Node))]))
    conn = db.open()
    with pytest.raises(RecordDecodeError, match=r"oid 0x20"):
        conn.get(p64(32))
    conn.close()


def test_a_state_of_plain_values_is_written_without_calling_back(conn: amberdb.Connection) -> None:
    calls: list[Any] = []
    writer = conn._writer
    reduce = writer._reduce

    def counting(obj: Any) -> Any:
        calls.append(obj)
        return reduce(obj)

    writer._pickler.reducer_override = counting  # the C pickler reads its hook at creation...
    writer._pickler.__init__(writer._buffer, counting)  # ...so create it again with the spy
    conn.root.book = Book("Plain")
    conn.root.book.authors = ("a", "b")
    transaction.commit()
    # The root's reference to the book (the function that writes references is already in
    # the pickler's memo); nothing for the book's own state of strings and a tuple.
    assert calls == [conn.root.book]
