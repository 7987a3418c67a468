"""The lock file beside a data file (``path + ".lock"``): one writer, and readers that ask.

A writable FileStorage holds ``flock(LOCK_EX)`` on the lock file from before its first write
until it closes; the kernel drops the lock when the process dies, so a crashed writer never
leaves it behind.  The file holds the writer's pid (for error messages) on its first line,
and the writer's committed end on its second, rewritten at every finish: the offset below
which the data file no longer changes (see :func:`published_end`).

A read-only opener never takes the lock to read.  It only *asks* whether a writer is alive
when that changes how it reads the end of the file (see ``FileStorage``'s invariant I9):
it tries ``LOCK_SH | LOCK_NB`` and, if that succeeds, holds it while it looks, which keeps
any writer from opening meanwhile.  Writers therefore retry their own lock for a short
while instead of failing on the first refusal: a reader's look takes milliseconds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from amberdb.exceptions import StorageLockedError

__all__ = ["WRITER_PATIENCE", "acquire_writer_lock", "publish_end", "published_end", "writers_kept_out"]

WRITER_PATIENCE = 0.5
"""Seconds a writer keeps retrying a lock held by someone else before giving up."""
_RETRY_EVERY = 0.01
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def acquire_writer_lock(path: str) -> int:
    """Lock ``path + ".lock"`` exclusively and return its descriptor (StorageLockedError if busy)."""
    lock_path = path + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + WRITER_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in _BUSY:
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                holder = os.pread(fd, _PID_LINE, 0).decode("ascii", "replace").strip()
                os.close(fd)
                who = f" (pid {holder})" if holder.isdigit() else ""
                message = f"{path} is already open for writing by another process{who}"
                raise StorageLockedError(message) from None
            time.sleep(_RETRY_EVERY)
    try:
        # Overwrite, not truncate: freeing the file's block makes ext4 journal, which can take
        # milliseconds while other writes are in flight.  The blank end line hides the
        # previous writer's end from readers until this one publishes its own.
        pid_line = f"{os.getpid():>{_PID_LINE - 1}}\n".encode("ascii")
        os.pwrite(fd, pid_line + _NO_END, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


_PID_LINE = 12  # the pid, right-aligned, and a newline
_END_LINE = 16 + 8 + 1  # the end and its CRC-32 in hex, and a newline
_NO_END = b" " * (_END_LINE - 1) + b"\n"  # what published_end reads as unknown


def publish_end(fd: int, end: int) -> None:
    """Write the writer's committed end into its lock file (descriptor ``fd``).

    With a CRC, so a reader that reads it half-rewritten sees nothing rather than a number.
    """
    digits = b"%016x" % end
    os.pwrite(fd, digits + b"%08x\n" % zlib.crc32(digits), _PID_LINE)


def published_end(path: str) -> int | None:
    """The committed end a live writer of ``path`` last published, or None if unknown.

    Below it the writer never writes again (append only), so damage a reader finds there is
    damage, not a transaction in flight.  It only grows; a reader may see an older value.
    """
    try:
        with open(path + ".lock", "rb") as f:
            line = f.read(_PID_LINE + _END_LINE)[_PID_LINE:]
    except OSError:
        return None
    digits, crc = line[:16], line[16:24]
    try:
        if len(line) != _END_LINE or int(crc, 16) != zlib.crc32(digits):
            return None
        return int(digits, 16)
    except ValueError:
        return None


@contextmanager
def writers_kept_out(path: str) -> Iterator[bool]:
    """Yield True while no writer can be alive (a shared lock held, or no lock file), else False.

    No lock file means no writer has ever opened the file, and a writer that starts now
    never aborts a transaction it did not vote itself.  A lock file this process cannot
    open answers False: when in doubt, assume a writer.
    """
    try:
        fd = os.open(path + ".lock", os.O_RDONLY)
    except FileNotFoundError:
        fd = -1
        free = True
    except OSError:
        fd = -1
        free = False
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            free = True
        except OSError as exc:
            if exc.errno not in _BUSY:
                os.close(fd)
                raise
            free = False
    try:
        yield free
    finally:
        if fd >= 0:
            os.close(fd)  # drops the shared lock
