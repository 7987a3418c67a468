"""Schema evolution: generations, migrating every instance of a class, changing persistence.

``from amberdb import evolve``:

* :class:`Schema` -- numbered migration steps (``f(conn)``), each run once per database in
  its own transaction together with the new generation number, which the database keeps
  (:mod:`amberdb.metadata`).  Two processes running one schema at once never both run a
  step: a process *claims* the schema (a committed claim, so only one wins) before it runs
  anything, and the other waits until the claim is released, or has expired.
* :func:`each` -- ``func(obj)`` for every stored instance of a class, found through the
  storage's records (``current_records``), in batches that commit with the run's position,
  so a run interrupted at any point continues after its last committed batch.
* :func:`make_plain` -- turn the stored instances of a class that stopped being persistent
  into plain values inside the objects that refer to them.
* :func:`upgrade` -- for :func:`each`: write an object again when it was loaded from a state of
  an older ``_p_version`` (see the README, "Versioned classes").
"""

from __future__ import annotations

import contextlib
import copyreg
import itertools
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from amberdb import transaction as _transaction
from amberdb.broken import Broken, broken_name
from amberdb.exceptions import ConflictError, DatabaseError, TransientError
from amberdb.metadata import metadata_for_update, read_metadata
from amberdb.persistent import Persistent, stored_version_differs
from amberdb.record import decode_header
from amberdb.serialize import normalize_class_name
from amberdb.storage.history import iter_current_records
from amberdb.utils import Oid, Tid, oid_repr, p64, u64

__all__ = [
    "EachResult",
    "GenerationTooHigh",
    "RunResult",
    "Schema",
    "SchemaTooOld",
    "SharedInstancesError",
    "each",
    "make_plain",
    "upgrade",
]

log = logging.getLogger("amberdb.evolve")

_RETRIES = 20


class SchemaTooOld(DatabaseError):  # noqa: N818 - the name the issue fixes
    """The database's generation is below what the application needs (``Schema.minimum``)."""


class GenerationTooHigh(DatabaseError):  # noqa: N818 - the name the issue fixes
    """The database was evolved by newer code: its generation is above the schema's steps."""


class SharedInstancesError(DatabaseError, ValueError):
    """``make_plain`` refused: some instances are referred to from more than one object."""

    def __init__(self, message: str, oids: Mapping[Oid, list[Oid]]) -> None:
        super().__init__(message)
        self.oids = dict(oids)


# -- generations -----------------------------------------------------------------------------


class RunResult(list[int]):
    """The generations a :meth:`Schema.run` ran (or, dry, would run), oldest first.

    ``changed`` counts the objects they changed (or would change) per class
    (``"module.Class"``), ``changed_by_generation`` per step; ``dry_run`` says whether
    anything was committed.
    """

    def __init__(self, generations: list[int], dry_run: bool) -> None:
        super().__init__(generations)
        self.dry_run = dry_run
        self.changed_by_generation: dict[int, dict[str, int]] = {}

    @property
    def changed(self) -> dict[str, int]:
        """Objects changed per class, over every step."""
        total: Counter[str] = Counter()
        for counts in self.changed_by_generation.values():
            total.update(counts)
        return dict(total)

    def __str__(self) -> str:
        if not self:
            return "nothing to run"
        verb = "would change" if self.dry_run else "changed"
        lines = []
        for generation in self:
            counts = self.changed_by_generation.get(generation, {})
            what = ", ".join(f"{count} {name}" for name, count in sorted(counts.items())) or "nothing"
            lines.append(f"generation {generation}: {verb} {what}")
        return "\n".join(lines)


class Schema:
    """Numbered migration steps of one application (see the module docstring).

    ``steps`` maps generation numbers (1, 2, ... without gaps) to functions ``f(conn)``;
    ``minimum`` is the lowest generation the application can run on (``check``).
    ``claim_timeout`` is how long (seconds) another process's claim is honoured without it
    being renewed before this one takes over.
    """

    def __init__(
        self,
        name: str,
        steps: Mapping[int, Callable[[Any], Any]],
        minimum: int = 0,
        *,
        claim_timeout: float = 600.0,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a schema needs a non-empty name")
        numbers = sorted(steps)
        if any(type(number) is not int for number in numbers) or numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(
                f"schema {name!r}: steps must be numbered 1, 2, 3, ... without gaps, got {numbers}"
            )
        for number in numbers:
            if not callable(steps[number]):
                raise TypeError(f"schema {name!r}: step {number} is not callable")
        if type(minimum) is not int or not 0 <= minimum <= len(numbers):
            raise ValueError(
                f"schema {name!r}: minimum must be between 0 and {len(numbers)}, got {minimum!r}"
            )
        self.name = name
        self.steps = dict(steps)
        self.minimum = minimum
        self.claim_timeout = claim_timeout

    @property
    def latest(self) -> int:
        """The highest generation the steps reach."""
        return len(self.steps)

    def __repr__(self) -> str:
        return f"<evolve.Schema {self.name!r}: {self.latest} steps, minimum {self.minimum}>"

    def generation(self, db: Any) -> int:
        """The generation recorded in ``db`` (0 when this schema never ran there)."""
        metadata = _read(db)
        return self._recorded(metadata.get("generations", {}) if metadata is not None else {})

    def _recorded(self, generations: dict[str, Any]) -> int:
        """This schema's generation in a ``generations`` section, checked (0 when absent)."""
        value = generations.get(self.name, 0)
        if type(value) is not int or value < 0:
            raise DatabaseError(
                f"schema {self.name!r}: the database records generation {value!r}, not a number"
            )
        return value

    def check(self, db: Any) -> int:
        """Raise SchemaTooOld below ``minimum``, GenerationTooHigh above the steps; else the generation."""
        current = self.generation(db)
        self._check_not_too_high(current)
        if current < self.minimum:
            raise SchemaTooOld(
                f"schema {self.name!r}: the database is at generation {current}, this application needs at "
                f"least {self.minimum}; run its steps (amberdb evolve URI module:schema, or schema.run(db))"
            )
        return current

    def _check_not_too_high(self, current: int) -> None:
        if current > self.latest:
            raise GenerationTooHigh(
                f"schema {self.name!r}: the database is at generation {current}, newer than this code knows "
                f"({self.latest}): it was evolved by a newer version of the application"
            )

    def run(
        self, db: Any, dry_run: bool = False, progress: Callable[[int, str], Any] | None = None
    ) -> RunResult:
        """Run the steps above the database's generation; return the generations run.

        Each step commits in its own transaction with the new generation number; a step
        that raises leaves the database at the previous generation (and the error raised).
        ``dry_run`` runs the steps in one transaction and aborts it, returning what they
        would change.  ``progress(generation, step name)`` is called before each step.
        """
        current = self.generation(db)
        self._check_not_too_high(current)
        if dry_run:
            return self._dry_run(db, current, progress)
        result = RunResult([], dry_run=False)
        if current >= self.latest:
            return result
        owner = _owner()
        try:
            while True:
                claimed = self._claim(db, owner)
                if claimed is None:
                    continue  # another process held it: it may have run steps meanwhile
                current = claimed
                if current >= self.latest:
                    break
                generation = current + 1
                step = self.steps[generation]
                if progress is not None:
                    progress(generation, _step_name(step))
                counts = self._run_step(db, generation, step, owner)
                if counts is not None:
                    result.append(generation)
                    result.changed_by_generation[generation] = counts
        finally:
            self._release(db, owner)
        return result

    def _dry_run(self, db: Any, current: int, progress: Callable[[int, str], Any] | None) -> RunResult:
        result = RunResult(list(range(current + 1, self.latest + 1)), dry_run=True)
        refuse = _RefuseCommits(self.name)
        with _connection(db) as (manager, conn):
            manager.registerSynch(refuse)
            try:
                manager.begin()
                seen: set[int] = set()
                for generation in result:
                    step = self.steps[generation]
                    if progress is not None:
                        progress(generation, _step_name(step))
                    step(conn)
                    counts: Counter[str] = Counter()
                    for obj in conn.pending_changes():
                        if id(obj) not in seen:
                            seen.add(id(obj))
                            counts[_dotted(obj)] += 1
                    result.changed_by_generation[generation] = dict(counts)
            finally:
                manager.abort()
                manager.unregisterSynch(refuse)
        return result

    def _claim(self, db: Any, owner: tuple[Any, ...]) -> int | None:
        """Claim the schema for ``owner``; its generation once claimed, None after waiting."""
        while True:
            with _connection(db) as (manager, conn):
                try:
                    manager.begin()
                    metadata = metadata_for_update(conn)
                    held = metadata.section("claims").get(self.name)
                    generation = self._recorded(metadata.section("generations"))
                    self._check_not_too_high(generation)
                    if held is None or _same_owner(held, owner) or _expired(held, self.claim_timeout):
                        metadata.update_section("claims", self.name, (*owner[:3], time.time()))
                        manager.get().note(f"amberdb: claim schema {self.name}")
                        manager.commit()
                        return generation
                except ConflictError:
                    continue  # another claim committed first: look again
            time.sleep(0.05)
            return None

    def _release(self, db: Any, owner: tuple[Any, ...]) -> None:
        for _ in range(_RETRIES):
            with _connection(db) as (manager, conn):
                try:
                    manager.begin()
                    metadata = read_metadata(conn)
                    held = None if metadata is None else metadata.section("claims").get(self.name)
                    if metadata is None or not _same_owner(held, owner):
                        return
                    metadata.update_section("claims", self.name, None)
                    manager.commit()
                    return
                except ConflictError:
                    continue
                except Exception:
                    log.exception("schema %s: cannot release the claim", self.name)
                    return

    def _run_step(
        self, db: Any, generation: int, step: Callable[[Any], Any], owner: tuple[Any, ...]
    ) -> dict[str, int] | None:
        """Run one step with the generation it reaches; None when another process got there first."""
        for _attempt in range(_RETRIES):
            with _connection(db) as (manager, conn):
                try:
                    manager.begin()
                    metadata = metadata_for_update(conn)
                    if self._recorded(metadata.section("generations")) >= generation:
                        return None
                    step(conn)
                    counts = Counter(_dotted(obj) for obj in conn.pending_changes())
                    metadata.update_section("generations", self.name, generation)
                    if _same_owner(metadata.section("claims").get(self.name), owner):
                        metadata.update_section("claims", self.name, (*owner[:3], time.time()))
                    manager.get().note(
                        f"amberdb: schema {self.name} generation {generation} ({_step_name(step)})"
                    )
                    manager.commit()
                    return dict(counts)
                except TransientError:
                    continue
        raise ConflictError(f"schema {self.name!r}: step {generation} kept conflicting ({_RETRIES} attempts)")


class _RefuseCommits:
    """A synchronizer making every transaction of a dry run refuse to commit."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    def newTransaction(self, transaction: Any) -> None:
        """Hook the refusal into each transaction the dry run begins."""
        transaction.addBeforeCommitHook(self._refuse)

    def beforeCompletion(self, transaction: Any) -> None:
        """Nothing to do."""

    def afterCompletion(self, transaction: Any) -> None:
        """Nothing to do."""

    def _refuse(self) -> None:
        raise DatabaseError(
            f"schema {self.schema!r}: a step committed during a dry run; dry runs commit nothing, so "
            "steps that commit their own transactions cannot be dry-run"
        )


@contextlib.contextmanager
def _connection(db: Any) -> Iterator[tuple[Any, Any]]:
    """A connection on a transaction manager of its own, aborted and closed at the end
    (whatever the application's threads have open stays apart)."""
    manager = _transaction.TransactionManager()
    conn = db.open(manager)
    try:
        yield manager, conn
    finally:
        manager.abort()
        conn.close()


def _owner() -> tuple[Any, ...]:
    """Who runs a schema: host, process and a token of this run (threads differ), and when."""
    return (socket.gethostname(), os.getpid(), secrets.token_hex(8), time.time())


def _same_owner(held: Any, owner: tuple[Any, ...]) -> bool:
    """Whether the claim ``held`` (whatever the database holds) is ``owner``'s."""
    return isinstance(held, tuple) and len(held) == 4 and held[:3] == owner[:3]


def _expired(held: Any, timeout: float) -> bool:
    """Whether a claim is stale: its process is gone (same host) or it was not renewed in time."""
    try:
        host, pid, _token, when = held
    except (TypeError, ValueError):
        return True
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return not isinstance(when, (int, float)) or time.time() - when > timeout


def _step_name(step: Callable[..., Any]) -> str:
    return getattr(step, "__qualname__", None) or repr(step)


def _dotted(obj: Any) -> str:
    cls = obj.__class__
    if isinstance(obj, Broken):
        return broken_name(cls).replace(":", ".")
    return f"{cls.__module__}.{cls.__qualname__}"


# -- every instance of a class ---------------------------------------------------------------


class EachResult(int):
    """How many objects :func:`each` passed to its function in this call (an int), with
    ``batches`` committed and ``conflicts`` retried; ``already_done`` when an earlier call
    had finished the run."""

    batches: int
    conflicts: int
    already_done: bool


def each(
    db: Any,
    class_: Any,
    func: Callable[[Any], Any],
    batch_size: int = 1000,
    progress: Callable[[int, int | None], Any] | None = None,
    name: str | None = None,
) -> EachResult:
    """Call ``func(obj)`` for every stored instance of ``class_`` (a name or the class).

    Instances are found through the storage's records, not by walking from the root, in
    oid order; every ``batch_size`` objects the changes commit together with the run's
    position, and a batch that conflicts with a concurrent commit is retried, so it runs on
    a live database.  A run is named by the class and ``func``'s qualified name (or
    ``name``): called again after a crash it continues after the last committed batch; once
    finished, calling it again does nothing.  Records still naming an old name of the class
    (``db.rename_class``) are included.  ``progress(done, total)`` is called after each batch
    (``total`` unknown: None).
    """
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    target = normalize_class_name(class_)
    names = db.class_resolver.names_for(target)
    run = name or _run_name(db, target, func)
    state = _run_state(db, run)
    if state.get("done"):
        return _each_result(0, 0, 0, already_done=True)
    after = p64(state["after"]) if isinstance(state.get("after"), int) else None
    done = int(state.get("count", 0)) if isinstance(state.get("count"), int) else 0
    count = batches = conflicts = 0
    with _connection(db) as (manager, conn):
        while True:
            handled, after, finished, retried = _each_batch(
                conn, manager, run, names, after, func, batch_size, done + count
            )
            count += handled
            batches += 1
            conflicts += retried
            if progress is not None:
                progress(done + count, done + count if finished else None)
            if finished:
                break
    return _each_result(count, batches, conflicts, already_done=False)


def _each_result(count: int, batches: int, conflicts: int, already_done: bool) -> EachResult:
    result = EachResult(count)
    result.batches, result.conflicts, result.already_done = batches, conflicts, already_done
    return result


def _run_name(db: Any, target: str, func: Callable[[Any], Any]) -> str:
    """The class and the function's qualified name; where that is ambiguous, more.

    A lambda or a function defined inside another has no unique qualified name, so its code's
    file and line are added; ``upgrade`` runs again for each new ``_p_version`` of the class.
    """
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    run = f"{target}/{getattr(func, '__module__', None) or '?'}.{qualname}"
    code = getattr(func, "__code__", None)
    if "<" in qualname and code is not None:
        run += f"@{code.co_filename}:{code.co_firstlineno}"
    if func is upgrade:
        cls = db.class_resolver.persistent_class(target)
        run += f"@version{getattr(cls, '_p_version', 0)}"
    return run


def _run_state(db: Any, run: str) -> dict[str, Any]:
    metadata = _read(db)
    state = {} if metadata is None else metadata.get("runs", {}).get(run, {})
    return dict(state) if isinstance(state, dict) else {}


def _read(db: Any) -> dict[str, dict[str, Any]] | None:
    """The database's metadata sections as of now (copies), or None when it has none."""
    with _connection(db) as (manager, conn):
        manager.begin()
        metadata = read_metadata(conn)
        if metadata is None:
            return None
        return {section: metadata.section(section) for section in ("generations", "claims", "runs")}


def _next_instances(
    storage: Any, names: set[str], after: Oid | None, wanted: int
) -> tuple[list[tuple[Oid, Tid, bytes]], Oid | None, bool]:
    """Up to ``wanted`` current records of the classes ``names`` above ``after``.

    Returns them, the last oid looked at, and whether the storage has no more records.
    """
    found: list[tuple[Oid, Tid, bytes]] = []
    page_size = max(100, min(wanted, 1000))
    while len(found) < wanted:
        page = _current_page(storage, after, page_size)
        if not page:
            return found, after, True
        for oid, tid, record in page:
            after = oid
            try:
                if decode_header(record).class_name in names:
                    found.append((oid, tid, record))
            except DatabaseError:
                log.warning("evolve: the record of oid %s cannot be decoded; skipped", oid_repr(oid))
            if len(found) >= wanted:
                break
    return found, after, False


def _current_page(storage: Any, after: Oid | None, limit: int) -> list[tuple[Oid, Tid, bytes]]:
    """One page of ``current_records``, checked (order, size) by ``iter_current_records``."""
    return list(itertools.islice(iter_current_records(storage, after=after, batch=limit), limit))


def _each_batch(
    conn: Any,
    manager: Any,
    run: str,
    names: set[str],
    after: Oid | None,
    func: Callable[[Any], Any],
    batch_size: int,
    done: int,
) -> tuple[int, Oid | None, bool, int]:
    """Migrate the next batch and commit it with the run's new position; retried on conflicts.

    The records are listed after the transaction began, so one whose serial is not newer
    than the connection's snapshot is the revision the snapshot shows and is used as it is
    (no second read).  Returns (objects handled, new position, finished, conflicts retried).
    """
    for attempt in range(_RETRIES):
        try:
            manager.begin()
            found, position, finished = _next_instances(conn._storage, names, after, batch_size)
            objects = [conn.get_with_record(oid, record, tid) for oid, tid, record in found]
            for obj in objects:
                func(obj)
            metadata = metadata_for_update(conn)
            saved: dict[str, Any] = {"count": done + len(found)}
            if position is not None:
                saved["after"] = u64(position)
            if finished:
                saved["done"] = True
            metadata.update_section("runs", run, saved)
            manager.get().note(f"amberdb: evolve.each {run}: {len(found)} objects")
            manager.commit()
            conn.release(objects)
            return len(found), position, finished, attempt
        except TransientError:
            manager.abort()
            time.sleep(min(0.5, 0.01 * 2**attempt))
        except BaseException:
            manager.abort()
            raise
    raise ConflictError(f"evolve.each {run}: a batch kept conflicting ({_RETRIES} attempts)")


def upgrade(obj: Any) -> None:
    """For :func:`each`: mark ``obj`` changed when it was loaded from an older (or other)
    ``_p_version`` of its class, so the batch writes it in its class's version."""
    if isinstance(obj, Persistent):
        obj._p_activate()  # a ghost tells nothing yet: its state decides
        if stored_version_differs(obj):
            obj._p_changed = True


# -- changing your mind about persistence ------------------------------------------------------


def make_plain(
    db: Any, class_: Any, batch_size: int = 1000, progress: Callable[[int, int | None], Any] | None = None
) -> int:
    """Turn the stored instances of a class that is no longer persistent into plain values.

    Each instance, a record of its own, is written inline into the one object that refers to
    it (the instance's record is left for ``pack`` to collect).  The class must now be a
    plain (non-persistent) class this database may load.  Refuses with
    :class:`SharedInstancesError`, changing nothing, when an instance is referred to from
    more than one object (plain values cannot be shared).  Returns the number of objects
    rewritten.
    """
    target = normalize_class_name(class_)
    resolver = db.class_resolver
    module, _, qualname = target.partition(":")
    names = resolver.names_for(target)
    try:
        plain = resolver.find(module, qualname)
    except DatabaseError as exc:
        raise DatabaseError(
            f"make_plain: {module}.{qualname} cannot be loaded by this database: {exc}"
        ) from None
    if not isinstance(plain, type) or issubclass(plain, (Persistent, Broken)):
        raise TypeError(
            f"make_plain: {module}.{qualname} must be a plain class now (not a subclass of Persistent): "
            "change the class first, then convert its stored instances"
        )
    referrers: dict[Oid, list[Oid]] = {}
    instances: set[Oid] = set()
    for oid, _tid, record in iter_current_records(db.storage):
        try:
            header = decode_header(record)
        except DatabaseError:
            continue
        if header.class_name in names:
            instances.add(oid)
        for ref_oid, ref_class in set(header.refs):
            if ref_class in names:
                referrers.setdefault(ref_oid, []).append(oid)
    shared = {oid: owners for oid, owners in referrers.items() if len(owners) > 1}
    if shared:
        shown = "; ".join(
            f"{oid_repr(oid)} from {', '.join(oid_repr(owner) for owner in owners[:5])}"
            for oid, owners in list(shared.items())[:20]
        )
        raise SharedInstancesError(
            f"make_plain: {len(shared)} instance(s) of {module}.{qualname} are referred to from more than "
            f"one object, which plain values cannot be: {shown}",
            shared,
        )
    # An instance referred to by another instance goes inline into it, and with it into the
    # object that refers to the first of the chain: only those outside objects are written.
    owners = sorted({owners[0] for owners in referrers.values() if owners[0] not in instances})

    def inline(obj: Persistent) -> Any:
        if isinstance(obj, Broken) and broken_name(type(obj)) in names:
            obj._p_activate()
            obj._v_inline_class = plain  # see PersistentBroken.__class__
            return copyreg.__newobj__, (plain,), obj.__getstate__()  # type: ignore[attr-defined]
        return None

    rewritten = 0
    with _connection(db) as (manager, conn):
        conn._writer.inline = inline
        try:
            for start in range(0, len(owners), batch_size):
                batch = owners[start : start + batch_size]
                for attempt in range(_RETRIES):
                    try:
                        manager.begin()
                        for oid in batch:
                            owner = conn.get(oid)
                            if isinstance(owner, Broken):
                                raise DatabaseError(
                                    f"make_plain: {_dotted(owner)} oid {oid_repr(oid)} refers to an instance"
                                    " but its own class is missing, so it cannot be rewritten"
                                )
                            owner._p_changed = True
                        manager.get().note(f"amberdb: make_plain {module}.{qualname}")
                        manager.commit()
                        conn.cache_minimize()
                        break
                    except TransientError:
                        manager.abort()
                        time.sleep(min(0.5, 0.01 * 2**attempt))
                else:
                    raise ConflictError(f"make_plain: a batch kept conflicting ({_RETRIES} attempts)")
                rewritten += len(batch)
                if progress is not None:
                    progress(rewritten, len(owners))
        finally:
            conn._writer.inline = None
    return rewritten
