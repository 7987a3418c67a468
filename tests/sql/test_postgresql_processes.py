"""Real processes committing through PostgreSQLStorage on one database: concurrent transfers
with retries, and processes SIGKILLed in the middle of their commits (tests/sql/transfers.py
is the workload and its ledger check)."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import amberdb
from amberdb.testing.pgcluster import PostgreSQLCluster
from tests.server.procs import SRC, Processes, finish, read_until
from tests.sql.faulttools import backends, pg_uri, wait_for
from tests.sql.transfers import apply, check_ledger, draw, parse_acks, seed

WORKER = "from tests.sql.transfers import main; main()"
REPO = str(Path(SRC).parent)


def test_random_transfers_by_four_processes(
    procs: Processes, pg_cluster: PostgreSQLCluster, pg_database: str, tmp_path: Path
) -> None:
    uri = pg_uri(pg_cluster, pg_database)
    workers, count = 4, 25
    db = amberdb.DB(uri)
    try:
        seed(db, workers)
        go = tmp_path / "go"
        children = [
            procs.spawn(WORKER, uri, str(w), str(count), "--go", str(go), extra_path=[REPO])
            for w in range(workers)
        ]
        for child in children:
            read_until(child, "READY", timeout=30)
        go.write_text("go")  # all start together, so their transactions overlap
        acked = []
        retries = 0
        for child in children:
            status, out, err = finish(child, timeout=90)
            assert status == 0, err
            lines = out.splitlines()
            assert lines[-1] == "DONE 0", f"a reader saw a mixed snapshot: {lines[-5:]}"
            retries += int(lines[-2].split()[1])
            acked += parse_acks(out)
        assert len(acked) == workers * count
        logged = check_ledger(db, acked)
        assert len(logged) == workers * count
        # Conflicting transfers were retried (4 writers on 10 accounts always collide).
        assert retries > 0, "no transfer ever conflicted: the test proved little"
    finally:
        db.close()


def test_processes_killed_mid_commit_lose_nothing_acknowledged(
    procs: Processes, pg_cluster: PostgreSQLCluster, pg_database: str
) -> None:
    """Six processes, each SIGKILLed while committing transfers: three exactly between vote
    and finish (holding the commit lock), three at a random moment of a stream of commits.
    After each kill the test process commits at once: the dead process's lock is gone."""
    rng = random.Random(14)
    rounds = 6
    survivor = rounds  # the test process's own log
    db = amberdb.DB(pg_uri(pg_cluster, pg_database, lock_timeout=10))
    try:
        seed(db, rounds + 1)
        acked: list[list[object]] = []
        maybe: list[list[object]] = []
        held: list[list[object]] = []
        survivor_rng = random.Random(-1)
        for r in range(rounds):
            args = [pg_uri(pg_cluster, pg_database), str(r), "0", "--seed", str(r)]
            hold = r % 2 == 0
            if hold:
                args += ["--hold-after-vote", str(rng.randrange(0, 5))]
            victim = procs.spawn(WORKER, *args, extra_path=[REPO])
            if hold:
                read_until(victim, "VOTED", timeout=30)
                # Voted: its session is in a transaction holding the advisory lock.
                assert backends(pg_cluster, pg_database, "state = 'idle in transaction'")
            else:
                read_until(victim, "ACK", timeout=30)
                time.sleep(rng.uniform(0.0, 0.3))
            os.killpg(victim.pid, signal.SIGKILL)
            status, out, _ = finish(victim, timeout=10)
            assert status == -signal.SIGKILL
            mine = parse_acks(out)
            # The victim's transfers are drawn from its seed: the one after its last ACK was
            # in flight when it died.
            replay = random.Random(r * 1000 + r)
            drawn = [draw(replay, r, n) for n in range(len(mine) + 1)]
            assert drawn[: len(mine)] == mine
            acked += mine
            (held if hold else maybe).append(drawn[-1])
            # The dead session ends (the server sees the socket close) and its lock with it.
            wait_for(
                lambda: not backends(pg_cluster, pg_database, "state = 'idle in transaction'"),
                10,
                "the killed process's transaction to end",
            )
            started = time.monotonic()
            entry = draw(survivor_rng, survivor, r)
            with db.transaction() as conn:
                apply(conn, survivor, entry)
            assert time.monotonic() - started < 5, "the next commit waited for a dead process's lock"
            acked.append(entry)
        logged = check_ledger(db, acked, maybe)
        tags = {entry[0] for entry in logged}
        # Killed between vote and finish: voted but never committed, so never there.
        assert not tags & {entry[0] for entry in held}
        assert len([entry for entry in acked if str(entry[0]).split(":")[0] != str(survivor)]) >= rounds // 2
    finally:
        db.close()
