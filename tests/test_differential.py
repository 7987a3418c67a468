"""AmberDB and ZODB 6 run the same random programs and must agree after every step.

A hypothesis state machine drives two *worlds*, one on AmberDB and one on ZODB, through the
same operations on the same objects: persistent items holding an int, a reference to
another item and a plain list (changed with ``_p_changed = True``); a PersistentList; a
PersistentMapping; an OOBTree and an IIBTree.  Connection A uses an implicit transaction
manager: it adds and changes objects, takes savepoints and rolls back to any live one,
commits and aborts (also subtransactions), registers before- and after-commit hooks that
change objects, closes and reopens, writes through an object of its closed connection, and
trims its cache.  Connection B uses an explicit manager and commits concurrently; it also
writes without a transaction.  After each step the machine requires:

* the same outcome in both worlds (the same error kind, ConflictError in both or neither);
* the same values visible through A, through B (snapshot isolation), and through a fresh
  connection (the committed state);
* A's view equal to a simple model: a dict of plain values, the committed state at A's last
  transaction boundary plus A's own changes, with a stack of savepoint snapshots.

ZODB's ``transaction`` package no longer has subtransactions: there ``commit(True)`` is taken
as an optimistic savepoint and ``abort(True)`` as its rollback (a savepoint at the
transaction's start when there is none), which is what AmberDB documents them to be, and
the model checks both.  Known deliberate differences are kept out of the programs: trees
keep a first key that is never deleted (AmberDB merges concurrent deletes of a bucket's first
key, ZODB refuses) and stay far below a bucket's size (split points differ); ZODB's
read-current checks on BTree nodes are off (AmberDB conflicts on writes only).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import BTrees.IIBTree
import BTrees.OOBTree
import persistent
import persistent.list
import persistent.mapping
import pytest
import ZODB
import ZODB.FileStorage
import ZODB.POSException
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from transaction.interfaces import InvalidSavepointRollbackError as ZodbInvalidSavepointRollbackError
from ZODB.DemoStorage import DemoStorage

import amberdb
import amberdb.transaction as atransaction
from amberdb.btrees import IIBTree, OOBTree
from amberdb.exceptions import ConflictError, InvalidSavepointRollbackError
from transaction import TransactionManager as ZodbTransactionManager

Plain = tuple[Any, ...]
State = dict[str, Plain]


class AmberItem(amberdb.Persistent):
    """An item of the AmberDB world."""

    def __init__(self, name: str, value: int) -> None:
        self.name = name
        self.value = value
        self.ref: AmberItem | None = None
        self.tags: list[int] = []


class ZodbItem(persistent.Persistent):
    """The same item in the ZODB world."""

    def __init__(self, name: str, value: int) -> None:
        self.name = name
        self.value = value
        self.ref: ZodbItem | None = None
        self.tags: list[int] = []


@dataclass(frozen=True)
class Engine:
    """What differs between the worlds: classes, managers, errors, cache calls."""

    name: str
    item: type
    plist: type
    pmap: type
    oo_tree: type
    ii_tree: type
    manager: Callable[..., Any]
    conflict: type[BaseException]
    invalid_savepoint: type[BaseException]
    open_db: Callable[[str | None], Any]
    cache_gc: Callable[[Any], None]
    cache_minimize: Callable[[Any], None]
    commit_subtransaction: Callable[[World], None]
    abort_subtransaction: Callable[[World], None]

    def category(self, error: BaseException) -> str:
        """A name for ``error`` that both worlds share."""
        if isinstance(error, self.conflict):
            return "conflict"
        if isinstance(error, self.invalid_savepoint):
            return "invalid savepoint"
        if isinstance(error, KeyError):
            return "key"
        if isinstance(error, IndexError):
            return "index"
        return "refused"


CACHE_SIZE = 3  # small: eviction happens all the time


def _amber_commit_subtransaction(world: World) -> None:
    world.tm_a.commit(True)


def _amber_abort_subtransaction(world: World) -> None:
    world.tm_a.abort(True)


def _zodb_commit_subtransaction(world: World) -> None:
    world.subtransaction = world.tm_a.savepoint(optimistic=True)


def _zodb_abort_subtransaction(world: World) -> None:
    savepoint = world.subtransaction
    if savepoint is None:
        savepoint = world.start_savepoint
    savepoint.rollback()


AMBER = Engine(
    name="amberdb",
    item=AmberItem,
    plist=amberdb.PersistentList,
    pmap=amberdb.PersistentMapping,
    oo_tree=OOBTree,
    ii_tree=IIBTree,
    manager=atransaction.TransactionManager,
    conflict=ConflictError,
    invalid_savepoint=InvalidSavepointRollbackError,
    open_db=lambda path: amberdb.DB(path, cache_size=CACHE_SIZE),
    cache_gc=lambda conn: conn.cache_gc(),
    cache_minimize=lambda conn: conn.cache_minimize(),
    commit_subtransaction=_amber_commit_subtransaction,
    abort_subtransaction=_amber_abort_subtransaction,
)

ZODB_ENGINE = Engine(
    name="zodb",
    item=ZodbItem,
    plist=persistent.list.PersistentList,
    pmap=persistent.mapping.PersistentMapping,
    oo_tree=BTrees.OOBTree.OOBTree,
    ii_tree=BTrees.IIBTree.IIBTree,
    manager=ZodbTransactionManager,
    conflict=ZODB.POSException.ConflictError,
    invalid_savepoint=ZodbInvalidSavepointRollbackError,
    # DemoStorage resolves conflicts (MappingStorage does not), as AmberDB's storages do.
    open_db=lambda path: ZODB.DB(
        DemoStorage() if path is None else ZODB.FileStorage.FileStorage(path), cache_size=CACHE_SIZE
    ),
    cache_gc=lambda conn: conn.cacheGC(),
    cache_minimize=lambda conn: conn.cacheMinimize(),
    commit_subtransaction=_zodb_commit_subtransaction,
    abort_subtransaction=_zodb_abort_subtransaction,
)

# Changes to the containers, by root name: what a refused write tries.
CONTAINERS: dict[str, Callable[[Any, int], object]] = {
    "plist": lambda items, value: items.append(value),
    "pmap": lambda mapping, value: mapping.__setitem__("b", value),
    "tree": lambda tree, value: tree.__setitem__("e", value),
    "iitree": lambda tree, value: tree.__setitem__(3, value),
}


def _no_read_current_check(obj: Any) -> None:
    """Stands in for ZODB's ``Connection.readCurrent`` (see ``World``)."""


FIRST_OO_KEY = "a"  # never deleted: see the module docstring
FIRST_II_KEY = 0


class World:
    """One database with connection A (implicit manager) and B (explicit manager)."""

    def __init__(self, engine: Engine, path: str | None) -> None:
        self.engine = engine
        self.db = engine.open_db(path)
        self.tm_a = engine.manager()
        self.a = self.db.open(transaction_manager=self.tm_a)
        root = self.a.root()
        root["plist"] = engine.plist()
        root["pmap"] = engine.pmap()
        root["tree"] = engine.oo_tree({FIRST_OO_KEY: 0})
        root["iitree"] = engine.ii_tree({FIRST_II_KEY: 0})
        self.tm_a.commit()
        self.tm_b = engine.manager(explicit=True)
        self.b = self.db.open(transaction_manager=self.tm_b)
        if engine is ZODB_ENGINE:
            # ZODB's BTrees ask for read-current checks on the nodes they pass through, so
            # a commit that only read a tree another transaction changed raises
            # ReadConflictError.  AmberDB has no such checks (a split always rewrites the
            # bucket it splits, so write conflicts cover it): compare without them.
            for conn in (self.a, self.b):
                conn.readCurrent = _no_read_current_check
        self.savepoints: list[Any] = []  # parallel to the machine's stack
        self.dead_savepoints: list[Any] = []  # invalidated by a rollback or the end of the transaction
        self.subtransaction: Any = None  # ZODB's stand-in for commit(True)
        self.start_savepoint: Any = None
        self.hook_errors: list[BaseException] = []
        # What B changed, kept for writes outside a transaction: items, and containers.
        self.b_kept: dict[str, Any] = {}
        self.b_kept_containers: dict[str, Any] = {}
        self.boundary()

    def boundary(self) -> None:
        """A's transaction ended: its savepoints are no longer valid."""
        self.dead_savepoints.extend(sp for sp in self.savepoints if sp is not None)
        del self.dead_savepoints[:-4]
        self.savepoints = []
        self.subtransaction = None
        if self.engine is ZODB_ENGINE:
            # abort(True) before any commit(True) returns here.
            self.start_savepoint = self.tm_a.savepoint()

    def plain(self, obj: Any) -> Plain:
        """``obj`` as plain values; references as the referenced item's name."""
        engine = self.engine
        if isinstance(obj, engine.item):
            ref = None if obj.ref is None else obj.ref.name
            return ("item", obj.value, ref, tuple(obj.tags))
        if isinstance(obj, engine.plist):
            return ("list", tuple(obj))
        if isinstance(obj, engine.pmap):
            return ("map", tuple(sorted(obj.items())))
        return ("tree", tuple(obj.items()))

    def view(self, conn: Any) -> State:
        """Everything reachable from the root, as ``conn`` sees it."""
        root = conn.root()
        return {name: self.plain(root[name]) for name in sorted(root.keys())}

    def committed(self) -> State:
        """What a fresh connection sees: the committed state."""
        manager = self.engine.manager()
        reader = self.db.open(transaction_manager=manager)
        try:
            return self.view(reader)
        finally:
            manager.abort()
            reader.close()

    def close(self) -> None:
        """Abort what is open, close the connections, then the database."""
        for manager, conn in ((self.tm_a, self.a), (self.tm_b, self.b)):
            try:
                manager.abort()
            except Exception:  # an explicit manager with no transaction
                pass
            conn.close()
        self.db.close()


Outcome = tuple[str, Any]


@dataclass(eq=False)  # entries are told apart by identity: two may hold equal snapshots
class Entry:
    """One savepoint of A's transaction in the model."""

    kind: str  # "user" (a savepoint), "sub" (commit(True))
    snapshot: State
    valid: bool = True


VALUES = st.integers(-3, 30)
OO_KEYS = st.sampled_from(["b", "c", "d", "e"])
II_KEYS = st.integers(1, 6)


class DifferentialMachine(RuleBasedStateMachine):
    """Same operations on AmberDB, ZODB and a model; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        # Cyclic garbage collected at random moments would make caches (weak references)
        # differ between runs of one program, and a failure flaky to shrink.
        gc.disable()
        self.directory = self.make_directory()
        self.amber = World(AMBER, self.path("amber.fs"))
        self.zodb = World(ZODB_ENGINE, self.path("zodb.fs"))
        self.worlds = (self.amber, self.zodb)
        self.counter = 0
        self.resync()
        self.b_in_transaction = False

    # -- set-up and helpers ----------------------------------------------------------------

    def make_directory(self) -> str | None:
        return None

    def path(self, name: str) -> str | None:
        return None if self.directory is None else str(Path(self.directory) / name)

    def teardown(self) -> None:
        try:
            for world in self.worlds:
                world.close()
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
        finally:
            gc.enable()

    def resync(self) -> None:
        """A transaction boundary of A: the model starts again from the committed state."""
        committed = self.both(lambda w: w.committed())[1]
        self.model: State = dict(committed)
        self.start: State = dict(committed)
        self.stack: list[Entry] = []
        self.subtransaction: Entry | None = None
        self.before_hooks: list[tuple[str, int]] = []
        self.b_committed = False  # since A's boundary
        for world in self.worlds:
            world.boundary()

    def both(self, operation: Callable[[World], Any]) -> Outcome:
        """Run ``operation`` in both worlds; they must have the same outcome (compared plainly)."""
        outcomes: list[Outcome] = []
        for world in self.worlds:
            try:
                outcomes.append(("ok", operation(world)))
            except Exception as exc:  # the category is compared, the exception kept for the message
                outcomes.append(("error", world.engine.category(exc), repr(exc)))  # type: ignore[arg-type]
        amber, zodb = outcomes
        assert amber[:2] == zodb[:2], f"AmberDB: {amber}\nZODB:    {zodb}"
        return amber

    def expect(self, outcome: Outcome, expected: Outcome) -> None:
        assert outcome[:2] == expected, f"both worlds gave {outcome}, the model expects {expected}"

    def items(self) -> list[str]:
        return sorted(name for name, plain in self.model.items() if plain[0] == "item")

    def new_name(self) -> str:
        self.counter += 1
        return f"i{self.counter}"

    def change_item(self, name: str, change: Callable[[Plain], Plain], act: Callable[[Any], None]) -> None:
        self.expect(self.both(lambda w: act(w.a.root()[name])), ("ok", None))
        self.model[name] = change(self.model[name])

    # -- connection A: objects -----------------------------------------------------------

    @rule(value=VALUES)
    def add_item(self, value: int) -> None:
        name = self.new_name()

        def add(world: World) -> None:
            world.a.root()[name] = world.engine.item(name, value)

        self.expect(self.both(add), ("ok", None))
        self.model[name] = ("item", value, None, ())

    @rule(value=VALUES, minimize=st.booleans())
    def add_item_explicitly_then_trim_the_cache(self, value: int, minimize: bool) -> None:
        name = self.new_name()

        def add(world: World) -> None:
            item = world.engine.item(name, value)
            world.a.add(item)
            (world.engine.cache_minimize if minimize else world.engine.cache_gc)(world.a)
            world.a.root()[name] = item

        self.expect(self.both(add), ("ok", None))
        self.model[name] = ("item", value, None, ())

    @precondition(lambda self: self.items())
    @rule(data=st.data(), value=VALUES)
    def set_value(self, data: st.DataObject, value: int) -> None:
        name = data.draw(st.sampled_from(self.items()))
        self.change_item(
            name, lambda p: ("item", value, p[2], p[3]), lambda item: setattr(item, "value", value)
        )

    @precondition(lambda self: self.items())
    @rule(data=st.data())
    def set_ref(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.items()))
        target = data.draw(st.sampled_from([None, *self.items()]))

        def act(world: World) -> None:
            root = world.a.root()
            root[name].ref = None if target is None else root[target]

        self.expect(self.both(act), ("ok", None))
        plain = self.model[name]
        self.model[name] = ("item", plain[1], target, plain[3])

    @precondition(lambda self: self.items())
    @rule(data=st.data(), tag=VALUES)
    def add_tag_marking_changed(self, data: st.DataObject, tag: int) -> None:
        name = data.draw(st.sampled_from(self.items()))

        def act(item: Any) -> None:
            item.tags.append(tag)
            item._p_changed = True

        self.change_item(name, lambda p: ("item", p[1], p[2], (*p[3], tag)), act)

    @rule(value=VALUES)
    def list_append(self, value: int) -> None:
        self.expect(self.both(lambda w: w.a.root()["plist"].append(value)), ("ok", None))
        self.model["plist"] = ("list", (*self.model["plist"][1], value))

    @rule()
    def list_pop(self) -> None:
        items = self.model["plist"][1]
        outcome = self.both(lambda w: w.a.root()["plist"].pop())
        if items:
            self.expect(outcome, ("ok", items[-1]))
            self.model["plist"] = ("list", items[:-1])
        else:
            self.expect(outcome, ("error", "index"))

    @rule(key=OO_KEYS, value=VALUES)
    def map_set(self, key: str, value: int) -> None:
        def act(world: World) -> None:
            world.a.root()["pmap"][key] = value

        self.expect(self.both(act), ("ok", None))
        self.model["pmap"] = ("map", tuple(sorted({**dict(self.model["pmap"][1]), key: value}.items())))

    @rule(key=OO_KEYS)
    def map_delete(self, key: str) -> None:
        def act(world: World) -> None:
            del world.a.root()["pmap"][key]

        current = dict(self.model["pmap"][1])
        outcome = self.both(act)
        if key in current:
            self.expect(outcome, ("ok", None))
            del current[key]
            self.model["pmap"] = ("map", tuple(sorted(current.items())))
        else:
            self.expect(outcome, ("error", "key"))

    @rule(which=st.sampled_from(["tree", "iitree"]), data=st.data(), value=VALUES)
    def tree_set(self, which: str, data: st.DataObject, value: int) -> None:
        key = data.draw(OO_KEYS if which == "tree" else II_KEYS)

        def act(world: World) -> None:
            world.a.root()[which][key] = value

        self.expect(self.both(act), ("ok", None))
        self.model[which] = ("tree", tuple(sorted({**dict(self.model[which][1]), key: value}.items())))

    @rule(which=st.sampled_from(["tree", "iitree"]), data=st.data())
    def tree_delete(self, which: str, data: st.DataObject) -> None:
        key = data.draw(OO_KEYS if which == "tree" else II_KEYS)

        def act(world: World) -> None:
            del world.a.root()[which][key]

        current = dict(self.model[which][1])
        outcome = self.both(act)
        if key in current:
            self.expect(outcome, ("ok", None))
            del current[key]
            self.model[which] = ("tree", tuple(sorted(current.items())))
        else:
            self.expect(outcome, ("error", "key"))

    # -- connection A: savepoints and subtransactions ----------------------------------------

    @rule()
    def savepoint(self) -> None:
        def take(world: World) -> None:
            world.savepoints.append(world.tm_a.savepoint())

        self.expect(self.both(take), ("ok", None))
        self.stack.append(Entry("user", dict(self.model)))

    @precondition(lambda self: any(entry.kind == "user" for entry in self.stack))
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from([i for i, entry in enumerate(self.stack) if entry.kind == "user"]))
        self.expect(self.both(lambda w: w.savepoints[index].rollback()), ("ok", None))
        self.model = dict(self.stack[index].snapshot)
        self.truncate(index + 1)

    def truncate(self, keep: int) -> None:
        """Savepoints after the first ``keep`` are no longer valid (a rollback went before them)."""
        for entry in self.stack[keep:]:
            entry.valid = False
        del self.stack[keep:]
        for world in self.worlds:
            world.dead_savepoints.extend(sp for sp in world.savepoints[keep:] if sp is not None)
            del world.savepoints[keep:]

    @precondition(lambda self: self.amber.dead_savepoints)
    @rule(data=st.data())
    def rollback_to_an_invalid_savepoint(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.amber.dead_savepoints) - 1))
        outcome = self.both(lambda w: w.dead_savepoints[index].rollback())
        self.expect(outcome, ("error", "invalid savepoint"))

    @rule()
    def commit_subtransaction(self) -> None:
        def commit(world: World) -> None:
            world.engine.commit_subtransaction(world)
            world.savepoints.append(None)  # keeps the lists parallel to the stack

        self.expect(self.both(commit), ("ok", None))
        self.subtransaction = Entry("sub", dict(self.model))
        self.stack.append(self.subtransaction)

    @rule()
    def abort_subtransaction(self) -> None:
        outcome = self.both(lambda w: w.engine.abort_subtransaction(w))
        entry = self.subtransaction
        if entry is None:
            self.expect(outcome, ("ok", None))
            self.model = dict(self.start)
            self.truncate(0)
        elif not entry.valid:
            self.expect(outcome, ("error", "invalid savepoint"))
        else:
            self.expect(outcome, ("ok", None))
            self.model = dict(entry.snapshot)
            self.truncate(self.stack.index(entry) + 1)

    # -- connection A: commit, abort, hooks --------------------------------------------------

    @precondition(lambda self: self.items())
    @rule(data=st.data(), value=VALUES)
    def before_commit_hook(self, data: st.DataObject, value: int) -> None:
        name = data.draw(st.sampled_from(self.items()))

        def add(world: World) -> None:
            def hook() -> None:
                world.a.root()[name].value = value

            world.tm_a.get().addBeforeCommitHook(hook)

        self.expect(self.both(add), ("ok", None))
        self.before_hooks.append((name, value))

    @precondition(lambda self: self.items())
    @rule(data=st.data(), value=VALUES)
    def after_commit_hook_that_changes(self, data: st.DataObject, value: int) -> None:
        name = data.draw(st.sampled_from(self.items()))

        def add(world: World) -> None:
            item = world.a.root()[name]

            def hook(ok: bool) -> None:
                try:
                    item.value = value
                except Exception as exc:
                    world.hook_errors.append(exc)
                    raise

            world.tm_a.get().addAfterCommitHook(hook)

        self.expect(self.both(add), ("ok", None))

    @rule()
    def commit(self) -> None:
        expected = dict(self.model)
        hooks_fail = False
        for name, value in self.before_hooks:
            if name not in expected:
                hooks_fail = True
                break
            plain = expected[name]
            expected[name] = ("item", value, plain[2], plain[3])
        for world in self.worlds:
            world.hook_errors = []
        outcome = self.both(lambda w: w.tm_a.commit())
        if outcome[0] == "error":
            assert hooks_fail or outcome[1] == "conflict", outcome
            self.both(lambda w: w.tm_a.abort())
        else:
            assert not hooks_fail
            if not self.b_committed:
                assert self.both(lambda w: w.committed())[1] == expected
        refused = [bool(w.hook_errors) for w in self.worlds]
        assert refused[0] == refused[1], f"after-commit hook change refused (AmberDB, ZODB): {refused}"
        self.resync()

    @rule(then_trim_cache=st.booleans())
    def abort(self, then_trim_cache: bool) -> None:
        self.expect(self.both(lambda w: w.tm_a.abort()), ("ok", None))
        self.resync()
        if then_trim_cache:
            self.trim_cache(minimize=False)

    @rule()
    def begin_aborts_the_current_transaction(self) -> None:
        self.expect(self.both(lambda w: w.tm_a.begin() and None), ("ok", None))
        self.resync()

    @rule()
    def doomed_commit_is_refused(self) -> None:
        self.expect(self.both(lambda w: w.tm_a.doom()), ("ok", None))
        self.expect(self.both(lambda w: w.tm_a.commit()), ("error", "refused"))
        self.expect(self.both(lambda w: w.tm_a.abort()), ("ok", None))
        self.resync()

    # -- connection A: objects back to ghosts ---------------------------------------------------

    @precondition(lambda self: self.items())
    @rule(data=st.data(), invalidate=st.booleans())
    def back_to_ghost(self, data: st.DataObject, invalidate: bool) -> None:
        """``_p_deactivate`` (unchanged objects only) or ``_p_invalidate`` (changes are lost)."""
        name = data.draw(st.sampled_from(self.items()))

        def act(world: World) -> None:
            item = world.a.root()[name]
            item._p_invalidate() if invalidate else item._p_deactivate()

        if name not in self.start:
            # New in this transaction: AmberDB leaves it alone (its state may exist only in
            # memory); ZODB makes an explicitly added one a ghost with no record.
            self.expect(self.amber_only(act), ("ok", None))
            return
        self.expect(self.both(act), ("ok", None))
        if invalidate:  # back to the last savepoint's state, or the transaction's start
            self.model[name] = (self.stack[-1].snapshot if self.stack else self.start)[name]

    # -- connection A: closing, writing while closed, cache -----------------------------------

    def close_a(self) -> bool:
        """Close A in both worlds (refused in both while it has changes); True if closed."""
        outcome = self.both(lambda w: w.a.close())
        return outcome[0] == "ok"

    def reopen_a(self) -> None:
        def reopen(world: World) -> None:
            world.a = world.db.open(transaction_manager=world.tm_a)

        self.expect(self.both(reopen), ("ok", None))
        committed = self.both(lambda w: w.committed())[1]
        self.model = dict(committed)
        self.start = dict(committed)

    @precondition(lambda self: not self.stack)
    @rule()
    def close_and_reopen(self) -> None:
        if self.close_a():
            self.reopen_a()

    @precondition(lambda self: not self.stack)
    @rule(data=st.data(), value=VALUES)
    def write_through_a_closed_connection(self, data: st.DataObject, value: int) -> None:
        target = data.draw(st.sampled_from([*CONTAINERS, *self.items()]))
        kept = {world.engine.name: world.a.root()[target] for world in self.worlds}
        if not self.close_a():
            return
        if target in CONTAINERS:
            # ZODB's containers and BTrees change their data before they register, so a
            # refused change stays in memory there: AmberDB is held to the model instead.
            refused = self.amber_only(lambda world: CONTAINERS[target](kept["amberdb"], value))
        else:
            refused = self.both(lambda world: setattr(kept[world.engine.name], "value", value))
        self.expect(refused, ("error", "refused"))
        self.reopen_a()

    def amber_only(self, operation: Callable[[World], Any]) -> Outcome:
        """Run ``operation`` in the AmberDB world only (where ZODB is known to differ)."""
        try:
            return ("ok", operation(self.amber))
        except Exception as exc:
            return ("error", AMBER.category(exc))

    @rule(minimize=st.booleans())
    def trim_cache(self, minimize: bool) -> None:
        def trim(world: World) -> None:
            for conn in (world.a, world.b):
                (world.engine.cache_minimize if minimize else world.engine.cache_gc)(conn)

        self.expect(self.both(trim), ("ok", None))

    # -- connection B: explicit transactions, concurrent commits ------------------------------

    def b_items(self) -> list[str]:
        """The items B sees (ZODB reads only inside a transaction on an explicit manager)."""
        return sorted(name for name, plain in self.zodb.view(self.zodb.b).items() if plain[0] == "item")

    @precondition(lambda self: not self.b_in_transaction)
    @rule()
    def b_begin(self) -> None:
        self.expect(self.both(lambda w: w.tm_b.begin() and None), ("ok", None))
        self.b_in_transaction = True

    @precondition(lambda self: self.b_in_transaction)
    @rule(data=st.data(), value=VALUES)
    def b_set_value(self, data: st.DataObject, value: int) -> None:
        names = self.b_items()
        if not names:
            return

        name = data.draw(st.sampled_from(names))

        def act(world: World) -> None:
            item = world.b_kept[name] = world.b.root()[name]
            item.value = value

        self.expect(self.both(act), ("ok", None))

    @precondition(lambda self: self.b_in_transaction)
    @rule(which=st.sampled_from(["tree", "iitree"]), data=st.data(), value=VALUES)
    def b_tree_set(self, which: str, data: st.DataObject, value: int) -> None:
        key = data.draw(OO_KEYS if which == "tree" else II_KEYS)

        def act(world: World) -> None:
            tree = world.b_kept_containers[which] = world.b.root()[which]
            tree[key] = value

        self.expect(self.both(act), ("ok", None))

    @precondition(lambda self: self.b_in_transaction)
    @rule(value=VALUES)
    def b_list_append(self, value: int) -> None:
        def act(world: World) -> None:
            items = world.b_kept_containers["plist"] = world.b.root()["plist"]
            items.append(value)

        self.expect(self.both(act), ("ok", None))

    @precondition(lambda self: self.b_in_transaction)
    @rule()
    def b_commit(self) -> None:
        outcome = self.both(lambda w: w.tm_b.commit())
        if outcome[0] == "error":
            assert outcome[1] == "conflict", outcome
            self.both(lambda w: w.tm_b.abort())
        else:
            self.b_committed = True
        self.b_in_transaction = False

    @rule(data=st.data(), value=VALUES)
    def b_changes_and_commits_at_once(self, data: st.DataObject, value: int) -> None:
        if not self.b_in_transaction:
            self.b_begin()
        target = data.draw(st.sampled_from(["tree", "iitree", "plist", *self.b_items()]))
        if target in ("tree", "iitree"):
            key = data.draw(OO_KEYS if target == "tree" else II_KEYS)

            def act(world: World) -> None:
                world.b.root()[target][key] = value

        elif target == "plist":

            def act(world: World) -> None:
                world.b.root()["plist"].append(value)

        else:

            def act(world: World) -> None:
                world.b.root()[target].value = value

        self.expect(self.both(act), ("ok", None))
        self.b_commit()

    @precondition(lambda self: self.b_in_transaction)
    @rule()
    def b_abort(self) -> None:
        self.expect(self.both(lambda w: w.tm_b.abort()), ("ok", None))
        self.b_in_transaction = False

    @precondition(
        lambda self: not self.b_in_transaction and (self.zodb.b_kept or self.zodb.b_kept_containers)
    )
    @rule(data=st.data(), value=VALUES)
    def b_write_without_a_transaction(self, data: st.DataObject, value: int) -> None:
        target = data.draw(st.sampled_from(sorted(self.zodb.b_kept) + sorted(self.zodb.b_kept_containers)))
        if target in CONTAINERS:  # see write_through_a_closed_connection
            kept = self.amber.b_kept_containers[target]
            refused = self.amber_only(lambda world: CONTAINERS[target](kept, value))
        else:
            refused = self.both(lambda world: setattr(world.b_kept[target], "value", value))
        self.expect(refused, ("error", "refused"))

    # -- what must hold after every step --------------------------------------------------

    @invariant()
    def same_views(self) -> None:
        a_views = self.both(lambda w: w.view(w.a))[1]
        assert a_views == self.model, "A's view differs from the model"
        if self.b_in_transaction:
            self.both(lambda w: w.view(w.b))
        self.both(lambda w: w.committed())


class FileDifferentialMachine(DifferentialMachine):
    """The same programs on AmberDB's FileStorage and ZODB's."""

    def make_directory(self) -> str | None:
        return tempfile.mkdtemp(prefix="amberdb-differential-")


SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    stateful_step_count=50,
    suppress_health_check=list(HealthCheck),
)


# A failure shrinks for up to five minutes (hypothesis's limit): give it the time to report.
@pytest.mark.timeout(900)
def test_amberdb_behaves_like_zodb_and_the_model() -> None:
    try:
        run_state_machine_as_test(DifferentialMachine, settings=SETTINGS)
    finally:
        gc.enable()  # even if a machine failed before its teardown


@pytest.mark.timeout(900)
def test_amberdb_behaves_like_zodb_and_the_model_on_files() -> None:
    try:
        run_state_machine_as_test(FileDifferentialMachine, settings=settings(SETTINGS, max_examples=25))
    finally:
        gc.enable()
