"""``StorageServer``: one asyncio loop serving one storage to ``ClientStorage`` clients.

Threads and order
=================

Every message is read, checked and answered on one event loop thread (ZEO's multi-threaded
server corrupted data, ZEO#209; this one has no shared state outside the loop).  Storage
calls that may take long run elsewhere and report back to the loop:

* each client's commit (``begin``, its stores and ``vote`` in one go at VOTE, ``finish`` at
  FINISH, ``abort``) runs in a thread of its own, so the storage sees one committing thread
  per client -- FileStorage's group commit then shares one fsync among the clients that
  vote together -- and no client's fsync or wait for the commit lock stalls the loop;
* iterator, undo log, history and pack run in a small pool of job threads;
* loads run on the loop: a FileStorage load is an index lookup and one ``pread``.

The storage's commit lock is taken at VOTE, in the client's commit thread, and released
when that vote fails or at FINISH/ABORT: stores wait in memory (or in a spill file past
:data:`SPILL_AT` bytes) until then, so a client that is slow to send them holds nothing.
A vote that meets conflicts aborts the storage transaction at once and keeps the stores:
the client resolves, sends replacements, and votes again.

Invalidations
=============

After every FINISH (and pack) the loop asks the storage what changed since the newest tid
it told clients about (``poll_invalidations``) and writes one INVALIDATE to every client
*before* it writes the FINISH reply.  A load answers with the state as of that newest
broadcast tid (a revision committed but not yet broadcast is read past), so every client
sees replies and invalidations that agree, in wire order: a client applies them one by one
on its network thread and its cache is exact.  That is the rule ZEO broke three times
(ZODB#290, ZEO#155, ZEO#166).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import socket
import ssl as ssl_module
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from amberdb.exceptions import (
    AuthenticationError,
    ConflictError,
    DatabaseError,
    POSKeyError,
    ReadOnlyError,
    StorageError,
    StorageTransactionError,
    VoteConflictError,
)
from amberdb.record import references
from amberdb.server.auth import Tokens
from amberdb.server.protocol import (
    DEFAULT_FRAME_LIMIT,
    OLDEST_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameReader,
    Kind,
    Value,
    WireError,
    decode_hello,
    decode_message,
    encode_hello,
    encode_message,
    error_fields,
)
from amberdb.storage.base import Storage, TransactionMeta
from amberdb.storage.spill import StoreBuffer
from amberdb.utils import Oid, Tid, oid_repr, p64, u64

__all__ = ["StorageServer"]

log = logging.getLogger("amberdb.server")

_T = TypeVar("_T")

SPILL_AT = 16 << 20
"""Bytes of one client's stores kept in memory before they go to a spill file."""
INVALIDATE_CHUNK = 100_000
"""Oids per INVALIDATE frame (a bigger transaction's are sent in several, marked ``more``)."""
MAX_BATCH = 10_000
"""Most oids in one LOAD_MANY, entries asked of UNDO_LOG or HISTORY."""
ITERATE_BUDGET = 4 << 20
"""About how many record bytes one ITERATE or CURRENT_RECORDS reply carries."""
_CURRENT_PAGE = 500
"""Records a CURRENT_RECORDS reply asks of the storage at a time, until its limit or budget."""
QUEUE_HIGH, QUEUE_LOW = 10_000, 1_000
"""Transaction messages queued for one client at which its socket stops being read, and
below which reading resumes."""
WRITE_BUFFER_LIMIT = 256 << 20
"""A client that lets this much of our output pile up unread is dropped."""
CLOSE_GRACE = 10.0
"""Seconds ``close()`` lets voted transactions finish before aborting them."""


class _ProtocolViolation(Exception):  # noqa: N818 - never leaves this module
    """The client broke the protocol: it is disconnected, with this as the logged reason."""


class _Transaction:
    """One client's open transaction on the server: its metadata and buffered stores."""

    def __init__(self, meta: TransactionMeta, tid: Tid | None, packed_seen: Tid | None) -> None:
        self.meta = meta
        self.tid = tid
        self.packed_seen = packed_seen
        self.stores = StoreBuffer(SPILL_AT)
        self.error: DatabaseError | None = None
        self.voted = False
        self.voted_at = 0.0

    def add(self, oid: Oid, base: Tid, record: bytes) -> None:
        self.stores.store(oid, base, record)

    def entries(self) -> Iterable[tuple[Oid, Tid, bytes]]:
        return self.stores.entries()

    def close(self) -> None:
        self.stores.close()


def _oid(value: Value, what: str = "oid") -> Oid:
    if type(value) is not bytes or len(value) != 8:
        raise _ProtocolViolation(f"{what} must be 8 bytes, got {value!r:.60}")
    return value


def _optional_tid(value: Value, what: str) -> Tid | None:
    return None if value is None else _oid(value, what)


def _int(value: Value, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _ProtocolViolation(f"{what} must be an integer from {low} to {high}, got {value!r:.60}")
    return value


def _text(value: Value, what: str, limit: int = 1 << 16) -> str:
    if type(value) is not str or len(value) > limit:
        raise _ProtocolViolation(f"{what} must be a string of at most {limit} characters")
    return value


def _bytes(value: Value, what: str) -> bytes:
    if type(value) is not bytes:
        raise _ProtocolViolation(f"{what} must be bytes, got {type(value).__name__}")
    return value


def _fields(fields: list[Value], count: int, kind: Kind) -> list[Value]:
    if len(fields) != count:
        raise _ProtocolViolation(f"{kind.name} takes {count} fields, got {len(fields)}")
    return fields


def _meta_fields(meta: TransactionMeta) -> list[Value]:
    return [meta.user, meta.description, meta.extension]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ClientConnection(FrameReader):
    """One client, seen from the loop: its protocol state, transaction and commit thread."""

    def __init__(self, server: StorageServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        super().__init__()
        self.decoder = FrameDecoder(server.frame_limit)
        self.greeted = False
        self.identity: str | None = None
        self.access = "ro"
        self.txn: _Transaction | None = None
        self.queue: asyncio.Queue[tuple[Kind, int, list[Value]] | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.committer: ThreadPoolExecutor | None = None
        self.closed = False
        self.last_data = time.monotonic()
        self.connected_at = self.last_data
        self.jobs = 0
        self.paused_for: set[str] = set()
        self.held: collections.deque[tuple[float, bytes]] = collections.deque()  # message_delay

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (str(peer or "") or "unix socket")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.server.clients.add(self)
        transport.write(encode_hello())
        self.worker = worker = asyncio.get_running_loop().create_task(self._transactions())
        # Kept until done, past the client's disconnect: a voted transaction's abort runs
        # there, and the server must not close its storage before it has.
        self.server.workers.add(worker)
        worker.add_done_callback(self.server.workers.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            log.info(
                "client %s (%s) disconnected%s", self.peer, self.identity or "-", f": {exc}" if exc else ""
            )
        self.server.clients.discard(self)
        self.server.subscribers.discard(self)
        self.queue.put_nowait(None)  # the worker aborts what is open, then ends

    def pause_writing(self) -> None:
        self._pause("replies")

    def resume_writing(self) -> None:
        self._resume("replies")

    def _pause(self, why: str) -> None:
        """Stop reading this client while its replies pile up unsent, or its transaction
        messages unprocessed: it cannot make the server hold more than a bounded amount."""
        if not self.paused_for and self.transport is not None:
            self.transport.pause_reading()
        self.paused_for.add(why)

    def _resume(self, why: str) -> None:
        if why in self.paused_for:
            self.paused_for.discard(why)
            if not self.paused_for and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closed:
            return
        self.last_data = time.monotonic()
        try:
            payloads = self.decoder.feed(data)
            for payload in payloads:
                if self.closed:
                    return
                if not self.greeted:
                    version = decode_hello(payload)
                    if not OLDEST_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
                        raise _ProtocolViolation(
                            f"protocol version {version} is not one this server speaks"
                            f" ({OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION})"
                        )
                    self.greeted = True
                    continue
                kind, request_id, fields = decode_message(payload)
                self.dispatch(kind, request_id, fields)
        except (WireError, _ProtocolViolation) as exc:
            self.fail(str(exc))

    # -- sending ----------------------------------------------------------------------------

    def send(self, kind: Kind, request_id: int, fields: list[Value]) -> None:
        try:
            frame = encode_message(kind, request_id, fields)
        except WireError as exc:  # a reply larger than a frame may be
            kind, frame = Kind.ERROR, encode_message(Kind.ERROR, request_id, error_fields(exc))
        self.write_frames([frame], kind, request_id)

    def write_frames(self, frames: list[bytes], kind: Kind = Kind.INVALIDATE, request_id: int = 0) -> None:
        """Write encoded frames (an INVALIDATE's, unless said), and drop a client that
        leaves too much of what we write unread."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return
        for frame in frames:
            if self.server.message_delay is None:
                transport.write(frame)
            else:
                self._hold(transport, kind, request_id, frame)
        if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.fail(f"it left more than {WRITE_BUFFER_LIMIT} bytes of replies unread")

    def _hold(self, transport: asyncio.Transport, kind: Kind, request_id: int, frame: bytes) -> None:
        """Test hook (:attr:`StorageServer.message_delay`): write ``frame`` after the delay the
        hook asks for, and never before a frame written earlier to this client (wire order
        is kept, as TCP keeps it); frames due together go out in one write."""
        hook = self.server.message_delay
        assert hook is not None
        delay = hook(self, kind, request_id, frame) or 0.0
        if not delay and not self.held:
            transport.write(frame)
            return
        loop = asyncio.get_running_loop()
        due = max(loop.time() + delay, self.held[-1][0] if self.held else 0.0)
        self.held.append((due, frame))
        loop.call_at(due, self._release, transport)

    def _release(self, transport: asyncio.Transport) -> None:
        now = asyncio.get_running_loop().time()
        due = []
        while self.held and self.held[0][0] <= now:
            due.append(self.held.popleft()[1])
        if due and not self.closed and not transport.is_closing():
            transport.write(b"".join(due))

    def reply(self, request_id: int, fields: list[Value]) -> None:
        self.send(Kind.REPLY, request_id, fields)

    def error(self, request_id: int, exc: BaseException) -> None:
        self.send(Kind.ERROR, request_id, error_fields(exc))

    def fail(self, reason: str) -> None:
        """Drop this client for breaking the protocol (or a limit), logging why."""
        if self.closed:
            return
        self.closed = True
        log.warning("client %s (%s) dropped: %s", self.peer, self.identity or "-", reason)
        if self.transport is not None:
            self.transport.abort()

    # -- requests ---------------------------------------------------------------------------

    def dispatch(self, kind: int, request_id: int, fields: list[Value]) -> None:
        try:
            kind = Kind(kind)
        except ValueError:
            raise _ProtocolViolation(f"unknown message kind {kind}") from None
        if self.identity is None:
            if kind != Kind.AUTH:
                raise _ProtocolViolation(f"{kind.name} before AUTH")
            self.authenticate(request_id, fields)
            return
        if kind in (Kind.BEGIN, Kind.STORE, Kind.VOTE, Kind.FINISH, Kind.ABORT):
            if kind in (Kind.VOTE, Kind.FINISH) and request_id == 0:
                raise _ProtocolViolation(f"{kind.name} needs a request id")
            self.queue.put_nowait((kind, request_id, fields))
            if self.queue.qsize() > QUEUE_HIGH:
                self._pause("queue")  # a flood of stores while its vote runs
            return
        if request_id == 0:
            raise _ProtocolViolation(f"{kind.name} needs a request id")
        handler = self._handlers.get(kind)
        if handler is None:
            raise _ProtocolViolation(f"{kind.name} is not a request")
        try:
            handler(self, request_id, fields)
        except _ProtocolViolation:
            raise
        except DatabaseError as exc:
            self.error(request_id, exc)

    def authenticate(self, request_id: int, fields: list[Value]) -> None:
        token, last, name = _fields(fields, 3, Kind.AUTH)
        if request_id == 0:
            raise _ProtocolViolation("AUTH needs a request id")
        server = self.server
        client_name = _text(name, "client name", 200) if name is not None else ""
        if server.tokens is not None:
            found = server.tokens.check(token) if isinstance(token, str) else None
            if found is None:
                why = "no token was given" if token is None else "the token is not valid"
                log.warning("client %s (%s) refused: %s", self.peer, client_name or "-", why)
                self.error(request_id, AuthenticationError(f"{server.name} refused the client: {why}"))
                self.closed = True
                assert self.transport is not None
                self.transport.close()
                return
            token_name, access = found
        else:
            token_name, access = "", "rw"
        if server.read_only:
            access = "ro"
        last_tid = _optional_tid(last, "last tid")
        changed, stale = server.changes_since(last_tid)
        self.identity = client_name or token_name or "client"
        self.access = access
        server.subscribers.add(self)
        log.info("client %s (%s) connected, %s", self.peer, self.identity, access)
        packed = server.storage.packed_tid
        self.reply(request_id, [access, server.broadcast_tid, changed, packed, stale])

    def _load(self, request_id: int, fields: list[Value]) -> None:
        oid, before = _fields(fields, 2, Kind.LOAD)
        record, tid = self.server.load(_oid(oid), _optional_tid(before, "before"))
        self.reply(request_id, [record, tid])

    def _load_many(self, request_id: int, fields: list[Value]) -> None:
        (oids,) = _fields(fields, 1, Kind.LOAD_MANY)
        if not isinstance(oids, list) or len(oids) > MAX_BATCH:
            raise _ProtocolViolation(f"LOAD_MANY takes a list of at most {MAX_BATCH} oids")
        found: list[Value] = []
        for value in oids:
            oid = _oid(value)
            try:
                record, tid = self.server.load(oid, None)
            except POSKeyError:
                found.append([oid, None, None])
            else:
                found.append([oid, record, tid])
        self.reply(request_id, [found])

    def _new_oids(self, request_id: int, fields: list[Value]) -> None:
        (count,) = _fields(fields, 1, Kind.NEW_OIDS)
        number = _int(count, "NEW_OIDS count", 1, 1000)
        self._check_writable("new oids")
        storage = self.server.storage
        self.reply(request_id, [[storage.new_oid() for _ in range(number)]])

    def _size(self, request_id: int, fields: list[Value]) -> None:
        _fields(fields, 0, Kind.SIZE)
        storage = self.server.storage
        self.reply(request_id, [len(storage), storage.get_size()])

    def _ping(self, request_id: int, fields: list[Value]) -> None:
        self.reply(request_id, [self.server.broadcast_tid])

    def _mark_packed(self, request_id: int, fields: list[Value]) -> None:
        (tid,) = _fields(fields, 1, Kind.MARK_PACKED)
        self._check_writable("record a pack time")
        storage = self.server.storage
        mark = getattr(storage, "_mark_packed", None)
        if mark is None or storage.last_tid() != p64(0):
            raise StorageError(f"{self.server.name} cannot take a pack time now (it is not empty)")
        mark(_oid(tid, "pack time"))
        self.reply(request_id, [])

    def _iterate(self, request_id: int, fields: list[Value]) -> None:
        start, stop, skip = _fields(fields, 3, Kind.ITERATE)
        first = _optional_tid(start, "start")
        last = _optional_tid(stop, "stop")
        records_to_skip = _int(skip, "records to skip", 0, 1 << 40)
        self.job(request_id, lambda: self.server.iterate(first, last, records_to_skip))

    def _undo_log(self, request_id: int, fields: list[Value]) -> None:
        first, last = _fields(fields, 2, Kind.UNDO_LOG)
        begin = _int(first, "first", 0, 1 << 40)
        end = _int(last, "last", -MAX_BATCH, 1 << 40)
        if end > 0 and end - begin > MAX_BATCH:
            end = begin + MAX_BATCH

        def undo_log() -> list[Value]:
            entries = self.server.storage.undo_log(begin, end)
            return [[[info.tid, *_meta_fields(info.meta)] for info in entries]]

        self.job(request_id, undo_log)

    def _history(self, request_id: int, fields: list[Value]) -> None:
        oid, size = _fields(fields, 2, Kind.HISTORY)
        wanted = _oid(oid)
        count = _int(size, "size", 1, MAX_BATCH)

        def history() -> list[Value]:
            revisions = self.server.storage.history(wanted, count)
            return [[[rev.tid, *_meta_fields(rev.meta), rev.size] for rev in revisions]]

        self.job(request_id, history)

    def _pack(self, request_id: int, fields: list[Value]) -> None:
        (when,) = _fields(fields, 1, Kind.PACK)
        if isinstance(when, float):
            pack_time: Tid | float = when
        else:
            pack_time = _oid(when, "pack tid")
        self._check_writable("pack")
        server = self.server
        loop = server.loop
        shown = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - shown[0] >= 0.1 or done >= total:
                shown[0] = now
                fields: list[Value] = [request_id, done, total]
                loop.call_soon_threadsafe(self.send, Kind.PROGRESS, 0, fields)

        def pack() -> list[Value]:
            server.storage.pack(pack_time, progress=progress)
            return []

        self.job(request_id, pack, then=server.publish)

    def _current_records(self, request_id: int, fields: list[Value]) -> None:
        after, limit = _fields(fields, 2, Kind.CURRENT_RECORDS)
        # Arguments a client library checks itself: refused with a reply, not a disconnect.
        if after is not None and (type(after) is not bytes or len(after) != 8):
            raise StorageError(f"CURRENT_RECORDS: after must be an oid (8 bytes) or None, not {after!r:.60}")
        if type(limit) is not int or limit < 1:
            raise StorageError(f"CURRENT_RECORDS: limit must be an integer of at least 1, not {limit!r:.60}")
        server = self.server
        if getattr(server.storage, "current_records", None) is None:
            raise StorageError(
                f"{server.name} cannot list its current records: its storage"
                f" ({type(server.storage).__name__}) has no current_records"
            )
        newest = server.broadcast_tid  # read on the loop: the job thread must not
        wanted = min(limit, MAX_BATCH)
        self.job(request_id, lambda: [server.current_records(after, wanted, newest)])

    _handlers: dict[Kind, Callable[[_ClientConnection, int, list[Value]], None]] = {
        Kind.LOAD: _load,
        Kind.LOAD_MANY: _load_many,
        Kind.NEW_OIDS: _new_oids,
        Kind.SIZE: _size,
        Kind.PING: _ping,
        Kind.MARK_PACKED: _mark_packed,
        Kind.ITERATE: _iterate,
        Kind.UNDO_LOG: _undo_log,
        Kind.HISTORY: _history,
        Kind.PACK: _pack,
        Kind.CURRENT_RECORDS: _current_records,
    }

    def _check_writable(self, what: str) -> None:
        if self.access != "rw":
            raise ReadOnlyError(f"cannot {what}: {self._why_read_only()}")

    def _why_read_only(self) -> str:
        if self.server.read_only:
            return f"{self.server.name} is served read-only"
        return "this client's token grants read-only access"

    def job(
        self, request_id: int, work: Callable[[], list[Value]], then: Callable[[], None] | None = None
    ) -> None:
        """Run ``work`` in a job thread and reply with what it returns (or its error)."""
        if self.jobs >= self.server.max_jobs:
            raise _ProtocolViolation(f"more than {self.server.max_jobs} slow requests in flight")
        self.jobs += 1
        future = self.server.loop.run_in_executor(self.server.jobs, work)

        def done(finished: asyncio.Future[list[Value]]) -> None:
            self.jobs -= 1
            if then is not None:
                then()
            exc = finished.exception()
            if exc is None:
                self.reply(request_id, finished.result())
            elif isinstance(exc, DatabaseError):
                self.error(request_id, exc)
            else:
                log.error("client %s: %s failed: %r", self.peer, work, exc)
                self.error(request_id, exc)

        future.add_done_callback(done)

    # -- transactions -----------------------------------------------------------------------

    async def _transactions(self) -> None:
        """Take BEGIN, STORE, VOTE, FINISH and ABORT one at a time, in arrival order."""
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    break
                if self.queue.qsize() < QUEUE_LOW:
                    self._resume("queue")
                kind, request_id, fields = item
                try:
                    await self._transaction_step(kind, request_id, fields)
                except _ProtocolViolation as exc:
                    self.fail(str(exc))
                    break
        finally:
            await self._abort_open()
            if self.committer is not None:
                self.committer.shutdown(wait=False)

    async def _in_committer(self, work: Callable[[], _T]) -> _T:
        if self.committer is None:
            self.committer = ThreadPoolExecutor(1, thread_name_prefix=f"amberdb-commit-{self.peer}")
        return await self.server.loop.run_in_executor(self.committer, work)

    async def _abort_open(self) -> None:
        txn, self.txn = self.txn, None
        if txn is None:
            return
        if txn.voted:
            try:
                await self._in_committer(self.server.storage.abort)
            except Exception as exc:  # the storage's own failure: logged, the loop goes on
                log.error("client %s: aborting its voted transaction failed: %r", self.peer, exc)
        txn.close()

    async def _transaction_step(self, kind: Kind, request_id: int, fields: list[Value]) -> None:
        server = self.server
        if kind == Kind.BEGIN:
            user, description, extension, tid, packed = _fields(fields, 5, kind)
            if self.txn is not None:
                raise _ProtocolViolation("BEGIN while a transaction is open")
            meta = TransactionMeta(
                _text(user, "user"), _text(description, "description"), _bytes(extension, "extension")
            )
            self.txn = _Transaction(meta, _optional_tid(tid, "tid"), _optional_tid(packed, "packed tid"))
            if self.access != "rw":
                self.txn.error = ReadOnlyError(f"cannot commit: {self._why_read_only()}")
            return
        if kind == Kind.STORE:
            oid, base, record = _fields(fields, 3, kind)
            txn = self.txn
            if txn is None or txn.voted:
                raise _ProtocolViolation("STORE outside an open transaction")
            if txn.error is None:
                txn.add(_oid(oid), _oid(base, "base tid"), _bytes(record, "record"))
            return
        if kind == Kind.ABORT:
            await self._abort_open()
            return
        txn = self.txn
        if kind == Kind.VOTE:
            _fields(fields, 0, kind)
            if txn is None or txn.voted:
                self.error(request_id, StorageTransactionError("VOTE without an open transaction"))
                return
            if txn.error is not None:
                self.error(request_id, txn.error)
                return
            try:
                await self._in_committer(lambda: server.vote(txn))
            except DatabaseError as exc:
                self.error(request_id, exc)
                return
            txn.voted = True
            txn.voted_at = time.monotonic()
            self.reply(request_id, [])
            return
        # FINISH
        _fields(fields, 0, kind)
        if txn is None or not txn.voted:
            self.error(request_id, StorageTransactionError("FINISH without a voted transaction"))
            return
        try:
            tid = await self._in_committer(server.storage.finish)
        except DatabaseError as exc:
            self.txn = None
            txn.close()
            self.error(request_id, exc)
            return
        self.txn = None
        txn.close()
        server.publish()
        self.reply(request_id, [tid])


class StorageServer:
    """Serves ``storage_or_uri`` to ``ClientStorage`` clients over TCP (and Unix sockets).

    ``address`` is ``(host, port)`` (port 0 picks a free one; :attr:`address` tells which)
    or ``"unix:/path"``; ``unix`` adds a Unix-socket listener beside a TCP one.  ``ssl`` is a
    server-side ``ssl.SSLContext``.  ``tokens`` -- a tokens file (``amberdb token add``) or a
    mapping ``{token: "rw" | "ro"}`` -- makes every client authenticate; without tokens
    only loopback and Unix-socket listeners are allowed unless ``insecure=True``.
    ``read_only`` refuses every write.  A storage given as an object stays open when the
    server closes; one opened from a URI or path is closed with it.
    """

    def __init__(
        self,
        storage_or_uri: Storage | str | os.PathLike[str],
        address: tuple[str, int] | str = ("127.0.0.1", 0),
        *,
        ssl: ssl_module.SSLContext | None = None,
        tokens: str | os.PathLike[str] | Mapping[str, str] | Tokens | None = None,
        read_only: bool = False,
        unix: str | None = None,
        insecure: bool = False,
        frame_limit: int = DEFAULT_FRAME_LIMIT,
        client_timeout: float = 60.0,
        max_jobs: int = 16,
    ) -> None:
        if isinstance(address, str):
            if not address.startswith("unix:"):
                raise ValueError(f"an address is (host, port) or 'unix:/path', got {address!r}")
            tcp: tuple[str, int] | None = None
            unix_paths = [address[len("unix:") :]]
        else:
            host, port = address
            if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ValueError(f"an address is (host, port) with a port from 0 to 65535, got {address!r}")
            tcp = (host, port)
            unix_paths = []
        if unix is not None:
            unix_paths.append(unix)
        if tokens is not None and not isinstance(tokens, Tokens):
            tokens = Tokens(tokens)
        if tcp is not None and tokens is None and not insecure and not _is_loopback(tcp[0]):
            raise ValueError(
                f"refusing to serve {tcp[0]}:{tcp[1]} without tokens: anyone who reaches it could read"
                " and change the database; give tokens (amberdb token add), listen on a loopback"
                " address or a Unix socket, or pass insecure=True (--insecure)"
            )
        if isinstance(storage_or_uri, Storage):
            self.storage: Storage = storage_or_uri
            self._owns_storage = False
        else:
            from amberdb.storage.uri import open_storage

            self.storage = open_storage(storage_or_uri, read_only=read_only)
            self._owns_storage = True
        self.read_only = read_only or self.storage.read_only
        self.name = f"amberdb server of {self.storage.name}"
        self.tokens: Tokens | None = tokens
        self.frame_limit = frame_limit
        self.client_timeout = client_timeout
        self.max_jobs = max_jobs
        self._ssl = ssl
        self._tcp = tcp
        self._unix_paths = unix_paths
        self.clients: set[_ClientConnection] = set()
        self.subscribers: set[_ClientConnection] = set()
        self.workers: set[asyncio.Task[None]] = set()
        self.broadcast_tid: Tid = self.storage.last_tid()
        self._packed_told: Tid | None = self.storage.packed_tid
        self.jobs = ThreadPoolExecutor(4, thread_name_prefix="amberdb-server-job")
        self._address: tuple[str, int] | str | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.message_delay: Callable[[_ClientConnection, Kind, int, bytes], float | None] | None = None
        """Test hook, None (the default) in production, where it costs one attribute check
        per frame sent.  When set, it is called on the loop with (client, kind, request id,
        frame) before each frame goes to a client, and returns the seconds to hold that
        frame (0 or None: none).  Held frames keep their order: later frames to the same
        client wait behind them, as on a slow link.  Tests use it to make the invalidation
        races of ZODB#290, ZEO#155 and ZEO#166 happen on purpose."""

    # -- life -----------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int] | str:
        """Where the server listens: the bound ``(host, port)``, or ``"unix:/path"``."""
        if self._address is None:
            raise StorageError("the server is not listening yet: call start() or serve_forever()")
        return self._address

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (only while it runs)."""
        assert self._loop is not None
        return self._loop

    def start(self) -> StorageServer:
        """Serve from a background thread; return once listening (or raise why it cannot)."""
        if self._thread is not None:
            raise StorageError("the server is already started")
        self._thread = threading.Thread(target=self.serve_forever, name="amberdb-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error
        return self

    def serve_forever(
        self, *, handle_signals: bool = False, on_ready: Callable[[], None] | None = None
    ) -> None:
        """Serve in this thread until :meth:`close` (or, with ``handle_signals``, SIGTERM/SIGINT).

        ``on_ready()`` is called once the server listens (:attr:`address` is then known).
        A server that cannot start raises why.
        """
        try:
            asyncio.run(self._serve(handle_signals, on_ready))
        finally:
            self._ready.set()
            self._done.set()

    def close(self) -> None:
        """Stop: refuse new clients, let voted commits finish (or abort them), tell clients,
        close their connections and (if the server opened it) the storage.  Idempotent."""
        loop = self._loop
        if loop is None or self._done.is_set():
            self._closing = True
            if self._owns_storage and not self._ready.is_set():
                self.storage.close()
            self.jobs.shutdown(wait=False)
            return
        self._closing = True
        stop = self._stop
        if stop is not None:
            loop.call_soon_threadsafe(stop.set)
        if threading.current_thread() is not self._thread and not _in_loop(loop):
            self._done.wait()

    def reload_tokens(self) -> None:
        """Read the tokens file again (``amberdb serve`` does on SIGHUP): tokens added with
        ``amberdb token add`` are accepted from then on, removed ones refused at the next
        connect (clients already connected stay)."""
        if self.tokens is None:
            return
        try:
            self.tokens.reload()
        except (OSError, ValueError, DatabaseError) as exc:
            log.error("tokens not reloaded, the old ones stay in force: %s", exc)
            return
        log.info("tokens reloaded: %d", len(self.tokens))

    def __enter__(self) -> StorageServer:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self._address if self._address is not None else "not listening"
        return f"<StorageServer {self.storage.name} at {where}>"

    async def _serve(self, handle_signals: bool, on_ready: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        servers: list[asyncio.base_events.Server] = []
        try:
            if self._closing:
                raise StorageError("the server was closed before it started")
            if self._tcp is not None:
                server = await loop.create_server(
                    lambda: _ClientConnection(self), self._tcp[0], self._tcp[1], ssl=self._ssl
                )
                servers.append(server)
                bound = server.sockets[0].getsockname()
                self._address = (bound[0], bound[1])
            for path in self._unix_paths:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)  # a socket a killed server left behind (never another file)
                servers.append(
                    await loop.create_unix_server(lambda: _ClientConnection(self), path, ssl=self._ssl)
                )
                if self._address is None:
                    self._address = f"unix:{path}"
        except BaseException as exc:
            self._startup_error = exc
            for server in servers:
                server.close()
            self._ready.set()
            if self._owns_storage:
                self.storage.close()
            self.jobs.shutdown(wait=False)
            if threading.current_thread() is not self._thread:
                raise
            return
        if handle_signals:
            import signal

            for number in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(number, self._stop.set)
            if self.tokens is not None:
                loop.add_signal_handler(signal.SIGHUP, self.reload_tokens)
        watchdog = loop.create_task(self._watch())
        follower = loop.create_task(self._follow()) if self.storage.read_only else None
        self._ready.set()
        if on_ready is not None:
            on_ready()
        try:
            await self._stop.wait()
        finally:
            for server in servers:
                server.close()
            watchdog.cancel()
            if follower is not None:
                follower.cancel()
            await self._shut_down()
            for path in self._unix_paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self.jobs.shutdown(wait=True)
            if self._owns_storage:
                self.storage.close()

    async def _shut_down(self) -> None:
        for client in list(self.subscribers):
            client.send(Kind.CLOSING, 0, [f"{self.name} is shutting down"])
        deadline = time.monotonic() + CLOSE_GRACE
        while time.monotonic() < deadline and any(
            client.txn is not None and client.txn.voted for client in self.clients
        ):
            await asyncio.sleep(0.01)
        clients = list(self.clients)
        for client in clients:
            client.closed = True
            if client.transport is not None:
                client.transport.close()
        if self.workers:
            await asyncio.wait(list(self.workers), timeout=CLOSE_GRACE)

    async def _watch(self) -> None:
        """Drop clients that stall: silent mid-frame, unauthenticated, or voted and gone."""
        while True:
            await asyncio.sleep(min(1.0, self.client_timeout / 4))
            now = time.monotonic()
            limit = self.client_timeout
            for client in list(self.clients):
                if client.closed:
                    continue
                if client.identity is None and now - client.connected_at > limit:
                    client.fail(f"it did not authenticate within {limit:g} s")
                elif client.decoder.buffered and now - client.last_data > limit:
                    client.fail(f"it sent part of a frame and nothing more for {limit:g} s")
                elif client.txn is not None and client.txn.voted and now - client.txn.voted_at > limit:
                    client.fail(f"it voted and did not finish or abort within {limit:g} s")

    async def _follow(self) -> None:
        """Serving a read-only storage that another process writes: broadcast its commits."""
        while True:
            await asyncio.sleep(0.05)
            self.publish()

    # -- storage access (loop thread) -----------------------------------------------------------

    def load(self, oid: Oid, before: Tid | None) -> tuple[bytes, Tid]:
        """A record as clients may see it: nothing newer than the last broadcast tid."""
        if before is not None:
            return self.storage.load(oid, before)
        record, tid = self.storage.load(oid)
        if tid > self.broadcast_tid:
            # Committed but not yet announced: a client caching it as current before the
            # invalidation that would end it arrives is ZEO#155.
            record, tid = self.storage.load(oid, p64(u64(self.broadcast_tid) + 1))
        return record, tid

    def current_records(self, after: Oid | None, limit: int, newest: Tid) -> list[Value]:
        """One CURRENT_RECORDS reply (in a job thread): up to ``limit`` current records above
        ``after`` as clients may see them -- as of ``newest``, the last broadcast tid when
        the request came, as :meth:`load` answers -- and about :data:`ITERATE_BUDGET` bytes
        of them at most.  The storage is asked in small pages, so a reply cut short by the
        budget has not read far past it."""
        lister = self.storage.current_records  # type: ignore[attr-defined]
        found: list[Value] = []
        size = 0
        while len(found) < limit and size < ITERATE_BUDGET:
            asked = min(limit - len(found), _CURRENT_PAGE)
            page: list[tuple[Oid, Tid, bytes]] = lister(after, asked)
            for oid, tid, record in page:
                after = oid
                if tid > newest:
                    # Committed but not yet announced (see load): the revision clients see,
                    # or nothing for an object they cannot know yet.
                    try:
                        record, tid = self.storage.load(oid, p64(u64(newest) + 1))
                    except POSKeyError:
                        continue
                found.append([oid, tid, record])
                size += len(record) + 32
                if size >= ITERATE_BUDGET:
                    break
            if len(page) < asked:
                break
        return found

    def changes_since(self, last: Tid | None) -> tuple[list[Value] | None, bool]:
        """What a (re)connecting client whose cache is at ``last`` must drop: the oids changed
        since (None: everything), and whether its cache is newer than this database."""
        newest = self.broadcast_tid
        if last is None:
            return None, False
        if last > newest:
            return None, True
        if last == newest:
            return [], False
        known = next(iter(self.storage.iterator(last, last)), None)
        if known is None or known.tid != last:
            return None, True  # a tid this history never had: another or a restored database
        _, oids = self.storage.poll_invalidations(last)
        if oids is None or len(oids) > self.frame_limit // 16:
            return None, False
        return list(oids), False

    def publish(self) -> None:
        """Tell every client what the storage finished since the last broadcast."""
        storage = self.storage
        newest, oids = storage.poll_invalidations(self.broadcast_tid)
        packed = storage.packed_tid
        if newest == self.broadcast_tid and oids is not None and not oids and packed == self._packed_told:
            return
        since = self.broadcast_tid
        chunks: list[list[Value] | None] = [None]
        if oids is not None:
            listed: list[Value] = list(oids)
            chunks = [
                listed[start : start + INVALIDATE_CHUNK] for start in range(0, len(listed), INVALIDATE_CHUNK)
            ]
            chunks = chunks or [[]]
        last = len(chunks) - 1
        frames = [
            encode_message(Kind.INVALIDATE, 0, [newest, chunk, packed, index < last, since])
            for index, chunk in enumerate(chunks)
        ]
        self.broadcast_tid = newest
        self._packed_told = packed
        for client in list(self.subscribers):
            client.write_frames(frames)

    def vote(self, txn: _Transaction) -> None:
        """Begin, store and vote ``txn`` in one go (in the client's commit thread).

        Conflicts from every store are collected into one VoteConflictError; any failure
        aborts the storage transaction at once (the stores stay buffered for a revote).
        """
        storage = self.storage
        storage.begin(txn.meta, txn.tid)
        try:
            # After a pack the client had not seen, its references are checked (below, in
            # the same pass over the stores: a spilled transaction is read once).
            check = txn.packed_seen != storage.packed_tid
            stored: set[Oid] = set()
            referenced: list[Oid] = []
            conflicts: dict[Oid, tuple[Tid, Tid]] = {}
            for oid, base, record in txn.entries():
                if check:
                    stored.add(oid)
                    referenced.extend(references(record))
                try:
                    storage.store(oid, base, record)
                except VoteConflictError as exc:
                    conflicts.update(exc.conflicts)
                except ConflictError as exc:
                    if exc.oid is None or exc.serials is None:
                        raise
                    conflicts[exc.oid] = exc.serials
            if check:
                self._check_references(stored, referenced)
            if conflicts:
                raise VoteConflictError(conflicts)
            storage.vote()
        except BaseException:
            storage.abort()
            raise

    def _check_references(self, stored: set[Oid], referenced: list[Oid]) -> None:
        """Refuse a commit that refers to an object a pack removed since the client looked.

        Its connection checked against the pack it knew of; a retry sees this one too and
        stores the object again (or says why it cannot).
        """
        for ref in referenced:
            if ref in stored:
                continue
            try:
                self.storage.load(ref)
            except POSKeyError:
                raise ConflictError(
                    f"this transaction refers to oid {oid_repr(ref)}, which a pack removed as"
                    " unreachable after the client last looked; retry the transaction",
                    oid=ref,
                ) from None
            stored.add(ref)

    def iterate(self, start: Tid | None, stop: Tid | None, skip: int) -> list[Value]:
        """One ITERATE reply: transactions from ``start`` (skipping ``skip`` records of the
        first), about :data:`ITERATE_BUDGET` record bytes of them."""
        batch: list[Value] = []
        size = 0
        for txn in self.storage.iterator(start, stop):
            records = txn.records[skip:]
            skip = 0
            taken: list[Value] = []
            for rec in records:
                if size >= ITERATE_BUDGET and (taken or batch):
                    break
                taken.append([rec.oid, rec.tid, rec.record])
                size += len(rec.record) + 32
            complete = len(taken) == len(records)
            batch.append([txn.tid, *_meta_fields(txn.meta), taken, complete])
            if not complete or size >= ITERATE_BUDGET:
                return [batch, True]
        return [batch, False]


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
