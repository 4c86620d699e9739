"""Settings every service takes, from flags first, then environment, then defaults.

Each service has one environment prefix (``TESSERA_AS_``, ``TESSERA_LS_``,
``TESSERA_ADMIN_``); a flag ``--database-url`` reads ``<PREFIX>DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tessera.logs import LOG_FORMATS
from tessera.metrics import split_listen
from tessera.storage import sqlite_url

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Below this, health checks and ordinary requests would not fit.
MIN_MESSAGE_BYTES = 4 * 1024
DEFAULT_MAX_CALL_SECONDS = 30.0


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
        self.parser = argparse.ArgumentParser(prog=prog, description=description)
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
        metrics_listen = args.metrics_listen.strip()
        if metrics_listen:
            try:
                split_listen(metrics_listen)
            except ValueError:
                self.parser.error(f"--metrics-listen: {metrics_listen!r} is not HOST:PORT")
        common = CommonSettings(
            listen=args.listen,
            data_dir=data_dir,
            database_url=args.database_url,
            log_level=args.log_level,
            shutdown_grace=grace,
            log_format=log_format,
            metrics_listen=metrics_listen,
            service=self.service,
            max_message_bytes=max_message_bytes,
            max_call_seconds=max_call_seconds,
        )
        return common, args


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
    # The largest request message grpc accepts (``--max-message-bytes``).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # The longest a unary call may run (``--max-call-seconds``); 0: no limit.
    max_call_seconds: float = DEFAULT_MAX_CALL_SECONDS

    def database_url_or_default(self, filename: str) -> str:
        return self.database_url or sqlite_url(self.data_dir, filename)
