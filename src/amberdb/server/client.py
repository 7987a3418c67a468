"""``ClientStorage``: a storage whose data lives in an ``amberdb serve`` server.

Threads
=======

Each ClientStorage runs an asyncio loop on a network thread of its own.  Application threads
write requests to it and wait for their replies; the network thread reads every message the
server sends and applies it, one at a time, in wire order:

* an INVALIDATE moves the client's last tid and ends the cached revisions of the oids it
  names in one step under one lock, and is logged for ``poll_invalidations`` -- so a
  connection can never see a new last tid before its invalidations (ZEO#166) nor an
  invalidation before the tid it belongs to (ZODB#290);
* a load's reply is put in the cache *there*, before any later message is read, so it can
  never land after a newer invalidation that should have ended it (ZEO#155).  The server
  answers loads as of the newest tid it has announced, so a reply and the invalidations
  before it always agree.

Commits take two round trips whatever their size: BEGIN and the stores go out without
waiting; VOTE and FINISH wait.  Threads of one process that share a ClientStorage commit one
at a time (``begin`` waits for the previous ``finish``); processes commit in parallel, and
the server's FileStorage shares one fsync among those that vote together.

Cache
=====

Every record loaded is kept in a :class:`~amberdb.storage.record_cache.RecordCache`
(bounded by bytes; in a file with ``cache_path``).  On every (re)connect the client tells the
server its last tid and drops what the server says changed since -- or everything, when the
server no longer knows, or when the cache is newer than the server's database (a server
restored from a backup), which is also warned about.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import socket
import ssl as ssl_module
import threading
import warnings
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from amberdb.exceptions import (
    AuthenticationError,
    ClientDisconnected,
    ReadOnlyError,
    StorageError,
    StorageTransactionError,
    VoteConflictError,
)
from amberdb.server.protocol import (
    OLDEST_PROTOCOL_VERSION,
    FrameDecoder,
    FrameReader,
    Kind,
    Value,
    WireError,
    decode_hello,
    decode_message,
    encode_hello,
    encode_message,
    error_from_fields,
)
from amberdb.storage.base import (
    DataRecord,
    PackProgress,
    Revision,
    Storage,
    TransactionInfo,
    TransactionMeta,
    TransactionRecord,
    UndoResolver,
)
from amberdb.storage.history import copy_transactions, pack_time, undo_transaction
from amberdb.storage.record_cache import CacheFileWarning, RecordCache
from amberdb.utils import Oid, Tid, oid_repr, p64, u64, z64

__all__ = ["ClientStorage", "open_client_uri"]

log = logging.getLogger("amberdb.client")

LOG_LENGTH = 10_000
"""Invalidations kept for ``poll_invalidations``: a connection idle for longer than this many
transactions forgets its whole cache instead of the objects that changed."""
OID_BATCH = 100
"""New oids asked of the server at a time."""
FLUSH_AT = 256 << 10
"""Bytes of stores gathered before they are handed to the network thread."""
PREFETCH_BATCH = 1000
_CURRENT_RECORDS_VERSION = 2
"""The protocol version that has CURRENT_RECORDS."""
_MAX_CURRENT = 10_000
"""The most records a server sends for one CURRENT_RECORDS (it refuses nothing above: it caps)."""
COMMIT_WAIT_FACTOR = 4
"""A vote or finish waits this many timeouts for its answer (a load waits one)."""
RESYNC_WAIT = 1.0
"""Seconds a transaction start (with ``server_sync``) waits for a lost server to come back
before it reads the snapshot the client has."""
CLIENT_FRAME_LIMIT = 1 << 30
"""Frames from the server may be this large: a record as big as the server's storage holds
must still come through (the server trusts clients far less: its limit is 64 MiB)."""


class _Waiter:
    """One request's reply, waited for by application threads, set by the network thread."""

    __slots__ = ("done", "error", "events", "followers", "loading", "lock", "on_reply", "protocol", "result")

    def __init__(self, protocol: _ClientProtocol | None) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.protocol = protocol
        self.result: list[Value] | None = None
        self.error: BaseException | None = None
        self.done = False
        self.followers: list[threading.Lock] = []
        self.on_reply: Any = None
        self.events: queue.SimpleQueue[tuple[int, int]] | None = None
        self.loading: tuple[Oid, ...] = ()  # the oids loads wait on this reply for

    def settle(self, result: list[Value] | None, error: BaseException | None) -> None:
        """Called with the client's pending lock held."""
        self.result = result
        self.error = error
        self.done = True
        self.lock.release()
        for follower in self.followers:
            follower.release()


class _ClientProtocol(FrameReader):
    """The network thread's end of one connection to the server."""

    def __init__(self, client: ClientStorage) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        super().__init__()
        self.decoder = FrameDecoder(CLIENT_FRAME_LIMIT)
        self.greeted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost = False
        self.sock: socket.socket | None = None  # set for plain sockets, which _send writes directly
        self.backlog = False  # data waits in the transport's buffer: later sends queue behind it
        self.queued = 0  # chunks handed to the network thread and not yet written
        self.invalidating: list[Oid] = []
        self.version = 0  # the protocol version the server's hello offered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Ours goes first: a TLS server then fails at once on it instead of both sides
        # waiting for the other to speak.
        transport.write(encode_hello(OLDEST_PROTOCOL_VERSION))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def write_queued(self, data: bytes) -> None:
        """Write what a thread could not send directly; direct sends resume only when every
        such chunk is written and the transport's buffer is empty (else bytes would pass
        each other)."""
        self.write(data)
        with self.client._send_lock:
            self.queued -= 1
            self._maybe_direct()

    def resume_writing(self) -> None:
        # The transport's buffer is empty (low-water mark 0).
        with self.client._send_lock:
            self._maybe_direct()

    def _maybe_direct(self) -> None:
        transport = self.transport
        if self.queued == 0 and (transport is None or transport.get_write_buffer_size() == 0):
            self.backlog = False

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            for payload in self.decoder.feed(data):
                if not self.greeted.done():
                    version = decode_hello(payload)
                    if version < OLDEST_PROTOCOL_VERSION:
                        raise WireError(f"the server offers protocol version {version}, which is no version")
                    # A newer server speaks ours too; newer kinds are sent only where it has them.
                    self.version = version
                    self.greeted.set_result(None)
                    continue
                kind, request_id, fields = decode_message(payload)
                self.client._on_message(self, kind, request_id, fields)
        except WireError as exc:
            log.error("%s: the server sent something that is not the protocol: %s", self.client.name, exc)
            if not self.greeted.done():
                self.greeted.set_exception(exc)
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.greeted.done():
            self.greeted.set_exception(
                ConnectionError(
                    "the server closed the connection before greeting"
                    f"{f' ({exc})' if exc else ''}: is it serving TLS (amberdbs://, ssl=)?"
                )
            )
        self.client._on_lost(self, exc)


def _parse_address(
    address: str | tuple[str, int], port: int | None
) -> tuple[tuple[str, int] | None, str | None]:
    if isinstance(address, tuple):
        if port is not None:
            raise TypeError("give (host, port) or host and port, not both")
        host, number = address
        return (str(host), int(number)), None
    if not isinstance(address, str):
        raise TypeError(f"a server address is a host, (host, port) or 'unix:/path', not {address!r}")
    if address.startswith("unix:"):
        return None, address[len("unix:") :]
    if port is None:
        if address.startswith("/"):
            return None, address
        raise TypeError(f"ClientStorage({address!r}) needs a port: ClientStorage(host, port)")
    return (address, int(port)), None


class ClientStorage:
    """A storage served by ``amberdb serve`` (or :class:`~amberdb.server.StorageServer`).

    ``ClientStorage(host, port)``, ``ClientStorage((host, port))`` or
    ``ClientStorage("unix:/path/to/socket")``.  Options: ``cache_path`` (a persistent cache
    file; None keeps the cache in memory), ``cache_size`` (bytes), ``ssl`` (a client
    ``ssl.SSLContext``), ``token`` (from ``amberdb token add``), ``read_only``, ``timeout``
    (seconds to wait for the server -- to connect, and for each reply -- before
    ClientDisconnected), ``name``, ``server_sync`` (True by default: every explicit
    transaction start -- ``begin()``, ``attempts()``, ``db.open()`` -- makes one round trip
    to the server, so it sees every commit finished anywhere before it began, what another
    process just told it it committed, say; False, as ZEO's default, relies only on the
    invalidations the server pushes, which arrive a moment later).
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        port: int | None = None,
        *,
        cache_path: str | None = None,
        cache_size: int = 64 << 20,
        ssl: ssl_module.SSLContext | None = None,
        token: str | None = None,
        read_only: bool = False,
        timeout: float = 30.0,
        name: str | None = None,
        server_hostname: str | None = None,
        server_sync: bool = True,
    ) -> None:
        self._tcp, self._unix = _parse_address(address, port)
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._ssl = ssl
        self._server_hostname = server_hostname
        self._token = token
        self._read_only_option = read_only
        self._timeout = timeout
        self._server_sync = server_sync
        where = f"{self._tcp[0]}:{self._tcp[1]}" if self._tcp is not None else f"unix:{self._unix}"
        self._name = name or f"{'amberdbs' if ssl is not None else 'amberdb'}://{where}"
        self._cache = RecordCache(cache_size, cache_path)
        self._state_lock = threading.Lock()
        self._last_tid: Tid = z64
        self._log: deque[tuple[Tid, frozenset[Oid]]] = deque()
        self._floor: Tid = z64
        self._packed: Tid | None = None
        self._access = "ro"
        self._pending_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._welcomes: dict[int, asyncio.Future[list[Value]]] = {}
        self._loading: dict[Oid, _Waiter] = {}
        self._ids = itertools.count(1)
        self._protocol: _ClientProtocol | None = None
        self._connected = threading.Event()
        self._fatal: BaseException | None = None
        self._last_error: BaseException | None = None
        self._warnings: list[str] = []
        self._kick: asyncio.Event | None = None
        self._closed = False
        self._commit_lock = threading.Lock()
        self._txn_owner: int | None = None
        self._txn: _ClientTransaction | None = None
        self._conflicted: set[Oid] = set()
        self._oids: list[Oid] = []
        self._oid_lock = threading.Lock()
        self._oid_batch: frozenset[Oid] = frozenset()
        self._oid_generation = 0
        self._oids_taken: set[Oid] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"amberdb-client {where}", daemon=True
        )
        self._thread.start()
        self._connector: asyncio.Task[None] | None = None
        asyncio.run_coroutine_threadsafe(self._start_connecting(), self._loop).result()
        try:
            self._wait_connected("connect")
            self._warn_pending()
        except BaseException:
            self.close()
            raise

    # -- connection ---------------------------------------------------------------------------

    async def _start_connecting(self) -> None:
        self._connector = asyncio.get_running_loop().create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                await self._connect_once()
                return
            except AuthenticationError as exc:
                self._fatal = exc
                self._connected.set()  # wake waiters: they raise the fatal error
                return
            except (
                OSError,
                EOFError,
                WireError,
                asyncio.TimeoutError,
                ssl_module.SSLError,
                StorageError,
            ) as exc:
                self._last_error = exc
                log.info("%s: cannot connect (%s); retrying in %.2f s", self._name, exc, delay)
            except Exception as exc:
                # Not a server that is away but a client that cannot work (a bad option, a
                # bug): say so at once instead of letting callers wait their whole timeout.
                fatal = StorageError(f"{self._name}: cannot connect: {type(exc).__name__}: {exc}")
                fatal.__cause__ = exc
                self._fatal = fatal
                log.error("%s", fatal)
                self._connected.set()
                return
            kick = self._kick = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(kick.wait(), delay)  # kick(): try again at once
            delay = min(delay * 2, 2.0)

    async def _connect_once(self) -> None:
        loop = asyncio.get_running_loop()
        limit = min(self._timeout, 10.0)
        sock = await asyncio.wait_for(self._open_socket(), limit)
        hostname = None
        if self._ssl is not None:
            hostname = self._server_hostname or (self._tcp[0] if self._tcp is not None else None)
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _ClientProtocol(self), sock=sock, ssl=self._ssl, server_hostname=hostname
                ),
                limit,
            )
        except BaseException:
            sock.close()
            raise
        if self._ssl is None:
            # Plain sockets are written straight from the requesting thread (see _send).
            protocol.sock = sock
            transport.set_write_buffer_limits(high=1, low=0)
        try:
            await asyncio.wait_for(asyncio.shield(protocol.greeted), limit)
            request_id = next(self._ids)
            welcome: asyncio.Future[list[Value]] = loop.create_future()
            self._welcomes[request_id] = welcome
            # What this client knows: its connections' snapshots (after a reconnect), or what
            # a cache file holds (at the first connect); the server says what changed since.
            if self._last_tid != z64:
                last: Tid | None = self._last_tid
            else:
                last = self._cache.last_tid if len(self._cache) else None
            protocol.write(encode_message(Kind.AUTH, request_id, [self._token, last, self._name]))
            try:
                # Applied by _on_message as it is read, in wire order with what follows it.
                await asyncio.wait_for(asyncio.shield(welcome), limit)
            finally:
                self._welcomes.pop(request_id, None)
        except BaseException:
            transport.abort()
            raise
        with self._pending_lock:
            if protocol.lost:
                raise ConnectionError("the server closed the connection right after welcoming us")
            self._protocol = protocol
        # A restarted server may hand out again what was not used.  No lock: new_oid may
        # hold its lock while it waits for this very connection.
        self._oid_generation += 1
        self._oids = []
        self._oid_batch = frozenset()
        self._connected.set()
        log.info("%s: connected", self._name)

    async def _open_socket(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        if self._unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self._unix)
            except BaseException:
                sock.close()
                raise
            return sock
        assert self._tcp is not None
        host, port = self._tcp
        error: BaseException | None = None
        for family, kind, proto, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            return sock
        raise error if error is not None else OSError(f"{host!r} resolves to no address")

    def _send(self, protocol: _ClientProtocol, data: bytes) -> None:
        """Write ``data`` to the server: straight into a plain socket from this thread when
        nothing waits in the transport's buffer (a wake-up of the network thread for every
        request cost more than the server's whole answer), else through the network thread,
        in order."""
        sock = protocol.sock
        if sock is not None:
            with self._send_lock:
                if not protocol.backlog:
                    try:
                        sent = sock.send(data)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        sent = 0  # the transport's own write meets the error and reports it
                    if sent == len(data):
                        return
                    data = data[sent:]
                    protocol.backlog = True
                protocol.queued += 1
                self._loop.call_soon_threadsafe(protocol.write_queued, data)
            return
        self._loop.call_soon_threadsafe(protocol.write, data)

    def _apply_welcome(self, fields: list[Value]) -> None:
        access, server_tid, changed, packed, stale = fields
        if access not in ("rw", "ro") or not _is_tid(server_tid) or not isinstance(stale, bool):
            raise WireError("a malformed AUTH reply")
        if packed is not None and not _is_tid(packed):
            raise WireError("a malformed AUTH reply")
        assert isinstance(server_tid, bytes)
        with self._state_lock:
            cache = self._cache
            if stale and len(cache):
                message = (
                    f"{self._name}: the client cache{_cache_where(cache)} is newer than the server's"
                    f" database (cache at tid {oid_repr(cache.last_tid)}, server at"
                    f" {oid_repr(server_tid)}: was it restored from a backup?); it was dropped"
                )
                log.warning("%s", message)
                # Warned in the application's thread (the next call): raised here, under a
                # filter that makes warnings errors, it would break the network thread.
                self._warnings.append(message)
            if changed is None or stale:
                cache.clear(last_tid=server_tid)
                self._log.clear()
                self._floor = server_tid
            else:
                if not isinstance(changed, list) or not all(_is_tid(oid) for oid in changed):
                    raise WireError("a malformed AUTH reply")
                oids: list[Oid] = changed  # type: ignore[assignment]
                if server_tid > cache.last_tid:
                    self._invalidate_cache(server_tid, oids)
                if server_tid > self._last_tid:
                    self._append_log(server_tid, frozenset(oids))
                    if self._last_tid == z64:
                        self._floor = server_tid
            self._last_tid = server_tid
            # The cache (and its file) names the pack it was filled after: one the client has
            # not seen may have removed objects it holds, which a connection checking its
            # references after a pack must not find there.
            if (packed or b"") != cache.database_id:
                cache.clear(database_id=packed or b"", last_tid=server_tid)  # type: ignore[arg-type]
            self._packed = packed  # type: ignore[assignment]
            self._access = str(access)

    def _invalidate_cache(self, tid: Tid, oids: Iterable[Oid]) -> None:
        """Move the cache to ``tid``, ending the revisions of ``oids``, which changed in one
        or more transactions after its last tid: exactly when is not said, so each ends
        right after the cache's last tid -- kept for the snapshots that surely saw it,
        never served to one that may not have."""
        cache = self._cache
        if tid <= cache.last_tid:
            cache.drop(oids)  # nothing newer was committed (a pack's announcement): no change
            return
        cache.invalidate(p64(u64(cache.last_tid) + 1), oids)
        cache.last_tid = tid

    def _forget_oids(self, used: Iterable[Oid]) -> None:
        """Drop from the batch of new oids any that now have a record (a restore, or a
        store of an explicit oid, elsewhere): new_oid never hands out one (invariant 5)."""
        # No lock: this runs on the network thread, which new_oid may be waiting on.
        batch = self._oid_batch
        if batch:
            self._oids_taken.update(batch.intersection(used))

    def _append_log(self, tid: Tid, oids: frozenset[Oid]) -> None:
        self._log.append((tid, oids))
        if len(self._log) > LOG_LENGTH:
            dropped, _ = self._log.popleft()
            self._floor = dropped

    def _warn_pending(self) -> None:
        while self._warnings:
            warnings.warn(self._warnings.pop(0), CacheFileWarning, stacklevel=4)

    def _wait_connected(self, action: str) -> _ClientProtocol:
        if self._warnings:
            self._warn_pending()
        protocol = self._protocol
        if protocol is not None and not protocol.lost:
            return protocol
        if self._closed:
            raise ClientDisconnected(f"{self._name} is closed: cannot {action}")
        self._connected.wait(self._timeout)
        if self._fatal is not None:
            raise self._fatal
        protocol = self._protocol
        if protocol is None or protocol.lost:
            why = f": {self._last_error}" if self._last_error is not None else ""
            raise ClientDisconnected(
                f"cannot {action}: no connection to the server {self._name} within {self._timeout:g} s{why}"
            )
        return protocol

    def _on_lost(self, protocol: _ClientProtocol, exc: Exception | None) -> None:
        with self._pending_lock:
            protocol.lost = True
            was_current = self._protocol is protocol
            if was_current:
                self._protocol = None
                self._connected.clear()
            error = ClientDisconnected(
                f"lost the connection to the server {self._name}{f': {exc}' if exc else ''}"
            )
            for request_id, waiter in list(self._pending.items()):
                if waiter.protocol is protocol:
                    del self._pending[request_id]
                    waiter.settle(None, error)
            for oid, waiter in list(self._loading.items()):
                if waiter.protocol is protocol:
                    del self._loading[oid]
        if was_current and not self._closed:
            log.warning("%s: lost the server%s; reconnecting", self._name, f" ({exc})" if exc else "")
            self._connector = self._loop.create_task(self._connect_loop())

    # -- messages (network thread) ---------------------------------------------------------

    def _on_message(self, protocol: _ClientProtocol, kind: int, request_id: int, fields: list[Value]) -> None:
        if kind == Kind.REPLY or kind == Kind.ERROR:
            welcome = self._welcomes.pop(request_id, None)
            if welcome is not None:
                if welcome.done():
                    return
                if kind == Kind.ERROR:
                    welcome.set_exception(error_from_fields(fields))
                    return
                # Now, not when the connecting coroutine resumes: an INVALIDATE read right
                # behind the welcome must be applied after it, or the last tid would go back.
                try:
                    self._apply_welcome(fields)
                except (WireError, ValueError, TypeError) as exc:
                    welcome.set_exception(WireError(f"a malformed AUTH reply: {exc}"))
                    raise WireError(f"a malformed AUTH reply: {exc}") from None
                welcome.set_result(fields)
                return
            with self._pending_lock:
                waiter = self._pending.pop(request_id, None)
            if waiter is None:
                raise WireError(f"a reply to request {request_id}, which is not waiting for one")
            if kind == Kind.ERROR:
                self._settle(waiter, None, error_from_fields(fields))
                return
            if waiter.on_reply is not None:
                try:
                    waiter.on_reply(fields)
                except (ValueError, TypeError, WireError) as exc:
                    self._settle(waiter, None, WireError(f"a malformed reply: {exc}"))
                    raise WireError(f"a malformed reply: {exc}") from None
            self._settle(waiter, fields, None)
        elif kind == Kind.INVALIDATE:
            self._on_invalidate(protocol, fields)
        elif kind == Kind.PROGRESS:
            target, done, total = fields
            with self._pending_lock:
                waiter = self._pending.get(target) if type(target) is int else None
            if waiter is not None and waiter.events is not None and type(done) is int and type(total) is int:
                waiter.events.put((done, total))
        elif kind == Kind.CLOSING:
            log.info("%s: the server is closing: %s", self._name, fields[0] if fields else "")
        else:
            raise WireError(f"unexpected message kind {kind} from the server")

    def _settle(self, waiter: _Waiter, result: list[Value] | None, error: BaseException | None) -> None:
        with self._pending_lock:
            self._done_loading(waiter)
            waiter.settle(result, error)
            if waiter.events is not None:
                waiter.events.put((-1, -1))

    def _done_loading(self, waiter: _Waiter) -> None:
        """Whatever the answer (records, an error, a lost connection), loads of these oids no
        longer wait on it."""
        loading = self._loading
        for oid in waiter.loading:
            if loading.get(oid) is waiter:
                del loading[oid]

    def _on_invalidate(self, protocol: _ClientProtocol, fields: list[Value]) -> None:
        tid, oids, packed, more, since = fields
        if not _is_tid(tid) or (packed is not None and not _is_tid(packed)) or not isinstance(more, bool):
            raise WireError("a malformed INVALIDATE")
        if not _is_tid(since):
            raise WireError("a malformed INVALIDATE")
        if oids is not None and (not isinstance(oids, list) or not all(_is_tid(oid) for oid in oids)):
            raise WireError("a malformed INVALIDATE")
        assert isinstance(tid, bytes)
        if more:
            assert isinstance(oids, list)
            protocol.invalidating.extend(oids)  # type: ignore[arg-type]
            return
        listed: list[Oid] | None = None
        if oids is not None:
            listed = protocol.invalidating + oids  # type: ignore[operator]
        protocol.invalidating = []
        with self._state_lock:
            cache = self._cache
            if tid < self._last_tid:
                raise WireError(
                    f"an invalidation for tid {oid_repr(tid)}, older than {oid_repr(self._last_tid)}"
                )
            if since != self._last_tid:
                # Not the continuation of what we know: an invalidation was lost somewhere.
                # Nothing cached can be trusted, and no snapshot before now can be served.
                log.error(
                    "%s: the server's invalidations skipped from %s to %s; the cache is dropped",
                    self._name,
                    oid_repr(self._last_tid),
                    oid_repr(since),  # type: ignore[arg-type]
                )
                listed = None
            if listed is None:
                cache.clear(last_tid=tid)
                self._log.clear()
                self._floor = tid
            else:
                self._invalidate_cache(tid, listed)
                if tid > self._last_tid or listed:
                    self._append_log(tid, frozenset(listed))
                self._forget_oids(listed)
            if packed != self._packed:
                # A pack may have removed objects the cache still holds: a connection checking
                # its references after a pack must ask the server, not the cache.
                cache.clear(database_id=packed or b"", last_tid=tid)  # type: ignore[arg-type]
                self._packed = packed  # type: ignore[assignment]
            self._last_tid = tid

    # -- requests (application threads) ----------------------------------------------------

    def _request(
        self,
        kind: Kind,
        fields: list[Value],
        on_reply: Any = None,
        protocol: _ClientProtocol | None = None,
        events: bool = False,
        loading: Iterable[Oid] = (),
    ) -> _Waiter:
        if self._closed:
            raise StorageError(f"{self._name} is closed: cannot {_ACTIONS.get(kind, kind.name)}")
        if protocol is None:
            protocol = self._wait_connected(_ACTIONS.get(kind, kind.name))
        waiter = _Waiter(protocol)
        waiter.on_reply = on_reply
        if events:
            waiter.events = queue.SimpleQueue()
        request_id = next(self._ids)
        frame = encode_message(kind, request_id, fields)
        with self._pending_lock:
            if protocol.lost:
                raise ClientDisconnected(f"lost the connection to the server {self._name}")
            self._pending[request_id] = waiter
            waiter.loading = tuple(loading)
            for oid in waiter.loading:
                self._loading.setdefault(oid, waiter)
        self._send(protocol, frame)
        return waiter

    def _wait(self, waiter: _Waiter, what: str, timeout: float | None = -1.0) -> list[Value]:
        wait = self._timeout if timeout == -1.0 else timeout
        if not waiter.lock.acquire(timeout=-1 if wait is None else wait):
            self._give_up(waiter, what)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.result is not None
        return waiter.result

    def _give_up(self, waiter: _Waiter, what: str) -> None:
        protocol = waiter.protocol
        if protocol is not None and protocol.transport is not None:
            # A reply that comes later would find nobody waiting: start over on a new connection.
            self._loop.call_soon_threadsafe(protocol.transport.abort)
        raise ClientDisconnected(f"{self._name}: no answer to the request to {what} in time")

    def _call(self, kind: Kind, fields: list[Value], on_reply: Any = None) -> list[Value]:
        return self._wait(self._request(kind, fields, on_reply), _ACTIONS.get(kind, kind.name))

    # -- the storage interface ---------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        """True when the client was opened read-only or the server grants only reading."""
        return self._read_only_option or self._access != "rw"

    @property
    def name(self) -> str:
        """``amberdb://host:port`` (or the ``name`` given)."""
        return self._name

    @property
    def packed_tid(self) -> Tid | None:
        """The server storage's newest pack time, as the server last told it."""
        return self._packed

    @property
    def cache(self) -> RecordCache:
        """The client's record cache (for statistics: ``hits``, ``misses``, ``used``)."""
        return self._cache

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._protocol is not None else "disconnected")
        return f"<ClientStorage {self._name} {state}>"

    def is_connected(self) -> bool:
        """Whether the client has a connection to its server right now."""
        protocol = self._protocol
        return protocol is not None and not protocol.lost

    def load(self, oid: Oid, before: Tid | None = None) -> tuple[bytes, Tid]:
        """The newest revision of ``oid`` (before ``before``): from the cache, else the server."""
        if self._closed:
            self._check_open(f"load oid {oid_repr(oid)}")
        if before is None:
            if oid not in self._conflicted:
                hit = self._cache.load(oid)
                if hit is not None:
                    return hit
                waiter = self._loading.get(oid)
                if waiter is not None:
                    self._follow(waiter)
                    hit = self._cache.load(oid)
                    if hit is not None:
                        return hit
            return self._load_remote(oid, None)
        hit = self._cache.load_before(oid, before)
        if hit is not None:
            return hit
        return self._load_remote(oid, before)

    def _follow(self, waiter: _Waiter) -> None:
        """Wait for a load another thread (or a prefetch) already asked for."""
        with self._pending_lock:
            if waiter.done:
                return
            follower = threading.Lock()
            follower.acquire()
            waiter.followers.append(follower)
        follower.acquire(timeout=self._timeout)

    def _load_remote(self, oid: Oid, before: Tid | None) -> tuple[bytes, Tid]:
        cache = self._cache

        def cache_reply(fields: list[Value]) -> None:
            record, tid = fields
            if type(record) is not bytes or not _is_tid(tid):
                raise WireError("a LOAD reply must be [record, tid]")
            if before is None:
                cache.store(oid, tid, record)  # type: ignore[arg-type]

        waiter = self._request(
            Kind.LOAD, [oid, before], cache_reply, loading=(oid,) if before is None else ()
        )
        try:
            record, tid = self._wait(waiter, f"load oid {oid_repr(oid)}")
        finally:
            if before is None and self._loading.get(oid) is waiter:
                self._loading.pop(oid, None)
        return record, tid  # type: ignore[return-value]

    def prefetch(self, oids: Iterable[Oid]) -> None:
        """Ask for the records of ``oids`` that are not cached, in batches, without waiting:
        the loads that follow find them in the cache (or wait for the reply on its way)."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            return
        cache = self._cache
        wanted = [oid for oid in dict.fromkeys(oids) if cache.load(oid) is None and oid not in self._loading]
        for start in range(0, len(wanted), PREFETCH_BATCH):
            batch = wanted[start : start + PREFETCH_BATCH]

            def cache_replies(fields: list[Value], oids: list[Oid] = batch) -> None:
                try:
                    (found,) = fields
                    if not isinstance(found, list):
                        raise WireError("a LOAD_MANY reply must be a list")
                    for entry in found:
                        if not isinstance(entry, list) or len(entry) != 3:
                            raise WireError("a LOAD_MANY entry must be [oid, record, tid]")
                        oid, record, tid = entry
                        if type(record) is bytes and _is_tid(tid) and _is_tid(oid):
                            cache.store(oid, tid, record)  # type: ignore[arg-type]
                finally:
                    for oid in oids:
                        self._loading.pop(oid, None)

            try:
                self._request(Kind.LOAD_MANY, [batch], cache_replies, protocol, loading=batch)  # type: ignore[list-item]
            except ClientDisconnected:
                return

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise StorageError(f"{self._name} is closed: cannot {action}")

    def last_tid(self) -> Tid:
        """The newest tid the server has told this client about."""
        self._check_open("read the last tid")
        return self._last_tid

    def poll_invalidations(self, since: Tid) -> tuple[Tid, Collection[Oid] | None]:
        """What the server's invalidations said changed after ``since`` (invariant 7)."""
        self._check_open("poll")
        with self._state_lock:
            newest = self._last_tid
            if since == newest:
                return newest, ()
            if since > newest or since < self._floor:
                return newest, None
            changed: set[Oid] = set()
            for tid, oids in reversed(self._log):
                if tid <= since:
                    break
                changed.update(oids)
            return newest, changed

    def sync(self) -> None:
        """With ``server_sync`` (the default), one round trip to the server: the polls that
        follow report every commit that finished anywhere before this call.  Connections
        call it at every explicit transaction start (``begin()``), as ZODB calls ZEO's."""
        self._check_open("sync")
        if not self._server_sync:
            return
        if not self.is_connected():
            # The server may be back while the reconnect loop sleeps: try now, and give it
            # a moment -- not the whole timeout: this is a transaction's start, and the
            # snapshot the client has is consistent, only older.
            self._reconnect_now()
            self._connected.wait(min(self._timeout, RESYNC_WAIT))
        if self.is_connected():
            with contextlib.suppress(ClientDisconnected):
                self._call(Kind.PING, [])

    def _reconnect_now(self) -> None:
        kick = self._kick
        if kick is not None and not self._closed:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(kick.set)

    def ping(self) -> Tid:
        """One round trip: the server's newest announced tid (and every invalidation before it)."""
        (tid,) = self._call(Kind.PING, [])
        return tid  # type: ignore[return-value]

    def new_oid(self) -> Oid:
        """A fresh oid from the server (asked for in batches)."""
        self._check_open("allocate oids")
        if self.read_only:
            raise ReadOnlyError(f"cannot allocate oids: {self._why_read_only()}")
        with self._oid_lock:
            while True:
                if not self._oids:
                    generation = self._oid_generation
                    (oids,) = self._call(Kind.NEW_OIDS, [OID_BATCH])
                    if not isinstance(oids, list) or not oids or not all(_is_tid(oid) for oid in oids):
                        raise WireError("a malformed NEW_OIDS reply")
                    if generation != self._oid_generation:
                        continue  # answered by a server we have since lost: ask the new one
                    self._oids = list(reversed(oids))  # type: ignore[arg-type]
                    self._oid_batch = frozenset(self._oids)
                    self._oids_taken = set()
                oid = self._oids.pop()
                if oid not in self._oids_taken:
                    return oid

    def _why_read_only(self) -> str:
        if self._read_only_option:
            return f"{self._name} was opened read-only"
        return f"the server {self._name} grants this client read-only access"

    def begin(self, meta: TransactionMeta, tid: Tid | None = None) -> None:
        """Start a commit (waits while another thread of this process commits through it)."""
        self._check_open("begin a commit")
        if self.read_only:
            raise ReadOnlyError(f"cannot commit: {self._why_read_only()}")
        me = threading.get_ident()
        if self._txn_owner == me:
            raise StorageTransactionError("begin() called twice without finish() or abort()")
        self._commit_lock.acquire()
        try:
            protocol = self._wait_connected("begin a commit")
        except BaseException:
            self._commit_lock.release()
            raise
        self._txn_owner = me
        txn = self._txn = _ClientTransaction(protocol, self._cache.size // 8)
        txn.add(
            encode_message(Kind.BEGIN, 0, [meta.user, meta.description, meta.extension, tid, self._packed])
        )

    def _open_transaction(self, action: str) -> _ClientTransaction:
        txn = self._txn
        if txn is None or self._txn_owner != threading.get_ident():
            raise StorageTransactionError(f"{action} without begin()")
        return txn

    def store(self, oid: Oid, base_tid: Tid, record: bytes) -> None:
        """Send a store (without waiting for the server)."""
        txn = self._open_transaction("store()")
        if txn.voted:
            raise StorageTransactionError("store() after vote(): only finish() or abort() may follow")
        txn.add(encode_message(Kind.STORE, 0, [oid, base_tid, record]))
        txn.remember(oid, record)
        if oid in self._oid_batch:
            self._oids_taken.add(oid)
        if txn.buffered >= FLUSH_AT:
            self._flush(txn)

    def _flush(self, txn: _ClientTransaction) -> None:
        data = txn.take()
        if data:
            protocol = txn.protocol
            if protocol.lost:
                raise ClientDisconnected(f"lost the connection to the server {self._name} during the commit")
            self._send(protocol, data)

    def vote(self) -> None:
        """Send the stores and vote: returns once the server's storage made them durable."""
        txn = self._open_transaction("vote()")
        if txn.voted:
            raise StorageTransactionError("vote() called twice: only finish() or abort() may follow")
        self._flush(txn)
        waiter = self._request(Kind.VOTE, [], protocol=txn.protocol)
        try:
            # A vote may wait behind other clients' commits (the server drops a client that
            # holds it past its own timeout, 60 s by default): give it longer than a load.
            self._wait(waiter, "vote", self._timeout * COMMIT_WAIT_FACTOR)
        except VoteConflictError as conflicts:
            # The committed states must come from the server, not a cache that may not yet
            # have heard of the commit that conflicted.
            self._conflicted.update(conflicts.conflicts)
            for oid in conflicts.conflicts:
                self._cache.drop([oid])
            raise
        txn.voted = True

    def finish(self) -> Tid:
        """Publish the voted transaction and return its tid."""
        txn = self._open_transaction("finish()")
        if not txn.voted:
            raise StorageTransactionError("finish() before a vote that succeeded")
        cache = self._cache
        records = txn.records

        def cache_own(fields: list[Value]) -> None:
            (tid,) = fields
            if not _is_tid(tid):
                raise WireError("a FINISH reply must be [tid]")
            # The server sent the INVALIDATE for this tid first; if nothing came after it,
            # our records are the current revisions.
            if records is not None and cache.last_tid == tid:
                for oid, record in records.items():
                    cache.store(oid, tid, record)

        try:
            finishing = self._request(Kind.FINISH, [], cache_own, txn.protocol)
            (tid,) = self._wait(finishing, "finish a commit", self._timeout * COMMIT_WAIT_FACTOR)
        finally:
            self._end_transaction()
        return tid  # type: ignore[return-value]

    def abort(self) -> None:
        """Forget the open or voted transaction (a no-op when none is open)."""
        txn = self._txn
        if txn is None or self._txn_owner != threading.get_ident():
            return
        try:
            if not txn.protocol.lost:
                txn.take()
                self._send(txn.protocol, encode_message(Kind.ABORT, 0, []))
        finally:
            self._end_transaction()

    def _end_transaction(self) -> None:
        self._txn = None
        self._txn_owner = None
        self._conflicted.clear()
        self._commit_lock.release()

    def close(self) -> None:
        """Abort an open transaction, close the connection, save the cache.  Idempotent."""
        if self._closed:
            return
        if self._txn is not None and self._txn_owner == threading.get_ident():
            self.abort()
        self._closed = True
        self._connected.set()
        loop = self._loop

        async def shut() -> None:
            # The connecting task is unwound (its socket closed) before the loop stops: a
            # task still pending then would leak its socket.
            connector = self._connector
            if connector is not None and not connector.done():
                connector.cancel()
                await asyncio.wait([connector], timeout=2)
            protocol = self._protocol
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
            for _ in range(3):
                await asyncio.sleep(0)  # connection_lost runs

        if loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shut(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(5)
        if not loop.is_running():
            with contextlib.suppress(Exception):
                loop.close()
        with self._pending_lock:
            error = ClientDisconnected(f"{self._name} is closed")
            for waiter in self._pending.values():
                waiter.settle(None, error)
            self._pending.clear()
        self._cache.close()

    def __len__(self) -> int:
        """The number of objects in the server's storage."""
        count, _ = self._call(Kind.SIZE, [])
        return int(count)  # type: ignore[arg-type]

    def get_size(self) -> int:
        """About how many bytes the server's storage occupies."""
        _, size = self._call(Kind.SIZE, [])
        return int(size)  # type: ignore[arg-type]

    def current_records(self, after: Oid | None = None, limit: int = 1000) -> list[tuple[Oid, Tid, bytes]]:
        """Up to ``limit`` current records of the server storage's oids above ``after``, in
        oid order (storage/base.py), as of the server's last announced tid; one round trip.

        The server sends at most 10000 records (and about 4 MiB) per call: fewer than
        ``limit`` does not mean the end, an empty list does.  StorageError when the server
        is too old to list them (protocol version 1) or its storage cannot.  The records do
        not go into the client's cache: a walk over every object would push out what
        connections use.
        """
        if type(limit) is not int or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r:.40}")
        if after is not None and (type(after) is not bytes or len(after) != 8):
            raise TypeError(f"after must be an oid (8 bytes) or None, not {after!r:.60}")
        action = _ACTIONS[Kind.CURRENT_RECORDS]
        if self._closed:
            raise StorageError(f"{self._name} is closed: cannot {action}")
        protocol = self._wait_connected(action)
        if protocol.version < _CURRENT_RECORDS_VERSION:
            raise StorageError(
                f"storage {self._name} cannot list its current records (no current_records): the"
                f" server speaks protocol version {protocol.version}, and listing needs"
                f" {_CURRENT_RECORDS_VERSION}; upgrade the server"
            )
        waiter = self._request(Kind.CURRENT_RECORDS, [after, min(limit, _MAX_CURRENT)], protocol=protocol)
        (entries,) = self._wait(waiter, action)
        if not isinstance(entries, list) or len(entries) > limit:
            raise WireError("a malformed CURRENT_RECORDS reply")
        found: list[tuple[Oid, Tid, bytes]] = []
        previous = after
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 3:
                raise WireError("a malformed CURRENT_RECORDS entry")
            oid, tid, record = entry
            if not _is_tid(oid) or not _is_tid(tid) or type(record) is not bytes:
                raise WireError("a malformed CURRENT_RECORDS entry")
            assert isinstance(oid, bytes) and isinstance(tid, bytes)
            if previous is not None and oid <= previous:
                raise WireError("a CURRENT_RECORDS reply out of oid order")
            found.append((oid, tid, record))
            previous = oid
        return found

    # -- history --------------------------------------------------------------------------

    def iterator(self, start: Tid | None = None, stop: Tid | None = None) -> Iterator[TransactionRecord]:
        """The server's transactions from ``start`` to ``stop``, fetched in batches."""
        newest = self.ping()
        stop = newest if stop is None or stop > newest else stop
        skip = 0
        partial: TransactionRecord | None = None
        while True:
            batch, more = self._call(Kind.ITERATE, [start, stop, skip])
            if not isinstance(batch, list) or not isinstance(more, bool):
                raise WireError("a malformed ITERATE reply")
            last: tuple[Tid, bool, int] | None = None
            for entry in batch:
                txn, complete = _transaction_from(entry)
                if partial is not None and partial.tid == txn.tid:
                    partial.records.extend(txn.records)
                    txn = partial
                elif partial is not None:
                    raise WireError("ITERATE left a transaction incomplete")
                if complete:
                    partial = None
                    yield txn
                else:
                    partial = txn
                last = (txn.tid, complete, len(txn.records))
            if not more:
                if partial is not None:
                    raise WireError("ITERATE ended inside a transaction")
                return
            if last is None:
                raise WireError("an empty ITERATE reply that says more follows")
            tid, complete, count = last
            if complete:
                start, skip = p64(u64(tid) + 1), 0
            else:
                start, skip = tid, count

    def undo_log(self, first: int = 0, last: int = -20) -> list[TransactionInfo]:
        """The server's undoable transactions, newest first (ZODB's first/last)."""
        (entries,) = self._call(Kind.UNDO_LOG, [first, last])
        if not isinstance(entries, list):
            raise WireError("a malformed UNDO_LOG reply")
        infos = []
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 4:
                raise WireError("a malformed UNDO_LOG entry")
            tid, user, description, extension = entry
            infos.append(TransactionInfo(_tid(tid), _meta(user, description, extension)))
        return infos

    def history(self, oid: Oid, size: int = 1) -> list[Revision]:
        """Up to ``size`` revisions of ``oid``, newest first."""
        (entries,) = self._call(Kind.HISTORY, [oid, max(1, min(int(size), 10_000))])
        if not isinstance(entries, list):
            raise WireError("a malformed HISTORY reply")
        revisions = []
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 5 or type(entry[4]) is not int:
                raise WireError("a malformed HISTORY entry")
            tid, user, description, extension, length = entry
            revisions.append(Revision(_tid(tid), _meta(user, description, extension), length))  # type: ignore[arg-type]
        return revisions

    def undo(self, tid: Tid, meta: TransactionMeta, resolve: UndoResolver | None = None) -> Tid:
        """Undo ``tid`` through this client's own loads and commit (conflicts merge here)."""
        if self.read_only:
            raise ReadOnlyError(f"cannot undo: {self._why_read_only()}")
        return undo_transaction(self, tid, meta, resolve, self._packed)

    def pack(
        self, pack_tid: Tid | float, referencesf: object = None, *, progress: PackProgress | None = None
    ) -> None:
        """Pack the server's storage (waits until it is done, reporting its progress)."""
        if self.read_only:
            raise ReadOnlyError(f"cannot pack: {self._why_read_only()}")
        waiter = self._request(Kind.PACK, [pack_time(pack_tid)], events=True)
        assert waiter.events is not None
        while True:
            try:
                done, total = waiter.events.get(timeout=self._timeout * 10)
            except queue.Empty:
                if waiter.done:
                    break
                continue
            if done < 0:
                break
            if progress is not None:
                progress(done, total)
        self._wait(waiter, "pack", None)
        # The server announced the new pack time before its reply.

    def copy_transactions_from(self, other: Storage) -> int:
        """Copy ``other``'s transactions newer than ours into the server, tids and all."""
        return copy_transactions(self, other, self._mark_packed)

    def _mark_packed(self, tid: Tid) -> None:
        self._call(Kind.MARK_PACKED, [tid])
        self._packed = tid


class _ClientTransaction:
    """The frames of a commit not yet handed to the network thread, and its records (kept to
    cache them as current after the finish, while they fit in ``keep`` bytes)."""

    def __init__(self, protocol: _ClientProtocol, keep: int) -> None:
        self.protocol = protocol
        self.out = bytearray()
        self.records: dict[Oid, bytes] | None = {}
        self.kept = 0
        self.keep = keep
        self.voted = False

    @property
    def buffered(self) -> int:
        return len(self.out)

    def add(self, frame: bytes) -> None:
        self.out += frame

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def remember(self, oid: Oid, record: bytes) -> None:
        records = self.records
        if records is None:
            return
        self.kept += len(record)
        if self.kept > self.keep:
            self.records = None
        else:
            records[oid] = record


_ACTIONS = {
    Kind.LOAD: "load",
    Kind.LOAD_MANY: "prefetch",
    Kind.NEW_OIDS: "allocate oids",
    Kind.VOTE: "vote",
    Kind.FINISH: "finish a commit",
    Kind.ITERATE: "list transactions",
    Kind.UNDO_LOG: "read the undo log",
    Kind.HISTORY: "read an object's history",
    Kind.PACK: "pack",
    Kind.SIZE: "count objects",
    Kind.MARK_PACKED: "record a pack time",
    Kind.PING: "reach the server",
    Kind.CURRENT_RECORDS: "list current records",
}
"""What each request does, for error messages ("cannot read the undo log: ...")."""


def _is_tid(value: object) -> bool:
    return type(value) is bytes and len(value) == 8


def _tid(value: Value) -> Tid:
    if not _is_tid(value):
        raise WireError(f"expected a tid, got {value!r:.60}")
    return value  # type: ignore[return-value]


def _meta(user: Value, description: Value, extension: Value) -> TransactionMeta:
    if type(user) is not str or type(description) is not str or type(extension) is not bytes:
        raise WireError("malformed transaction metadata")
    return TransactionMeta(user, description, extension)


def _transaction_from(entry: Value) -> tuple[TransactionRecord, bool]:
    if not isinstance(entry, list) or len(entry) != 6:
        raise WireError("a malformed ITERATE entry")
    tid, user, description, extension, records, complete = entry
    if not isinstance(records, list) or not isinstance(complete, bool):
        raise WireError("a malformed ITERATE entry")
    txn_tid = _tid(tid)
    data = []
    for item in records:
        if not isinstance(item, list) or len(item) != 3 or type(item[2]) is not bytes:
            raise WireError("a malformed ITERATE record")
        data.append(DataRecord(_tid(item[0]), _tid(item[1]), item[2]))
    return TransactionRecord(txn_tid, _meta(user, description, extension), data), complete


def _cache_where(cache: RecordCache) -> str:
    return f" ({cache.path})" if cache.path else ""


# -- URIs -----------------------------------------------------------------------------------

_URI_OPTIONS = (
    "cache_path",
    "cache_size",
    "token",
    "token_file",
    "read_only",
    "timeout",
    "name",
    "server_sync",
    "ca_file",
    "cert_file",
    "key_file",
    "server_hostname",
)
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def open_client_uri(uri: str, read_only: bool = False) -> ClientStorage:
    """The ClientStorage an ``amberdb://host:port?...``, ``amberdbs://`` (TLS) or
    ``amberdb+unix:///path/to/socket?...`` URI names.

    Options: ``cache_path``, ``cache_size``, ``token`` (or ``token_file``, a file holding the
    token: a URI is often logged), ``read_only``, ``timeout``, ``name``, ``server_sync``; with
    TLS ``ca_file`` (else the system's CAs), ``cert_file`` and ``key_file`` (a client
    certificate), ``server_hostname``.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    options: dict[str, str] = {}
    for field in parts.query.split("&") if parts.query else ():
        if "=" not in field:
            raise ValueError(f"option {unquote(field)!r} has no value in storage URI {_shown(uri)}")
        ((key, value),) = parse_qsl(field, keep_blank_values=True)
        if key not in _URI_OPTIONS:
            raise ValueError(
                f"unknown option {key!r} in storage URI {_shown(uri)}:"
                f" known options are {', '.join(_URI_OPTIONS)}"
            )
        if key in options:
            raise ValueError(f"option {key!r} is given twice in storage URI {_shown(uri)}")
        options[key] = value
    if parts.fragment:
        raise ValueError(f"storage URI {_shown(uri)} has a fragment (#...); options go after '?'")
    kwargs: dict[str, Any] = {}
    if "cache_path" in options:
        kwargs["cache_path"] = options["cache_path"]
    for key, convert in (("cache_size", int), ("timeout", float)):
        if key in options:
            try:
                kwargs[key] = convert(options[key])
            except ValueError:
                raise ValueError(f"option {key}={options[key]!r} in {_shown(uri)} is not a number") from None
    for key in ("read_only", "server_sync"):
        if key in options:
            text = options[key].lower()
            if text not in _TRUE | _FALSE:
                raise ValueError(f"option {key}={options[key]!r} in {_shown(uri)} is not true or false")
            kwargs[key] = text in _TRUE
    if read_only:
        kwargs["read_only"] = True
    if "name" in options:
        kwargs["name"] = options["name"]
    if "token" in options and "token_file" in options:
        raise ValueError(f"give token or token_file in {_shown(uri)}, not both")
    if "token" in options:
        kwargs["token"] = options["token"]
    elif "token_file" in options:
        with open(options["token_file"], encoding="utf-8") as f:
            kwargs["token"] = f.read().strip()
    tls = scheme in ("amberdbs", "amberdbs+unix")
    if tls:
        context = ssl_module.create_default_context(cafile=options.get("ca_file"))
        if "cert_file" in options:
            context.load_cert_chain(options["cert_file"], options.get("key_file"))
        kwargs["ssl"] = context
        if "server_hostname" in options:
            kwargs["server_hostname"] = options["server_hostname"]
    elif any(key in options for key in ("ca_file", "cert_file", "key_file", "server_hostname")):
        raise ValueError(f"TLS options in {_shown(uri)} need the amberdbs:// scheme")
    if scheme.endswith("+unix"):
        path = unquote(parts.path)
        if parts.netloc or not path:
            raise ValueError(
                f"{scheme}: URIs name a socket path: {scheme}:///path/to/socket, got {_shown(uri)}"
            )
        return ClientStorage(f"unix:{path}", **kwargs)
    host = parts.hostname
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"storage URI {_shown(uri)} has a port that is not a number") from None
    if not host or port is None or parts.path not in ("", "/"):
        raise ValueError(f"{scheme}:// URIs are {scheme}://host:port?options, got {_shown(uri)}")
    return ClientStorage(host, port, **kwargs)


def _shown(uri: str) -> str:
    """The URI as an error may quote it: a token in it is not repeated."""
    parts = urlsplit(uri)
    if "token=" not in parts.query:
        return repr(uri)
    query = "&".join("token=***" if field.startswith("token=") else field for field in parts.query.split("&"))
    return repr(parts._replace(query=query).geturl())
