"""A tree or bucket whose record has vanished raises POSKeyError on every access, in every family.

BTrees' own suite checks this by emptying ZODB's MappingStorage (``testAccessRaisesPOSKeyError*``,
excluded from the peer run for that reason); this is the same check on AmberDB's storage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb.btrees import FAMILIES
from amberdb.exceptions import POSKeyError
from tests.btrees.families import PREFIXES, key, value

ACCESSES: dict[str, Callable[[Any, Any, Any], Any]] = {
    "get": lambda tree, k, v: tree.get(k),
    "setdefault": lambda tree, k, v: tree.setdefault(k, v),
    "in": lambda tree, k, v: k in tree,
    "len": lambda tree, k, v: len(tree),
    "keys": lambda tree, k, v: list(tree.keys()),
    "item": lambda tree, k, v: tree[k],
    "store": lambda tree, k, v: tree.__setitem__(k, v),
}


@pytest.mark.parametrize("kind", ["BTree", "Bucket"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_access_to_a_missing_record_raises_poskeyerror(prefix: str, kind: str) -> None:
    db = amberdb.DB(None)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    tree = getattr(FAMILIES[prefix], kind)({key(prefix, i): value(prefix, i) for i in range(300)})
    conn.root()["tree"] = tree
    tm.commit()
    conn.cache_minimize()
    assert tree._p_status == "ghost"
    # The tree's own record disappears from the storage (its buckets' records stay).
    storage: Any = db.storage
    del storage._records[tree._p_oid], storage._tids[tree._p_oid]
    for name, access in ACCESSES.items():
        tm.begin()
        with pytest.raises(POSKeyError, match=f"{kind}"):
            access(tree, key(prefix, 1), value(prefix, 1))
        assert tree._p_status == "ghost", name
        tm.abort()
    conn.close()
    db.close()
