"""``persistent`` as the BTrees tests import it, answered by AmberDB (peer tests only).

The tests subclass ``persistent.Persistent`` together with a tree class and update trees
from a ``persistent.mapping.PersistentMapping``; a ZODB user moving to AmberDB changes these
imports to AmberDB's classes, so the tests do too.
"""

from __future__ import annotations

import sys
from types import ModuleType

import amberdb

Persistent = amberdb.Persistent

for _name, _cls in (("mapping", amberdb.PersistentMapping), ("list", amberdb.PersistentList)):
    _module = ModuleType(f"{__name__}.{_name}")
    setattr(_module, _cls.__name__, _cls)
    sys.modules[_module.__name__] = _module
    globals()[_name] = _module
