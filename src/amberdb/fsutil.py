"""Durable file-system steps shared by the storages and the tools on top of them."""

from __future__ import annotations

import contextlib
import os

__all__ = ["fsync_directory", "replace_file"]


def fsync_directory(directory: str) -> None:
    """Make the entries of ``directory`` durable (a file created, renamed or removed there)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes, mode: int = 0o666) -> None:
    """Replace the file at ``path`` with ``data``, atomically and durably.

    The bytes go to a temporary file made fresh beside it -- whatever was at that name (a
    crash's leftover, a planted symlink) is removed, never written through -- with ``mode``
    from the first byte, are synced, renamed over ``path``, and the directory is synced.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))
