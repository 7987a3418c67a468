"""Conflict resolution above the storage: merging two committed changes with ``_p_resolveConflict``.

When a commit finds that another transaction changed the same object since it was loaded,
the connection asks the object's class to merge the three states: ``oldState`` (what both
started from), ``savedState`` (what the other transaction committed) and ``newState`` (what
this one wants to commit).  The resolver runs on a bare instance with no connection, so it
cannot load anything: references to other persistent objects inside the states arrive as
:class:`PersistentReference` placeholders that compare by oid.  Whatever it returns is
checked before it is stored: a resolver that raises, returns a state ``__setstate__``
refuses, or returns something that cannot be stored turns into a ConflictError, never a
damaged record.
"""

from __future__ import annotations

from typing import Any

from amberdb.exceptions import ConflictError, UnsafeGlobalError
from amberdb.persistent import Persistent
from amberdb.record import REFERENCE_GLOBAL, decode_header, ref
from amberdb.serialize import ClassResolver, ObjectWriter
from amberdb.unpickler import load_state
from amberdb.utils import Oid, oid_repr

__all__ = ["PersistentReference", "resolve"]


class PersistentReference:
    """A reference to a persistent object inside a state being resolved; compares by oid."""

    __slots__ = ("class_name", "oid")

    def __init__(self, oid: Oid, class_name: str) -> None:
        self.oid = oid
        self.class_name = class_name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PersistentReference) and other.oid == self.oid

    def __hash__(self) -> int:
        return hash(self.oid)

    def __repr__(self) -> str:
        return f"<PersistentReference {self.class_name} oid {oid_repr(self.oid)}>"


def _decode(resolver: ClassResolver, record: bytes) -> Any:
    """The state of ``record`` with placeholders for its references, loaded as safely as any."""
    header = decode_header(record)
    references = [PersistentReference(oid, name) for oid, name in header.refs]
    state = record[header.state_offset :]
    return load_state(state, resolver, references, REFERENCE_GLOBAL, header.reference_in_memo)


class _ResolvedStateWriter(ObjectWriter):
    """Writes a merged state: placeholders become references again; live objects are refused."""

    def __init__(self, resolver: ClassResolver) -> None:
        super().__init__(resolver, _no_live_objects)

    def _reduce(self, obj: Any) -> Any:
        if type(obj) is PersistentReference:
            return ref, (self._reference_index(obj.oid, obj.class_name),)
        return super()._reduce(obj)


def _no_live_objects(obj: Persistent) -> Oid:
    raise TypeError(
        f"a resolved state may refer to persistent objects only through the references in the "
        f"states it was given, not to a live {type(obj).__qualname__}"
    )


def resolve(
    resolver: ClassResolver, oid: Oid, old_record: bytes, saved_record: bytes, new_record: bytes
) -> bytes:
    """The record merging ``saved_record`` and ``new_record`` (both based on ``old_record``).

    Raises ConflictError (naming oid and class) when the class has no resolver, or the
    resolver refuses, fails or returns a state that cannot be used.
    """
    class_name = shown = decode_header(new_record).class_name

    def refuse(reason: str, cause: BaseException | None = None) -> ConflictError:
        error = ConflictError(
            f"database conflict error, oid {oid_repr(oid)}, class {shown}: {reason}",
            oid=oid,
            class_name=shown,
        )
        error.__cause__ = cause
        return error

    try:
        cls = resolver.persistent_class(class_name)
    except UnsafeGlobalError as exc:
        raise refuse(str(exc), exc) from None
    resolver_method = getattr(cls, "_p_resolveConflict", None)
    if resolver_method is None:
        raise refuse("both transactions changed it and its class has no _p_resolveConflict")
    try:
        old, saved, new = (_decode(resolver, record) for record in (old_record, saved_record, new_record))
    except Exception as exc:
        raise refuse(f"its states cannot be read for resolution: {exc!r}", exc) from None
    try:
        merged = cls.__new__(cls)._p_resolveConflict(old, saved, new)
    except ConflictError as exc:
        raise refuse(f"_p_resolveConflict refused: {exc}", exc) from None
    except Exception as exc:
        raise refuse(f"_p_resolveConflict raised {exc!r}", exc) from None
    try:
        cls.__new__(cls).__setstate__(merged)
    except Exception as exc:
        raise refuse(
            f"_p_resolveConflict returned a state __setstate__ refuses: {merged!r:.100}", exc
        ) from None
    try:
        return _ResolvedStateWriter(resolver).serialize_state(class_name, merged)
    except Exception as exc:
        raise refuse(f"_p_resolveConflict returned a state that cannot be stored: {exc}", exc) from None
