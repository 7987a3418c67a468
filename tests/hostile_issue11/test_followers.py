"""Read-only followers in processes of their own beside a writer killed and restarted."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import amberdb
import amberdb.transaction as transaction

CHILD = Path(__file__).with_name("bank_child.py")
ROOT = Path(__file__).resolve().parents[2]


def _start(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def test_followers_see_one_committed_state_per_transaction_while_the_writer_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "bank.fs"
    rng = random.Random(11)
    writer = _start("writer", path, 0)
    assert writer.stdout is not None and writer.stdout.readline() == "ready\n", writer.stderr
    seconds = 6.0
    followers = [_start("follower", path, seconds) for _ in range(2)]
    deadline = time.monotonic() + seconds - 0.3
    kills = 0
    try:
        while time.monotonic() < deadline:
            # Short waits: starting a writer takes a while on a loaded machine, and the
            # followers must see at least three kills.
            time.sleep(rng.uniform(0.1, 0.4))
            writer.kill()  # SIGKILL: mid-commit, mid-savepoint, mid-vote, wherever it is
            writer.communicate()
            kills += 1
            writer = _start("writer", path, kills)
            assert writer.stdout is not None and writer.stdout.readline() == "ready\n", writer.stderr
    finally:
        writer.kill()
        writer.communicate()
    reports = [follower.communicate(timeout=60) for follower in followers]
    for out, err in reports:
        assert out.startswith("ok "), (out, err)
    assert kills >= 3
    # What the followers saw last is what the file holds, and it verifies.
    db = amberdb.DB(path)
    root = db.open(transaction.TransactionManager()).root()
    assert sum(account.balance for account in root["accounts"]) == 20 * 1000
    assert all(int(out.split()[2]) <= root["seq"] for out, _ in reports)
    db.close()
