"""Storage URIs: what DB(uri) and open_storage(uri) open, and how a bad URI fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import amberdb
import amberdb.transaction as transaction
from amberdb import FileStorage, MemoryStorage, open_storage
from amberdb.exceptions import ReadOnlyError
from amberdb.storage import uri as uris

pytestmark = pytest.mark.usefixtures("no_leftover_schemes")


def _commit_value(target: str | Path, value: int) -> None:
    db = amberdb.DB(target)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["value"] = value
    tm.commit()
    db.close()


def _read_value(target: str | Path, **options: bool) -> object:
    db = amberdb.DB(target, **options)
    try:
        return db.open(transaction.TransactionManager()).root().get("value")
    finally:
        db.close()


def test_memory_uri_is_a_new_memory_storage() -> None:
    first, second = open_storage("memory:"), open_storage("MEMORY://")
    assert isinstance(first, MemoryStorage) and first is not second
    db = amberdb.DB("memory:")
    assert isinstance(db.storage, MemoryStorage)
    db.close()


SPELLINGS = ["absolute", "triple slash", "localhost", "relative", "path", "PathLike"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_file_uris_and_paths_name_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "my data.fs"
    _commit_value(target, 42)
    uri = {
        "absolute": f"file:{target}",
        "triple slash": "file://" + str(target).replace(" ", "%20"),
        "localhost": f"file://localhost{target}",
        "relative": "file:my%20data.fs",
        "path": str(target),
        "PathLike": target,
    }[spelling]
    assert _read_value(uri) == 42
    storage = open_storage(uri)
    assert isinstance(storage, FileStorage)
    storage.close()


def test_file_uri_options_reach_the_file_storage(tmp_path: Path) -> None:
    target = tmp_path / "data.fs"
    with pytest.raises(Exception, match="data.fs"):
        open_storage(f"file:{target}?create=false")  # not there, and not to be made
    _commit_value(target, 1)
    storage = open_storage(f"file:{target}?read_only=true&fsync=0")
    assert storage.read_only
    with pytest.raises(ReadOnlyError):
        storage.new_oid()
    storage.close()
    # DB(read_only=True) wins over the URI.
    assert _read_value(f"file:{target}?read_only=no", read_only=True) == 1


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("memroy:", r"unknown storage scheme 'memroy'.*known schemes are .*file, memory"),
        ("postgres1://localhost/db", r"unknown storage scheme 'postgres1'"),
        ("sqlite:///tmp/x.sqlite?histroy=false", r"unknown option 'histroy'.*history, read_only"),
        ("sqlite:///tmp/x.sqlite?history=perhaps", r"history='perhaps'.*not true or false"),
        ("sqlite:", r"names no file"),
        ("postgresql://u:secret@localhost/db?cache_size=big", r"cache_size='big'.*not a number"),
        ("file:/tmp/x.fs?readonly=true", r"unknown option 'readonly'.*read_only, create, fsync, salvage"),
        ("file:/tmp/x.fs?read_only=maybe", r"read_only='maybe'.*not true or false"),
        ("file://elsewhere/tmp/x.fs", r"names host 'elsewhere'"),
        ("file:", r"names no file"),
        ("memory:somewhere", r"memory: URI names no place"),
        ("memory:?size=3", r"unknown option 'size'.*known options are none"),
        ("", r"empty storage URI"),
    ],
)
def test_a_bad_uri_says_what_is_wrong(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_storage(uri)
    with pytest.raises(ValueError, match=message):
        amberdb.DB(uri)


def test_a_registered_scheme_opens_its_storage() -> None:
    opened: list[tuple[str, bool]] = []

    def opener(uri: str, read_only: bool) -> MemoryStorage:
        opened.append((uri, read_only))
        return MemoryStorage()

    uris.register_scheme("test-mem", opener)
    assert "test-mem" in uris.known_schemes()
    db = amberdb.DB("test-mem://anything?x=1")
    assert opened == [("test-mem://anything?x=1", False)]
    db.close()
    uris.register_scheme("broken", lambda uri, read_only: "not a storage")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="scheme 'broken' returned str, not a storage"):
        open_storage("broken:")
    with pytest.raises(ValueError, match="not a URI scheme"):
        uris.register_scheme("no spaces", opener)


def test_an_entry_point_registers_a_scheme_in_another_process(tmp_path: Path) -> None:
    # A package's metadata names the opener; it is imported only when its scheme is opened.
    site = tmp_path / "site"
    (site / "amber_plugin").mkdir(parents=True)
    (site / "amber_plugin" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from amberdb import MemoryStorage
            def open_plugin(uri, read_only):
                storage = MemoryStorage()
                storage.opened_as = (uri, read_only)
                return storage
            """
        )
    )
    dist = site / "amber_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: amber-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[amberdb.storages]\nplugin = amber_plugin:open_plugin\n")
    script = textwrap.dedent(
        """
        import sys
        import amberdb
        from amberdb.storage.uri import known_schemes
        assert "plugin" in known_schemes(), known_schemes()
        assert "amber_plugin" not in sys.modules
        storage = amberdb.open_storage("plugin://x", read_only=False)
        print(storage.opened_as)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={"PYTHONPATH": f"{site}:{Path(__file__).parents[2] / 'src'}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "('plugin://x', False)"
