"""The ``amberdb`` command: inspect, check, pack, copy, back up and serve databases.

``amberdb SUBCOMMAND --help`` describes each.  Every subcommand uses only public APIs of the
storage and object layers.  Errors are one line on stderr (``amberdb: error: ...``) with exit
status 2 when the command could not run (usage, a bad URI, a missing or locked file) and 1
when it found something wrong with the data; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from amberdb.cli.common import EXIT_PROBLEMS, EXIT_USAGE, CliError

__all__ = ["main"]

_PROG = "amberdb"


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{_PROG}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def _global_flags(parser: argparse.ArgumentParser, default: object) -> None:
    # The same flags before or after the subcommand: the subparsers' copies default to
    # SUPPRESS so they do not undo what was given before the subcommand.
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="show no progress")
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks of errors")


def _build_parser() -> argparse.ArgumentParser:
    from amberdb.cli import backup, inspect, maintain

    parser = _Parser(
        prog=_PROG,
        description="Inspect, check, pack, copy and back up AmberDB databases. A database is named by"
        " a path (data.fs) or a storage URI (file:///data.fs, or a registered scheme).",
    )
    _global_flags(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _global_flags(p, argparse.SUPPRESS)
        p.set_defaults(func=func)
        return p

    p = command("info", inspect.cmd_info, "size, objects, transactions, commit times and classes")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("pack", maintain.cmd_pack, "remove old revisions and unreachable objects")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--days", type=float, default=0, help="keep the history of the last N days (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "verify",
        inspect.cmd_verify,
        "check checksums, references from the root and BTrees; exit status 1 if anything is wrong",
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("history", inspect.cmd_history, "the revisions of one object, newest first")
    p.add_argument("uri", metavar="URI")
    p.add_argument("oid", metavar="OID", help="hex (0x1f) or decimal (31)")
    p.add_argument("--size", type=int, default=20, help="at most N revisions (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("undo-log", inspect.cmd_undo_log, "the undoable transactions, newest first")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--limit", type=int, default=20, help="at most N transactions (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "copy", maintain.cmd_copy, "copy every transaction (tids and metadata kept), then verify the copy"
    )
    p.add_argument("source", metavar="SRC_URI")
    p.add_argument("destination", metavar="DST_URI")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "upgrade-schema",
        maintain.cmd_upgrade_schema,
        "upgrade the tables of a SQLite or PostgreSQL database to this AmberDB's schema version",
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("--json", action="store_true", help="print JSON")

    from amberdb.cli import evolution

    p = command(
        "rename-class",
        evolution.cmd_rename_class,
        "record in the database that class OLD is now NEW (every process loads OLD records as NEW);"
        " --rewrite also rewrites every record naming OLD",
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("old", metavar="OLD", help="the old class name: package.module.Class")
    p.add_argument("new", metavar="NEW", help="the new class name: package.module.Class")
    p.add_argument(
        "--rewrite",
        action="store_true",
        help="rewrite the records that name OLD (headers and pickle globals, nothing unpickled), in batches;"
        " interrupted, run it again to finish",
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "evolve",
        evolution.cmd_evolve,
        "run the steps of an amberdb.evolve.Schema above the database's generation",
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("schema", metavar="MODULE:SCHEMA", help="where the Schema object is (module:attribute)")
    p.add_argument(
        "--dry-run", action="store_true", help="run the steps, commit nothing, show what they change"
    )
    p.add_argument(
        "--allow",
        action="append",
        metavar="MODULE",
        help="allowed_modules for loading (default: the schema module's top-level package); repeatable",
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "backup",
        backup.cmd_backup,
        "back a file storage up into DIR: a full copy first, then only what was committed since",
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("restore", backup.cmd_restore, "rebuild a data file from a backup directory")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("target", metavar="TARGET", help="the data file to create (must not exist)")
    p.add_argument(
        "--at",
        metavar="TIME",
        help="restore the state after the last transaction at or before TIME"
        " (ISO 8601 datetime, local time without a zone, or POSIX seconds)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    from amberdb.cli import serve

    p = command(
        "serve",
        serve.cmd_serve,
        "serve a database to ClientStorage clients (amberdb://) until SIGTERM or SIGINT",
    )
    p.add_argument("uri", metavar="URI_OR_PATH")
    p.add_argument("--listen", metavar="HOST:PORT", help="a TCP address (port 0 picks a free one)")
    p.add_argument("--unix", metavar="PATH", help="a Unix socket path (beside or instead of --listen)")
    p.add_argument("--tls-cert", metavar="FILE", help="the server's certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--tls-client-ca", metavar="FILE", help="require client certificates signed by these CAs")
    p.add_argument(
        "--tokens",
        metavar="FILE",
        help="require a token from this file (amberdb token add; SIGHUP reads it again)",
    )
    p.add_argument("--read-only", action="store_true", help="refuse every commit, pack and undo")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without tokens (anyone who reaches it can change the data)",
    )

    p = command("token", _token_add, "manage the tokens file of an amberdb server")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    add = actions.add_parser(
        "add",
        help="create a token; it is printed once, alone on the last line",
        description="Create a token in FILE (made if missing, readable by its owner only) and print"
        " it once, alone on the last line; the file keeps only a salted hash of it.",
    )
    add.add_argument("file", metavar="FILE")
    add.add_argument("name", metavar="NAME", help="names the client in the server's log")
    add.add_argument("--read-only", action="store_true", help="the token may read but not commit")
    return parser


def _token_add(args: argparse.Namespace) -> int:
    from amberdb.server.auth import add_token

    token = add_token(args.file, args.name, "ro" if args.read_only else "rw")
    kind = "read-only" if args.read_only else "read-write"
    print(f"added the {kind} token {args.name!r} to {args.file}; it is not shown again, keep it secret:")
    print(token)
    return 0


def _describe(exc: BaseException) -> tuple[str, int]:
    """One line and an exit status for an error that ended a command."""
    from amberdb.exceptions import CorruptedDataError, DatabaseError, StorageLockedError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, CliError):
        return text, exc.code
    if isinstance(exc, StorageLockedError):
        hint = "close it there first; info, verify, history, undo-log and backup work meanwhile"
        return f"{text} ({hint})", EXIT_USAGE
    if isinstance(exc, CorruptedDataError):
        return f"{text} (amberdb verify lists every problem)", EXIT_PROBLEMS
    if isinstance(exc, (DatabaseError, OSError)):
        return text, EXIT_USAGE
    return f"{type(exc).__name__}: {text}", EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        sys.stderr.write(f"{_PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_PROBLEMS  # the reader of our output went away (| head)
    except Exception as exc:
        if args.debug:
            raise
        message, status = _describe(exc)
        sys.stderr.write(f"{_PROG}: error: {message}\n")
    return status
