"""ZEO's invalidation races, made to happen on purpose against StorageServer and ClientStorage.

The rule (issue 13): a client's last tid and its applied invalidations move together, in wire
order, so that every transaction of every connection reads one committed state.  ZEO broke it
three times; each test below makes the server (or the client's network thread) wait at the
point where ZEO went wrong, then checks what connections read against a *model*: the server's
own storage, which knows the newest revision of every object as of any tid.

* ZODB#290 -- a snapshot taken before the invalidations up to it were applied (an object
  changed at or before the snapshot stays in the connection's memory, stale).
* ZEO#155 -- a load's reply cached after a newer invalidation that should have ended it.
* ZEO#166 -- the last tid visible before the invalidations it belongs to ran.

Then the shapes of ZODB's race tests (two counters kept equal, 8 clients, half the reads from
the connection's memory and half from the server; 64 clients reconnecting every few
transactions, each transaction checked against the model), and an INVALIDATE split over
several frames whose connection drops half-way.

The server's delays come from :attr:`StorageServer.message_delay` (a test hook that holds a
frame, and everything after it to the same client, for the seconds it returns) and from
:class:`HoldingStorage` (a MemoryStorage that can block a committer's thread right after
its ``finish``: committed in the storage, not yet announced to clients).  Everything runs
with ``sys.setswitchinterval(5e-6)``.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import amberdb
from amberdb import PersistentList, PersistentMapping
from amberdb.exceptions import ClientDisconnected, ConflictError
from amberdb.server import ClientStorage, StorageServer
from amberdb.server import server as server_module
from amberdb.server.protocol import FrameDecoder, Kind, decode_message
from amberdb.storage.memory import MemoryStorage
from amberdb.transaction import TransactionManager
from amberdb.utils import Oid, Tid, oid_repr, p64, u64

# -- harness ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _switch_often() -> Iterator[None]:
    """Make the interpreter switch threads every 5 microseconds, as ZODB's race tests do."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


class HoldingStorage(MemoryStorage):
    """A MemoryStorage whose next ``finish`` may block its thread once it has finished.

    ``hold_next_finish()`` arms it; the next committer's thread then waits, after the
    transaction is committed in the storage (and its commit lock released) but before the
    server hears of it, until ``release()``.  That is a server committer thread descheduled
    at the worst moment: the commit is in the storage, not yet announced to any client.
    """

    def __init__(self) -> None:
        super().__init__()
        self._armed = False
        self._gate = threading.Event()
        self.finished_held = threading.Event()
        self.held_tid: Tid | None = None

    def hold_next_finish(self) -> None:
        self._gate.clear()
        self.finished_held.clear()
        self._armed = True

    def release(self) -> None:
        self._gate.set()

    def finish(self) -> Tid:
        tid = super().finish()
        if self._armed:
            self._armed = False
            self.held_tid = tid
            self.finished_held.set()
            self._gate.wait(10)
        return tid


@contextmanager
def serving(storage: MemoryStorage | None = None) -> Iterator[StorageServer]:
    server = StorageServer(storage if storage is not None else MemoryStorage()).start()
    try:
        yield server
    finally:
        server.message_delay = None
        server.close()


def open_db(server: StorageServer, name: str, **options: Any) -> amberdb.DB:
    options.setdefault("timeout", 10.0)
    return amberdb.DB(ClientStorage(server.address, name=name, **options))


def client_of(db: amberdb.DB) -> ClientStorage:
    storage = db.storage
    assert isinstance(storage, ClientStorage)
    return storage


def drop_client(server: StorageServer, name: str) -> None:
    """Close the server's side of the named client's connection (the client reconnects)."""

    def drop() -> None:
        for client in list(server.clients):
            if client.identity == name and client.transport is not None:
                client.transport.abort()

    server.loop.call_soon_threadsafe(drop)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.002)


def served_name(server: StorageServer, name: str) -> bool:
    return any(client.identity == name and not client.closed for client in list(server.clients))


def snapshot_of(conn: amberdb.Connection) -> Tid:
    """The tid the connection's transaction reads as of (its MVCC snapshot)."""
    snapshot: Tid = conn._snapshot
    return snapshot


def newest_serial(storage: MemoryStorage, oid: Oid, snapshot: Tid) -> Tid:
    """The model: the tid of the newest revision of ``oid`` committed at or before ``snapshot``."""
    return storage.load(oid, p64(u64(snapshot) + 1))[1]


def check_reads(storage: MemoryStorage, conn: amberdb.Connection, objects: list[Any], where: str) -> None:
    """Every object the transaction reads is the model's revision as of its snapshot."""
    snapshot = snapshot_of(conn)
    for obj in objects:
        obj._p_activate()
        expected = newest_serial(storage, obj._p_oid, snapshot)
        assert obj._p_serial == expected, (
            f"{where}: oid {oid_repr(obj._p_oid)} reads revision {oid_repr(obj._p_serial)} in a"
            f" transaction at {oid_repr(snapshot)}, whose newest revision of it is {oid_repr(expected)}"
        )


def frame_fields(frame: bytes) -> list[Any]:
    (payload,) = FrameDecoder(1 << 30).feed(frame)
    return list(decode_message(payload).fields)


def setup_cells(db: amberdb.DB, names: list[str]) -> None:
    tm = TransactionManager()
    conn = db.open(tm)
    with tm:
        for name in names:
            conn.root()[name] = PersistentMapping(v=0)
    conn.close()


def commit_in_thread(db: amberdb.DB, change: Callable[[Any], object]) -> threading.Thread:
    """Commit ``change(root)`` through ``db`` from a thread of its own (started)."""

    def run() -> None:
        tm = TransactionManager()
        conn = db.open(tm)
        with tm:
            change(conn.root())
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def commit_now(db: amberdb.DB, change: Callable[[Any], object]) -> None:
    thread = commit_in_thread(db, change)
    thread.join(20)
    assert not thread.is_alive()


# -- ZODB#290: a snapshot whose invalidations were not all applied -------------------------------


@pytest.mark.parametrize("server_sync", [True, False])
def test_zodb290_commit_moves_snapshot_past_an_unannounced_commit(server_sync: bool) -> None:
    storage = HoldingStorage()
    with serving(storage) as server:
        victim_db = open_db(server, "victim", server_sync=server_sync)
        writer_db = open_db(server, "writer")
        try:
            setup_cells(victim_db, ["x", "y"])
            tm = TransactionManager()
            conn = victim_db.open(tm)
            tm.begin()
            root = conn.root()
            x, y = root["x"], root["y"]
            assert (x["v"], y["v"]) == (0, 0)  # both in the connection's memory now
            tm.abort()

            # The writer changes x; its server thread stalls right after the storage's finish.
            storage.hold_next_finish()
            writer = commit_in_thread(writer_db, lambda r: r["x"].__setitem__("v", 1))
            assert storage.finished_held.wait(10)
            changed_x = storage.held_tid
            assert changed_x is not None

            # The victim commits y: its vote comes after x's finish, so its tid is newer.
            tm.begin()
            y["v"] = 1
            tm.commit()
            assert snapshot_of(conn) > changed_x
            storage.release()
            writer.join(10)
            wait_until(lambda: client_of(victim_db).last_tid() >= storage.last_tid(), "the victim hears")

            tm.begin()
            check_reads(storage, conn, [x, y], "after its own commit")
            assert x["v"] == 1, "the victim still reads x as it was before a commit older than its snapshot"
            tm.abort()
            conn.close()
        finally:
            storage.release()
            victim_db.close()
            writer_db.close()


# -- ZEO#155: a load's reply cached after a newer invalidation ---------------------------------


@pytest.mark.parametrize("how", ["load", "prefetch"])
def test_zeo155_load_reply_held_until_after_a_newer_invalidation(how: str) -> None:
    """The victim's LOAD (or LOAD_MANY) reply is held on the wire while another client commits
    the object: the INVALIDATE queues behind the reply, which must not outlive it as current."""
    storage = MemoryStorage()
    with serving(storage) as server:
        victim_db = open_db(server, "victim")
        writer_db = open_db(server, "writer")
        try:
            setup_cells(writer_db, ["x"])
            x_oid = writer_db.open(TransactionManager()).root()["x"]._p_oid
            victim = client_of(victim_db)
            victim.cache.drop([x_oid])
            replies: list[float] = []

            def hold_first_reply(client: Any, kind: Kind, request_id: int, frame: bytes) -> float:
                if client.identity == "victim" and kind == Kind.REPLY and not replies:
                    replies.append(time.monotonic())
                    return 0.3
                return 0.0

            server.message_delay = hold_first_reply
            results: list[Any] = []

            def victim_load() -> None:
                if how == "load":
                    results.append(victim.load(x_oid))
                else:
                    victim.prefetch([x_oid])
                    results.append(victim.load(x_oid))

            loader = threading.Thread(target=victim_load, daemon=True)
            loader.start()
            wait_until(lambda: bool(replies), "the reply is held")
            commit_now(writer_db, lambda r: r["x"].__setitem__("v", 1))
            loader.join(10)
            assert results, "the victim's load never returned"
            wait_until(lambda: victim.last_tid() == storage.last_tid(), "the victim hears of the commit")
            cached = victim.cache.load(x_oid)
            assert cached is None or cached[1] == storage.last_tid(), (
                "the victim caches the pre-commit revision of x as current after the commit's invalidation"
            )
            tm = TransactionManager()
            conn = victim_db.open(tm)
            tm.begin()
            check_reads(storage, conn, [conn.root()["x"]], "after the held reply")
            assert conn.root()["x"]["v"] == 1
            tm.abort()
            conn.close()
        finally:
            victim_db.close()
            writer_db.close()


@pytest.mark.parametrize("how", ["load", "prefetch"])
def test_zeo155_load_while_a_commit_is_finished_but_not_announced(how: str) -> None:
    """A load served between a commit's finish in the storage and its INVALIDATE answers the
    state clients were told about, and the INVALIDATE then ends it in the cache."""
    storage = HoldingStorage()
    with serving(storage) as server:
        victim_db = open_db(server, "victim")
        writer_db = open_db(server, "writer")
        try:
            setup_cells(writer_db, ["x"])
            x_oid = writer_db.open(TransactionManager()).root()["x"]._p_oid
            victim = client_of(victim_db)
            victim.cache.drop([x_oid])
            announced = victim.ping()

            storage.hold_next_finish()
            writer = commit_in_thread(writer_db, lambda r: r["x"].__setitem__("v", 1))
            assert storage.finished_held.wait(10)
            if how == "prefetch":
                victim.prefetch([x_oid])
            _record, tid = victim.load(x_oid)
            assert tid <= announced, "the server served a revision it had not announced (ZEO#155)"
            storage.release()
            writer.join(10)
            wait_until(lambda: victim.last_tid() == storage.last_tid(), "the victim hears of the commit")
            cached = victim.cache.load(x_oid)
            assert cached is None or cached[1] == storage.last_tid()
            tm = TransactionManager()
            conn = victim_db.open(tm)
            tm.begin()
            check_reads(storage, conn, [conn.root()["x"]], "after the commit is announced")
            tm.abort()
            conn.close()
        finally:
            storage.release()
            victim_db.close()
            writer_db.close()


# -- ZEO#166: the last tid visible before its invalidations ran ---------------------------------


@pytest.mark.parametrize("split", ["before-cache", "after-cache"])
def test_zeo166_reader_never_sees_last_tid_before_invalidations(
    split: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The victim's network thread is slowed between the parts of applying an INVALIDATE
    (before the cache is invalidated, or between the cache and the log/last tid) while a
    reader thread keeps starting transactions and reading raw records: whatever last tid it
    sees, the cache and its connections agree with it."""
    storage = MemoryStorage()
    with serving(storage) as server:
        victim_db = open_db(server, "victim", server_sync=False)
        writer_db = open_db(server, "writer")
        try:
            names = ["a", "b"]
            setup_cells(writer_db, names)
            victim = client_of(victim_db)
            wait_until(lambda: victim.last_tid() == storage.last_tid(), "the victim is current")
            original_invalidate = victim._invalidate_cache
            original_append = victim._append_log
            in_split = threading.Event()

            def slow_invalidate(tid: Tid, oids: Any) -> None:
                if split == "before-cache":
                    in_split.set()
                    time.sleep(0.02)
                original_invalidate(tid, oids)

            def slow_append(tid: Tid, oids: frozenset[Oid]) -> None:
                if split == "after-cache":
                    in_split.set()
                    time.sleep(0.02)
                original_append(tid, oids)

            monkeypatch.setattr(victim, "_invalidate_cache", slow_invalidate)
            monkeypatch.setattr(victim, "_append_log", slow_append)
            stop = threading.Event()
            failures: list[str] = []
            checked = [0]

            def reader() -> None:
                tm = TransactionManager()
                conn = victim_db.open(tm)
                oids = []
                with tm:
                    oids = [conn.root()[name]._p_oid for name in names]
                while not stop.is_set():
                    try:
                        seen = victim.last_tid()
                        for oid in oids:
                            _record, tid = victim.load(oid)
                            expected = newest_serial(storage, oid, seen)
                            if tid < expected:
                                failures.append(
                                    f"last_tid() said {oid_repr(seen)} but load() gave revision"
                                    f" {oid_repr(tid)} of oid {oid_repr(oid)},"
                                    f" older than {oid_repr(expected)}"
                                )
                        tm.begin()
                        cells = [conn.root()[name] for name in names]
                        check_reads(storage, conn, cells, "reader")
                        values = {cell["v"] for cell in cells}
                        if len(values) != 1:
                            failures.append(f"cells read {values} at {oid_repr(snapshot_of(conn))}")
                        tm.abort()
                        checked[0] += 1
                    except AssertionError as exc:
                        failures.append(str(exc))
                        tm.abort()
                conn.close()

            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            for value in range(1, 16):

                def set_all(root: Any, value: int = value) -> None:
                    for name in names:
                        root[name]["v"] = value

                commit_now(writer_db, set_all)
                time.sleep(0.03)
            assert in_split.is_set()
            stop.set()
            thread.join(10)
            assert not failures, failures[:3]
            assert checked[0] > 10
        finally:
            victim_db.close()
            writer_db.close()


# -- reconnection: the welcome and the INVALIDATE behind it --------------------------------------


def test_reconnect_welcome_and_invalidate_in_one_read() -> None:
    storage = MemoryStorage()
    with serving(storage) as server:
        victim_db = open_db(server, "victim")
        writer_db = open_db(server, "writer")
        try:
            setup_cells(writer_db, ["x"])
            victim = client_of(victim_db)
            tm = TransactionManager()
            conn = victim_db.open(tm)
            tm.begin()
            x = conn.root()["x"]
            assert x["v"] == 0
            tm.abort()
            held: list[bool] = []

            def hold_welcome(client: Any, kind: Kind, request_id: int, frame: bytes) -> float:
                if client.identity == "victim" and kind == Kind.REPLY and not held:
                    held.append(True)
                    return 0.3
                return 0.0

            server.message_delay = hold_welcome
            drop_client(server, "victim")
            wait_until(lambda: bool(held), "the victim's welcome is held")
            commit_now(writer_db, lambda r: r["x"].__setitem__("v", 1))
            acknowledged = storage.last_tid()
            wait_until(victim.is_connected, "the victim reconnects")
            time.sleep(0.05)
            tm.begin()  # server_sync: sees every commit acknowledged before it began
            assert snapshot_of(conn) >= acknowledged, (
                f"a transaction begun after the commit {oid_repr(acknowledged)} was acknowledged reads"
                f" as of {oid_repr(snapshot_of(conn))};"
                f" the client's last tid is {oid_repr(victim.last_tid())}"
            )
            check_reads(storage, conn, [x], "after the reconnect")
            assert x["v"] == 1
            tm.abort()
            assert victim.last_tid() == acknowledged
            conn.close()
        finally:
            victim_db.close()
            writer_db.close()


# -- an INVALIDATE in several frames, cut half-way -----------------------------------------------


def test_invalidate_in_chunks_cut_half_way_is_never_half_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "INVALIDATE_CHUNK", 3)
    storage = MemoryStorage()
    count = 10
    with serving(storage) as server:
        victim_db = open_db(server, "victim", server_sync=False)
        writer_db = open_db(server, "writer")
        try:
            tm = TransactionManager()
            wconn = writer_db.open(tm)
            with tm:
                wconn.root()["cells"] = PersistentList(PersistentMapping(v=0) for _ in range(count))
            wconn.close()
            victim = client_of(victim_db)
            # server_sync=False: the victim learns of the commit from its INVALIDATE, which may
            # still be on its way when the writer's commit returns.
            wait_until(lambda: victim.last_tid() >= storage.last_tid(), "the victim hears of the cells")
            vtm = TransactionManager()
            conn = victim_db.open(vtm)
            vtm.begin()
            cells = list(conn.root()["cells"])
            assert [cell["v"] for cell in cells] == [0] * count
            vtm.abort()
            before_cut = victim.last_tid()
            seen: list[list[Any]] = []
            cut = threading.Event()
            resumed = threading.Event()

            def cut_after_first_chunk(client: Any, kind: Kind, request_id: int, frame: bytes) -> float:
                if client.identity != "victim" or kind != Kind.INVALIDATE or cut.is_set():
                    return 0.0
                fields = frame_fields(frame)
                seen.append(fields)
                if len(seen) == 2:
                    assert seen[0][3] is True  # the first frame said more follows
                    client.transport.abort()
                    cut.set()
                    return 60.0  # never sent: the connection is gone
                return 0.0

            server.message_delay = cut_after_first_chunk

            def reader() -> None:
                rtm = TransactionManager()
                rconn = victim_db.open(rtm)
                while not resumed.is_set():
                    try:
                        rtm.begin()
                        values = [cell["v"] for cell in rconn.root()["cells"]]
                        assert len(set(values)) == 1, f"half an invalidation applied: {values}"
                        check_reads(storage, rconn, list(rconn.root()["cells"]), "reader")
                        rtm.abort()
                    except ClientDisconnected:
                        rtm.abort()
                    except AssertionError as exc:
                        failures.append(str(exc))
                        rtm.abort()
                rconn.close()

            failures: list[str] = []
            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            commit_now(writer_db, lambda r: [cell.__setitem__("v", 1) for cell in r["cells"]])
            assert cut.wait(10)
            # The client's last tid moves in one step (under its state lock): before the cut
            # chunked INVALIDATE, or already at the reconnect's newest -- never in between.  (Its
            # cache's last tid moves first, inside that step, so the two are not read together.)
            assert victim.last_tid() in (before_cut, storage.last_tid())
            wait_until(lambda: victim.is_connected() and victim.last_tid() == storage.last_tid(), "reconnect")
            time.sleep(0.05)
            resumed.set()
            thread.join(10)
            assert not failures, failures[:3]
            vtm.begin()
            check_reads(storage, conn, cells, "after the reconnect")
            assert [cell["v"] for cell in cells] == [1] * count
            vtm.abort()
            conn.close()
        finally:
            victim_db.close()
            writer_db.close()


# -- ZODB's race tests: two counters, 8 clients; 64 clients reconnecting ------------------------


def test_two_counters_eight_clients_half_from_cache_half_from_server() -> None:
    """ZODB's load race test, over the network: 8 clients (threads, each a ClientStorage and a
    DB) keep two counters equal, incrementing both in one transaction now and then; every
    transaction reads the first from the connection's memory and the second from the server
    (ghostified and dropped from the record cache first), and checks they are equal and the
    model's revisions as of the transaction's snapshot."""
    storage = MemoryStorage()
    clients = 8
    budget = 4.0
    with serving(storage) as server:
        dbs = [open_db(server, f"counter-{n}") for n in range(clients)]
        try:
            setup_cells(dbs[0], ["one", "two"])
            failures: list[str] = []
            counts = {"checked": 0, "committed": 0, "conflicts": 0}
            lock = threading.Lock()
            deadline = time.monotonic() + budget

            def worker(number: int) -> None:
                rng = random.Random(number)
                db = dbs[number]
                client = client_of(db)
                tm = TransactionManager()
                conn = db.open(tm)
                while time.monotonic() < deadline and not failures:
                    try:
                        tm.begin()
                        root = conn.root()
                        one, two = root["one"], root["two"]
                        two._p_invalidate()
                        client.cache.drop([two._p_oid])
                        first, second = one["v"], two["v"]
                        check_reads(storage, conn, [one, two], f"client {number}")
                        if first != second:
                            failures.append(
                                f"client {number}: one={first} two={second} at {oid_repr(snapshot_of(conn))}"
                            )
                            break
                        with lock:
                            counts["checked"] += 1
                        if rng.random() < 0.4:
                            one["v"] = first + 1
                            two["v"] = second + 1
                            tm.commit()
                            with lock:
                                counts["committed"] += 1
                        else:
                            tm.abort()
                    except ConflictError:
                        tm.abort()
                        with lock:
                            counts["conflicts"] += 1
                    except AssertionError as exc:
                        failures.append(str(exc))
                        tm.abort()
                conn.close()

            threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(budget + 20)
            assert not any(thread.is_alive() for thread in threads)
            assert not failures, failures[:3]
            assert counts["checked"] > 50 and counts["committed"] > 10, counts
            tm = TransactionManager()
            conn = dbs[0].open(tm)
            with tm:
                assert conn.root()["one"]["v"] == conn.root()["two"]["v"] == counts["committed"]
            conn.close()
        finally:
            for db in dbs:
                db.close()


def test_sixty_four_clients_reconnecting_every_few_transactions(tmp_path: Any) -> None:
    """ZODB's reconnect race test, over the network: 64 clients (threads) each run a few
    transactions, then lose their connection -- the server closes its side, or the client
    is closed and opened again on its persistent cache file -- and go on.  The database
    holds 16 pairs of cells; a commit sets both cells of one pair to a new value.  At the
    start of every transaction each client checks what it reads against the model (the
    newest revision of every cell as of the tid it reads at: a skipped invalidation leaves
    a stale cell), that the two cells of every pair agree, and that its snapshot never goes
    back."""
    storage = MemoryStorage()
    clients = 64
    pairs = 16
    rounds = 4
    per_round = 3
    names = [f"p{n}{side}" for n in range(pairs) for side in "ab"]
    with serving(storage) as server:
        first = open_db(server, "setup")
        setup_cells(first, names)
        first.close()
        failures: list[str] = []
        counts = {"checked": 0, "committed": 0, "conflicts": 0, "disconnected": 0}
        lock = threading.Lock()
        started = time.monotonic()

        def worker(number: int) -> None:
            rng = random.Random(number)
            name = f"r{number}"
            cache_path = str(tmp_path / f"{name}.cache")
            db = open_db(server, name, cache_path=cache_path)
            tm = TransactionManager()
            conn = db.open(tm)
            last_snapshot = p64(0)
            try:
                for round_number in range(rounds):
                    done = 0
                    while done < per_round and not failures and time.monotonic() - started < 25:
                        try:
                            tm.begin()
                            snapshot = snapshot_of(conn)
                            if snapshot < last_snapshot:
                                failures.append(
                                    f"client {number}: snapshot went back from {oid_repr(last_snapshot)}"
                                    f" to {oid_repr(snapshot)}"
                                )
                            last_snapshot = max(last_snapshot, snapshot)
                            root = conn.root()
                            row = [root[cell] for cell in names]
                            check_reads(storage, conn, row, f"client {number}")
                            for pair in range(pairs):
                                a, b = row[2 * pair]["v"], row[2 * pair + 1]["v"]
                                if a != b:
                                    failures.append(f"client {number}: pair {pair} reads {a} and {b}")
                            with lock:
                                counts["checked"] += 1
                            if rng.random() < 0.5:
                                pair = rng.randrange(pairs)
                                value = row[2 * pair]["v"] + 1
                                row[2 * pair]["v"] = row[2 * pair + 1]["v"] = value
                                tm.commit()
                                with lock:
                                    counts["committed"] += 1
                            else:
                                tm.abort()
                            done += 1
                        except ConflictError:
                            tm.abort()
                            with lock:
                                counts["conflicts"] += 1
                        except ClientDisconnected:
                            tm.abort()
                            with lock:
                                counts["disconnected"] += 1
                        except AssertionError as exc:
                            failures.append(str(exc))
                            tm.abort()
                    client = client_of(db)
                    if round_number % 2 == 0:
                        before = client._protocol
                        drop_client(server, name)
                        wait_until(
                            lambda c=client, p=before: c._protocol is not p,  # type: ignore[misc]
                            f"client {number} is dropped",
                        )
                    else:
                        # Closed once connected again: a close while it reconnects was seen to
                        # leak its socket and connector task under this load (not a race of
                        # invalidations; left out of this test).
                        wait_until(client.is_connected, f"client {number} reconnects")
                        conn.close()
                        db.close()
                        db = open_db(server, name, cache_path=cache_path)
                        tm = TransactionManager()
                        conn = db.open(tm)
                        last_snapshot = p64(0)  # a new process may start anywhere it likes
            finally:
                with contextlib.suppress(AssertionError):
                    wait_until(client_of(db).is_connected, f"client {number} reconnects")
                conn.close()
                db.close()

        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
        assert not any(thread.is_alive() for thread in threads)
        assert time.monotonic() - started < 30
        assert not failures, failures[:3]
        assert counts["checked"] >= clients * rounds * per_round, counts
        assert counts["committed"] >= clients, counts
        final = storage.load(p64(0))[1]
        assert final > p64(0)
