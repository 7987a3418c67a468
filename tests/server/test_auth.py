"""Tokens (amberdb.server.auth) and ``amberdb token add``, as an operator uses them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from amberdb.server.auth import TokenError, TokenFileError, Tokens, add_token

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _amberdb(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-m", "amberdb", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_token_add_prints_the_token_once_and_stores_only_a_hash(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    result = _amberdb("token", "add", str(path), "web-1")
    assert result.returncode == 0, result.stderr
    token = result.stdout.splitlines()[-1]
    assert token and " " not in token and "." in token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token.split(".", 1)[1] not in text  # the secret is nowhere in the file
    reader = _amberdb("token", "add", str(path), "reporting", "--read-only")
    assert reader.returncode == 0, reader.stderr
    read_only = reader.stdout.splitlines()[-1]
    tokens = Tokens(path)
    assert tokens.check(token) == ("web-1", "rw")
    assert tokens.check(read_only) == ("reporting", "ro")
    assert len(tokens) == 2
    for wrong in (
        "",
        token[:-1],
        token + "x",
        read_only.split(".")[0] + "." + token.split(".")[1],
        "nonsense",
    ):
        assert tokens.check(wrong) is None
    again = _amberdb("token", "add", str(path), "web-1")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already has a token" in again.stderr


def test_bad_names_and_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    for name in ("", "has space", "x" * 65, "new\nline"):
        with pytest.raises(TokenError):
            add_token(path, name)
    with pytest.raises(TokenError):
        add_token(path, "ok", "admin")  # type: ignore[arg-type]
    assert not path.exists()
    with pytest.raises(TokenFileError, match="no such tokens file"):
        Tokens(path)
    add_token(path, "one")
    data = json.loads(path.read_text())
    for damage in (
        lambda d: d.update(format=2),
        lambda d: d["tokens"][0].update(access="admin"),
        lambda d: d["tokens"][0].update(hash="zz"),
        lambda d: d["tokens"].append("not an entry"),
        lambda d: d["tokens"][0].update(id="../../x"),
    ):
        copy = json.loads(json.dumps(data))
        damage(copy)
        path.write_text(json.dumps(copy))
        with pytest.raises(TokenFileError):
            Tokens(path)
        with pytest.raises(TokenFileError):
            add_token(path, "two")
    path.write_text("{not json")
    result = _amberdb("token", "add", str(path), "three")
    assert result.returncode == 2 and "tokens file" in result.stderr and "Traceback" not in result.stderr


def test_reload_sees_tokens_added_later(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first = add_token(path, "first")
    tokens = Tokens(path)
    second = add_token(path, "second", "ro")
    assert tokens.check(second) is None
    tokens.reload()
    assert tokens.check(second) == ("second", "ro") and tokens.check(first) == ("first", "rw")


def test_a_mapping_of_plain_tokens() -> None:
    tokens = Tokens({"s3cret-writer": "rw", "s3cret-reader": "ro"})
    assert tokens.check("s3cret-writer") == ("token", "rw")
    assert tokens.check("s3cret-reader") == ("token", "ro")
    for wrong in ("", "s3cret", "S3CRET-WRITER", "\udcff"):
        assert tokens.check(wrong) is None
    assert tokens.check(None) is None  # type: ignore[arg-type]
    with pytest.raises(TokenError):
        Tokens({"x": "admin"})
    with pytest.raises(TokenError):
        Tokens({"": "rw"})
