"""``tessera config``: the settings in force and where each came from."""

from __future__ import annotations

import argparse

from tessera.tls import ClientTls
from tessera_cli.arguments import Subcommands, add_command
from tessera_cli.session import Result, Session
from tessera_cli.settings import Token
from tessera_cli.terminal import Cell, Column, table


def _token(token: Token | None) -> tuple[str, str]:
    if token is None:
        return "(none)", "-"
    if token.path is not None:
        state = "file" if token.path.is_file() else "file missing!"
        return f"({state}) {token.path}", token.source
    return "(set)", token.source


def _tls(tls: ClientTls | None) -> str:
    if tls is None:
        return "off (plaintext)"
    parts = [f"CA {tls.ca}" if tls.ca else "system CAs"]
    if tls.cert is not None:
        parts.append(f"client certificate {tls.cert}")
    if tls.server_name:
        parts.append(f"server name {tls.server_name}")
    return ("mutual TLS" if tls.cert is not None else "TLS") + ": " + ", ".join(parts)


async def show(args: argparse.Namespace, session: Session) -> Result:
    s = session.settings
    administrator = _token(s.administrator_token)
    operator = _token(s.operator_token)
    vendor = _token(s.vendor_token)
    rows = [
        ("administrator", s.administrator.value, s.administrator.source),
        ("license_server", s.license_server.value, s.license_server.source),
        ("activation_server", s.activation_server.value, s.activation_server.source),
        ("timeout", f"{s.timeout:g} s", s.timeout_source),
        ("data_dir", s.data_dir.value, s.data_dir.source),
        ("administrator_token", *administrator),
        ("operator_token", *operator),
        ("vendor_token", *vendor),
        ("tls", _tls(s.tls), s.tls_source),
    ]
    config_file = str(s.config_file) if s.config_file else "(none found)"
    text = "\n".join(
        [
            f"Config file: {config_file}",
            "",
            table(
                session.style,
                [Column("Setting"), Column("Value"), Column("From")],
                [[name, value, Cell(source, "dim")] for name, value, source in rows],
            ),
            "",
            session.style.dim(
                "Precedence: flag, then environment, then config file, then default."
            ),
        ]
    )
    settings: dict[str, dict[str, object]] = {
        name: {"value": value, "source": source} for name, value, source in rows
    }
    settings["timeout"]["value"] = s.timeout
    data = {"config_file": str(s.config_file) if s.config_file else None, "settings": settings}
    return Result(data, text)


def register(commands: Subcommands) -> None:
    """``tessera config``."""
    add_command(
        commands,
        "config",
        show,
        "the settings in force and where each came from",
        "Show the addresses, timeout and token sources in force, and where each came from: "
        "a flag, the environment, the config file, the `make up` data directory, a default.",
        ["tessera config", "TESSERA_LICENSE_SERVER=27001@es-host tessera config"],
    )
