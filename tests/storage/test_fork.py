"""I11: a storage (or a database) used across os.fork() refuses in the child; the parent's data is intact.

The forking happens in a fresh interpreter (a subprocess running the scenario), so the test
process never forks with pytest's threads alive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from amberdb.storage.file import FileStorage, verify
from amberdb.utils import p64, z64

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def run_scenario(path: Path, *parts: str) -> dict[str, object]:
    """Run the code ``parts`` (the last prints one JSON line) with ``PATH`` bound; parse the line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    script = f"PATH = {str(path)!r}\n" + "\n".join(textwrap.dedent(part) for part in parts)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


CHILD_TRIES = """
    def child_tries(fs):
        from amberdb.storage.base import TransactionMeta
        from amberdb.utils import p64, z64
        calls = {
            "load": lambda: fs.load(z64),
            "last_tid": fs.last_tid,
            "len": lambda: len(fs),
            "iterator": lambda: list(fs.iterator()),
            "new_oid": fs.new_oid,
            "begin": lambda: fs.begin(TransactionMeta()),
            "store": lambda: fs.store(p64(99), z64, b"child"),
            "vote": fs.vote,
            "finish": fs.finish,
            "abort": fs.abort,
        }
        seen = {}
        for name, call in calls.items():
            try:
                call()
                seen[name] = "no error"
            except Exception as exc:
                seen[name] = f"{type(exc).__name__}: {exc}"
        fs.close()
        fs.close()
        seen["close"] = "ok"
        return seen

    def in_child(work):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                payload = json.dumps(work())
            except BaseException as exc:
                payload = json.dumps({"crashed": repr(exc)})
            os.write(write_end, payload.encode())
            os._exit(0)
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        return json.loads(b"".join(chunks))
"""


def test_forked_storage_refuses_every_operation_in_the_child(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    result = run_scenario(
        path,
        """
        import json, os
        from amberdb.storage.base import TransactionMeta
        from amberdb.storage.file import FileStorage
        from amberdb.utils import p64, z64
        """,
        CHILD_TRIES,
        """
        fs = FileStorage(PATH)
        fs.begin(TransactionMeta()); fs.store(z64, z64, b"root"); fs.vote(); t1 = fs.finish()
        child = in_child(lambda: child_tries(fs))
        # The parent goes on as if nothing happened: its lock and its file are its own.
        fs.begin(TransactionMeta()); fs.store(z64, t1, b"parent"); fs.vote(); t2 = fs.finish()
        print(json.dumps({"child": child, "t2": t2.hex(), "pid": os.getpid()}))
        fs.close()
        """,
    )
    child = result["child"]
    assert isinstance(child, dict)
    assert child.pop("close") == "ok"
    for name, outcome in child.items():
        assert outcome.startswith("StorageForkedError: "), (name, outcome)
        assert f"opened in process {result['pid']} before fork()" in outcome
        assert "open it again here" in outcome
    with FileStorage(path) as fs:
        assert fs.load(z64) == (b"parent", bytes.fromhex(str(result["t2"])))
        assert len(fs) == 1
    assert verify(path).ok


def test_child_abort_and_close_leave_the_parents_voted_transaction_alone(tmp_path: Path) -> None:
    path = tmp_path / "data.fs"
    result = run_scenario(
        path,
        """
        import json, os
        from amberdb.storage.base import TransactionMeta
        from amberdb.storage.file import FileStorage
        from amberdb.utils import p64, z64
        """,
        CHILD_TRIES,
        """
        fs = FileStorage(PATH)
        fs.begin(TransactionMeta()); fs.store(p64(1), z64, b"voted before the fork"); fs.vote()
        size = os.path.getsize(PATH)
        child = in_child(lambda: child_tries(fs))
        unchanged = os.path.getsize(PATH) == size
        tid = fs.finish()
        fs.close()
        print(json.dumps({"child": child, "unchanged": unchanged, "tid": tid.hex()}))
        """,
    )
    assert result["unchanged"] is True
    with FileStorage(path) as fs:
        assert fs.load(p64(1)) == (b"voted before the fork", bytes.fromhex(str(result["tid"])))


def test_child_does_not_keep_the_writer_lock(tmp_path: Path) -> None:
    """The fork hook closes the lock descriptor in the child: after the parent closes, the file is free."""
    path = tmp_path / "data.fs"
    result = run_scenario(
        path,
        """
        import json, os, time
        from amberdb.exceptions import StorageLockedError
        from amberdb.storage.file import FileStorage
        fs = FileStorage(PATH)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # a long-lived child that never closes the storage
            os.read(read_end, 1)
            os._exit(0)
        fs.close()
        try:
            FileStorage(PATH).close()
            outcome = "reopened"
        except StorageLockedError as exc:
            outcome = str(exc)
        os.write(write_end, b"x")
        os.waitpid(pid, 0)
        print(json.dumps({"outcome": outcome}))
        """,
    )
    assert result["outcome"] == "reopened"


def test_database_commit_in_a_forked_child_fails_and_the_parent_wins(tmp_path: Path) -> None:
    """Defect 7: the child's commit is refused, so it can never overwrite the parent's."""
    path = tmp_path / "data.fs"
    result = run_scenario(
        path,
        """
        import json, os
        import amberdb
        import amberdb.transaction as transaction
        """,
        CHILD_TRIES,
        """
        db = amberdb.DB(PATH)
        with db.transaction() as conn:
            conn.root()["who"] = "nobody"

        def child_commits():
            try:
                with db.transaction() as conn:
                    conn.root()["who"] = "child"
                return {"child": "committed"}
            except Exception as exc:
                return {"child": f"{type(exc).__name__}: {exc}"}

        child = in_child(child_commits)
        with db.transaction() as conn:
            conn.root()["who"] = "parent"
        db.close()
        db = amberdb.DB(PATH)
        with db.transaction() as conn:
            who = conn.root()["who"]
        db.close()
        print(json.dumps({"child": child["child"], "who": who}))
        """,
    )
    assert str(result["child"]).startswith("StorageForkedError: ")
    assert result["who"] == "parent"
    with FileStorage(path, read_only=True) as fs:
        assert len(fs) >= 1
    assert verify(path).ok


def test_child_cannot_write_into_the_parents_savepoints(tmp_path: Path) -> None:
    """The spill file of a transaction is shared across fork() too: a child's savepoint refuses.

    It used to write there, and the parent's commit then stored the child's entries where its
    own should have been: its acknowledged change was lost.
    """
    path = tmp_path / "data.fs"
    result = run_scenario(
        path,
        """
        import json, os
        import amberdb, amberdb.transaction as transaction
        from amberdb import PersistentMapping
        """,
        CHILD_TRIES,
        """
        db = amberdb.DB(PATH)
        conn = db.open()
        root = conn.root()
        root["a"], root["b"] = PersistentMapping(v="a0"), PersistentMapping(v="b0")
        transaction.commit()
        root["a"]["v"] = "a1"
        transaction.savepoint()

        def child_work():
            root["b"]["v"] = "child" + "x" * (1 << 20)  # more than the spill keeps in memory
            try:
                transaction.savepoint()
                return {"savepoint": "no error"}
            except Exception as exc:
                return {"savepoint": f"{type(exc).__name__}: {exc}"}

        child = in_child(child_work)
        root["a"]["v"] = "a2" + "y" * (1 << 20)
        transaction.savepoint()
        transaction.commit()
        db.close()
        with amberdb.DB(PATH, read_only=True) as reopened:
            reader = reopened.open(transaction.TransactionManager())
            values = {key: reader.root()[key]["v"][:2] for key in ("a", "b")}
            reader.close()
        print(json.dumps({"child": child, "values": values}))
        """,
    )
    child = result["child"]
    assert isinstance(child, dict) and child["savepoint"].startswith("StorageForkedError: ")
    assert result["values"] == {"a": "a2", "b": "b0"}
