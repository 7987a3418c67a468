"""Objects <-> records: pickled state, references by oid, and an allow-list for loading.

Loading a record never imports or calls anything the application did not allow.  Every
class or function a record names goes through :class:`ClassResolver`, which accepts only:

1. persistent classes already defined in this process (including aliases left in an
   imported module after a rename: ``from catalog import Publication as Book``);
2. classes and functions the application registered (``DB(allowed_classes=...)``);
3. names in modules the application listed (``DB(allowed_modules=["myapp"])``);
4. a fixed set of safe standard types (:data:`SAFE_GLOBALS`): containers, ``datetime``,
   ``decimal``, ``fractions``, ``uuid``, ``pathlib`` paths, ``zoneinfo``;
5. the BTrees families ``amberdb.btrees.family32`` and ``family64``, loaded as themselves.

Anything else, ``os.system`` or ``builtins.eval`` for instance, raises
:class:`~amberdb.exceptions.UnsafeGlobalError` naming the global and the oid before it is
called.  A name is looked up only in a module already imported, in AmberDB's own modules
that define persistent classes, or in an allowed module; a module path with a ``__main__``
part is never imported, and a name reached through a dunder attribute or defined outside
the allowed modules (``myapp.os.system``) is refused.  How the state itself is unpickled
safely -- no imports, no extension codes, bounded memory -- is :mod:`amberdb.unpickler`'s job.

The writer applies the same rules when committing, so a value that could not be loaded back
is refused at commit time, naming the attribute that holds it.
"""

from __future__ import annotations

import copyreg
import importlib
import io
import pickle
import sys
import types
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import Any

from amberdb.broken import Broken, BrokenValue, broken_class
from amberdb.checked_unpickler import BIG_INT_BITS
from amberdb.exceptions import RecordDecodeError, SerializationError, UnsafeGlobalError
from amberdb.persistent import (
    CLASS_DEFINITIONS,
    Persistent,
    class_name,
    persistent_class_named,
    versioned_state,
)
from amberdb.persistent import _classes_by_name as _persistent_classes
from amberdb.record import (
    REFERENCE_GLOBAL,
    REFERENCE_IN_MEMO,
    RecordHeader,
    decode_header,
    encode_record,
    ref,
)
from amberdb.unpickler import ImportRefusedError, install_import_guard, load_state, permitted_import
from amberdb.utils import Oid, oid_repr

__all__ = [
    "SAFE_GLOBALS",
    "ClassResolver",
    "ObjectReader",
    "ObjectWriter",
    "is_own_module",
    "normalize_class_name",
]

PICKLE_PROTOCOL = 5

# Types whose instances the pickler writes without naming any global.
_PLAIN_TYPES: frozenset[type] = frozenset(
    {str, int, float, bool, type(None), bytes, tuple, list, dict, set, frozenset}
)
_GLOBAL_TYPES = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def _split(name: str) -> tuple[str, str]:
    module, _, qualname = name.partition(":")
    return module, qualname


def normalize_class_name(name: Any) -> str:
    """``"module:qualname"`` for a class, ``"module.Name"`` or ``"module:qualname"``.

    A dotted name splits at its last dot (``"pkg.mod.Cls"`` is module ``pkg.mod``); name a
    nested class as ``"pkg.mod:Outer.Inner"``.
    """
    if isinstance(name, type):
        return class_name(name)
    if not isinstance(name, str):
        raise TypeError(f"a class name must be a str or a class, not {type(name).__qualname__}")
    if ":" in name:
        module, qualname = _split(name)
    else:
        module, _, qualname = name.rpartition(".")
    parts = qualname.split(".")
    if (
        not module
        or not qualname
        or any(not part.isidentifier() for part in parts)
        or not all(part.isidentifier() for part in module.split("."))
    ):
        raise ValueError(
            f"{name!r} is not a class name: give 'package.module.Class' or 'package.module:Outer.Inner'"
        )
    return f"{module}:{qualname}"


def is_own_module(module: str) -> bool:
    """Whether ``module`` is AmberDB's own (its classes cannot be renamed)."""
    return module == "amberdb" or module.startswith("amberdb.")


def _refused_qualname(qualname: str) -> bool:
    """A dunder or ``<locals>`` part: no record may name it (it leads out of the module)."""
    return any(part.startswith(("<", "__")) for part in qualname.split("."))


class _MissingGlobalError(UnsafeGlobalError):
    """A global that cannot be found (its module or attribute is missing), as opposed to refused."""


_MAX_ALIAS_CHAIN = 32


def _lookup(module_obj: Any, qualname: str) -> Any:
    obj = module_obj
    for part in qualname.split("."):
        # "<locals>" parts cannot be looked up; dunder parts lead out of the module
        # (Model.__init__.__globals__ is every name the module can see).
        if part.startswith(("<", "__")):
            raise AttributeError(qualname)
        obj = getattr(obj, part)
    return obj


SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("builtins", name) for name in (
        "bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list",
        "object", "range", "set", "slice", "str", "tuple",
    )]
    + [("collections", name) for name in ("Counter", "OrderedDict", "defaultdict", "deque")]
    + [("datetime", name) for name in ("date", "datetime", "time", "timedelta", "timezone")]
    + [("decimal", "Decimal"), ("fractions", "Fraction"), ("uuid", "UUID"), ("uuid", "SafeUUID")]
    + [("pathlib", name) for name in ("PurePath", "PurePosixPath", "PureWindowsPath", "Path", "PosixPath")]
    + [("zoneinfo", "ZoneInfo"), ("zoneinfo", "ZoneInfo._unpickle")]
)  # fmt: skip
"""Standard globals every database may load: plain data types that run no user code."""

# Imported now, once: a record may name them at any time, and a load imports nothing.
_SAFE_OBJECTS: dict[tuple[str, str], Any] = {
    (module, name): _lookup(importlib.import_module(module), name) for module, name in SAFE_GLOBALS
}

# AmberDB's own modules whose persistent classes (BTrees, containers) a record may name
# before the application imported them: importing them only defines classes.
_LOADABLE_OWN_MODULES = frozenset(
    {
        "amberdb.btrees",
        "amberdb.btrees._leaves",
        "amberdb.btrees._tree",
        "amberdb.btrees.length",
        "amberdb.containers",
        "amberdb.metadata",
    }
)


# AmberDB's own module-level values a record may name: it loads as that very object (no
# call, no state).  BTrees' family32 and family64 pickle so (``self.family = family64``).
_LOADABLE_OWN_VALUES = frozenset({("amberdb.btrees", "family32"), ("amberdb.btrees", "family64")})


def _is_own_value(obj: Any) -> bool:
    """Whether ``obj`` is one of :data:`_LOADABLE_OWN_VALUES`."""
    for module, name in _LOADABLE_OWN_VALUES:
        imported = sys.modules.get(module)
        if imported is not None and getattr(imported, name, None) is obj:
            return True
    return False


def _never_imported(module: str) -> bool:
    """A module path that running code must never import on behalf of a record."""
    return "__main__" in module.split(".")


def _defining_module(obj: Any) -> str | None:
    """The module that defines ``obj`` (a class or function), or its class's module."""
    if isinstance(obj, types.ModuleType):
        return None
    owner = obj if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)) else type(obj)
    module = getattr(owner, "__module__", None)
    return module if isinstance(module, str) else None


class ClassResolver:
    """Turns the global names records mention into classes, following the allow-list."""

    def __init__(
        self,
        allowed_modules: Iterable[str] = (),
        allowed_classes: Iterable[Any] | Mapping[str, Any] = (),
    ) -> None:
        if isinstance(allowed_modules, str):
            allowed_modules = [allowed_modules]
        self._allowed_modules = tuple(allowed_modules)
        self._registered: dict[str, Any] = {}
        self._found: dict[tuple[str, str], Any] = {}
        self._persistent_found: dict[str, type[Persistent]] = {}
        # Globals a load may use as they are (no persistent classes: see _LoadFinder).
        self._load_found: dict[tuple[str, str], Any] = {}
        # Renamed classes: old "module:qualname" -> new name or class.  This process's own
        # (DB(class_aliases=...)) win over those recorded in the database.
        self._process_aliases: dict[str, Any] = {}
        self._stored_aliases: dict[str, str] = {}
        # Broken classes found, with what the process looked like then (see _broken_class).
        self._broken: dict[tuple[str, str, bool], tuple[type[Broken], tuple[int, int]]] = {}
        self._definitions_seen = CLASS_DEFINITIONS[0]
        if isinstance(allowed_classes, Mapping):
            for name, obj in allowed_classes.items():
                self.register(obj, name)
        else:
            for obj in allowed_classes:
                self.register(obj)

    def register(self, obj: Any, name: str | None = None) -> None:
        """Allow ``obj`` (a class or function) to be loaded, under its own name or ``name``.

        ``name`` is ``"module:qualname"`` (or ``"module.qualname"``); use it to load records
        written under an old name after a class was renamed or moved.
        """
        if name is None:
            name = f"{obj.__module__}:{obj.__qualname__}"
        elif ":" not in name:
            module, _, attr = name.rpartition(".")
            name = f"{module}:{attr}"
        self._registered[name] = obj
        self._forget_found()

    def _forget_found(self) -> None:
        self._found.clear()
        self._persistent_found.clear()
        self._load_found.clear()
        self._broken.clear()

    def set_aliases(self, aliases: Mapping[str, Any]) -> None:
        """This process's renamed classes: old name -> new name (or the class itself)."""
        normalized: dict[str, Any] = {}
        for old, new in aliases.items():
            normalized[normalize_class_name(old)] = (
                new if isinstance(new, type) else normalize_class_name(new)
            )
        self._process_aliases = normalized
        self._forget_found()

    def set_stored_aliases(self, aliases: Mapping[str, str]) -> None:
        """The renames recorded in the database (``db.rename_class``), replacing the last ones."""
        aliases = dict(aliases)
        if aliases != self._stored_aliases:
            self._stored_aliases = aliases
            self._forget_found()

    @property
    def aliases(self) -> dict[str, Any]:
        """Every rename in force: the database's, then this process's on top."""
        return {**self._stored_aliases, **self._process_aliases}

    def names_for(self, name: str) -> set[str]:
        """``name`` and every old name that resolves to it through the aliases."""
        found = {name}
        changed = True
        aliases = self.aliases
        while changed:
            changed = False
            for old, new in aliases.items():
                target = class_name(new) if isinstance(new, type) else new
                if target in found and old not in found:
                    found.add(old)
                    changed = True
        return found

    def _module_allowed(self, module: str) -> bool:
        return any(module == allowed or module.startswith(allowed + ".") for allowed in self._allowed_modules)

    def import_allowed(self, module: str) -> bool:
        """Whether a load may import ``module``: inside ``allowed_modules``, no ``__main__``."""
        return self._module_allowed(module) and not _never_imported(module)

    def find(self, module: str, qualname: str) -> Any:
        """The object a record names as ``module``/``qualname``; UnsafeGlobalError if not allowed."""
        key = (module, qualname)
        found = self._found.get(key)
        if found is not None:
            return found
        found = self._resolve(module, qualname)
        self._found[key] = found
        return found

    def _resolve(self, module: str, qualname: str) -> Any:
        name = f"{module}:{qualname}"
        # AmberDB's own names (the metadata holding the renames above all) are never renamed.
        chain = 0 if is_own_module(module) else _MAX_ALIAS_CHAIN
        for _ in range(chain):
            target = self._process_aliases.get(name)
            if target is None:
                target = self._stored_aliases.get(name)
            if target is None:
                break
            if isinstance(target, type):
                return target
            name = target
        else:
            if chain:
                raise UnsafeGlobalError(
                    f"the class renames starting at {module}.{qualname} go round in a circle"
                )
        module, qualname = _split(name)
        if name in self._registered:
            return self._registered[name]
        safe = _SAFE_OBJECTS.get((module, qualname))
        if safe is not None:
            return safe
        cls = persistent_class_named(name)
        if cls is not None:
            return cls
        refused_part = _refused_qualname(qualname)
        imported = sys.modules.get(module)
        if imported is None and module in _LOADABLE_OWN_MODULES:
            imported = permitted_import(module)
        if imported is not None:
            try:
                candidate = _lookup(imported, qualname)
            except AttributeError:
                candidate = _NOT_FOUND
            if isinstance(candidate, type) and issubclass(candidate, Persistent):
                return candidate
            if (module, qualname) in _LOADABLE_OWN_VALUES and candidate is not None:
                return candidate
            if candidate is _NOT_FOUND and not refused_part and not self.import_allowed(module):
                raise _MissingGlobalError(f"module {module} has no attribute {qualname}")
        if self.import_allowed(module):
            return self._resolve_allowed(module, qualname)
        if imported is None and not refused_part and not _never_imported(module):
            raise _MissingGlobalError(
                f"module {module} is not imported and not in allowed_modules "
                f"{list(self._allowed_modules)}, so it cannot be looked up"
            )
        raise UnsafeGlobalError(
            f"global {module}.{qualname} is not allowed to load; import the module that defines it "
            f"if it is a persistent class, or allow it with DB(..., allowed_modules=[{module!r}]) "
            f"or DB(..., allowed_classes=[...])"
        )

    def _resolve_allowed(self, module: str, qualname: str) -> Any:
        """A name in one of ``allowed_modules``, which must also be defined there."""
        if _refused_qualname(qualname):
            raise UnsafeGlobalError(f"global {module}.{qualname} cannot be loaded: a dunder or local name")
        try:
            imported = permitted_import(module)
        except ImportError as exc:
            raise _MissingGlobalError(f"module {module} cannot be imported: {exc}") from None
        try:
            found = _lookup(imported, qualname)
        except AttributeError:
            raise _MissingGlobalError(f"module {module} has no attribute {qualname}") from None
        owner = _defining_module(found)
        if owner is None or not self._module_allowed(owner):
            where = "a module" if owner is None else f"defined in {owner}"
            raise UnsafeGlobalError(
                f"global {module}.{qualname} is {where}, outside the allowed modules "
                f"{list(self._allowed_modules)}; allow it with DB(..., allowed_classes=[...])"
            )
        return found

    def persistent_class(self, name: str) -> type[Persistent]:
        """The persistent class a record names as ``"module:qualname"``.

        A name that cannot be found or loaded as a persistent class -- a deleted class, a
        module this process may not import, a global that is no persistent class -- gives
        a broken class standing in for it (:mod:`amberdb.broken`): nothing is imported or
        run, and only the objects of that class are affected.
        """
        if CLASS_DEFINITIONS[0] != self._definitions_seen:
            self._definitions_seen = CLASS_DEFINITIONS[0]
            self._forget_found()
        cls = self._persistent_found.get(name)
        if cls is not None:
            return cls
        module, qualname = _split(name)
        try:
            found = self.find(module, qualname)
        except UnsafeGlobalError as exc:
            return self._broken_class(module, qualname, str(exc), persistent=True)  # type: ignore[return-value]
        if not (isinstance(found, type) and issubclass(found, Persistent)):
            what = (
                "a broken class"
                if isinstance(found, type) and issubclass(found, Broken)
                else "not a persistent class"
            )
            return self._broken_class(module, qualname, f"{module}.{qualname} is {what}", persistent=True)  # type: ignore[return-value]
        self._persistent_found[name] = found
        return found

    def _broken_class(self, module: str, qualname: str, reason: str, persistent: bool) -> type[Broken]:
        """The broken class for ``module.qualname``, kept until an import or a rename may have
        changed things."""
        key = (module, qualname, persistent)
        epoch = (len(sys.modules), len(_persistent_classes))
        known = self._broken.get(key)
        if known is not None and known[1] == epoch:
            return known[0]
        cls = broken_class(module, qualname, reason, persistent)
        self._broken[key] = (cls, epoch)
        return cls

    def find_for_load(self, module: str, qualname: str) -> Any:
        """As :meth:`find`, but a global that cannot be found gives a broken value class."""
        try:
            return self.find(module, qualname)
        except _MissingGlobalError as exc:
            return self._broken_class(module, qualname, str(exc), persistent=False)

    def check_storable(self, obj: Any) -> None:
        """Raise SerializationError unless ``obj`` (a class or function) can be loaded back."""
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str):
            return  # pickle itself will refuse or name it; loading stays guarded by find()
        if "<" in qualname and not (isinstance(obj, type) and issubclass(obj, Persistent)):
            raise SerializationError(
                f"{module}.{qualname} is a lambda or is defined inside a function, so it cannot be "
                f"loaded back; store data (or a module-level class), not functions"
            )
        if (module, qualname) in _EXTENSION_NAMES:
            # The pickler would write its copyreg extension code, which loading refuses.
            raise SerializationError(
                f"{module}.{qualname} is registered with copyreg.add_extension, and records never "
                f"use extension codes; remove the registration to store it"
            )
        try:
            found = self.find(module, qualname)
        except UnsafeGlobalError as exc:
            raise SerializationError(str(exc)) from None
        if found is not obj and not _same_function(found, obj):
            raise SerializationError(f"global {module}.{qualname} does not name {obj!r}")


_NOT_FOUND: Any = object()


def _same_function(a: Any, b: Any) -> bool:
    # Bound class methods are new objects on each access; compare what they wrap.
    return (
        isinstance(a, types.MethodType)
        and isinstance(b, types.MethodType)
        and a.__func__ is b.__func__
        and a.__self__ is b.__self__
    )


def _check_fraction_size(value: Fraction) -> None:
    """Refuse a Fraction too big to load back in reasonable time (see BIG_INT_BITS)."""
    bits = max(value.numerator.bit_length(), value.denominator.bit_length())
    if bits > BIG_INT_BITS:
        raise SerializationError(
            f"a Fraction with a {bits}-bit numerator or denominator cannot be stored: records "
            f"keep Fractions of at most {BIG_INT_BITS} bits (loading a bigger one takes time "
            "quadratic in its size, which a hostile record could abuse); store its numerator "
            "and denominator as two ints"
        )


def _reduce_special_value(obj: Any) -> Any:
    """How the writer stores values whose own pickling loading would refuse, or NotImplemented."""
    if isinstance(obj, Fraction):
        _check_fraction_size(obj)
    elif type(obj) is zoneinfo.ZoneInfo and obj.key is not None:
        # ZoneInfo pickles as ZoneInfo._unpickle, a method of a C class reached through
        # builtins.getattr, which no record may call; ZoneInfo(key) gives the same zone (the
        # cached instance, also for one made with ZoneInfo.no_cache).
        return zoneinfo.ZoneInfo, (obj.key,)
    return NotImplemented


# Classes whose every instance goes through _reduce_special_value, subclasses included.
_SPECIAL_VALUE_TYPES = (Fraction, zoneinfo.ZoneInfo)


# copyreg's (module, name) -> extension code table, mutated in place, never replaced.
_EXTENSION_NAMES: dict[tuple[str, str], int] = getattr(copyreg, "_extension_registry")  # noqa: B009

_BIG_STATE = 4096  # bytes of pickle after which the next state gets a new pickler


# The memo every state starts with: ``ref`` at index 0, so references need no global.
_REFERENCE_MEMO = {id(ref): (0, ref)}


class _StatePickler(pickle.Pickler):
    """A pickler calling ``reduce`` for every value that is not a plain value or container."""

    def __init__(self, file: io.BytesIO, reduce: Callable[[Any], Any]) -> None:
        # Set before the C initializer runs: it looks the hook up once, there.
        self.reducer_override = reduce  # type: ignore[method-assign]
        super().__init__(file, PICKLE_PROTOCOL)
        self.memo = _REFERENCE_MEMO


class _NeedsBrokenPicklerError(Exception):
    """The state holds a broken value: only _BrokenAwarePickler can write its class's name."""


class _BrokenAwarePickler(pickle._Pickler):
    """The Python pickler, writing a broken class under the name of the class it stands for.

    The C pickler checks that a class's module really holds it, which a broken class (its
    module is what is missing) cannot pass; states holding broken values are rare, so they
    take this slower machine.
    """

    def __init__(self, file: io.BytesIO, reduce: Callable[[Any], Any]) -> None:
        super().__init__(file, PICKLE_PROTOCOL)
        self.reducer_override = reduce  # type: ignore[method-assign]
        self.memo = dict(_REFERENCE_MEMO)

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, type) and issubclass(obj, Broken):
            module, qualname = obj.__broken_global__
            machine: Any = self  # typeshed does not declare the Python pickler's own methods
            machine.save(module)
            machine.save(qualname)
            machine.write(pickle.STACK_GLOBAL)
            machine.memoize(obj)
            return
        super().save_global(obj, name)  # type: ignore[misc]


class ObjectWriter:
    """Turns a persistent object's state into a record.

    ``reference`` is called for each persistent object the state refers to and returns its
    oid (adding new objects to the connection as a side effect).
    """

    def __init__(self, resolver: ClassResolver, reference: Callable[[Persistent], Oid]) -> None:
        self._resolver = resolver
        self._reference = reference
        self._buffer = io.BytesIO()
        self._pickler = _StatePickler(self._buffer, self._reduce)
        self._refs: list[tuple[Oid, str]] = []
        self._ref_index: dict[Oid, int] = {}
        self._checked_types: set[type] = set(_PLAIN_TYPES)
        self._broken_pickler = False  # the state is being written by _BrokenAwarePickler
        # make_plain: a persistent object this returns a reduce value for is written inline.
        self.inline: Callable[[Persistent], Any] | None = None

    # hot path: called by the pickler for each value of a state that is not a plain value
    # or container (persistent objects, instances of other classes, classes, functions).
    def _reduce(self, obj: Any) -> Any:
        cls = type(obj)
        if cls in self._checked_types:
            return NotImplemented
        if isinstance(obj, Persistent):
            if self.inline is not None:
                inlined = self.inline(obj)
                if inlined is not None:
                    return inlined
            return ref, (self._reference_index(self._reference(obj), class_name(obj.__class__)),)
        if obj is ref:
            return NotImplemented
        if isinstance(obj, Broken) or (isinstance(obj, type) and issubclass(obj, BrokenValue)):
            if not self._broken_pickler:
                raise _NeedsBrokenPicklerError
            return NotImplemented  # its __reduce_ex__, or save_global for the class
        if isinstance(obj, _GLOBAL_TYPES):
            self._resolver.check_storable(obj)
            return NotImplemented
        if _is_own_value(obj):
            return NotImplemented  # pickles as the global it is (its __reduce__ names it)
        self._resolver.check_storable(cls)
        if isinstance(obj, _SPECIAL_VALUE_TYPES):
            return _reduce_special_value(obj)  # each time: the value decides
        self._checked_types.add(cls)
        return NotImplemented

    def _reference_index(self, oid: Oid, ref_class: str) -> int:
        index = self._ref_index.get(oid)
        if index is None:
            index = self._ref_index[oid] = len(self._refs)
            self._refs.append((oid, ref_class))
        return index

    def serialize(self, obj: Persistent) -> bytes:
        """The record for ``obj``'s current state."""
        state = obj.__getstate__()
        if type(obj)._p_version:  # a versioned class (twins inherit the attribute)
            state = versioned_state(obj, state)
        try:
            return self.serialize_state(class_name(obj.__class__), state)
        except SerializationError as exc:
            raise self._explain(obj, state, exc) from None
        except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError) as exc:
            raise self._explain(obj, state, exc) from exc

    def serialize_state(self, record_class: str, state: Any) -> bytes:
        """The record for an object of class ``record_class`` (``module:qualname``) in ``state``."""
        self._refs = []
        self._ref_index = {}
        buffer = self._buffer
        buffer.seek(0)
        buffer.truncate()
        pickler = self._pickler
        pickler.memo = _REFERENCE_MEMO  # ref at index 0: see amberdb.record
        try:
            pickler.dump(state)
        except _NeedsBrokenPicklerError:
            self._refs = []
            self._ref_index = {}
            buffer.seek(0)
            buffer.truncate()
            self._broken_pickler = True
            # The Python pickler spends several frames per level of nesting where the C one
            # spends one: give it room for what the C pickler would have written.
            limit = sys.getrecursionlimit()
            sys.setrecursionlimit(max(limit, 6 * limit))
            try:
                _BrokenAwarePickler(buffer, self._reduce).dump(state)
            finally:
                sys.setrecursionlimit(limit)
                self._broken_pickler = False
            self._pickler = _StatePickler(buffer, self._reduce)  # the failed one may hold state
        if buffer.tell() > _BIG_STATE:
            # The C pickler's memo table keeps the size a big state gave it, and clearing it
            # costs that size every time: start the next state with a new pickler instead.
            self._pickler = _StatePickler(buffer, self._reduce)
        return encode_record(record_class, self._refs, buffer.getvalue(), reference_in_memo=True)

    def _explain(self, obj: Persistent, state: Any, error: BaseException) -> SerializationError:
        """Find which attribute of ``obj`` holds the value that cannot be stored."""
        what = f"{class_name(obj.__class__)} oid {oid_repr(obj._p_oid)}"
        items: list[tuple[str, Any]] = []
        if isinstance(state, dict):
            items = list(state.items())
        elif isinstance(state, tuple) and len(state) == 2:
            for part in state:
                if isinstance(part, dict):
                    items.extend(part.items())
        for name, value in items:
            try:
                self._probe(value)
            except Exception as exc:
                return SerializationError(
                    f"cannot store {what}: attribute {name!r} holds a {type(value).__qualname__} "
                    f"that cannot be stored: {exc}"
                )
        return SerializationError(f"cannot store {what}: {error}")

    def _probe(self, value: Any) -> None:
        """Pickle ``value`` alone, as a state would be: raises what storing it raises."""
        writer = ObjectWriter(self._resolver, lambda obj: Oid(bytes(8)))
        _StatePickler(io.BytesIO(), writer._reduce).dump(value)


class _LoadFinder:
    """The globals a load may use: the resolver's, with broken value classes for missing ones.

    It also notes whether a record named a persistent class as a global: a class object
    stored as a value, or an instance stored inline because its class became persistent
    after it was written (the connection then adopts such instances, see
    Connection._adopt_inline).
    """

    __slots__ = ("_cache", "_resolver", "named_persistent")

    def __init__(self, resolver: ClassResolver) -> None:
        self._resolver = resolver
        self._cache = resolver._load_found  # cleared in place by the resolver
        self.named_persistent = False

    def find(self, module: str, qualname: str) -> Any:
        """The global ``module.qualname`` for a load (see the class docstring)."""
        key = (module, qualname)
        found = self._cache.get(key)
        if found is not None:
            return found
        found = self._resolver.find_for_load(module, qualname)
        if isinstance(found, type) and issubclass(found, Persistent):
            self.named_persistent = True
        elif not (isinstance(found, type) and issubclass(found, Broken)):
            self._cache[key] = found
        return found

    def import_allowed(self, module: str) -> bool:
        """Whether a load may import ``module``."""
        return self._resolver.import_allowed(module)


class ObjectReader:
    """Turns records back into classes and states, through the allow-list.

    ``ghost`` is called with ``(oid, class name)`` for each reference and returns the
    object to use (the connection's cached object, or a new ghost).
    """

    def __init__(self, resolver: ClassResolver, ghost: Callable[[Oid, str], Persistent]) -> None:
        self._resolver = resolver
        self._ghost = ghost
        # Its named_persistent tells whether the last state read named a persistent class.
        self.finder = _LoadFinder(resolver)
        install_import_guard()  # again: something may have put its own hook first meanwhile

    def header(self, oid: Oid, record: bytes) -> RecordHeader:
        """The record's header; RecordDecodeError naming ``oid`` when damaged."""
        try:
            return decode_header(record)
        except RecordDecodeError as exc:
            raise RecordDecodeError(f"record of oid {oid_repr(oid)}: {exc}") from None

    def record_class(self, oid: Oid, header: RecordHeader) -> type[Persistent]:
        """The persistent class of the record, checked against the allow-list."""
        try:
            return self._resolver.persistent_class(header.class_name)
        except UnsafeGlobalError as exc:
            raise UnsafeGlobalError(f"record of oid {oid_repr(oid)}: {exc}") from None

    # hot path: every load of every object passes here.
    def state(self, oid: Oid, record: bytes, header: RecordHeader) -> Any:
        """Unpickle the state of ``record``, making ghosts for its references."""
        try:
            ghost = self._ghost
            ghosts = [ghost(ref_oid, ref_class) for ref_oid, ref_class in header.refs] if header.refs else []
            state = record[header.state_offset :]
            in_memo = header.version >= REFERENCE_IN_MEMO  # header.reference_in_memo, without a call
            finder = self.finder
            finder.named_persistent = False
            return load_state(state, finder, ghosts, REFERENCE_GLOBAL, in_memo)
        except (UnsafeGlobalError, ImportRefusedError) as exc:
            what = _describe(oid, header)
            raise UnsafeGlobalError(f"record of {what}: {exc}; nothing in it was run") from None
        except RecordDecodeError as exc:
            raise RecordDecodeError(f"record of {_describe(oid, header)}: {exc}") from None
        except Exception as exc:
            raise RecordDecodeError(f"record of {_describe(oid, header)} cannot be decoded: {exc!r}") from exc


def _describe(oid: Oid, header: RecordHeader) -> str:
    module, qualname = _split(header.class_name)
    return f"oid {oid_repr(oid)} ({module}.{qualname})"
