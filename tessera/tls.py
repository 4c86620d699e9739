"""TLS for Tessera's gRPC: what a service serves with, what a client dials with, and the
rule that keeps plaintext on loopback.

A service serves TLS when given a certificate and its key (PEM files), and mutual TLS
when also given a client CA: then only callers presenting a certificate that CA signed
get through the handshake. Without TLS it serves plaintext, which is allowed on loopback
and refused on any other address unless explicitly allowed (then it warns loudly).

A client dials TLS when given a ``ClientTls``: the CA to trust (default: the system's
roots), optionally its own certificate and key for mutual TLS, and optionally the name
the server's certificate must carry when it differs from the host dialled.

Private key files are read through ``tessera.keys.read_private_file``: one that group or
others can read is refused, as for every other private key.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from tessera.keys import read_private_file

log = logging.getLogger(__name__)

ChannelOption = tuple[str, str | int]


class TlsConfigurationError(ValueError):
    """A TLS setting is incomplete, or one of its files cannot be read."""


def read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsConfigurationError(f"cannot read the {what} {path}: {error.strerror}") from None


def read_key(path: Path) -> bytes:
    try:
        return read_private_file(path)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise TlsConfigurationError(
            f"cannot read the TLS private key {path}: {error.strerror}"
        ) from None


@dataclass(frozen=True)
class ClientTls:
    """How a client dials TLS.

    ``ca``: PEM file of the CA(s) to trust; None trusts the system's roots.
    ``cert``/``key``: the client's own certificate chain and key, for mutual TLS.
    ``server_name``: the name the server's certificate must carry, when it differs from
    the host in the target (e.g. dialling an IP address).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsConfigurationError(
                "a client certificate needs its key and a key its certificate"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files now, so a renewed certificate is used by the next channel."""
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "TLS CA") if self.ca is not None else None,
            private_key=read_key(self.key) if self.key is not None else None,
            certificate_chain=(
                read_pem(self.cert, "TLS client certificate") if self.cert is not None else None
            ),
        )

    def check(self) -> None:
        """Read the files now, so a missing file or a key others can read is refused at
        start rather than on the first call."""
        self.credentials()

    def options(self) -> list[ChannelOption]:
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def client_tls(
    enabled: bool, ca: str = "", cert: str = "", key: str = "", server_name: str = ""
) -> ClientTls | None:
    """A ClientTls from settings text, or None for plaintext. Naming a CA, a client
    certificate or a server name turns TLS on as well as ``enabled`` does."""
    if not (enabled or ca or cert or key or server_name):
        return None
    return ClientTls(
        ca=Path(ca) if ca else None,
        cert=Path(cert) if cert else None,
        key=Path(key) if key else None,
        server_name=server_name,
    )


def open_channel(
    target: str, tls: ClientTls | None, options: Sequence[ChannelOption] = ()
) -> grpc.aio.Channel:
    """A channel to ``target``: TLS with ``tls``, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def open_sync_channel(target: str, tls: ClientTls | None) -> grpc.Channel:
    """``open_channel`` for code without an event loop (a check-in at interpreter exit)."""
    if tls is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, tls.credentials(), options=tls.options())
