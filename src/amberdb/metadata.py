"""What AmberDB keeps about a database inside the database itself.

One :class:`DatabaseMetadata` object, hung on the root object as the attribute
``_amberdb_metadata`` (not a key: the root's mapping stays the application's), holds the
class renames every process must apply (``db.rename_class``), the generations of
:mod:`amberdb.evolve` schemas with the claims that keep two processes from running one step
twice, and the progress of ``evolve.each`` runs.  Its state is plain data (dicts of str, int
and tuples), so a database reads it before it can load any application class, and it merges
concurrent changes key by key: two processes may record different renames or advance
different schemas at once, while two changes of the *same* key conflict -- even to equal
values, which is what makes a generation step commit once.
"""

from __future__ import annotations

from typing import Any

from amberdb.exceptions import ConflictError
from amberdb.persistent import Persistent, class_name

__all__ = ["METADATA_ATTRIBUTE", "METADATA_CLASS", "DatabaseMetadata", "metadata_for_update", "read_metadata"]

METADATA_ATTRIBUTE = "_amberdb_metadata"
_SECTIONS = ("class_aliases", "generations", "claims", "runs")
_ABSENT: Any = object()


class DatabaseMetadata(Persistent):
    """The database's own bookkeeping (see the module docstring); every attribute a dict."""

    class_aliases: dict[str, str]
    generations: dict[str, int]
    claims: dict[str, tuple[Any, ...]]
    runs: dict[str, dict[str, Any]]

    def __init__(self) -> None:
        self.class_aliases = {}
        self.generations = {}
        self.claims = {}
        self.runs = {}

    def section(self, name: str) -> dict[str, Any]:
        """A copy of one section (``class_aliases``, ``generations``, ``claims``, ``runs``)."""
        value = getattr(self, name, None)
        return dict(value) if isinstance(value, dict) else {}

    def update_section(self, name: str, key: str, value: Any) -> None:
        """Set (or, with ``value`` None, remove) one key of a section, marking this changed."""
        if name not in _SECTIONS:
            raise ValueError(f"no metadata section {name!r}")
        section = self.section(name)
        if value is None:
            section.pop(key, None)
        else:
            section[key] = value
        setattr(self, name, section)

    def _p_resolveConflict(self, old: Any, saved: Any, new: Any) -> Any:
        """Merge two changes made from ``old`` key by key; the same key changed twice conflicts."""
        if not all(isinstance(state, dict) for state in (old, saved, new)):
            raise ConflictError("database metadata: unexpected state")
        merged: dict[str, Any] = {}
        for attribute in set(old) | set(saved) | set(new):
            before, theirs, ours = (state.get(attribute, _ABSENT) for state in (old, saved, new))
            if all(isinstance(value, dict) for value in (before, theirs, ours)):
                merged[attribute] = _merge_keys(attribute, before, theirs, ours)
            elif theirs == before:
                merged[attribute] = ours
            elif ours == before:
                merged[attribute] = theirs
            else:
                raise ConflictError(f"database metadata: {attribute} changed by two transactions")
            if merged[attribute] is _ABSENT:
                del merged[attribute]
        return merged


def _merge_keys(
    attribute: str, before: dict[Any, Any], theirs: dict[Any, Any], ours: dict[Any, Any]
) -> dict[Any, Any]:
    merged = {}
    for key in set(before) | set(theirs) | set(ours):
        was, their, our = (section.get(key, _ABSENT) for section in (before, theirs, ours))
        if their == was:
            value = our
        elif our == was:
            value = their
        else:
            raise ConflictError(f"database metadata: {attribute}[{key!r}] changed by two transactions")
        if value is not _ABSENT:
            merged[key] = value
    return merged


METADATA_CLASS = class_name(DatabaseMetadata)


def read_metadata(conn: Any) -> DatabaseMetadata | None:
    """The database's metadata object as ``conn`` sees it, or None when there is none yet."""
    found = getattr(conn.root(), METADATA_ATTRIBUTE, None)
    return found if isinstance(found, DatabaseMetadata) else None


def metadata_for_update(conn: Any) -> DatabaseMetadata:
    """The metadata object, created on the root when the database has none (in ``conn``'s
    transaction)."""
    root = conn.root()
    found = getattr(root, METADATA_ATTRIBUTE, None)
    if isinstance(found, DatabaseMetadata):
        return found
    if found is not None:
        raise TypeError(
            f"the root's {METADATA_ATTRIBUTE} attribute holds a {type(found).__qualname__}, not AmberDB's "
            "metadata: something else wrote it"
        )
    created = DatabaseMetadata()
    setattr(root, METADATA_ATTRIBUTE, created)
    return created
