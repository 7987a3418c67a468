"""Telling a storage that it was inherited through ``os.fork()``.

A child process gets copies of its parent's storages: the same file descriptors, the same
lock, the same idea of where the file ends.  If both processes commit, each appends at the
end it remembers and one overwrites the other's acknowledged transaction.  So a storage
must refuse to work in a child and say why.

Each process has a *generation*: 0 where this module was first imported, one more in every
child right after ``fork()`` (an ``os.register_at_fork`` hook).  A storage notes the
generation it was opened in; comparing two integers is all its hot path pays, with no
``getpid()`` system call per load.

Descriptors registered with :func:`close_in_children` (a writer's lock file) are closed in
every child right after the fork.  A ``flock`` belongs to the open file description, which
the parent still holds, so the parent keeps its lock; but a long-lived child (a worker
pool) no longer pins the lock after the parent closed the storage.
"""

from __future__ import annotations

import os

__all__ = ["GENERATION", "ProcessGeneration", "close_in_children", "forget_in_children"]


class ProcessGeneration:
    """How many forks separate this process from the one that imported this module."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


GENERATION = ProcessGeneration()
"""Read ``GENERATION.value``; only the fork hook changes it."""

_close_in_children: set[int] = set()


def close_in_children(fd: int) -> None:
    """Close ``fd`` in every child forked from now on (until :func:`forget_in_children`)."""
    _close_in_children.add(fd)


def forget_in_children(fd: int) -> None:
    """Stop closing ``fd`` in children (call before closing it in this process)."""
    _close_in_children.discard(fd)


def _after_fork_in_child() -> None:
    GENERATION.value += 1
    for fd in list(_close_in_children):
        try:
            os.close(fd)
        except OSError:  # pragma: no cover - already closed; nothing else to do in a fork hook
            pass
    _close_in_children.clear()


if hasattr(os, "register_at_fork"):  # every POSIX system; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
