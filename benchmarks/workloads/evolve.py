"""Workload 16: migrate every instance of a class -- ``amberdb.evolve.each`` against the
hand-written loop a ZODB application runs for the same job.

:func:`build` (setup, not timed) fills a FileStorage with ``n`` ``Book`` objects (title, year,
tags) held in an ``IOBTree`` keyed by int, committing every ``build_batch``, and closes the
database.  :func:`migrate` runs in a fresh process per sample on a copy of that database, so
the object cache is cold (the copy itself is outside the timing).  It times, from opening
the database to the last commit, one migration (``year += 1``, a new ``isbn`` attribute):

* AmberDB: ``amberdb.evolve.each(db, Book, change, batch_size=batch)``, which finds the
  instances through the storage's records (``current_records``), not through the tree, and
  commits every ``batch`` objects together with the run's position;
* ZODB: iterate the tree's values, change each, ``commit()`` every ``batch`` objects; after
  each commit the cache is minimized, as ``evolve.each`` does after each batch.

Reported: objects migrated per second, the peak RSS of the migrating process (taken right
after the last commit), and how much of it the migration added (the peak minus the RSS just
before opening the database, with the engine's modules imported).  :func:`check` (outside
any timing, a process of its own) reads every Book back and fails the run unless each was
migrated exactly once.  Cache size: 10,000
objects for both engines.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from benchmarks.engines import Engine
from benchmarks.measure import clock, current_rss_mb, peak_rss_mb

CACHE_SIZE = 10_000
_SUFFIXES = ("", ".index")
_changed = 0
"""How many times :func:`change` ran in this process."""


def _path(directory: str, name: str = "evolve.fs") -> str:
    return os.path.join(directory, name)


def _work_path(directory: str) -> str:
    return _path(directory, "evolve-work.fs")


def isbn(n: int) -> str:
    """The ISBN the migration gives Book ``n``."""
    return f"978-{n:010d}"


def change(book: Any) -> None:
    """The migration of one Book: the year moves on by one, the ISBN is a new attribute."""
    global _changed
    book.year += 1
    book.isbn = isbn(int(book.title[5:]))  # "Book <n>"
    _changed += 1


def build(engine: Engine, directory: str, n: int, build_batch: int) -> dict[str, float]:
    """Commit ``n`` Books into an IOBTree at ``root["books"]`` in chunks (setup, not timed)."""
    db = engine.open_db(_path(directory), cache_size=CACHE_SIZE)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    conn.root()["books"] = books = engine.object_btree_class()()
    manager.commit()
    book_class = engine.Book
    for start in range(0, n, build_batch):
        for i in range(start, min(n, start + build_batch)):
            books[i] = book_class(i)
        manager.commit()
        engine.minimize_cache(conn)
    conn.close()
    db.close()
    return {"objects": n}


def _copy(directory: str) -> str:
    """A fresh copy of the built database (each sample migrates the original state)."""
    source, path = _path(directory), _work_path(directory)
    for suffix in _SUFFIXES:
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
        if os.path.exists(source + suffix):
            shutil.copyfile(source + suffix, path + suffix)
    return path


def _migrate_amberdb(engine: Engine, path: str, batch: int) -> tuple[float, Any]:
    """Seconds from opening the database to ``evolve.each``'s last commit; the open DB."""
    from amberdb import evolve

    began = clock()
    db = engine.open_db(path, cache_size=CACHE_SIZE)
    done = evolve.each(db, engine.Book, change, batch_size=batch)
    elapsed = clock() - began
    if int(done) != _changed:
        raise AssertionError(f"evolve.each reported {int(done)} objects, the function ran {_changed} times")
    return elapsed, db


def _migrate_zodb(engine: Engine, path: str, batch: int) -> tuple[float, Any]:
    """Seconds from opening the database to the hand-written loop's last commit; the open DB."""
    began = clock()
    db = engine.open_db(path, cache_size=CACHE_SIZE)
    manager = engine.transaction_manager()
    conn = db.open(transaction_manager=manager)
    pending = 0
    for book in conn.root()["books"].values():
        change(book)
        pending += 1
        if pending == batch:
            manager.commit()
            engine.minimize_cache(conn)
            pending = 0
    manager.commit()
    elapsed = clock() - began
    conn.close()
    return elapsed, db


def migrate(engine: Engine, directory: str, n: int, batch: int) -> dict[str, float]:
    """Migrate every Book of a fresh copy of the database; objects per second and peak RSS."""
    global _changed
    path = _copy(directory)
    _changed = 0
    if engine.name == "amberdb":
        import amberdb.evolve  # noqa: F401 -- imported before the RSS baseline, like ZODB's modules

        runner = _migrate_amberdb
    else:
        runner = _migrate_zodb
    before = current_rss_mb()
    elapsed, db = runner(engine, path, batch)
    peak = peak_rss_mb()
    db.close()
    if _changed != n:
        raise AssertionError(f"the migration changed {_changed} objects, expected {n}")
    return {"evolve_rate": n / elapsed, "evolve_peak_rss_mb": peak, "evolve_rss_added_mb": peak - before}


def check(engine: Engine, directory: str, n: int) -> dict[str, float]:
    """Read every Book of the migrated copy back: each migrated exactly once (not timed).

    A Book changed twice would have moved two years on; one left out, no ISBN.  For AmberDB,
    the run is also recorded as finished: calling ``evolve.each`` again changes nothing.
    """
    db = engine.open_db(_work_path(directory), cache_size=CACHE_SIZE)
    try:
        manager = engine.transaction_manager()
        conn = db.open(transaction_manager=manager)
        checked = 0
        for key, book in conn.root()["books"].items():
            if book.year != 1900 + key % 120 + 1 or getattr(book, "isbn", None) != isbn(key):
                raise AssertionError(f"Book {key}: year {book.year}, isbn {getattr(book, 'isbn', None)!r}")
            checked += 1
            if not checked % 10_000:
                engine.minimize_cache(conn)
        manager.abort()
        conn.close()
        if checked != n:
            raise AssertionError(f"the database holds {checked} Books, expected {n}")
        if engine.name == "amberdb":
            from amberdb import evolve

            again = evolve.each(db, engine.Book, change)
            if not again.already_done or int(again) or _changed:
                raise AssertionError(f"evolve.each ran again over {int(again)} objects after finishing")
    finally:
        db.close()
    return {"evolve_checked": checked}
