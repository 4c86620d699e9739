"""License Server addresses as EBO and FlexNet write them.

``27000@localhost`` names one port, ``@host`` the default range 27000-27009, and several
servers are separated by ``;`` (``@es1;27001@192.0.2.2``). IPv6 hosts go in brackets:
``27000@[::1]``. ``@localhost`` is the recommended setup: the License Server next to the
Enterprise Server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tessera.errors import InvalidLicenseServerAddress

DEFAULT_PORTS = tuple(range(27000, 27010))
DEFAULT_PORT = DEFAULT_PORTS[0]

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.\-_]*[A-Za-z0-9])?)$")


@dataclass(frozen=True)
class ServerAddress:
    """One License Server: a host and the ports to try there, in order."""

    host: str
    ports: tuple[int, ...]

    def targets(self) -> list[str]:
        """gRPC targets (``host:port``) to try for this server, in order."""
        return [f"{self.host}:{port}" for port in self.ports]

    def __str__(self) -> str:
        if self.ports == DEFAULT_PORTS:
            return f"@{self.host}"
        return ";".join(f"{port}@{self.host}" for port in self.ports)


def parse_address(text: str) -> list[ServerAddress]:
    """Parse a License Server address list, or raise InvalidLicenseServerAddress."""
    if not text or not text.strip():
        raise InvalidLicenseServerAddress(
            "Invalid license server configuration: the address is empty "
            "(write e.g. @localhost or 27000@es-host)"
        )
    servers = []
    for part in text.split(";"):
        part = part.strip()
        if part:
            servers.append(_parse_one(part, text))
    if not servers:
        raise InvalidLicenseServerAddress(
            f"Invalid license server configuration: {text!r} names no server"
        )
    return servers


def _parse_one(part: str, whole: str) -> ServerAddress:
    # Where the mistake is, when the address has more to it than the mistake.
    within = "" if part == whole.strip() else f" in {whole!r}"
    port_text, at, host = part.partition("@")
    if not at:
        raise InvalidLicenseServerAddress(
            f"Invalid license server configuration: {part!r}{within} is not of the form "
            "port@host or @host"
        )
    if not _HOST.match(host):
        raise InvalidLicenseServerAddress(
            f"Invalid license server configuration: {host!r}{within} is not a host name"
        )
    if not port_text:
        return ServerAddress(host, DEFAULT_PORTS)
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise InvalidLicenseServerAddress(
            f"Invalid license server configuration: {port_text!r}{within} is not a port (1-65535)"
        )
    return ServerAddress(host, (int(port_text),))
