"""What a client is told and what it works with.

``ClientOptions`` is what an application gives ``LicenseClient`` and ``SyncLicenseClient``
(every default lives there); ``ClientSettings`` is what the client resolved from them for
its leases and calls: the parsed address, TLS and the timeouts.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from nacl.signing import VerifyKey

from clients.backoff import Backoff
from tessera.address import ServerAddress
from tessera.local_licenses import LocalLicenseStore
from tessera.tls import ClientTls


@dataclass(frozen=True)
class ClientOptions:
    """How a LicenseClient presents itself and how long it waits; every field optional.

    ``client_host``: the host name shown to the operator and used for requirements
    (None: this machine's host name).
    ``user``, ``display_name``: who and what holds the seats, shown in ``tessera leases``.
    ``local_licenses``: a LocalLicenseStore, or its directory, for the start-up rule
    (a valid local license first); needs ``vendor_keys``.
    ``vendor_keys``: the vendor public keys that verify local licenses, as a mapping of
    key id to key or the path of ``vendor-keys.pub``.
    ``connect_timeout``: seconds per License Server to get a connection.
    ``call_timeout``: seconds for an answer to an acquire, resume or unary call.
    ``release_timeout``: seconds for the whole check-in on exit, across every server.
    ``backoff``: the delays between resume attempts.
    ``tls``: how to dial TLS (and mutual TLS); None: plaintext.
    ``site_token``: presented on every call, for a License Server that requires one
    (``--site-token-sha256``); None presents none.
    """

    client_host: str | None = None
    user: str = ""
    display_name: str = ""
    local_licenses: LocalLicenseStore | str | os.PathLike[str] | None = None
    vendor_keys: Mapping[str, VerifyKey] | str | os.PathLike[str] | None = None
    connect_timeout: float = 2.0
    call_timeout: float = 10.0
    release_timeout: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    tls: ClientTls | None = None
    site_token: str | None = field(default=None, repr=False)


class ClientKeywords(TypedDict, total=False):
    """ClientOptions' fields as keyword arguments of the clients' constructors (the
    defaults are ClientOptions'); tests keep the two in step."""

    client_host: str | None
    user: str
    display_name: str
    local_licenses: LocalLicenseStore | str | os.PathLike[str] | None
    vendor_keys: Mapping[str, VerifyKey] | str | os.PathLike[str] | None
    connect_timeout: float
    call_timeout: float
    release_timeout: float
    backoff: Backoff | None
    tls: ClientTls | None
    site_token: str | None


def options_with(options: ClientOptions | None, keywords: ClientKeywords) -> ClientOptions:
    """``options`` (or the defaults) with the keyword arguments given beside it in force.

    ``backoff=None`` stands for the default Backoff, as it always has for the keyword.
    """
    changes: dict[str, Any] = {
        name: value for name, value in keywords.items() if value is not None or name != "backoff"
    }
    return dataclasses.replace(options if options is not None else ClientOptions(), **changes)


@dataclass(frozen=True)
class ClientSettings:
    """The servers of the address, in order, and how long to wait for them (the timeouts,
    backoff, TLS and site token of the client's ClientOptions)."""

    address: str
    servers: tuple[ServerAddress, ...]
    connect_timeout: float
    call_timeout: float
    release_timeout: float
    backoff: Backoff
    tls: ClientTls | None
    site_token: str | None = field(repr=False)
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    @classmethod
    def of(
        cls, address: str, servers: tuple[ServerAddress, ...], options: ClientOptions
    ) -> ClientSettings:
        """The settings for ``servers`` (parsed from ``address``) under ``options``."""
        return cls(
            address=address,
            servers=servers,
            connect_timeout=options.connect_timeout,
            call_timeout=options.call_timeout,
            release_timeout=options.release_timeout,
            backoff=options.backoff,
            tls=options.tls,
            site_token=options.site_token,
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the site token, if there is one."""
        return (("authorization", f"Bearer {self.site_token}"),) if self.site_token else ()

    @property
    def targets(self) -> list[str]:
        """Every ``host:port`` of the address, in the order they are tried."""
        return [target for server in self.servers for target in server.targets()]

    def targets_from(self, first: str) -> list[str]:
        """Every target, ``first`` first (the server that holds a lease)."""
        return [first, *(target for target in self.targets if target != first)]
