"""``amberdb serve``: serve a database to ``ClientStorage`` clients until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import ssl
import sys

from amberdb.cli.common import CliError

__all__ = ["cmd_serve"]


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise CliError(f"--listen takes HOST:PORT (port 0 picks a free one), got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise CliError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise CliError("TLS needs both --tls-cert and --tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca is not None:
            context.load_verify_locations(args.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot load the TLS certificate or key: {exc}") from None
    return context


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve ``args.uri`` until a signal; one log line per connect, disconnect and error."""
    from amberdb.server import StorageServer

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    host, port = _address(args.listen) if args.listen is not None else (None, None)
    if host is None and args.unix is None:
        raise CliError("give --listen HOST:PORT, --unix PATH, or both")
    address: tuple[str, int] | str = (
        (host, port) if host is not None and port is not None else f"unix:{args.unix}"
    )
    try:
        server = StorageServer(
            args.uri,
            address,
            ssl=_tls(args),
            tokens=args.tokens,
            read_only=args.read_only,
            unix=args.unix if host is not None else None,
            insecure=args.insecure,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None

    def announce() -> None:
        where = server.address
        print(f"listening on {f'{where[0]}:{where[1]}' if isinstance(where, tuple) else where}", flush=True)
        if args.unix is not None and host is not None:
            print(f"listening on unix:{args.unix}", flush=True)

    server.serve_forever(handle_signals=True, on_ready=announce)
    logging.getLogger("amberdb.server").info("stopped")
    return 0
