"""Persistent: the base class of every object stored as its own record.

Life cycle (the ``_p_changed`` value in brackets), transitions labelled by what causes them::

                      Connection.add / first store
        unsaved [False] ───────────────────────────▶ added [False] ──commit──▶ saved [False]
                                                                               │  ▲
                                              attribute write, _p_changed=True │  │ commit
                                                                               ▼  │
        ghost [None] ◀──── abort, _p_invalidate() ──────────────────────── changed [True]
          │  ▲
          │  └──── _p_deactivate(), _p_changed=None, cache eviction ◀──── saved
          └──── any attribute read or write, _p_activate() ────────────▶ saved

Why reads are as fast as on a plain object: a loaded object is an instance of its own class,
which has no ``__getattribute__`` hook.  Only a *ghost* needs one, so a ghost's ``__class__``
is switched to a *ghost twin*: a subclass with the same name and layout (``__slots__ = ()``)
whose ``__getattribute__`` loads the state and switches the class back.

Why writes to a changed object are as fast as on a plain object: the first write to a saved
object goes through :meth:`Persistent.__setattr__`, which registers it with its connection
(the *jar*), marks it changed and switches it to a *changed twin* whose ``__setattr__`` is
``object.__setattr__`` itself; further writes in the transaction cost nothing extra.  Commit
and abort switch it back.  Registering comes before both the mark and the write: a
connection that refuses the change (closed, or no transaction on an explicit manager) raises,
and the object keeps its value and stays unchanged.  A write that raises after the
connection accepted it (a property setter rejecting the value) leaves the object marked
changed: it is stored again as it is, which loses nothing.  (Classes that define their own
``__setattr__`` or ``__delattr__`` keep their class: their hook must keep running.)

``isinstance`` sees the real class in every state and ``obj.__class__`` answers it; only
``type(obj)`` shows a twin, for ghosts and changed objects.  Names starting with ``_p_`` belong to the
persistence machinery; names starting with ``_v_`` are volatile: never saved, never marking
the object changed, dropped when the object becomes a ghost.

The jar interface this module relies on is two methods: ``register(obj)`` (first change in a
transaction; raising refuses the change) and ``setstate(obj)`` (load a ghost's state and call
:func:`restore_state`).
"""

from __future__ import annotations

import copyreg
import functools
import sys
import weakref
from types import MemberDescriptorType
from typing import Any, Protocol

from amberdb.exceptions import ConnectionStateError, RecordDecodeError, StateVersionError, TransactionError
from amberdb.utils import Oid, oid_repr, time_from_tid, z64

__all__ = [
    "CHANGED",
    "GHOST",
    "UPTODATE",
    "Jar",
    "Persistent",
    "class_name",
    "ghostify",
    "make_ghost",
    "mark_changed",
    "mark_unchanged",
    "persistent_class_named",
    "restore_state",
]

GHOST = -1
UPTODATE = 0
CHANGED = 1

_object_setattr = object.__setattr__
_object_delattr = object.__delattr__
_object_getattribute = object.__getattribute__
_intern = sys.intern

# Attributes a ghost answers without loading its state.
_GHOST_SAFE_NAMES = frozenset({"__class__", "__dict__", "__weakref__", "__del__"})
_MACHINERY_PREFIXES = ("_p_", "_v_")


class Jar(Protocol):
    """What a persistent object needs from the connection it belongs to."""

    def register(self, obj: Persistent) -> None:
        """Note that ``obj`` changed in the current transaction."""

    def setstate(self, obj: Persistent) -> None:
        """Load the state of the ghost ``obj``."""


# Every persistent class defined in this process, by "module:qualname".  Classes defined
# inside functions cannot be found by import path, so loading needs this registry; a
# class defined again under the same name replaces the older one.
_classes_by_name: dict[str, type[Persistent]] = {}
# How many persistent classes were defined so far: one defined again (a reload, a new
# deployment in tests) must replace what resolvers found under its name.
CLASS_DEFINITIONS = [0]


def class_name(cls: type) -> str:
    """The name a record uses for ``cls``: ``"module:qualname"``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def persistent_class_named(name: str) -> type[Persistent] | None:
    """The persistent class defined in this process under ``name``, without importing."""
    return _classes_by_name.get(name)


class Persistent:
    """Base class for objects that are stored in the database as their own record."""

    __slots__ = ("__weakref__", "_p_estimated_size", "_p_jar", "_p_oid", "_p_serial", "_p_state")

    _p_oid: Oid | None
    _p_jar: Any
    _p_serial: bytes
    _p_state: int
    _p_estimated_size: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("_p_is_twin", False):
            if not cls.__dict__.get("_p_broken", False):  # broken classes are never found by name
                CLASS_DEFINITIONS[0] += 1  # resolvers drop what they found before (a reload?)
                _classes_by_name[class_name(cls)] = cls
            own = cls.__dict__.get("__setstate__")
            if own is not None and not getattr(own, "_p_guarded", False):
                cls.__setstate__ = _guarded_setstate(own)  # type: ignore[method-assign]

    # Versioned state (see the README, "Versioned classes"): the version of the state this
    # class writes; a stored state of another version goes through _p_upgrade on load.
    _p_version: int = 0
    _p_broken = False  # True for the stand-ins of missing classes (amberdb.broken)

    @classmethod
    def _p_upgrade(cls, state: Any, version: int) -> Any:
        """Turn ``state``, written with ``_p_version`` ``version``, into this class's version.

        Override it in a class that sets ``_p_version``; it gets the attribute dict and
        returns the one to load.  This default refuses.
        """
        raise StateVersionError(
            f"{class_name(cls).replace(':', '.')} has state version {cls._p_version} and cannot read a "
            f"state of version {version}: define {cls.__qualname__}._p_upgrade(state, version)"
        )

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Create an unsaved instance with the persistence slots set."""
        obj = super().__new__(cls)
        _object_setattr(obj, "_p_oid", None)
        _object_setattr(obj, "_p_jar", None)
        _object_setattr(obj, "_p_serial", z64)
        _object_setattr(obj, "_p_state", UPTODATE)
        _object_setattr(obj, "_p_estimated_size", 0)
        return obj

    # hot path: every write to an unsaved or saved object passes here (changed objects
    # skip it, see the module docstring).  The connection is asked first: a change it refuses
    # (closed, no transaction) must leave neither the value nor the mark behind.
    def __setattr__(self, name: str, value: Any) -> None:
        if self._p_state == UPTODATE and self._p_jar is not None and not name.startswith(_MACHINERY_PREFIXES):
            _set_changed(self, name)
        _object_setattr(self, name, value)

    def __delattr__(self, name: str) -> None:
        if (
            self._p_state == UPTODATE
            and self._p_jar is not None
            and not name.startswith(_MACHINERY_PREFIXES)
            and _deletes_something(self, name)
        ):
            _set_changed(self, name)
        _object_delattr(self, name)

    # -- the _p_ interface -------------------------------------------------------------

    @property
    def _p_changed(self) -> bool | None:
        """None for a ghost, True when changed since the last commit, False otherwise."""
        state = self._p_state
        if state == GHOST:
            return None
        return state == CHANGED

    @_p_changed.setter
    def _p_changed(self, value: bool | None) -> None:
        if value is None:
            self._p_deactivate()
        elif value:
            mark_changed(self)
        elif self._p_state == CHANGED:
            mark_unchanged(self)

    @_p_changed.deleter
    def _p_changed(self) -> None:
        self._p_invalidate()

    @property
    def _p_mtime(self) -> float | None:
        """Seconds since the epoch of the commit that wrote this revision, or None."""
        serial = self._p_serial
        return None if serial == z64 else time_from_tid(serial)

    @property
    def _p_status(self) -> str:
        """One of ``unsaved``, ``added``, ``saved``, ``changed``, ``ghost``."""
        if self._p_jar is None:
            return "unsaved"
        state = self._p_state
        if state == GHOST:
            return "ghost"
        if state == CHANGED:
            return "changed"
        return "added" if self._p_serial == z64 else "saved"

    def _p_activate(self) -> None:
        """Load the state if this object is a ghost."""
        if self._p_state == GHOST:
            _load(self)

    def _p_deactivate(self) -> None:
        """Turn a saved, unchanged object back into a ghost to free its state.

        Objects added in the current transaction are left alone: they have no record to load
        back from (the cache frees them once a savepoint has written them).
        """
        if self._p_state == UPTODATE and self._p_jar is not None and self._p_serial != z64:
            ghostify(self)

    def _p_invalidate(self) -> None:
        """Turn this saved object into a ghost even if it has unsaved changes (they are lost).

        Objects added in the current transaction are left alone, as by :meth:`_p_deactivate`.
        """
        if self._p_state != GHOST and self._p_jar is not None and self._p_serial != z64:
            ghostify(self)

    # -- state ----------------------------------------------------------------------------

    def __getstate__(self) -> Any:
        """The state to store: instance attributes except ``_v_`` and ``_p_`` ones.

        Classes with ``__slots__`` give ``(dict or None, {slot: value})``.
        """
        try:
            instance_dict = _object_getattribute(self, "__dict__")
        except AttributeError:
            state: dict[str, Any] | None = None
        else:
            try:
                state = {k: v for k, v in instance_dict.items() if not k.startswith(_MACHINERY_PREFIXES)}
            except AttributeError:  # a non-string key: rare enough for the slow path
                state = {
                    k: v
                    for k, v in instance_dict.items()
                    if not (isinstance(k, str) and k.startswith(_MACHINERY_PREFIXES))
                }
        slot_names = _slot_names(type(self))
        if not slot_names:
            return state if state is not None else {}
        slots = {}
        for name in slot_names:
            try:
                slots[name] = _object_getattribute(self, name)
            except AttributeError:
                pass
        return (state or None, slots)

    def __setstate__(self, state: Any) -> None:
        """Replace the instance attributes with ``state`` (as made by ``__getstate__``)."""
        _refuse_while_unpickling(self)
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        if state is not None:
            try:
                instance_dict = _object_getattribute(self, "__dict__")
            except AttributeError:
                if state:
                    raise
                instance_dict = {}
            instance_dict.clear()
            # Interned keys keep attribute reads on CPython's fastest path (it compares
            # key identity first); unpickled strings are not interned.
            try:
                instance_dict.update({_intern(key): value for key, value in state.items()})
            except TypeError:  # a non-string key in __dict__: rare, keep it as it is
                for key, value in state.items():
                    instance_dict[_intern(key) if type(key) is str else key] = value
        if slots:
            for key, value in slots.items():
                _object_setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        """Copy and pickle support outside the database: class plus ``__getstate__``."""
        return (copyreg.__newobj__, (_real_class(type(self)),), self.__getstate__())  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        cls = _real_class(type(self))
        oid = _object_getattribute(self, "_p_oid")
        where = "" if oid is None else f" oid {oid_repr(oid)}"
        return f"<{cls.__module__}.{cls.__qualname__} object at {id(self):#x}{where}>"


# -- twins: ghosts and changed objects ------------------------------------------------------

_ghost_twins: dict[type, type] = {}
_changed_twins: dict[type, type | None] = {}
_real_classes: dict[type, type] = {}  # every twin -> its real class
_set_class = object.__dict__["__class__"].__set__  # bypasses the twins' __class__ property


def _real_class(cls: type) -> type:
    return _real_classes.get(cls, cls)


def _make_twin(cls: type, namespace: dict[str, Any]) -> type:
    namespace.update(
        {
            "__slots__": (),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "_p_is_twin": True,
            "__class__": property(lambda self: cls, doc="The real class, not the twin."),
        }
    )
    twin = type(cls)(cls.__name__, (cls,), namespace)
    _real_classes[twin] = cls
    return twin


def _ghost_getattribute(self: Persistent, name: str) -> Any:
    if name.startswith("_p_") or name in _GHOST_SAFE_NAMES:
        return _object_getattribute(self, name)
    jar = _object_getattribute(self, "_p_jar")
    if jar is None:
        _load(self)  # raises the error that says why
    jar.setstate(self)
    return getattr(self, name)


def _ghost_setattr(self: Persistent, name: str, value: Any) -> None:
    if name.startswith("_p_"):
        _object_setattr(self, name, value)
        return
    _load(self)
    setattr(self, name, value)


def _ghost_delattr(self: Persistent, name: str) -> None:
    if name.startswith("_p_"):
        _object_delattr(self, name)
        return
    _load(self)
    delattr(self, name)


def _ghost_twin(cls: type) -> type:
    twin = _ghost_twins.get(cls)
    if twin is None:
        hooks = {
            "__getattribute__": _ghost_getattribute,
            "__setattr__": _ghost_setattr,
            "__delattr__": _ghost_delattr,
        }
        twin = _ghost_twins[cls] = _make_twin(cls, hooks)
    return twin


def _changed_twin(cls: type) -> type | None:
    """The class a changed instance of ``cls`` takes, or None when it must keep ``cls``."""
    try:
        return _changed_twins[cls]
    except KeyError:
        pass
    twin = None
    hooks: tuple[Any, Any] = (cls.__setattr__, cls.__delattr__)
    if hooks == (Persistent.__setattr__, Persistent.__delattr__):
        # The slot wrappers themselves: CPython then installs its generic C setattr.
        twin = _make_twin(cls, {"__setattr__": object.__setattr__, "__delattr__": object.__delattr__})
    _changed_twins[cls] = twin
    return twin


def _set_changed(obj: Persistent, attribute: str | None = None) -> None:
    # Registered first: when the connection refuses (closed, no transaction), the object
    # must stay unchanged, or its next write would skip registering and be lost.
    try:
        obj._p_jar.register(obj)
    except (ConnectionStateError, TransactionError) as exc:
        if attribute is None:
            raise
        raise type(exc)(f"{exc} (attribute {attribute!r} left unchanged)") from None
    _object_setattr(obj, "_p_state", CHANGED)
    twin = _changed_twin(type(obj))
    if twin is not None:
        _set_class(obj, twin)


def _deletes_something(obj: Persistent, name: str) -> bool:
    """Whether ``del obj.name`` would find something to delete (then the object changes).

    A descriptor with a deleter (a property) runs code that may change the object, so it
    counts; a missing attribute or an empty slot raises AttributeError without changing it.
    """
    descriptor = getattr(type(obj), name, None)
    if descriptor is not None and hasattr(type(descriptor), "__delete__"):
        if isinstance(descriptor, MemberDescriptorType):  # a slot: set or not
            try:
                _object_getattribute(obj, name)
            except AttributeError:
                return False
        return True
    try:
        return name in _object_getattribute(obj, "__dict__")
    except AttributeError:
        return False


def _load(obj: Persistent) -> None:
    jar = _object_getattribute(obj, "_p_jar")
    if jar is None:
        cls = _real_class(type(obj))
        raise ConnectionStateError(
            f"cannot load ghost {class_name(cls)} oid {oid_repr(obj._p_oid)}: it has no connection"
        )
    jar.setstate(obj)


def _refuse_while_unpickling(obj: Persistent) -> None:
    """Raise when a record being unpickled calls ``__setstate__`` of an object it refers to.

    Loading a record builds its state and nothing else; only a tampered record calls the
    state setter of another persistent object (pickle's BUILD on a reference), which would
    replace that object's state in memory for the next commit to store.
    """
    jar = _object_getattribute(obj, "_p_jar")
    if jar is not None and getattr(jar, "_unpickling", False):
        cls = _real_class(type(obj))
        raise RecordDecodeError(
            f"it tried to set the state of {class_name(cls)} oid {oid_repr(obj._p_oid)}: loading a"
            " record never changes another object"
        )


def _guarded_setstate(method: Any) -> Any:
    """``method`` (a class's own ``__setstate__``), refusing while a record is unpickled."""

    @functools.wraps(method)
    def guarded(self: Persistent, state: Any) -> Any:
        jar = _object_getattribute(self, "_p_jar")
        if jar is not None and getattr(jar, "_unpickling", False):
            _refuse_while_unpickling(self)
        return method(self, state)

    guarded._p_guarded = True  # type: ignore[attr-defined]
    return guarded


def ghostify(obj: Persistent) -> None:
    """Drop the state of ``obj`` (volatile attributes too) and make it a ghost."""
    cls = _real_class(type(obj))
    if _object_getattribute(obj, "_p_state") == GHOST:
        return
    try:
        _object_getattribute(obj, "__dict__").clear()
    except AttributeError:
        pass
    for name in _slot_names(cls):
        try:
            _object_delattr(obj, name)
        except AttributeError:
            pass
    _object_setattr(obj, "_p_state", GHOST)
    _set_class(obj, _ghost_twin(cls))


def replace_class(obj: Persistent, cls: type[Persistent]) -> bool:
    """Make ``obj`` a ghost of ``cls`` (a broken object whose class came back); False when
    the two classes' layouts differ, and ``obj`` is left as it was."""
    try:
        _set_class(obj, _ghost_twin(cls))
    except TypeError:
        return False
    _object_setattr(obj, "_p_state", UPTODATE)  # so that ghostify drops what it held
    ghostify(obj)
    return True


def make_ghost(cls: type[Persistent], oid: Oid, jar: Jar) -> Persistent:
    """A new ghost of class ``cls`` for ``oid``, to be loaded through ``jar`` when touched."""
    twin = _ghost_twins.get(cls) or _ghost_twin(cls)
    if cls.__new__ is Persistent.__new__:
        # hot path (one ghost per reference loaded): skip the Python-level __new__.
        obj: Persistent = _object_new(twin)
        _object_setattr(obj, "_p_serial", z64)
        _object_setattr(obj, "_p_estimated_size", 0)
    else:
        obj = cls.__new__(cls)
        _set_class(obj, twin)
    _object_setattr(obj, "_p_oid", oid)
    _object_setattr(obj, "_p_jar", jar)
    _object_setattr(obj, "_p_state", GHOST)
    return obj


def restore_state(obj: Persistent, state: Any, serial: bytes, size: int) -> None:
    """Give the ghost (or invalidated object) ``obj`` its loaded ``state``.

    Used by connections; ``__setstate__`` runs with the object in its real class and with
    change tracking off, so attribute writes inside it do not mark the object changed.
    """
    real = _real_classes.get(type(obj))
    if real is not None:
        _set_class(obj, real)
    else:
        real = type(obj)
    _object_setattr(obj, "_p_state", CHANGED)
    try:
        if real._p_version or (type(state) is dict and _VERSION_KEY in state):  # type: ignore[attr-defined]
            state = _upgraded(obj, real, state)
        if type(state) is dict and real.__setstate__ is _default_setstate:  # type: ignore[attr-defined]
            # hot path (every load): Persistent.__setstate__ inlined for a plain state
            try:
                interned = {_intern(key): value for key, value in state.items()}
            except TypeError:  # a non-string key: the general path keeps it as it is
                obj.__setstate__(state)
            else:
                instance_dict = _object_getattribute(obj, "__dict__")
                instance_dict.clear()
                instance_dict.update(interned)
        else:
            obj.__setstate__(state)
    except BaseException:
        ghostify(obj)
        raise
    _object_setattr(obj, "_p_serial", serial)
    _object_setattr(obj, "_p_estimated_size", size)
    _object_setattr(obj, "_p_state", UPTODATE)


_default_setstate = Persistent.__setstate__
_object_new = object.__new__

_VERSION_KEY = "_p_version"  # in a dict state: the class's _p_version when it was written
# Objects loaded from a state of another version than their class's, until written again.
_upgraded_objects: weakref.WeakValueDictionary[int, Persistent] = weakref.WeakValueDictionary()


def _upgraded(obj: Persistent, real: type, state: Any) -> Any:
    """``state`` in ``real``'s version: the version key taken out, ``_p_upgrade`` when it differs."""
    slots = None
    if type(state) is tuple and len(state) == 2 and (state[0] is None or type(state[0]) is dict):
        state, slots = state[0] or {}, state[1]
    if type(state) is not dict:
        raise StateVersionError(
            f"{real.__qualname__} sets _p_version, but the stored state is a"
            f" {type(state).__qualname__}, not a dict"
        )
    stored = state.pop(_VERSION_KEY, 0)
    wanted = real._p_version  # type: ignore[attr-defined]
    if stored == wanted:
        _upgraded_objects.pop(id(obj), None)
        return state if slots is None else (state, slots)
    if type(stored) is not int or stored < 0:
        raise StateVersionError(f"the state's version {stored!r} is not a non-negative int")
    upgraded = real._p_upgrade(state, stored)  # type: ignore[attr-defined]
    if not isinstance(upgraded, dict):
        raise StateVersionError(
            f"{real.__qualname__}._p_upgrade returned a {type(upgraded).__qualname__}, not the dict state"
        )
    _upgraded_objects[id(obj)] = obj
    return upgraded if slots is None else (upgraded, slots)


def stored_version_differs(obj: Persistent) -> bool:
    """Whether ``obj`` was loaded from a state of another version and not written since."""
    return _upgraded_objects.get(id(obj)) is obj


def versioned_state(obj: Persistent, state: Any) -> Any:
    """The state to write for ``obj``: with its class's ``_p_version`` when it has one."""
    version = _real_class(type(obj))._p_version  # type: ignore[attr-defined]
    if not version:
        return state
    _upgraded_objects.pop(id(obj), None)
    if isinstance(state, dict):
        return {**state, _VERSION_KEY: version}
    if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
        return ({**(state[0] or {}), _VERSION_KEY: version}, state[1])
    raise StateVersionError(
        f"{class_name(_real_class(type(obj)))} sets _p_version but its __getstate__ gives a "
        f"{type(state).__qualname__}: versioned classes need a dict state"
    )


def mark_changed(obj: Persistent) -> None:
    """Mark ``obj`` changed, as an attribute write would (used by containers).

    Call it *before* changing the object: when the connection refuses the change (it is
    closed, or an explicit transaction manager has no transaction), this raises and the
    object must be left as it was.  A ghost is loaded first (containers mark before they
    touch their data, which is what would load it).
    """
    state = obj._p_state
    if state == GHOST:
        _load(obj)
        state = obj._p_state
    if state == UPTODATE and obj._p_jar is not None:
        _set_changed(obj)


def mark_unchanged(obj: Persistent) -> None:
    """Mark ``obj`` (loaded) as matching its stored state: after commit, or on request."""
    if _object_getattribute(obj, "_p_state") == GHOST:
        return
    _object_setattr(obj, "_p_state", UPTODATE)
    real = _real_classes.get(type(obj))
    if real is not None:
        _set_class(obj, real)


_slot_names_cache: dict[type, tuple[str, ...]] = {}


def _slot_names(cls: type) -> tuple[str, ...]:
    """Names of the slots subclasses of Persistent declare (mangled as Python stores them)."""
    names = _slot_names_cache.get(cls)
    if names is None:
        collected: list[str] = []
        for klass in _real_class(cls).__mro__:
            if klass is Persistent or "__slots__" not in klass.__dict__:
                continue
            declared = klass.__dict__["__slots__"]
            for name in (declared,) if isinstance(declared, str) else declared:
                if name in ("__dict__", "__weakref__"):
                    continue
                if name.startswith("__") and not name.endswith("__"):
                    name = f"_{klass.__name__.lstrip('_')}{name}"
                if name not in collected:
                    collected.append(name)
        names = _slot_names_cache[cls] = tuple(collected)
    return names
