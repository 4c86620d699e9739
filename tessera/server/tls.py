"""The server half of TLS: a port's certificate, key and client CA, and the rule that
plaintext is only for loopback unless an operator allows it. How clients open channels
is ``tessera.tls``.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from tessera.tls import read_key, read_pem

log = logging.getLogger(__name__)


class PlaintextRefused(Exception):
    """Plaintext gRPC was about to be served on an address other than loopback."""


@dataclass(frozen=True)
class ServerTls:
    """A service's certificate chain and key; with ``client_ca``, mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def check(self) -> None:
        """Read the files now, so a service refuses them before it touches anything."""
        self.credentials()

    def credentials(self) -> grpc.ServerCredentials:
        """Reads the files now (the key refused when group or others can read it)."""
        key = read_key(self.key)
        chain = read_pem(self.cert, "TLS certificate")
        client_ca = (
            read_pem(self.client_ca, "TLS client CA") if self.client_ca is not None else None
        )
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


def listen_host(listen: str) -> str:
    """The host part of ``host:port`` (``[::1]:27000`` -> ``::1``; ``:27000`` -> ``''``)."""
    host, _, _ = listen.rpartition(":")
    return host.strip("[]")


def is_loopback(listen: str) -> bool:
    """Whether ``host:port`` listens on loopback only (``localhost``, 127.0.0.0/8, ::1)."""
    host = listen_host(listen)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # A wildcard ('', '0.0.0.0', '[::]' are addresses too) or a host name that may
        # resolve anywhere: not known to be loopback.
        return False


def check_plaintext(listen: str, tls: ServerTls | None, allow_plaintext: bool) -> None:
    """Refuse plaintext on an address other than loopback unless ``allow_plaintext``;
    when allowed there, say so loudly."""
    if tls is not None or is_loopback(listen):
        return
    if not allow_plaintext:
        raise PlaintextRefused(
            f"refusing to serve plaintext gRPC on {listen}, which is not a loopback address: "
            "give --tls-cert and --tls-key (and --tls-client-ca for mutual TLS), or "
            "--allow-plaintext if something else on the path encrypts the traffic"
        )
    log.warning(
        "serving PLAINTEXT gRPC on %s (--allow-plaintext): bearer tokens, lease secrets "
        "and licenses cross the network unencrypted; use --tls-cert and --tls-key unless "
        "something else on the path encrypts the traffic",
        listen,
    )
