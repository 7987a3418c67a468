"""The parts of ``ZODB`` the BTrees tests use, answered by AmberDB (peer tests only).

BTrees' persistence and conflict tests open ``DB(MappingStorage())``, commit with
``transaction`` and catch ``ZODB.POSException`` errors.  A ZODB user moving to AmberDB keeps
such code and changes the imports, so the tests run on ``amberdb.DB`` over a
``MemoryStorage`` (``MappingStorage`` here), AmberDB's ``FileStorage`` and AmberDB's
exceptions.  Only these modules exist; a test importing more of ZODB (its test storages, for
instance) fails and is excluded as needing ZODB itself.  Also keeps the real ZODB, which the
test extra installs, from being imported next to the ``transaction`` and ``BTrees`` shims.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import amberdb
import amberdb.btrees
import amberdb.exceptions


def _module(name: str, doc: str, **names: Any) -> ModuleType:
    """Register ``ZODB.<name>`` in ``sys.modules`` with ``names`` (no import hook needed)."""
    module = ModuleType(f"{__name__}.{name}", doc)
    vars(module).update(names)
    sys.modules[module.__name__] = module
    return module


def _mapping_db(*args: Any, **kwargs: Any) -> amberdb.DB:
    """``ZODB.MappingStorage.DB()``: a database on a new in-memory storage."""
    return amberdb.DB(amberdb.MemoryStorage(), *args, **kwargs)


DB = amberdb.DB
# Registered, not set as attributes: ``from ZODB import DB`` must stay the class, as in ZODB.
_module("DB", "ZODB.DB", DB=amberdb.DB)
_module("MappingStorage", "ZODB.MappingStorage", MappingStorage=amberdb.MemoryStorage, DB=_mapping_db)
_module("FileStorage", "ZODB.FileStorage", FileStorage=amberdb.FileStorage)
_module(
    "POSException",
    "ZODB.POSException",
    BTreesConflictError=amberdb.btrees.BTreesConflictError,
    **{name: getattr(amberdb.exceptions, name) for name in amberdb.exceptions.__all__},
)
