"""A tour of AmberDB on a file database: store, reopen, query, change, roll back, undo, pack.

Run it with ``python -m amberdb.demo [PATH]`` or ``amberdb-demo [PATH]``; the default PATH is
in a fresh temporary directory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence

import amberdb
import amberdb.transaction as transaction
from amberdb import DB, Persistent, PersistentList, PersistentMapping
from amberdb.btrees import IOBTree, Length, OOTreeSet


class Author(Persistent):
    """A person who wrote books."""

    def __init__(self, name: str) -> None:
        self.name = name


class Book(Persistent):
    """A book with a title, a year and a tuple of authors."""

    publisher = "UNKNOWN"  # a class default: records written without it still read fine

    def __init__(self, title: str, year: int, authors: Sequence[Author]) -> None:
        self.title = title
        self.year = year
        self.authors = tuple(authors)
        self.tags: PersistentList[str] = PersistentList()


def _say(message: str) -> None:
    print(message, flush=True)


def store(path: str) -> None:
    """Create the library in one transaction."""
    db = DB(path)
    with db.transaction() as conn:
        fulton, guido, knuth = Author("Jim Fulton"), Author("Guido van Rossum"), Author("Donald Knuth")
        books: PersistentMapping[str, Book] = PersistentMapping()
        for book in (
            Book("Object Databases in Practice", 2002, [fulton]),
            Book("Python Internals", 2009, [guido]),
            Book("The Art of Computer Programming", 1968, [knuth]),
            Book("Literate Programming", 1992, [knuth]),
            Book("Persistence for Pythonistas", 2026, [fulton, guido]),
        ):
            books[book.title] = book
        conn.root.books = books
        # An index kept by the application: year -> titles, searchable by range.
        by_year: IOBTree = IOBTree()
        for book in books.values():
            by_year.setdefault(book.year, OOTreeSet()).add(book.title)
        conn.root.by_year = by_year
        conn.root.book_count = Length(len(books))
        conn.root.authors = PersistentList([fulton, guido, knuth])
        conn.transaction_manager.get().note("demo: initial library")
    _say(
        f"stored {len(books)} books and 3 authors in {path} ({os.path.getsize(path):,} bytes, "
        f"{len(db)} objects)"
    )
    db.close()


def reload_and_query(path: str) -> None:
    """Open the file again, as a new process would, and look things up."""
    started = time.perf_counter()
    db = DB(path)
    conn = db.open()
    opened = time.perf_counter() - started
    books = conn.root.books
    _say(f"reopened in {opened * 1000:.1f} ms; the books mapping is a {books._p_status} until touched")
    knuth = [b.title for b in books.values() if any(a.name == "Donald Knuth" for a in b.authors)]
    _say(f"books by Donald Knuth: {sorted(knuth)}")
    recent = sorted((b.year, b.title) for b in books.values() if b.year >= 2000)
    _say(f"published since 2000: {recent}")
    nineties = [(year, list(titles)) for year, titles in conn.root.by_year.items(1990, 2005)]
    _say(f"the year index (an IOBTree), range 1990..2005: {nineties}")
    first = books["Python Internals"]
    _say(
        f"'{first.title}' is {first._p_status}, oid {amberdb.utils.u64(first._p_oid)}, "
        f"publisher {first.publisher!r} (class default)"
    )

    first.tags.append("classic")
    first.publisher = "Amber Press"
    transaction.get().note("demo: tag a book")
    transaction.commit()
    _say(
        f"tagged and committed; '{first.title}' is now {first._p_status} at "
        f"{time.strftime('%H:%M:%S', time.gmtime(first._p_mtime or 0))} UTC"
    )

    first.year = 2010
    savepoint = transaction.savepoint()
    first.title = "A title we will regret"
    savepoint.rollback()
    _say(f"after rolling back to the savepoint: title {first.title!r}, year {first.year}")
    transaction.abort()
    _say(f"after abort: year {first.year} (the stored one)")

    first.notify = lambda: None  # functions cannot be stored: the error says where
    try:
        transaction.commit()
    except amberdb.SerializationError as error:
        _say(f"refused as expected: {error}")
    transaction.abort()
    conn.close()
    db.close()


def upkeep(path: str) -> None:
    """Undo a bad change, read an object's history, then pack the file."""
    db = DB(path)
    conn = db.open()
    book = conn.root.books["Python Internals"]
    book.year = 1066
    transaction.get().note("demo: a typo in a year")
    transaction.commit()
    bad = db.undo_log()[0]
    db.undo(bad["id"])
    transaction.begin()
    _say(f"undid {bad['description']!r}: the year is {book.year} again")
    revisions = db.history(book, size=10)
    _say(f"'{book.title}' has {len(revisions)} revisions: {[entry['description'] for entry in revisions]}")
    del conn.root.books["Persistence for Pythonistas"]
    transaction.get().note("demo: drop a book")
    transaction.commit()
    before, objects = db.storage_size(), len(db)
    db.pack()
    _say(
        f"packed: {before:,} -> {db.storage_size():,} bytes, {objects} -> {len(db)} objects (old"
        f" revisions and the dropped book are gone); {len(db.history(book, size=10))} revision of"
        f" '{book.title}' left"
    )
    conn.close()
    db.close()


def history(path: str) -> None:
    """List the transactions the file holds."""
    db = DB(path, read_only=True)
    storage = db.storage
    for txn in storage.iterator():
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(amberdb.utils.time_from_tid(txn.tid)))
        _say(
            f"  transaction {amberdb.utils.u64(txn.tid):#x} at {when}: "
            f"{len(txn.records)} records, {txn.meta.description!r}"
        )
    db.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", nargs="?", help="database file to create (must not exist)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.path or os.path.join(scratch, "library.fs")
        if os.path.exists(path):
            parser.error(f"{path} exists; give a new path")
        _say(f"AmberDB {amberdb.__version__} demo")
        store(path)
        reload_and_query(path)
        upkeep(path)
        _say("history:")
        history(path)
    return 0
