"""The README's first command: the demo stores, reloads and queries a file database."""

from __future__ import annotations

from pathlib import Path

import pytest

from amberdb import demo


def test_demo_runs_and_reports_what_it_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main([str(tmp_path / "library.fs")]) == 0
    out = capsys.readouterr().out
    assert "stored 5 books and 3 authors" in out
    assert "the books mapping is a ghost until touched" in out
    assert "books by Donald Knuth: ['Literate Programming', 'The Art of Computer Programming']" in out
    assert (
        "range 1990..2005: [(1992, ['Literate Programming']), (2002, ['Object Databases in Practice'])]"
        in out
    )
    assert "after abort: year 2009" in out
    assert "refused as expected: cannot store amberdb.demo:Book" in out
    assert "undid 'demo: a typo in a year': the year is 2009 again" in out
    assert "'Python Internals' has 4 revisions" in out
    assert "1 revision of 'Python Internals' left" in out
    assert out.count("  transaction ") >= 1


def test_demo_refuses_an_existing_file(tmp_path: Path) -> None:
    existing = tmp_path / "there.fs"
    existing.write_bytes(b"precious")
    with pytest.raises(SystemExit):
        demo.main([str(existing)])
    assert existing.read_bytes() == b"precious"
