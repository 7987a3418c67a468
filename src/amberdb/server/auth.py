"""Tokens: who may read, and who may write, through the server.

A token is ``<id>.<secret>``: a short public id that names its entry in the tokens file, and
32 random bytes of secret, URL-safe base64.  The file keeps, per token, its name, id, access
(``"rw"`` or ``"ro"``), a random salt and ``sha256(salt + secret)`` -- never the secret, so a
copy of the file lets nobody in.  A salted fast hash is enough because the secret is random
(256 bits: nothing to guess); it also keeps the check cheap at every connect.  The check
compares in constant time (:func:`hmac.compare_digest`) and does the same work for an
unknown id as for a known one.

Tokens file (JSON, mode 0600, replaced atomically on every change)::

    {"format": 1,
     "tokens": [{"name": "web-1", "id": "9f2c4e1a", "access": "rw",
                 "salt": "<32 hex>", "hash": "<64 hex>", "created": "2026-12-01T10:00:00+00:00"}]}
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Mapping
from typing import Any, Literal

from amberdb.exceptions import DatabaseError
from amberdb.fsutil import replace_file

__all__ = ["Access", "TokenError", "TokenFileError", "Tokens", "add_token"]

Access = Literal["rw", "ro"]
_FORMAT = 1
_ID = re.compile(r"[0-9a-f]{8}")
_HEX = re.compile(r"[0-9a-f]+")
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class TokenError(DatabaseError):
    """A token, or a request about tokens, that cannot be used (the message says why)."""


class TokenFileError(TokenError):
    """A tokens file that cannot be read as one: its path and what is wrong."""


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


def _read(path: str) -> list[dict[str, Any]]:
    """The entries of the tokens file at ``path`` ([] when there is none), each checked."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"{path} is not a readable tokens file: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != _FORMAT
        or not isinstance(data.get("tokens"), list)
    ):
        raise TokenFileError(f"{path} is not an amberdb tokens file of format {_FORMAT}")
    entries: list[dict[str, Any]] = data["tokens"]
    for number, entry in enumerate(entries, 1):
        problem = _entry_problem(entry)
        if problem is not None:
            raise TokenFileError(f"{path}: token entry {number} {problem}")
    return entries


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "is not an object"
    if not isinstance(entry.get("name"), str) or not _NAME.fullmatch(entry["name"]):
        return f"has the name {entry.get('name')!r}"
    if not isinstance(entry.get("id"), str) or not _ID.fullmatch(entry["id"]):
        return f"has the id {entry.get('id')!r}"
    if entry.get("access") not in ("rw", "ro"):
        return f"has the access {entry.get('access')!r}, not 'rw' or 'ro'"
    for key, size in (("salt", 32), ("hash", 64)):
        value = entry.get(key)
        if not isinstance(value, str) or len(value) != size or not _HEX.fullmatch(value):
            return f"has a {key} that is not {size} hex digits"
    return None


def add_token(path: str | os.PathLike[str], name: str, access: Access = "rw") -> str:
    """Create a token named ``name`` in the tokens file at ``path`` (made if missing, mode
    0600) and return it -- the only time it is ever shown."""
    path = os.fspath(path)
    if not _NAME.fullmatch(name):
        raise TokenError(
            f"token name {name!r}: use 1 to 64 letters, digits and _ . @ - (it names a client in logs)"
        )
    if access not in ("rw", "ro"):
        raise TokenError(f"access must be 'rw' or 'ro', not {access!r}")
    entries = _read(path)
    if any(entry["name"] == name for entry in entries):
        raise TokenError(f"{path} already has a token named {name!r}: choose another name")
    taken = {entry["id"] for entry in entries}
    token_id = secrets.token_hex(4)
    while token_id in taken:
        token_id = secrets.token_hex(4)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")
    salt = secrets.token_bytes(16)
    entries.append(
        {
            "name": name,
            "id": token_id,
            "access": access,
            "salt": salt.hex(),
            "hash": _digest(salt, secret).hex(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    # Readable by its owner only, from the first byte.
    text = json.dumps({"format": _FORMAT, "tokens": entries}, indent=2) + "\n"
    replace_file(path, text.encode("utf-8"), mode=0o600)
    return f"{token_id}.{secret}"


class Tokens:
    """The tokens a server accepts: from a tokens file, or a mapping ``{token: "rw" | "ro"}``.

    :meth:`check` returns the access a token grants, or None.  A file is read when the
    object is made (:meth:`reload` reads it again, so tokens can be added to a running server).
    """

    def __init__(self, source: str | os.PathLike[str] | Mapping[str, str]) -> None:
        self._path: str | None = None
        self._plain: dict[str, Access] = {}
        self._entries: dict[str, tuple[str, Access, bytes, bytes]] = {}
        if isinstance(source, Mapping):
            for token, access in source.items():
                if not isinstance(token, str) or not token or access not in ("rw", "ro"):
                    raise TokenError(
                        f"tokens must map non-empty strings to 'rw' or 'ro', got {token!r}: {access!r}"
                    )
                self._plain[token] = access  # type: ignore[assignment]
        else:
            self._path = os.fspath(source)
            if not os.path.exists(self._path):
                raise TokenFileError(f"{self._path}: no such tokens file (make one with: amberdb token add)")
            self.reload()

    def reload(self) -> None:
        """Read the tokens file again (a mapping given at creation stays as it was)."""
        if self._path is None:
            return
        self._entries = {
            entry["id"]: (
                entry["name"],
                entry["access"],
                bytes.fromhex(entry["salt"]),
                bytes.fromhex(entry["hash"]),
            )
            for entry in _read(self._path)
        }

    def check(self, token: str) -> tuple[str, Access] | None:
        """``(name, access)`` for a valid token, None for any other string."""
        if not isinstance(token, str):
            return None
        if self._plain:
            found: tuple[str, Access] | None = None
            encoded = token.encode("utf-8", "surrogatepass")
            for known, access in self._plain.items():
                # Every entry compared, in constant time: no early exit tells which matched.
                if hmac.compare_digest(known.encode("utf-8", "surrogatepass"), encoded):
                    found = ("token", access)
            return found
        token_id, _, secret = token.partition(".")
        entry = self._entries.get(token_id)
        # An unknown id costs the same hash as a known one.
        name, access, salt, stored = entry if entry is not None else ("", "ro", b"\0" * 16, b"\0" * 32)
        matches = hmac.compare_digest(_digest(salt, secret), stored)
        return (name, access) if matches and entry is not None else None

    def __len__(self) -> int:
        return len(self._plain) + len(self._entries)
