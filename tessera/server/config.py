"""Settings every service takes, from flags first, then environment, then defaults.

Each service has one environment prefix (``TESSERA_AS_``, ``TESSERA_LS_``,
``TESSERA_ADMIN_``); a flag ``--database-url`` reads ``<PREFIX>DATABASE_URL``.

Transport security is common to all three: ``--tls-cert``/``--tls-key`` serve TLS,
``--tls-client-ca`` adds mutual TLS, and plaintext is served on loopback only unless
``--allow-plaintext`` says otherwise (``tessera.server.tls``).

A setting it refuses ends the service with status 2 and one line: the service, what is
wrong, and ``--help``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from tessera.server.logs import LOG_FORMATS
from tessera.server.metrics import split_listen
from tessera.server.tls import PlaintextRefused, ServerTls, check_plaintext
from tessera.storage import sqlite_url

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Below this, health checks and ordinary requests would not fit.
MIN_MESSAGE_BYTES = 4 * 1024
DEFAULT_MAX_CALL_SECONDS = 30.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every refusal to start; argparse would print the whole usage
        # (dozens of options) before it.
        self.exit(2, f"{self.prog}: {message} (--help lists the options)\n")


class SettingsParser:
    """An argparse parser whose defaults come from prefixed environment variables."""

    def __init__(
        self,
        prog: str,
        description: str,
        prefix: str,
        default_listen: str,
        default_data_dir: str,
        environ: Mapping[str, str] | None = None,
        service: str = "",
        default_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        default_max_call_seconds: float = DEFAULT_MAX_CALL_SECONDS,
    ) -> None:
        self.prefix = prefix
        self.service = service
        self.environ = os.environ if environ is None else environ
        self.parser: argparse.ArgumentParser = _Parser(prog=prog, description=description)
        self.add("--listen", default_listen, "host:port to serve gRPC on")
        self.add(
            "--database-url",
            "",
            "SQLAlchemy URL (sqlite+aiosqlite:///… or postgresql+asyncpg://…); "
            "default: a SQLite file in the data directory",
        )
        self.add("--data-dir", default_data_dir, "directory for keys and the default database")
        self.add("--log-level", "INFO", "DEBUG, INFO, WARNING or ERROR")
        self.add("--log-format", "text", "text, or json for one JSON object a line")
        self.add(
            "--metrics-listen",
            "",
            "host:port to serve Prometheus metrics on (GET /metrics); default: none",
        )
        self.add("--shutdown-grace", "5", "seconds in-flight calls get on SIGTERM")
        self.add("--tls-cert", "", "PEM certificate chain to serve TLS with (needs --tls-key)")
        self.add("--tls-key", "", "PEM private key of --tls-cert (mode 0600)")
        self.add(
            "--tls-client-ca",
            "",
            "PEM CA certificate(s): clients must present a certificate it signed (mutual TLS)",
        )
        self.add_switch(
            "--allow-plaintext",
            "serve plaintext gRPC on an address other than loopback (refused by default)",
        )
        self.add(
            "--max-message-bytes",
            str(default_max_message_bytes),
            "largest request message accepted; larger ones get RESOURCE_EXHAUSTED",
        )
        self.add(
            "--max-call-seconds",
            f"{default_max_call_seconds:g}",
            "longest a unary call may run before it is cancelled and rolled back "
            "(DEADLINE_EXCEEDED); 0: no limit",
        )

    def add_switch(self, flag: str, help_text: str) -> None:
        """A flag without a value; its environment variable takes true/false, 1/0, …"""
        env = self.env_name(flag)
        value = self.environ.get(env, "").strip().lower()
        if value not in TRUE_WORDS + FALSE_WORDS:
            self.parser.error(f"{env}: {value!r} is not true or false")
        self.parser.add_argument(
            flag, action="store_true", default=value in TRUE_WORDS, help=f"{help_text} [env {env}]"
        )

    def env_name(self, flag: str) -> str:
        return self.prefix + flag.lstrip("-").replace("-", "_").upper()

    def add(self, flag: str, default: str, help_text: str) -> None:
        env = self.env_name(flag)
        self.parser.add_argument(
            flag, default=self.environ.get(env, default), help=f"{help_text} [env {env}]"
        )

    def parse(self, argv: Sequence[str] | None) -> tuple[CommonSettings, argparse.Namespace]:
        args = self.parser.parse_args(argv)
        data_dir = Path(args.data_dir)
        try:
            grace = float(args.shutdown_grace)
        except ValueError:
            self.parser.error(f"--shutdown-grace: {args.shutdown_grace!r} is not a number")
        log_format = args.log_format.strip().lower()
        if log_format not in LOG_FORMATS:
            self.parser.error(f"--log-format: {args.log_format!r} is not text or json")
        try:
            max_message_bytes = int(args.max_message_bytes)
        except ValueError:
            max_message_bytes = 0
        if max_message_bytes < MIN_MESSAGE_BYTES:
            self.parser.error(
                f"--max-message-bytes: {args.max_message_bytes!r} is not a whole number of at "
                f"least {MIN_MESSAGE_BYTES}"
            )
        try:
            max_call_seconds = float(args.max_call_seconds)
        except ValueError:
            max_call_seconds = -1.0
        if not 0 <= max_call_seconds < float("inf"):
            self.parser.error(
                f"--max-call-seconds: {args.max_call_seconds!r} is not a number of seconds >= 0"
            )
        try:
            split_listen(args.listen)
        except ValueError:
            self.parser.error(f"--listen: {args.listen!r} is not HOST:PORT")
        database_problem = check_database_url(args.database_url)
        if database_problem:
            self.parser.error(f"--database-url: {database_problem}")
        metrics_listen = args.metrics_listen.strip()
        if metrics_listen:
            try:
                split_listen(metrics_listen)
            except ValueError:
                self.parser.error(f"--metrics-listen: {metrics_listen!r} is not HOST:PORT")
        tls = self._server_tls(args)
        if not args.allow_plaintext:
            # Refused here, before anything starts; when allowed, Endpoint.bind warns.
            try:
                check_plaintext(args.listen, tls, allow_plaintext=False)
            except PlaintextRefused as refusal:
                self.parser.error(str(refusal))
        common = CommonSettings(
            listen=args.listen,
            data_dir=data_dir,
            database_url=args.database_url,
            log_level=args.log_level,
            shutdown_grace=grace,
            log_format=log_format,
            metrics_listen=metrics_listen,
            service=self.service,
            tls=tls,
            allow_plaintext=args.allow_plaintext,
            max_message_bytes=max_message_bytes,
            max_call_seconds=max_call_seconds,
        )
        return common, args

    def _server_tls(self, args: argparse.Namespace) -> ServerTls | None:
        cert, key, client_ca = (
            args.tls_cert.strip(),
            args.tls_key.strip(),
            args.tls_client_ca.strip(),
        )
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            self.parser.error("TLS needs both --tls-cert and --tls-key")
        for flag, value in (
            ("--tls-cert", cert),
            ("--tls-key", key),
            ("--tls-client-ca", client_ca),
        ):
            if value and not Path(value).is_file():
                self.parser.error(f"{flag}: {value} is not a file")
        return ServerTls(Path(cert), Path(key), Path(client_ca) if client_ca else None)


def check_database_url(url: str) -> str:
    """Why ``url`` cannot be a service's database ('' when it can, or is empty: the
    default SQLite file). Names no password."""
    if not url:
        return ""
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError):
        return (
            "not a database URL Tessera can use; write sqlite+aiosqlite:///PATH or "
            "postgresql+asyncpg://USER@HOST/DATABASE"
        )
    if not getattr(dialect, "is_async", False):
        shown = parsed.render_as_string(hide_password=True)
        return (
            f"{shown} names a driver without asyncio; write sqlite+aiosqlite:// or "
            "postgresql+asyncpg://"
        )
    return ""


@dataclass(frozen=True)
class CommonSettings:
    listen: str
    data_dir: Path
    database_url: str
    log_level: str
    shutdown_grace: float
    log_format: str = "text"
    # Where GET /metrics is served; '' serves none.
    metrics_listen: str = ""
    # The service's name in logs and metrics (license_server, …).
    service: str = ""
    # TLS to serve with; None serves plaintext (loopback only unless allow_plaintext).
    tls: ServerTls | None = None
    allow_plaintext: bool = False
    # The largest request message grpc accepts (``--max-message-bytes``).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # The longest a unary call may run (``--max-call-seconds``); 0: no limit.
    max_call_seconds: float = DEFAULT_MAX_CALL_SECONDS

    @property
    def transport(self) -> str:
        """How gRPC is served, for the start-up log line."""
        if self.tls is None:
            return "plaintext"
        return "mutual TLS" if self.tls.mutual else "TLS"

    def database_url_or_default(self, filename: str) -> str:
        return self.database_url or sqlite_url(self.data_dir, filename)
