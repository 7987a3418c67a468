"""DB.pack against connections whose transactions span the pack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction_module

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("storage", ["file", "memory"])
def test_a_transaction_spanning_a_pack_never_commits_a_reference_to_a_dropped_object(
    tmp_path: Path, storage: str
) -> None:
    db = amberdb.DB(str(tmp_path / "data.fs") if storage == "file" else None)
    with db.transaction() as conn:
        conn.root.holder = amberdb.PersistentMapping()
        conn.root.doc = amberdb.PersistentMapping(secret=1)
    manager = transaction_module.TransactionManager()
    old = db.open(manager)
    doc, holder = old.root.doc, old.root.holder
    assert doc["secret"] == 1
    with db.transaction() as conn:
        del conn.root.doc  # unreachable now -- but `old` still sees it
    db.pack()
    holder["doc"] = doc  # `old` moves it; nothing else touched `holder`
    committed = True
    try:
        manager.commit()
    except amberdb.ConflictError:
        committed = False  # refusing is fine too
        manager.abort()
    old.close()
    with db.transaction() as conn:
        if committed:
            assert conn.root.holder["doc"]["secret"] == 1
        else:
            assert "doc" not in conn.root.holder
    db.close()


def test_an_object_removed_then_added_back_across_a_pack_survives_a_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "data.fs")
    db = amberdb.DB(path)
    with db.transaction() as conn:
        conn.root.a = amberdb.PersistentMapping(doc=amberdb.PersistentMapping(secret=1))
        conn.root.b = amberdb.PersistentMapping()
    manager = transaction_module.TransactionManager()
    conn = db.open(manager)
    doc = conn.root.a.pop("doc")
    manager.commit()
    db.pack()
    conn.root.b["doc"] = doc
    try:
        manager.commit()
        moved = True
    except amberdb.DatabaseError:
        manager.abort()  # refusing is fine too
        moved = False
    conn.close()
    db.close()
    db = amberdb.DB(path)
    with db.transaction() as conn:
        if moved:
            assert conn.root.b["doc"]["secret"] == 1
        else:
            assert "doc" not in conn.root.b
    db.close()


def test_pack_keeps_every_bucket_of_a_btree_after_heavy_churn(tmp_path: Path) -> None:
    from amberdb.btrees import OOBTree, check

    path = str(tmp_path / "data.fs")
    db = amberdb.DB(path)
    with db.transaction() as conn:
        conn.root.tree = OOBTree()
    for round_ in range(6):
        with db.transaction() as conn:
            tree = conn.root.tree
            for i in range(round_, 3000, 3):
                tree[f"k{i:05d}"] = amberdb.PersistentList([round_, i])
            for i in range(round_, 3000, 7):
                tree.pop(f"k{i:05d}", None)
        db.pack()
    with db.transaction() as conn:
        expected = {k: list(v) for k, v in conn.root.tree.items()}
    db.close()
    db = amberdb.DB(path)
    with db.transaction() as conn:
        tree = conn.root.tree
        check(tree)
        assert {k: list(v) for k, v in tree.items()} == expected
        assert list(tree.keys()) == sorted(expected)
    db.close()
    result = subprocess.run(
        [sys.executable, "-m", "amberdb", "verify", path, "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(amberdb.__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stdout
