"""Application modules written into a temporary directory, and child processes that import them.

The classes of an application live in modules the tests write (``write_module``) and delete
(``delete_module``) between processes, so each process sees the software version the test
wants.  Children run ``PRELUDE`` + their code with ``sys.executable``, ``PYTHONPATH`` being
``src`` and the module directory, and report a JSON value as their last stdout line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

from amberdb import DB, Persistent
from amberdb.serialize import ObjectReader
from tests.server.procs import Processes, finish, read_until

PRELUDE = """\
import json, os, sys, time
import amberdb
import amberdb.transaction as transaction
from amberdb.utils import oid_repr, p64, u64


def out(value):
    print(json.dumps(value), flush=True)


"""


def write_module(directory: Path, name: str, source: str) -> Path:
    """Write module ``name`` (dedented ``source``) into ``directory``; no stale bytecode."""
    shutil.rmtree(directory / "__pycache__", ignore_errors=True)
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def delete_module(directory: Path, name: str) -> None:
    """Remove module ``name`` from ``directory`` (and its bytecode)."""
    shutil.rmtree(directory / "__pycache__", ignore_errors=True)
    (directory / f"{name}.py").unlink()


def child_code(code: str) -> str:
    return PRELUDE + textwrap.dedent(code)


def run_child(procs: Processes, modules: Path, code: str, *args: Any, timeout: float = 60.0) -> Any:
    """Run a child to its end; the JSON value of its last stdout line (it must exit 0)."""
    done = procs.run(child_code(code), *map(str, args), timeout=timeout, extra_path=[modules])
    status, out, err = done.returncode, done.stdout, done.stderr
    assert status == 0, f"child failed ({status}):\n{out[-3000:]}\n{err[-6000:]}"
    return json.loads(out.strip().splitlines()[-1])


def spawn_child(procs: Processes, modules: Path, code: str, *args: Any) -> subprocess.Popen[str]:
    """Start a child (killed at the end of the test if still running)."""
    return procs.spawn(child_code(code), *map(str, args), extra_path=[modules])


def result_of(proc: subprocess.Popen[str], timeout: float = 60.0) -> Any:
    """Wait for a spawned child; the JSON value of its last stdout line (it must exit 0)."""
    status, out, err = finish(proc, timeout)
    assert status == 0, f"child failed ({status}):\n{out[-3000:]}\n{err[-6000:]}"
    return json.loads(out.strip().splitlines()[-1])


def _no_references(oid: bytes, name: str) -> Persistent:
    raise AssertionError(f"the state refers to oid {oid.hex()} ({name}); expected plain data")


def state_reader(db: DB) -> ObjectReader:
    """Reads the states of records that refer to no other object, without a connection."""
    return ObjectReader(db.class_resolver, _no_references)


def wait_ready(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Wait for the child's ``READY`` line; a child that exits first fails with its stderr."""
    try:
        read_until(proc, "READY", timeout=timeout)
    except AssertionError as exc:
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        raise AssertionError(f"{exc}\nexit status {proc.returncode}, stderr:\n{err[-6000:]}") from None
