"""The transfer workload of the PostgreSQL process and fault tests: money moved between ten
accounts, each transfer logged beside the balances it changed, in one transaction.

A transfer that is half-committed, lost after it was acknowledged, or applied twice shows up
in :func:`check_ledger`: the balances must be what the logged transfers make of the opening
balances, every acknowledged transfer must be logged exactly once, and the total never moves.

Run as a child process (``python -c "from tests.sql.transfers import main; main()" ...``, see
:func:`main`): it prints ``READY``, then ``ACK [tag, a, b, amount]`` once each transfer has
committed, and checks between transfers that a read-only transaction sees the total (a mixed
snapshot prints ``MIXED``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import amberdb
from amberdb import PersistentList, PersistentMapping
from amberdb.transaction import TransactionManager

ACCOUNTS = 10
OPENING = 100
TOTAL = ACCOUNTS * OPENING

Entry = list[Any]  # [tag, a, b, amount]; tag is "worker:n"


def seed(db: amberdb.DB, workers: int) -> None:
    """Open the accounts and one empty log per worker."""
    with db.transaction() as conn:
        conn.root()["accounts"] = PersistentList(PersistentMapping(balance=OPENING) for _ in range(ACCOUNTS))
        conn.root()["log"] = PersistentList(PersistentList() for _ in range(workers))


def draw(rng: random.Random, worker: int, n: int) -> Entry:
    """The ``n``-th transfer of ``worker``: ``[tag, a, b, amount]``."""
    a, b = rng.sample(range(ACCOUNTS), 2)
    return [f"{worker}:{n}", a, b, rng.randint(1, 30)]


def apply(conn: amberdb.Connection, worker: int, entry: Entry) -> None:
    """Make the transfer in ``conn``'s transaction (the caller commits)."""
    _, a, b, amount = entry
    accounts = conn.root()["accounts"]
    accounts[a]["balance"] -= amount
    accounts[b]["balance"] += amount
    conn.root()["log"][worker].append(list(entry))


def total_seen(conn: amberdb.Connection, minimize: bool = False) -> int:
    """The sum of the balances in ``conn``'s current transaction."""
    if minimize:
        conn.cache_minimize()
    return sum(account["balance"] for account in conn.root()["accounts"])


def check_ledger(db: amberdb.DB, acked: list[Entry], maybe: Iterable[Entry] = ()) -> list[Entry]:
    """Assert the ledger's invariants and return every logged transfer.

    ``acked`` were acknowledged (committed for sure); ``maybe`` are transfers whose commit was
    cut short (a killed process, a failed commit): each may or may not be there, once at most.
    """
    with db.transaction() as conn:
        balances = [account["balance"] for account in conn.root()["accounts"]]
        logged = [list(entry) for log in conn.root()["log"] for entry in log]
    assert sum(balances) == TOTAL, f"the total moved: {balances}"
    expected = [OPENING] * ACCOUNTS
    for _, a, b, amount in logged:
        expected[a] -= amount
        expected[b] += amount
    assert balances == expected, "the balances are not what the logged transfers make: a half commit"
    counts = Counter(entry[0] for entry in logged)
    twice = sorted(tag for tag, count in counts.items() if count > 1)
    assert not twice, f"transfers committed twice: {twice}"
    by_tag = {entry[0]: entry for entry in logged}
    lost = [entry for entry in acked if by_tag.get(entry[0]) != entry]
    assert not lost, f"acknowledged transfers missing: {lost[:5]} ({len(lost)} in all)"
    allowed = {entry[0] for entry in acked} | {entry[0] for entry in maybe}
    unknown = sorted(set(by_tag) - allowed)
    assert not unknown, f"logged transfers nobody made: {unknown}"
    return logged


def parse_acks(out: str) -> list[Entry]:
    """The transfers a child acknowledged (``ACK`` lines; a line cut by a kill is ignored)."""
    acked = []
    for line in out.split("\n"):
        if line.startswith("ACK "):
            try:
                acked.append(json.loads(line[4:]))
            except ValueError:
                continue
    return acked


def _say(line: str) -> None:
    # One write per line, so a kill never leaves half a line that parses.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    """A worker process: ``URI WORKER COUNT`` (COUNT 0: until killed)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("worker", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hold-after-vote", type=int, default=-1, help="sleep after voting transfer N")
    parser.add_argument("--go", default="", help="wait for this file to exist before starting")
    args = parser.parse_args()
    db = amberdb.DB(args.uri)
    storage = db.storage
    manager = TransactionManager()
    conn = db.open(manager)
    rng = random.Random(args.seed * 1000 + args.worker)
    holding: list[int] = []
    if args.hold_after_vote >= 0:
        vote = storage.vote

        def vote_then_hold() -> None:
            vote()
            if holding and holding[0] == args.hold_after_vote:
                _say("VOTED")
                time.sleep(60)

        storage.vote = vote_then_hold  # type: ignore[method-assign]
    _say("READY")
    if args.go:
        deadline = time.monotonic() + 30
        while not os.path.exists(args.go) and time.monotonic() < deadline:
            time.sleep(0.005)
    retries = mixed = 0
    numbers = itertools.count() if args.count == 0 else range(args.count)
    for n in numbers:
        entry = draw(rng, args.worker, n)
        holding[:] = [n]
        for attempt in manager.attempts(50):
            with attempt:
                retries += attempt.number > 1
                apply(conn, args.worker, entry)
        _say("ACK " + json.dumps(entry))
        # A read-only transaction: every balance of one snapshot, some loaded from the database.
        manager.begin()
        seen = total_seen(conn, minimize=n % 3 == 0)
        manager.abort()
        if seen != TOTAL:
            mixed += 1
            _say(f"MIXED {seen}")
    _say(f"RETRIES {retries}")
    _say(f"DONE {mixed}")
    conn.close()
    db.close()
