"""Many processes on one database: ``amberdb serve`` in one process, clients in others."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.server.procs import Processes, finish, read_until

SEED = """
import sys
from amberdb import ClientStorage, DB
import amberdb.transaction as transaction
PORT = int(sys.argv[1])
storage = ClientStorage('localhost', PORT)
db = DB(storage)
conn = db.open()
root = conn.root()
if sys.argv[2] == "write":
    root['greeting'] = 'hello from ' + str(__import__('os').getpid())
    root['numbers'] = list(range(10))
    transaction.commit()
    print("committed", root['greeting'])
else:
    print("read", root['greeting'], sum(root['numbers']))
db.close()
"""


def test_seed_example_as_written_across_processes(procs: Processes, tmp_path: Path) -> None:
    server = procs.serve(tmp_path / "data.fs")
    writer = procs.run(SEED, str(server.port), "write", timeout=30)
    assert writer.returncode == 0, writer.stderr
    greeting = writer.stdout.split("committed ", 1)[1].strip()
    reader = procs.run(SEED, str(server.port), "read", timeout=30)
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.strip() == f"read {greeting} 45"
    assert server.alive()


TRANSFERS = """
import json, random, sys
import amberdb
import amberdb.transaction as transaction
from amberdb import ClientStorage, DB

port, worker, count, total = (int(a) for a in sys.argv[1:5])
db = DB(ClientStorage('127.0.0.1', port, timeout=20, name=f"worker-{worker}"))
conn = db.open()
rng = random.Random(worker)
mixed = 0
retries = 0
for n in range(count):
    a, b = rng.sample(range(10), 2)
    amount = rng.randint(1, 30)
    tag = f"{worker}:{n}"
    for attempt in transaction.attempts(50):
        with attempt:
            retries += attempt.number > 1
            accounts = conn.root()['accounts']
            accounts[a]['balance'] -= amount
            accounts[b]['balance'] += amount
            conn.root()['log'][worker].append([tag, a, b, amount])
    print("ACK", json.dumps([tag, a, b, amount]), flush=True)
    # A reader transaction: every balance of one snapshot, some loaded from the server.
    transaction.begin()
    if n % 3 == 0:
        conn.cache_minimize()
    seen = sum(account['balance'] for account in conn.root()['accounts'])
    if seen != total:
        mixed += 1
        print("MIXED", seen, flush=True)
    transaction.abort()
print("RETRIES", retries, flush=True)
print("DONE", mixed, flush=True)
db.close()
"""


def test_random_transfers_by_four_processes(procs: Processes, tmp_path: Path) -> None:
    import amberdb
    import amberdb.transaction as transaction
    from amberdb import ClientStorage, PersistentList, PersistentMapping

    server = procs.serve(tmp_path / "data.fs")
    workers, count = 4, 25
    db = amberdb.DB(ClientStorage(server.address, timeout=20))
    try:
        with db.transaction() as conn:
            conn.root()["accounts"] = PersistentList(PersistentMapping(balance=100) for _ in range(10))
            conn.root()["log"] = PersistentList(PersistentList() for _ in range(workers))
        total = 1000
        children = [
            procs.spawn(TRANSFERS, str(server.port), str(w), str(count), str(total)) for w in range(workers)
        ]
        acked: list[list[object]] = []
        retries = 0
        for child in children:
            status, out, err = finish(child, timeout=60)
            assert status == 0, err
            lines = out.splitlines()
            assert lines[-1] == "DONE 0", f"a reader saw a mixed snapshot: {lines[-5:]}"
            acked += [json.loads(line[4:]) for line in lines if line.startswith("ACK ")]
            retries += int(lines[-2].split()[1])
        assert len(acked) == workers * count
        assert retries > 0, "no transfer ever conflicted: the test proved little"
        transaction.begin()
        with db.transaction() as conn:
            balances = [account["balance"] for account in conn.root()["accounts"]]
            logged = [list(entry) for log in conn.root()["log"] for entry in log]
        assert sum(balances) == total
        assert sorted(map(str, logged)) == sorted(map(str, acked))  # each acked transfer, once
        expected = [100] * 10
        for _, a, b, amount in acked:
            expected[a] -= amount  # type: ignore[index,operator]
            expected[b] += amount  # type: ignore[index,operator]
        assert balances == expected
    finally:
        db.close()
    assert server.alive()


COUNTER_MODULE = '''
import os
from amberdb import Persistent

with open(os.environ["COUNTER_IMPORTS"], "a") as f:
    f.write(f"{os.getpid()}\\n")


class Counter(Persistent):
    """The seed's Counter."""

    def __init__(self):
        self.count = 0

    def hit(self):
        self.count = self.count + 1

    def _p_resolveConflict(self, oldState, savedState, newState):
        saved_diff = savedState["count"] - oldState["count"]
        new_diff = newState["count"] - oldState["count"]
        return {**newState, "count": oldState["count"] + saved_diff + new_diff}
'''

COUNTER_CLIENT = """
import os, sys, time
import amberdb.transaction as transaction
from amberdb import ClientStorage, DB
from srvcounter import Counter

port, hits, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
db = DB(ClientStorage('127.0.0.1', port, timeout=20), allowed_modules=["srvcounter"])
conn = db.open()
if sys.argv[4] == "create":
    conn.root()['counter'] = Counter()
    transaction.commit()
    print("CREATED", flush=True)
    sys.exit(0)
deadline = time.monotonic() + 20
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)
for _ in range(hits):
    for attempt in transaction.attempts(20):
        with attempt:
            conn.root()['counter'].hit()
print("HITS", hits, flush=True)
db.close()
"""


def test_counter_conflicts_resolved_in_the_clients_only(procs: Processes, tmp_path: Path) -> None:
    modules = tmp_path / "clientonly"
    modules.mkdir()
    (modules / "srvcounter.py").write_text(COUNTER_MODULE)
    imports = tmp_path / "imports.txt"
    imports.write_text("")
    os.environ["COUNTER_IMPORTS"] = str(imports)
    try:
        server = procs.serve(tmp_path / "data.fs")
        go = tmp_path / "go"
        create = procs.run(COUNTER_CLIENT, str(server.port), "0", str(go), "create", extra_path=[modules])
        assert create.returncode == 0, create.stderr
        hits = 150
        children = [
            procs.spawn(COUNTER_CLIENT, str(server.port), str(hits), str(go), "hit", extra_path=[modules])
            for _ in range(2)
        ]
        time.sleep(0.3)
        go.write_text("go")
        for child in children:
            status, _out, err = finish(child, timeout=60)
            assert status == 0, err
        check = procs.run(
            "import sys\nfrom amberdb import ClientStorage, DB\n"
            "db = DB(ClientStorage('127.0.0.1', int(sys.argv[1])), allowed_modules=['srvcounter'])\n"
            "import srvcounter\nprint(db.open().root()['counter'].count)\n",
            str(server.port),
            extra_path=[modules],
        )
        assert check.returncode == 0, check.stderr
        assert int(check.stdout) == 2 * hits
        importers = {int(line) for line in imports.read_text().split()}
        assert len(importers) == 4  # every client process imported the class ...
        assert server.proc.pid not in importers  # ... and the server never did
        environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes().decode(errors="replace")
        assert str(modules) not in environ
        assert server.alive()
        assert "conflict" not in server.log().lower() or "Traceback" not in server.log()
    finally:
        del os.environ["COUNTER_IMPORTS"]


KILLED_MID_COMMIT = """
import sys, time
from amberdb import ClientStorage
from amberdb.storage.base import TransactionMeta
from amberdb.utils import p64

storage = ClientStorage('127.0.0.1', int(sys.argv[1]), timeout=10)
oid = p64(int(sys.argv[2]))
record, tid = storage.load(oid)
storage.begin(TransactionMeta("killed", "between vote and finish", b""))
storage.store(oid, tid, record)
storage.vote()
print("VOTED", flush=True)
time.sleep(60)
"""


def test_client_killed_between_vote_and_finish_never_blocks_the_server(
    procs: Processes, tmp_path: Path
) -> None:
    import amberdb
    import amberdb.transaction as transaction
    from amberdb import ClientStorage, PersistentMapping

    server = procs.serve(tmp_path / "data.fs")
    db = amberdb.DB(ClientStorage(server.address, timeout=10))
    try:
        with db.transaction() as conn:
            conn.root()["thing"] = PersistentMapping(value=1)
            conn.root()["other"] = PersistentMapping(value=1)
        with db.transaction() as conn:
            oid = int.from_bytes(conn.root()["thing"]._p_oid, "big")
        for _ in range(2):
            victim = procs.spawn(KILLED_MID_COMMIT, str(server.port), str(oid))
            read_until(victim, "VOTED", timeout=20)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(10)
            started = time.monotonic()
            transaction.begin()
            with db.transaction() as conn:  # the same object the dead client voted on
                conn.root()["thing"]["value"] += 1
            with db.transaction() as conn:
                conn.root()["other"]["value"] += 1
            assert time.monotonic() - started < 5
        with db.transaction() as conn:
            assert conn.root()["thing"]["value"] == 3
        assert server.alive()
        assert "disconnected" in server.wait_log("disconnected")
    finally:
        db.close()
