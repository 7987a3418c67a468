"""``BTrees`` as a ZODB user imports it, answered by :mod:`amberdb.btrees` (peer tests only).

This package is on ``sys.path`` only in the subprocess that runs BTrees' own test suite
(see ``tests/peer/runner.py``); nothing else in AmberDB's tests sees it.  It renames, it does
not implement: every class and function is AmberDB's object itself, so a test that fails here
fails on AmberDB's behaviour.

What the real package's ``__init__`` does and this one mirrors:

* one module per family, ``BTrees.OOBTree`` …, registered in ``sys.modules`` (as BTrees' own
  ``create_module`` does), generated from :data:`ALL_FAMILIES` for the families
  ``amberdb.btrees.FAMILIES`` has; the others are listed in :data:`MISSING_FAMILIES` and the
  runner reports them;
* each name under both spellings, ``OOBTree`` and ``OOBTreePy``: AmberDB has one
  implementation, and with the two names the same object the test builder creates each test
  class once (its ``_needs_test`` de-duplicates by class);
* each module's ``__all__``, listing what the real one would, where AmberDB has it;
* the zope.interface declarations (``classImplements(OOBTree, IBTree)``, the module
  providing ``IOOBTreeModule``): they are wiring of the real package, AmberDB does not depend
  on zope.interface, and without them ``verifyObject`` would stop at "does not implement"
  instead of checking the methods;
* ``_to_key``/``_to_value`` on each class: the test builder learns the key and value types
  (ranges, example keys) from ``BTreePy._to_key``; these are the sdist's own descriptions and
  AmberDB never reads these names.

Deliberately *not* mirrored: ``collections.abc`` registration, ``max_leaf_size`` and anything
else a user's code would see; those are AmberDB's to provide.

The sdist's extracted ``tests/`` and support modules (``Interfaces``, ``_datatypes``,
``utils``, ``_compat``) are found through ``__path__``, after this folder.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

from zope.interface import classImplements, directlyProvides  # type: ignore[import-untyped]
from zope.interface.common.sequence import IMinimalSequence  # type: ignore[import-untyped]

import amberdb.btrees
import amberdb.btrees.length
from amberdb.btrees._seq import RangeView

# The sdist's tests and support modules: extracted by tests/peer/sdists.py, named by the runner.
__path__.append(os.path.join(os.path.abspath(os.environ["AMBERDB_PEER_BTREES"]), "BTrees"))

# Found through __path__ just above (so invisible to a type checker: hence Any).
Interfaces: Any = importlib.import_module(f"{__name__}.Interfaces")
_datatypes: Any = importlib.import_module(f"{__name__}._datatypes")

#: Every family of BTrees 6.5 in its own order (``fs``, FileStorage's private 2-byte-key
#: family, is left out on purpose: it is not part of AmberDB's API).
ALL_FAMILIES = (
    "IO", "II", "IF", "IU", "UO", "UU", "UF", "UI",
    "LO", "LL", "LF", "LQ", "QO", "QQ", "QF", "QL",
    "OO", "OI", "OU", "OL", "OQ",
)  # fmt: skip

_FAMILIES = tuple(prefix for prefix in ALL_FAMILIES if prefix in amberdb.btrees.FAMILIES)
MISSING_FAMILIES = tuple(prefix for prefix in ALL_FAMILIES if prefix not in amberdb.btrees.FAMILIES)

family32 = amberdb.btrees.family32
family64 = amberdb.btrees.family64
for _family in (family32, family64):
    directlyProvides(_family, Interfaces.IBTreeFamily)
# keys(), values() and items() views: sequences, as the real package declares its results.
classImplements(RangeView, IMinimalSequence)

_KINDS = ("BTree", "Bucket", "Set", "TreeSet")
_INTERFACES = {
    "BTree": Interfaces.IBTree,
    "Bucket": Interfaces.IMinimalDictionary,
    "Set": Interfaces.ISet,
    "TreeSet": Interfaces.ITreeSet,
}
_OPERATIONS = ("union", "intersection", "difference", "weightedUnion", "weightedIntersection", "multiunion")
_BY_VALUE = {"II", "LL"}  # the real package declares IByValue on these only


def _alias(name: str, module: types.ModuleType) -> None:
    """Make ``BTrees.<name>`` import as ``module`` (and be an attribute of this package)."""
    sys.modules[f"{__name__}.{name}"] = module
    globals()[name] = module


def _family_module(prefix: str) -> types.ModuleType:
    family = amberdb.btrees.FAMILIES[prefix]
    module = types.ModuleType(
        f"{__name__}.{prefix}BTree", f"AmberDB's {prefix} family as BTrees.{prefix}BTree."
    )
    key_type = getattr(_datatypes, prefix[0])()
    value_type = getattr(_datatypes, prefix[1])().as_value_type()
    names: dict[str, Any] = {
        name: getattr(family, name) for name in dir(family) if not name.startswith("_")
    }  # the classes, the bound set operations, ``family``
    for kind in _KINDS:
        cls = getattr(family, kind)
        cls._to_key, cls._to_value = key_type, value_type
        names[prefix + kind] = cls
        classImplements(cls, _INTERFACES[kind])
        if prefix in _BY_VALUE and kind in ("BTree", "Bucket"):
            classImplements(cls, Interfaces.IByValue)
    for name, value in list(names.items()):
        setattr(module, name, value)
        setattr(module, name + "Py", value)
    # The real module's __all__: these names, where the module has them.
    public = (*_KINDS, *_OPERATIONS, *(prefix + kind for kind in _KINDS))
    vars(module)["__all__"] = [name for name in public if hasattr(module, name)]
    interface = getattr(Interfaces, f"I{key_type.long_name}{value_type.long_name}BTreeModule")
    directlyProvides(module, interface)
    return module


for _prefix in _FAMILIES:
    _alias(f"{_prefix}BTree", _family_module(_prefix))
# importlib: the attribute ``amberdb.btrees.check`` is the function, not the module.
_alias("check", importlib.import_module("amberdb.btrees.check"))
_alias("Length", amberdb.btrees.length)
