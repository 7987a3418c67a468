"""Helper for test_pack.py: a writer process that packs, for crash and follower tests.

Usage: ``python pack_child.py MODE PATH PACK_TID_HEX [ARG]``.  Lines on stdout are flushed
only after the storage call they report returned.

``kill PATH TID POINT``
    Open PATH, start a thread committing new objects (``ok TIDHEX OID`` after each
    finish; oid ``COMMIT_BASE + i`` holds :func:`commit_record`), then pack at TID and
    SIGKILL this process at the pack step POINT (see ``_pack_point`` in storage.py).
``delay PATH TID``
    The same, but pack to the end; the test kills the process after a random delay.
``serve PATH TID``
    Print ``ready``; on each stdin line: ``pack`` packs at TID and prints ``packed``;
    ``commit N`` commits oid ``COMMIT_BASE + N`` and prints ``ok TIDHEX OID``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from amberdb.record import encode_record
from amberdb.storage.base import TransactionMeta
from amberdb.storage.file import FileStorage
from amberdb.storage.file import storage as storage_module
from amberdb.utils import p64, z64

COMMIT_BASE = 1 << 40


def commit_record(i: int) -> bytes:
    return encode_record("t:Commit", [], b"commit %d" % i)


def say(line: str) -> None:
    # One write(2) per line: lines of the two threads never interleave (a pipe write this
    # small is atomic), and nothing waits in a buffer when the process is killed.
    os.write(1, (line + "\n").encode())


def commit_one(fs: FileStorage, i: int) -> None:
    oid = p64(COMMIT_BASE + i)
    fs.begin(TransactionMeta(description=f"during pack {i}"))
    fs.store(oid, z64, commit_record(i))
    fs.vote()
    tid = fs.finish()
    say(f"ok {tid.hex()} {COMMIT_BASE + i}")


def committer(fs: FileStorage, stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        commit_one(fs, i)
        i += 1


def main() -> None:
    mode, path, tid_hex = sys.argv[1:4]
    pack_tid = bytes.fromhex(tid_hex)
    fs = FileStorage(path)
    if mode == "serve":
        say("ready")
        for line in sys.stdin:
            words = line.split()
            if words[0] == "pack":
                fs.pack(pack_tid)
                say("packed")
            elif words[0] == "commit":
                commit_one(fs, int(words[1]))
        fs.close()
        return
    if mode == "kill":
        point = sys.argv[4]

        def hook(name: str) -> None:
            if name == point:
                os.kill(os.getpid(), signal.SIGKILL)

        storage_module._pack_point = hook  # type: ignore[attr-defined]
    stop = threading.Event()
    thread = threading.Thread(target=committer, args=(fs, stop), daemon=True)
    thread.start()
    say("packing")
    fs.pack(pack_tid)
    say("packed")
    stop.set()
    thread.join()
    fs.close()
    say("closed")


if __name__ == "__main__":
    main()
