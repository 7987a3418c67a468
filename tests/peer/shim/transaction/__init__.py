"""``transaction`` as a ZODB user imports it, answered by :mod:`amberdb.transaction` (peer tests only).

On ``sys.path`` only in the subprocess that runs a peer suite (see ``tests/peer/runner.py``).
It renames, it does not implement:

* the package's public names are ``amberdb.transaction``'s own objects (``manager``,
  ``get``, ``commit``, ``TransactionManager`` …);
* ``transaction._transaction``, ``transaction._manager`` and ``transaction.weakset`` *are*
  AmberDB's modules (``sys.modules`` aliases, not copies), so a test that patches a module
  global patches AmberDB's, and a name AmberDB lacks fails the test that imports it;
* ``transaction.interfaces`` is the sdist's file, for the zope.interface declarations the
  tests verify against, with its exception classes replaced by AmberDB's (a test expecting
  ``TransientError`` must catch what AmberDB raises); an exception AmberDB does not have is
  removed, so the tests needing it fail instead of passing on the sdist's class.  The
  classes are declared to implement the interfaces here, as the real package's
  ``@implementer`` does: AmberDB does not depend on zope.interface.

The sdist's extracted ``tests/`` are found through ``__path__``, after this folder.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

from zope.interface import classImplements  # type: ignore[import-untyped]

import amberdb.exceptions
import amberdb.transaction
import amberdb.transaction._transaction
import amberdb.transaction.weakset

# The sdist's tests and interfaces module: extracted by tests/peer/sdists.py, named by the runner.
__path__.append(os.path.join(os.path.abspath(os.environ["AMBERDB_PEER_TRANSACTION"]), "transaction"))

globals().update({name: getattr(amberdb.transaction, name) for name in amberdb.transaction.__all__})


def _alias(name: str, module: ModuleType) -> None:
    """Make ``transaction.<name>`` import as ``module`` (and be an attribute of this package)."""
    sys.modules[f"{__name__}.{name}"] = module
    globals()[name] = module


_alias("_transaction", amberdb.transaction._transaction)
# importlib: the attribute ``amberdb.transaction.manager`` is the default manager, not the module.
_alias("_manager", importlib.import_module("amberdb.transaction.manager"))
_alias("weakset", amberdb.transaction.weakset)

# The sdist's file, found through __path__ (so invisible to a type checker: hence Any).
interfaces: Any = importlib.import_module(f"{__name__}.interfaces")

#: The real package's exception names that AmberDB spells differently.
RENAMED = {"NoTransaction": "NoTransactionError"}

for _name, _value in list(vars(interfaces).items()):
    if isinstance(_value, type) and issubclass(_value, Exception):
        _ours = getattr(amberdb.exceptions, RENAMED.get(_name, _name), None)
        if _ours is None:
            delattr(interfaces, _name)
        else:
            setattr(interfaces, _name, _ours)

for _cls, _interface in (
    (amberdb.transaction.Transaction, interfaces.ITransaction),
    (amberdb.transaction.TransactionManager, interfaces.ITransactionManager),
    (amberdb.transaction.ThreadTransactionManager, interfaces.ITransactionManager),
    (amberdb.transaction.Savepoint, interfaces.ISavepoint),
):
    classImplements(_cls, _interface)
