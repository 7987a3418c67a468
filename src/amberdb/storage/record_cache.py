"""A client-side cache of storage records: opaque bytes by oid and revision, bounded by bytes.

One :class:`RecordCache` serves one database in one process: every connection and thread of
a client storage (the network ``ClientStorage``, later the SQL storages) shares it.  It
knows nothing of objects or of the network.  It holds *facts* its user gives it -- "this
record is the current revision of oid as of ``last_tid``" or "this record is the revision
of oid seen by snapshots ``start <= s < end``" -- and answers loads exactly from them:
eviction can turn a hit into a miss, never into another answer.  Policy (when to clear,
what to do with a ``database_id`` that does not match the server's) belongs to the user.

Revisions.  A *current* entry ``(oid, start)`` answers :meth:`RecordCache.load` and serves
snapshots up to ``last_tid``; :meth:`RecordCache.invalidate` turns it into an *old* entry
``(oid, start, end)`` (kept: connections on older snapshots still read it) and moves
``last_tid`` forward.  Invalidations must come one transaction at a time, in tid order: an
oid listed for ``tid`` is taken to have changed at exactly ``tid``.

Memory.  Each revision counts ``len(record) + ENTRY_OVERHEAD`` bytes; the least recently
used revisions go first once ``used`` would exceed ``size``.  ``load`` is called for every
object a connection loads, so its hit path is one lock, one dict lookup and one LRU touch.

File (optional, ``path``).  Read when the cache is made, written by :meth:`RecordCache.save`
and :meth:`RecordCache.close`, always whole, through :func:`amberdb.fsutil.replace_file`
(temporary file, fsync, rename: a crash leaves the old file or the new one), mode 0600.
While a cache has its file, it holds ``flock(LOCK_EX | LOCK_NB)`` on ``path + ".lock"``; a
second cache on the same path (in this process or another) warns and runs memory-only,
never writing the file.  Integers are big-endian:

======  ====  ===========================================================================
offset  size  meaning
======  ====  ===========================================================================
0       8     magic ``b"AMBRRC\\r\\n"`` (the CR LF catches a text-mode copy)
8       4     format version, 1
12      8     ``last_tid``
20      2     length n of ``database_id`` (at most 1024)
22      n     ``database_id``
22+n          entries, least recently used first, each:
                ====  ==================================================================
                8     oid
                8     start tid
                8     end tid; all zero for a current entry (an old entry's end is
                      above its start, so never zero)
                4     record length m
                m     record
                ====  ==================================================================
-32     32    SHA-256 of every byte before it
======  ====  ===========================================================================

Why one whole-file SHA-256 and no per-entry checksum: a file is trusted entirely or not at
all (a cache that kept the entries before a damaged one could keep a current entry whose
invalidation was in the lost part), so per-entry checks could only add salvage, which is
refused.  The digest is checked before any entry is looked at; SHA-256 rather than CRC-32
because a cache read at every start for years must not let a damaged file through by a
1 in 4 billion chance, and hashing 64 MiB once at start-up costs a fraction of a second.
The digest guards against accidents only (anyone who can write the file can recompute
it): the reader also checks every length against the bytes left, refuses a file longer
than a cache of this ``size`` could have written (so it never allocates more than that),
and refuses entries that contradict each other.  Any problem -- and a file of another
format or version -- gives a :class:`CacheFileWarning` naming the file and the problem, and
an empty cache that overwrites the file when it saves; a file that cannot be read at all (a
directory, no permission) leaves the cache in memory only, never saving.

Entries go out least recently used first, so reading them back in order restores the LRU
order, and a cache opened with a smaller ``size`` than the one that wrote the file keeps
the most recently used.  A file longer than this cache's size allows is refused as a whole.

After :meth:`RecordCache.close` (idempotent) every method but ``close``, ``len`` and the
counters raises ValueError, as a closed file does.  In a child process after ``os.fork()``
the inherited cache works in memory, but never writes the file nor touches the lock: the
parent owns both.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable

from amberdb.fsutil import replace_file
from amberdb.storage.forks import GENERATION, close_in_children, forget_in_children
from amberdb.utils import Oid, Tid, oid_repr, z64

__all__ = ["ENTRY_OVERHEAD", "FORMAT_VERSION", "MAGIC", "CacheFileWarning", "RecordCache"]

MAGIC = b"AMBRRC\r\n"
FORMAT_VERSION = 1
ENTRY_OVERHEAD = 300
"""Bytes counted per revision besides its record: roughly what CPython (64-bit) spends on
the entry object, its LRU node and index slots, and the oid and tid objects."""
MAX_DATABASE_ID = 1024

_HEADER = struct.Struct(">8sI8sH")  # magic, version, last_tid, len(database_id)
_ENTRY = struct.Struct(">8s8s8sI")  # oid, start, end (z64: current), len(record)
_DIGEST_SIZE = 32
_MAX_FILE_EXTRA = _HEADER.size + MAX_DATABASE_ID + _DIGEST_SIZE
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)

# A file entry takes _ENTRY.size + m bytes and is counted m + ENTRY_OVERHEAD, so a file a
# cache of size S wrote is at most S + _MAX_FILE_EXTRA bytes: the bound the reader enforces.
assert _ENTRY.size <= ENTRY_OVERHEAD


class CacheFileWarning(UserWarning):
    """A record cache file could not be used (damaged, foreign, or locked); the cache started empty."""


class _Entry:
    # Hashed by identity: the LRU is keyed by the entry itself, so invalidate can move an
    # entry from current to old without losing its place in the LRU.
    __slots__ = ("end", "oid", "record", "start")

    def __init__(self, oid: Oid, start: Tid, end: Tid | None, record: bytes) -> None:
        self.oid = oid
        self.start = start
        self.end = end
        self.record = record


class _BadFileError(Exception):
    """What is wrong with a cache file (turned into a CacheFileWarning)."""


class _UnreadableFileError(_BadFileError):
    """The file cannot even be read: writing it would fail too, so the cache stays in memory."""


def _check_tid(name: str, value: bytes) -> None:
    if type(value) is not bytes or len(value) != 8:
        raise ValueError(f"{name} must be 8 bytes, got {value!r}")


class RecordCache:
    """Records by oid and revision, shared by every connection of one database in a process.

    ``size`` bounds the bytes held (records plus ``ENTRY_OVERHEAD`` each); ``path``, when
    given, is the file the cache is read from now and saved to by :meth:`save` and
    :meth:`close` (see the module docstring for its format and what happens to a bad one).
    """

    def __init__(self, size: int = 64 << 20, path: str | os.PathLike[str] | None = None) -> None:
        if size < 0:
            raise ValueError(f"a record cache size cannot be negative, got {size}")
        self._size = size
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # one save at a time: replace_file's temporary name is per process
        self._current: dict[Oid, _Entry] = {}
        self._old: dict[Oid, dict[Tid, _Entry]] = {}
        self._lru: OrderedDict[_Entry, None] = OrderedDict()
        self._used = 0
        self._database_id = b""
        self._last_tid = z64
        self._last = 0  # last_tid as an integer, for load_before's "before <= last_tid + 1"
        self.hits = 0
        self.misses = 0
        self._closed = False
        self._path = None if path is None else os.fspath(path)
        self._lock_fd = -1
        self._generation = GENERATION.value
        if self._path is not None:
            self._open_file(self._path)

    # -- properties ---------------------------------------------------------------------------

    @property
    def path(self) -> str | None:
        """The cache file, or None for a memory-only cache."""
        return self._path

    @property
    def writes_file(self) -> bool:
        """True when :meth:`save` writes the file (a path, its lock held, still open)."""
        return self._lock_fd >= 0 and not self._closed and self._generation == GENERATION.value

    @property
    def size(self) -> int:
        """The most bytes the cache holds (records plus ``ENTRY_OVERHEAD`` per revision)."""
        return self._size

    @property
    def used(self) -> int:
        """The bytes held now, counted as ``size`` counts them."""
        return self._used

    @property
    def database_id(self) -> bytes:
        """The id of the database the cached records come from; ``b""`` when unknown.

        Set by the user (at most 1024 bytes) and saved in the file; the cache never looks at it.
        """
        return self._database_id

    @database_id.setter
    def database_id(self, value: bytes) -> None:
        self._check_database_id(value)
        with self._lock:
            self._check_open()
            self._database_id = value

    @property
    def last_tid(self) -> Tid:
        """The newest tid the cache is consistent with (``z64`` for a new cache).

        Setting it is ``invalidate(value, ())``: it only moves forward (use :meth:`clear` to
        start over), and says that no cached oid changed in between.
        """
        return self._last_tid

    @last_tid.setter
    def last_tid(self, value: Tid) -> None:
        self.invalidate(value, ())

    def __len__(self) -> int:
        """The number of cached revisions (current and old)."""
        return len(self._lru)

    def __repr__(self) -> str:
        where = self._path if self._path is not None else "memory"
        return (
            f"<RecordCache {where}: {len(self._lru)} revisions, {self._used}/{self._size} bytes, "
            f"last_tid {oid_repr(self._last_tid)}>"
        )

    # -- reads --------------------------------------------------------------------------------

    def load(self, oid: Oid) -> tuple[bytes, Tid] | None:
        """``(record, start tid)`` of the current revision of ``oid``, or None if not cached."""
        # acquire/release rather than ``with``: about 100 ns less per call on CPython 3.11,
        # and this runs for every object any connection loads.
        lock = self._lock
        lock.acquire()
        try:
            entry = self._current.get(oid)
            if entry is not None:
                self._lru.move_to_end(entry)
                self.hits += 1
                return entry.record, entry.start
            # close() empties the cache, so checking for it here costs the hit path nothing.
            self._check_open()
            self.misses += 1
            return None
        finally:
            lock.release()

    def load_before(self, oid: Oid, before: Tid) -> tuple[bytes, Tid] | None:
        """``(record, start tid)`` of the revision a snapshot just below ``before`` sees.

        That is the entry with ``start < before`` that is old with ``before <= end``, or
        current with ``before <= last_tid + 1``.  None when no cached revision is known to
        be it.
        """
        _check_tid("before", before)
        before_int = int.from_bytes(before, "big")
        with self._lock:
            self._check_open()
            entry = self._current.get(oid)
            if entry is not None and entry.start < before and before_int <= self._last + 1:
                return self._hit(entry)
            olds = self._old.get(oid)
            if olds is not None:
                for entry in olds.values():
                    assert entry.end is not None
                    if entry.start < before <= entry.end:
                        return self._hit(entry)
            self.misses += 1
            return None

    def _hit(self, entry: _Entry) -> tuple[bytes, Tid]:
        self._lru.move_to_end(entry)
        self.hits += 1
        return entry.record, entry.start

    # -- writes -------------------------------------------------------------------------------

    def store(self, oid: Oid, tid: Tid, record: bytes, end: Tid | None = None) -> None:
        """Cache the revision of ``oid`` that transaction ``tid`` wrote.

        With ``end`` None it is the *current* revision as of ``last_tid``, replacing an
        older current entry of ``oid``.  With ``end`` it is an old revision, seen by
        snapshots ``tid <= s < end``.  A revision bigger than the whole cache is not kept.

        A current store with ``tid > last_tid`` is refused silently.  The caller read the
        record from the server, which may be ahead of the invalidations this cache has
        applied: the record was written by a transaction whose invalidation is still on its
        way, and when it comes, ``invalidate`` would end this revision at its own start
        (or, worse, the invalidation would have been applied before and the revision would
        be taken for current forever after a later one).  Not caching is always correct.

        What the cache cannot detect is the other side of that race: a record read from
        the server *before* an invalidation that the cache applied while the reply was in
        flight (the oid was not cached, so there was nothing to end), stored afterwards with
        a ``tid <= last_tid`` that is no longer current.  The caller must order its stores
        with its invalidations (apply replies and invalidations in the order the server sent
        them, or hold its own lock across both); the cache refuses only the one stale
        current store it can see, a revision it already holds as ended by ``last_tid``.
        """
        _check_tid("oid", oid)
        _check_tid("tid", tid)
        if end is not None:
            _check_tid("end", end)
            if end <= tid:
                raise ValueError(
                    f"an old revision must end after it starts: {oid_repr(tid)} >= {oid_repr(end)}"
                )
        charge = len(record) + ENTRY_OVERHEAD
        with self._lock:
            self._check_open()
            if end is None:
                self._store_current(oid, tid, record, charge)
            else:
                self._store_old(oid, tid, end, record, charge)
            self._evict()

    def _store_current(self, oid: Oid, tid: Tid, record: bytes, charge: int) -> None:
        if tid > self._last_tid:
            return
        known = self._current.get(oid)
        if known is not None and known.start > tid:
            return  # we already hold a newer current revision: this one is stale
        olds = self._old.get(oid)
        if olds is not None:
            ended = olds.get(tid)
            if ended is not None:
                assert ended.end is not None
                if ended.end <= self._last_tid:
                    return  # this revision is known to have ended by last_tid: stale
                # Held as old with an end the cache has not reached yet: it becomes the current
                # entry instead (a revision is held once, so invalidate has no twin to meet).
                self._remove(ended)
        if known is not None:
            self._remove(known)
        if charge > self._size:
            return
        self._insert(_Entry(oid, tid, None, record), charge)

    def _store_old(self, oid: Oid, tid: Tid, end: Tid, record: bytes, charge: int) -> None:
        current = self._current.get(oid)
        if current is not None and current.start == tid:
            if end > self._last_tid:
                return  # the current entry already answers for these snapshots
            # The caller says this revision ended by last_tid, which the current entry
            # denies: one of the two facts is wrong, and forgetting is always safe.
            self._remove(current)
        olds = self._old.get(oid)
        if olds is not None:
            known = olds.get(tid)
            if known is not None:
                self._remove(known)
        if charge > self._size:
            return
        self._insert(_Entry(oid, tid, end, record), charge)

    def invalidate(self, tid: Tid, oids: Iterable[Oid]) -> None:
        """Transaction ``tid`` changed ``oids``: end their current revisions there, then
        make ``tid`` the cache's ``last_tid``, all in one step.

        The ended revisions stay cached for older snapshots.  ``tid`` must not be below
        ``last_tid`` (ValueError, nothing changed); oids not cached are ignored.  Call it
        for every transaction, in order: an oid listed here is taken to have changed at
        exactly ``tid``.
        """
        _check_tid("tid", tid)
        oids = tuple(oids)  # iterate before locking: a generator may call back into the cache
        with self._lock:
            self._check_open()
            if tid < self._last_tid:
                raise ValueError(
                    f"invalidation at {oid_repr(tid)} is older than the cache's last tid "
                    f"{oid_repr(self._last_tid)}"
                )
            current_map = self._current
            for oid in oids:
                entry = current_map.get(oid)
                if entry is None or entry.start >= tid:
                    continue  # not cached, or the revision tid itself wrote: still current
                del current_map[oid]
                entry.end = tid
                self._old.setdefault(oid, {})[entry.start] = entry
            self._last_tid = tid
            self._last = int.from_bytes(tid, "big")

    def drop(self, oids: Iterable[Oid]) -> None:
        """Forget every cached revision of ``oids``."""
        oids = tuple(oids)
        with self._lock:
            self._check_open()
            for oid in oids:
                entry = self._current.get(oid)
                if entry is not None:
                    self._remove(entry)
                olds = self._old.get(oid)
                if olds is not None:
                    for entry in list(olds.values()):
                        self._remove(entry)

    def clear(self, database_id: bytes | None = None, last_tid: Tid = z64) -> None:
        """Forget every revision; set ``last_tid``, and ``database_id`` unless it is None."""
        _check_tid("last_tid", last_tid)
        if database_id is not None:
            self._check_database_id(database_id)
        with self._lock:
            self._check_open()
            self._forget_all()
            if database_id is not None:
                self._database_id = database_id
            self._last_tid = last_tid
            self._last = int.from_bytes(last_tid, "big")

    # -- bookkeeping (callers hold self._lock) --------------------------------------------------

    def _insert(self, entry: _Entry, charge: int) -> None:
        if entry.end is None:
            self._current[entry.oid] = entry
        else:
            self._old.setdefault(entry.oid, {})[entry.start] = entry
        self._lru[entry] = None
        self._used += charge

    def _remove(self, entry: _Entry) -> None:
        del self._lru[entry]
        self._used -= len(entry.record) + ENTRY_OVERHEAD
        if entry.end is None:
            del self._current[entry.oid]
            return
        olds = self._old[entry.oid]
        del olds[entry.start]
        if not olds:
            del self._old[entry.oid]

    def _evict(self) -> None:
        lru = self._lru
        while self._used > self._size:
            self._remove(next(iter(lru)))

    def _forget_all(self) -> None:
        self._current.clear()
        self._old.clear()
        self._lru.clear()
        self._used = 0

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")

    @staticmethod
    def _check_database_id(value: bytes) -> None:
        if type(value) is not bytes or len(value) > MAX_DATABASE_ID:
            raise ValueError(
                f"database_id must be bytes of at most {MAX_DATABASE_ID} bytes, got {value!r:.80}"
            )

    # -- the file -----------------------------------------------------------------------------

    def _open_file(self, path: str) -> None:
        try:
            fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            self._warn(f"its lock file cannot be opened ({exc}); running in memory only, never saving")
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _BUSY:
                problem = "another cache (in this or another process) has it open"
            else:
                problem = f"its lock file cannot be locked ({exc})"
            self._warn(f"{problem}; running in memory only, never saving")
            return
        try:
            self._read_file(path)
        except _UnreadableFileError as exc:
            os.close(fd)
            self._warn(f"{exc}; running in memory only, never saving")
            return
        except _BadFileError as exc:
            self._forget_all()
            self._database_id = b""
            self._last_tid = z64
            self._last = 0
            try:
                self._warn(f"{exc}; starting empty")
            except BaseException:
                # Warnings turned into errors: no cache comes out, so none may keep the lock.
                os.close(fd)
                raise
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        close_in_children(fd)

    def _warn(self, message: str) -> None:
        # stacklevel 4: _warn, _open_file, __init__, then the code that made the cache.
        warnings.warn(CacheFileWarning(f"record cache file {self._path}: {message}"), stacklevel=4)

    def _read_file(self, path: str) -> None:
        try:
            # Non-blocking, so a FIFO planted at the path cannot hang the constructor.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _UnreadableFileError(f"it cannot be read ({exc})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _UnreadableFileError("it is not a regular file")
            length = info.st_size
            limit = self._size + _MAX_FILE_EXTRA
            if length > limit:
                raise _BadFileError(
                    f"it is {length} bytes, more than a cache of size {self._size} writes ({limit})"
                )
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(length)
        except OSError as exc:
            raise _UnreadableFileError(f"it cannot be read ({exc})") from None
        finally:
            os.close(fd)
        if len(data) != length:
            raise _BadFileError(f"it changed while being read ({len(data)} of {length} bytes)")
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        if not data:
            raise _BadFileError("it is empty")
        if data[: len(MAGIC)] != MAGIC:
            raise _BadFileError("it is not a record cache file (no magic)")
        if len(data) < _HEADER.size + _DIGEST_SIZE:
            raise _BadFileError(f"it is truncated ({len(data)} bytes)")
        _, version, last_tid, id_length = _HEADER.unpack_from(data)
        if version != FORMAT_VERSION:
            raise _BadFileError(
                f"it has format version {version}; this AmberDB reads version {FORMAT_VERSION}"
            )
        body_end = len(data) - _DIGEST_SIZE
        if hashlib.sha256(memoryview(data)[:body_end]).digest() != data[body_end:]:
            raise _BadFileError("its checksum does not match (damaged or truncated)")
        position = _HEADER.size
        if id_length > MAX_DATABASE_ID or position + id_length > body_end:
            raise _BadFileError(f"its database id length {id_length} is impossible")
        database_id = data[position : position + id_length]
        position += id_length
        last = int.from_bytes(last_tid, "big")
        # Staged apart from the cache: nothing is installed unless the whole file is sound.
        current: dict[Oid, _Entry] = {}
        old: dict[tuple[Oid, Tid], _Entry] = {}
        order: list[_Entry] = []
        while position < body_end:
            if body_end - position < _ENTRY.size:
                raise _BadFileError(f"an entry at offset {position} is cut short")
            oid, start, end, record_length = _ENTRY.unpack_from(data, position)
            position += _ENTRY.size
            if record_length > body_end - position:
                raise _BadFileError(
                    f"the entry at offset {position - _ENTRY.size} claims {record_length} bytes"
                )
            record = data[position : position + record_length]
            position += record_length
            if end == z64:
                if int.from_bytes(start, "big") > last or oid in current:
                    raise _BadFileError(f"the current entry for oid {oid_repr(oid)} is impossible")
                entry = _Entry(oid, start, None, record)
                current[oid] = entry
            else:
                if end <= start or (oid, start) in old:
                    raise _BadFileError(
                        f"the old entry for oid {oid_repr(oid)} at {oid_repr(start)} is impossible"
                    )
                entry = _Entry(oid, start, end, record)
                old[oid, start] = entry
            order.append(entry)
        for entry in order:
            current_entry = current.get(entry.oid)
            if entry.end is not None and current_entry is not None and current_entry.start == entry.start:
                raise _BadFileError(f"oid {oid_repr(entry.oid)} has one revision both current and old")
        self._database_id = database_id
        self._last_tid = last_tid
        self._last = last
        for entry in order:
            charge = len(entry.record) + ENTRY_OVERHEAD
            if charge <= self._size:
                self._insert(entry, charge)
                self._evict()

    def save(self) -> None:
        """Write the cache to its file now, replacing it atomically.

        A no-op for a memory-only cache (no path, or another cache holds the file's lock)
        and in a child process after a fork.
        """
        with self._save_lock:
            self._save()

    def _save(self) -> None:
        with self._lock:
            self._check_open()
            if not self.writes_file:
                return
            parts = [
                _HEADER.pack(MAGIC, FORMAT_VERSION, self._last_tid, len(self._database_id)),
                self._database_id,
            ]
            pack = _ENTRY.pack
            for entry in self._lru:
                end = z64 if entry.end is None else entry.end
                parts.append(pack(entry.oid, entry.start, end, len(entry.record)))
                parts.append(entry.record)
        # Joining, hashing and writing happen outside the lock: loads go on meanwhile.
        body = b"".join(parts)
        assert self._path is not None
        replace_file(self._path, body + hashlib.sha256(body).digest(), mode=0o600)

    def close(self) -> None:
        """Save the file, release its lock and forget everything; later calls raise
        ValueError (except ``close``, ``len`` and the counters).  Idempotent."""
        with self._save_lock:
            if self._closed:
                return
            try:
                self._save()
            finally:
                with self._lock:
                    self._closed = True
                    self._forget_all()
                    fd, self._lock_fd = self._lock_fd, -1
                if fd >= 0 and self._generation == GENERATION.value:
                    forget_in_children(fd)
                    os.close(fd)
