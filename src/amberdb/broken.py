"""Broken objects: what a record loads as when the class it names cannot be found.

A class deleted, moved without an alias, or in a module this process may not import must not
take its neighbours down: the object whose record names it loads as an instance of a
*broken class* -- a subclass of :class:`Broken` with the missing class's module and name,
made here, never imported -- holding what the record said, untouched:

* a persistent object (the record's own class, or a reference's class, is missing) becomes a
  :class:`PersistentBroken` whose ``__broken_state__`` is the unpickled state.  It reads
  (``obj.__broken_state__``, and attributes of a dict state), it is referred to and stored
  as a reference by the objects around it, and every change raises
  :class:`~amberdb.exceptions.BrokenModified`: its record is never written again, so when
  the class comes back the object loads with its original state.
* a plain value inside a state (an instance of a missing non-persistent class, or the class
  itself stored as a value) becomes a *broken value*: it records how the record built it
  (the arguments of the call, the state, appended items) and pickles back to the same
  opcodes, so its container can change and commit without losing it.

Nothing is imported or called to make either: a record naming ``os.system`` as its class
gets a broken class named ``os.system`` that runs nothing.
"""

from __future__ import annotations

import copyreg
import logging
from typing import Any, ClassVar

from amberdb.exceptions import BrokenModified
from amberdb.persistent import Persistent
from amberdb.utils import oid_repr

__all__ = ["Broken", "PersistentBroken", "broken_class", "broken_name", "is_broken"]

log = logging.getLogger("amberdb.broken")

_object_setattr = object.__setattr__
_object_getattribute = object.__getattribute__
_MACHINERY_PREFIXES = ("_p_", "_v_")


class Broken:
    """Base of every class standing in for a class that could not be found.

    ``type(obj).__module__`` and ``__qualname__`` are the missing class's; ``__broken_reason__``
    says why it was not found, ``__broken_state__`` holds the state the record gave.
    """

    __slots__ = ()
    __broken_name__: ClassVar[str] = ""  # "module:qualname" of the missing class
    __broken_reason__: ClassVar[str] = ""

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith(_MACHINERY_PREFIXES):
            _object_setattr(self, name, value)
            return
        raise _modified(self, f"setting attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if name.startswith(_MACHINERY_PREFIXES):
            object.__delattr__(self, name)
            return
        raise _modified(self, f"deleting attribute {name!r}")

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: read the attribute from the kept state.
        if name.startswith("__") or name.startswith(_MACHINERY_PREFIXES):
            raise AttributeError(name)
        try:
            state = _object_getattribute(self, "__dict__").get("__broken_state__")
        except AttributeError:
            state = None
        attributes = _attributes(state)
        if attributes is not None and name in attributes:
            return attributes[name]
        raise AttributeError(
            f"{_dotted(type(self))} is broken ({type(self).__broken_reason__}) and its state has no "
            f"attribute {name!r}"
        )

    def __repr__(self) -> str:
        oid = getattr(self, "_p_oid", None)
        where = "" if oid is None else f" oid {oid_repr(oid)}"
        return f"<broken {_dotted(type(self))} object at {id(self):#x}{where}>"


def _attributes(state: Any) -> dict[str, Any] | None:
    """The attribute dict of a pickled state (a dict, or the dict of a ``(dict, slots)`` pair)."""
    if isinstance(state, dict):
        return state
    if isinstance(state, tuple) and len(state) == 2:
        merged: dict[str, Any] = {}
        for part in state:
            if isinstance(part, dict):
                merged.update(part)
        return merged
    return None


def _dotted(cls: type) -> str:
    module, _, qualname = getattr(cls, "__broken_name__", "").partition(":")
    if not qualname:
        module, qualname = cls.__module__, cls.__qualname__
    return f"{module}.{qualname}"


def _modified(obj: Any, what: str) -> BrokenModified:
    cls = type(obj)
    oid = None
    try:
        oid = _object_getattribute(obj, "_p_oid")
    except AttributeError:
        pass
    where = "" if oid is None else f" oid {oid_repr(oid)}"
    return BrokenModified(
        f"cannot change broken object {_dotted(cls)}{where} ({what}): its class is missing "
        f"({cls.__broken_reason__}); it stays as stored until the class can be loaded again "
        "(define or import it, allow its module, or record a rename with db.rename_class)"
    )


class PersistentBroken(Broken, Persistent):
    """A persistent object whose class is missing: read-only, kept as stored."""

    _p_broken = True  # keeps the class out of persistent.persistent_class_named

    def __setstate__(self, state: Any) -> None:
        """Keep the state as the record gave it."""
        _object_getattribute(self, "__dict__")["__broken_state__"] = state

    def __getstate__(self) -> Any:
        """The state the record gave (a broken object is never changed)."""
        return _object_getattribute(self, "__dict__").get("__broken_state__")

    @property
    def _p_changed(self) -> bool | None:
        """As for any persistent object; setting it True raises BrokenModified."""
        return Persistent._p_changed.fget(self)  # type: ignore[attr-defined,no-any-return]

    @_p_changed.setter
    def _p_changed(self, value: bool | None) -> None:
        if value:
            raise _modified(self, "marking it changed")
        Persistent._p_changed.fset(self, value)  # type: ignore[attr-defined]

    @_p_changed.deleter
    def _p_changed(self) -> None:
        self._p_invalidate()


class BrokenValue(Broken):
    """A non-persistent value whose class is missing: records how the record built it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = object.__new__(cls)
        values = _object_getattribute(obj, "__dict__")
        values["__broken_args__"] = args
        if kwargs:
            values["__broken_kwargs__"] = kwargs
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Only a call of the class (pickle's REDUCE) runs this; NEWOBJ calls __new__ alone.
        _object_getattribute(self, "__dict__")["__broken_called__"] = True

    def __setstate__(self, state: Any) -> None:
        """Keep the state as the record gave it."""
        _object_getattribute(self, "__dict__")["__broken_state__"] = state

    # What pickle's APPEND(S) and SETITEM(S) call on a list or dict subclass being built.
    def append(self, item: Any) -> None:
        """Record an item the record appended."""
        _object_getattribute(self, "__dict__").setdefault("__broken_items__", []).append(item)

    def extend(self, items: Any) -> None:
        """Record items the record appended."""
        _object_getattribute(self, "__dict__").setdefault("__broken_items__", []).extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        _object_getattribute(self, "__dict__").setdefault("__broken_dictitems__", {})[key] = value

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Rebuild exactly what the record built: the same call, state and items."""
        values = _object_getattribute(self, "__dict__")
        cls = type(self)
        args = values.get("__broken_args__", ())
        kwargs = values.get("__broken_kwargs__")
        state = values.get("__broken_state__")
        items = values.get("__broken_items__")
        dict_items = values.get("__broken_dictitems__")
        if values.get("__broken_called__"):
            if kwargs:
                raise BrokenModified(
                    f"broken value {_dotted(cls)} was called with keywords, which pickle cannot write"
                )
            func: Any = cls
            func_args: tuple[Any, ...] = tuple(args)
        elif kwargs:
            func, func_args = copyreg.__newobj_ex__, (cls, tuple(args), dict(kwargs))  # type: ignore[attr-defined]
        else:
            func, func_args = copyreg.__newobj__, (cls, *args)  # type: ignore[attr-defined]
        return (
            func,
            func_args,
            state,
            None if items is None else iter(items),
            None if dict_items is None else iter(dict_items.items()),
        )


_broken_classes: dict[tuple[str, bool], type[Broken]] = {}


def broken_class(name: str, reason: str, persistent: bool) -> type[Broken]:
    """The broken class standing for ``name`` (``module:qualname``): persistent or a value."""
    key = (name, persistent)
    cls = _broken_classes.get(key)
    if cls is None:
        module, _, qualname = name.partition(":")
        base: type[Broken] = PersistentBroken if persistent else BrokenValue
        namespace = {
            "__module__": module,
            "__qualname__": qualname,
            "__broken_name__": name,
            "__broken_reason__": reason,
            "_p_broken": True,
        }
        cls = type(qualname.rpartition(".")[2] or qualname, (base,), namespace)
        _broken_classes[key] = cls
        log.warning("records name %s.%s, which loads as a broken object: %s", module, qualname, reason)
    elif cls.__broken_reason__ != reason:
        cls.__broken_reason__ = reason
    return cls


def is_broken(obj: Any) -> bool:
    """Whether ``obj`` is a broken object or a broken class."""
    return isinstance(obj, Broken) or (isinstance(obj, type) and issubclass(obj, Broken))


def broken_name(cls: type) -> str:
    """The ``module:qualname`` a broken class stands for."""
    return cls.__broken_name__  # type: ignore[attr-defined,no-any-return]
