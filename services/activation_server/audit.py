"""``python -m services.activation_server.audit verify``: check the audit log's hash chain.

Reads the Activation Server's database (``--database-url``, or the SQLite file in
``--data-dir``; the same TESSERA_AS_ environment variables as the server), walks the
chain and prints what it found. Exits 0 when the log is intact, 1 when it is broken and
2 when it cannot be read. The rules are in ``domain/audit.py``; this is only the command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from services.activation_server.domain.model import AuditVerdict
from services.activation_server.server import verify_audit_log
from tessera.storage import sqlite_url

PREFIX = "TESSERA_AS_"


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.activation_server.audit",
        description="Check the Activation Server's hash-chained audit log.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="walk the hash chain; exit 0 intact, 1 broken")
    verify.add_argument(
        "--database-url",
        default=environ.get(PREFIX + "DATABASE_URL", ""),
        help=f"SQLAlchemy URL of the database [env {PREFIX}DATABASE_URL]",
    )
    verify.add_argument(
        "--data-dir",
        default=environ.get(PREFIX + "DATA_DIR", "var/activation_server"),
        help=f"data directory of the default SQLite database [env {PREFIX}DATA_DIR]",
    )
    return parser.parse_args(argv)


def describe(verdict: AuditVerdict) -> str:
    head = f"head {verdict.head.sequence} {verdict.head.hash.hex()}"
    if verdict.intact:
        return f"audit log intact: {verdict.entries_checked} entries verified ({head})"
    return (
        f"audit log BROKEN at entry {verdict.first_bad_sequence}: {verdict.problem} "
        f"({verdict.entries_checked} entries verified before it; {head})"
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = parse(argv, os.environ if environ is None else environ)
    url = args.database_url
    if not url:
        # Never create an empty database just to report on it.
        if not (Path(args.data_dir) / "activation.db").exists():
            print(f"no Activation Server database in {args.data_dir}", file=sys.stderr)
            return 2
        url = sqlite_url(Path(args.data_dir), "activation.db")
    try:
        verdict = asyncio.run(verify_audit_log(url))
    except Exception as error:  # a missing or unmigrated database, a refused connection
        print(f"cannot read the audit log: {error}", file=sys.stderr)
        return 2
    print(describe(verdict))
    return 0 if verdict.intact else 1


if __name__ == "__main__":
    sys.exit(main())
