"""Child processes for test_followers.py: a bank writer and read-only followers.

``python bank_child.py writer PATH SEED``: through a DB, commit transfers between
ACCOUNTS accounts (the total never changes) forever, each transaction also bumping
``root['seq']``; every 25th one also adds BIG_OBJECTS objects to a tree, with savepoints,
and a record of more than a MiB.  Prints ``ready`` once the accounts exist.

``python bank_child.py follower PATH SECONDS``: through ``DB(FileStorage(PATH,
read_only=True))``, begin transactions for SECONDS, checking in each that the balances sum
to TOTAL, that ``seq`` never goes back, and now and then that the tree holds what the
transaction that last changed it says.  Prints ``ok CHECKS LAST_SEQ`` or ``VIOLATION ...``.
"""

from __future__ import annotations

import os
import random
import sys
import time

import amberdb
import amberdb.transaction as transaction
from amberdb import PersistentList
from amberdb.btrees import IOBTree
from amberdb.storage.file import FileStorage
from amberdb.testing.objects import Account  # importable by the test process too

ACCOUNTS = 20
TOTAL = ACCOUNTS * 1000
BIG_OBJECTS = 3000


def writer(path: str, seed: int) -> None:
    rng = random.Random(seed)
    db = amberdb.DB(path)
    tm = transaction.TransactionManager()
    root = db.open(tm).root()
    if "accounts" not in root:
        root["accounts"] = PersistentList(Account(1000) for _ in range(ACCOUNTS))
        root["seq"] = 0
        root["tree"] = IOBTree()
        root["tree_size"] = 0
        tm.commit()
    print("ready", flush=True)
    while True:
        accounts = root["accounts"]
        for _ in range(rng.randint(1, 4)):
            a, b = rng.sample(range(ACCOUNTS), 2)
            amount = rng.randint(1, 50)
            accounts[a].balance -= amount
            accounts[b].balance += amount
        root["seq"] += 1
        if root["seq"] % 25 == 0:
            tree = root["tree"]
            base = root["seq"] * BIG_OBJECTS
            for i in range(BIG_OBJECTS):
                tree[base + i] = Account(i)
                if i % 1000 == 999:
                    tm.savepoint()
            root["blob"] = os.urandom((1 << 20) + 1)
            root["tree_size"] = len(tree)
        tm.commit()


def follower(path: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    db = amberdb.DB(FileStorage(path, read_only=True), cache_size=50)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    checks, last = 0, -1
    while time.monotonic() < deadline:
        tm.begin()
        root = conn.root()
        total = sum(account.balance for account in root["accounts"])
        seq = root["seq"]
        if total != TOTAL or seq < last:
            print(f"VIOLATION total {total} at seq {seq} (last seen {last})", flush=True)
            return
        if checks % 20 == 0 and len(root["tree"]) != root["tree_size"]:
            print(f"VIOLATION tree of {len(root['tree'])} at seq {seq}, {root['tree_size']} committed")
            return
        last = seq
        checks += 1
    print(f"ok {checks} {last}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(sys.argv[2], int(sys.argv[3]))
    else:
        follower(sys.argv[2], float(sys.argv[3]))
