"""The embedded default: a file database that survives restarts, crashes and bad files."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import DB, PersistentList
from amberdb.exceptions import FileFormatError, StorageLockedError
from tests.models import Book, Node

ROOT = Path(__file__).resolve().parent.parent


def test_objects_survive_close_and_reopen(db_path: str) -> None:
    conn = amberdb.connection(db_path)
    conn.root.books = PersistentList([Book("ZODB"), Book("AmberDB")])
    conn.root.books[1].add_author("us")
    transaction.commit()
    conn.close()

    conn = amberdb.connection(db_path)
    assert [b.title for b in conn.root.books] == ["ZODB", "AmberDB"]
    assert conn.root.books[1].authors == ("us",)
    conn.close()


def test_db_by_path_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "new.fs"
    with DB(path) as db:
        assert path.exists()
        assert len(db) == 1  # the root


def test_foreign_file_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"my precious notes\n" * 10)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(FileFormatError, match="notes.txt"):
        DB(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_second_writer_is_locked_out(db_path: str) -> None:
    with DB(db_path), pytest.raises(StorageLockedError, match="data.fs"):
        DB(db_path)


def test_second_process_is_locked_out(db_path: str) -> None:
    with DB(db_path):
        code = (
            f"import amberdb\ntry:\n amberdb.DB({db_path!r})\n"
            f"except amberdb.StorageLockedError as e:\n print('locked', e)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        assert result.stdout.startswith("locked"), result.stderr


def test_history_stays_readable_for_snapshots(db_path: str) -> None:
    db = DB(db_path)
    tm = transaction.TransactionManager()
    reader = db.open(tm)
    writer = db.open(transaction.TransactionManager())
    writer.root.book = Book("v1")
    writer.transaction_manager.commit()
    tm.begin()
    book = reader.root.book
    for version in ("v2", "v3"):
        writer.root.book.title = version
        writer.transaction_manager.commit()
    book._p_deactivate()
    assert book.title == "v1"
    tm.abort()
    assert reader.root.book.title == "v3"
    reader.close()
    writer.close()
    db.close()


_WRITER = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{root!r}, {src!r}]
    import amberdb, amberdb.transaction as transaction
    from tests.models import Node
    conn = amberdb.connection({path!r})
    nodes = conn.root().setdefault("nodes", amberdb.PersistentList())
    transaction.commit()
    i = len(nodes)
    while True:
        nodes.append(Node(i))
        conn.root.count = i + 1
        transaction.commit()
        print(i, flush=True)
        i += 1
    """
)


def test_sigkill_mid_commit_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    path = str(tmp_path / "killed.fs")
    rng = random.Random(20261123)
    acknowledged = -1
    for _ in range(4):
        script = _WRITER.format(root=str(ROOT), src=str(ROOT / "src"), path=path)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # wait until it is committing
            assert first, "writer died before its first commit"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        lines = [first, *out.splitlines()]
        acknowledged = int([line for line in lines if line.strip()][-1])
        with DB(path) as db, db.transaction() as conn:
            nodes = conn.root.nodes
            assert len(nodes) >= acknowledged + 1
            assert [node.value for node in nodes] == list(range(len(nodes)))
            assert conn.root.count == len(nodes)
    assert acknowledged > 0


def test_index_is_used_and_rebuilt(db_path: str) -> None:
    with DB(db_path) as db, db.transaction() as conn:
        conn.root.nodes = PersistentList(Node(i) for i in range(100))
    index = Path(db_path + ".index")
    assert index.exists()
    index.unlink()
    with DB(db_path) as db, db.transaction() as conn:
        assert sum(n.value for n in conn.root.nodes) == sum(range(100))
