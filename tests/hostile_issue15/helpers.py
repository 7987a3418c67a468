"""Shared helpers: raw records, throw-away application modules."""

from __future__ import annotations

import pickle
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import amberdb
from amberdb.persistent import _classes_by_name
from amberdb.record import encode_record
from amberdb.storage.base import TransactionMeta
from amberdb.utils import z64
from tests.hostile.assemble import op, program, text

PM = "amberdb.containers:PersistentMapping"


def write_raw(storage: Any, oid: bytes, record: bytes) -> None:
    """Commit ``record`` as the current revision of ``oid``, bypassing every check."""
    storage.begin(TransactionMeta())
    try:
        base = storage.load(oid)[1]
    except amberdb.POSKeyError:
        base = z64
    storage.store(oid, base, record)
    storage.vote()
    storage.finish()


def mapping_holding(value_ops: bytes) -> bytes:
    """A PersistentMapping record whose data is ``{"v": <value_ops>}`` (opcodes given raw)."""
    state = program(
        op("EMPTY_DICT"), text("data"), op("EMPTY_DICT"), text("v"), value_ops, op("SETITEM"), op("SETITEM")
    )
    return encode_record(PM, [], state)


def plain_record(class_name: str, state: Any) -> bytes:
    return encode_record(class_name, [], pickle.dumps(state, protocol=5))


@contextmanager
def app_module(name: str, source: str) -> Iterator[types.ModuleType]:
    """A module ``name`` made from ``source``, taken away (with its persistent classes) after."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(source, module.__dict__)
        yield module
    finally:
        forget(name)


def forget(name: str) -> None:
    """Take module ``name`` away: neither it nor its persistent classes can be found by name."""
    sys.modules.pop(name, None)
    for key in [key for key in _classes_by_name if key.startswith(name + ":")]:
        del _classes_by_name[key]


def redefine(module: types.ModuleType, source: str) -> None:
    """Replace the module's classes (a new deployment): old persistent classes forgotten."""
    forget(module.__name__)
    sys.modules[module.__name__] = module
    exec(source, module.__dict__)
