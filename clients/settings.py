"""How a client reaches its License Servers: the parsed address, TLS and the timeouts."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from clients.backoff import Backoff
from tessera.address import ServerAddress
from tessera.tls import ClientTls


@dataclass(frozen=True)
class ClientSettings:
    """The servers of the address, in order, and how long to wait for them.

    ``connect_timeout``: per target, to get a connection (a refused port fails at once).
    ``call_timeout``: for an answer to an acquire, resume, or unary call.
    ``release_timeout``: for the whole check-in on exit, across every target.
    ``tls``: how to dial TLS (None: plaintext).
    ``site_token``: the site's token, presented on every call when the License Server
    requires one (``--site-token-sha256``); None presents none.
    """

    address: str
    servers: tuple[ServerAddress, ...]
    connect_timeout: float = 2.0
    call_timeout: float = 10.0
    release_timeout: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)
    tls: ClientTls | None = None
    site_token: str | None = field(default=None, repr=False)

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
