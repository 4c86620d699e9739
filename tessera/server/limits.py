"""Per-client limits: who a caller is (its network address), and the counters and token
buckets that keep one client from taking what others need.

A client is keyed by the IP address its connection comes from (``context.peer()``), not
by anything it says about itself: a host name in a request is the client's word and
costs nothing to change, while a TCP peer address needs a completed handshake from that
address. Behind NAT or a proxy that rewrites source addresses every client looks like
one; that is a deployment choice the operator sizes the limits for (docs/operator.md).
"""

from __future__ import annotations

import ipaddress
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

# A peer that is not an IP connection (a Unix socket, an in-process channel).
LOCAL_PEER = "local"


def peer_host(peer: str) -> str:
    """The client address of a grpc peer string, e.g. ``ipv4:10.0.0.7:50412`` ->
    ``10.0.0.7``, ``ipv6:%5B::1%5D:50412`` -> ``::1``; an IPv4 address mapped into IPv6
    is its IPv4 address, so a dual-stack listener keys one host once."""
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv4":  # grpc core writes a dotted quad: nothing to parse (every acquire)
        address, _, _port = rest.rpartition(":")
        return address or rest or LOCAL_PEER
    if scheme != "ipv6":
        return LOCAL_PEER
    address = urllib.parse.unquote(rest).rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address or LOCAL_PEER
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class StreamCounter:
    """Concurrent streams per client, at most ``limit`` each (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def try_open(self, client: str) -> bool:
        """Count one more stream of ``client``; False (nothing counted) when it has
        ``limit`` open already."""
        count = self._open.get(client, 0)
        if self.limit and count >= self.limit:
            return False
        self._open[client] = count + 1
        return True

    def close(self, client: str) -> None:
        """One stream of ``client`` ended."""
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)

    def open_streams(self, client: str) -> int:
        return self._open.get(client, 0)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """A token bucket per client: ``burst`` calls at once, then ``rate`` a second
    (rate 0: no limit). ``monotonic`` is injectable so tests move time by hand."""

    # Buckets that have refilled are forgotten this often, so the table stays as small
    # as the set of clients that called lately.
    PRUNE_SECONDS = 60.0

    def __init__(
        self, rate: float, burst: int, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.monotonic = monotonic
        self._buckets: dict[str, _Bucket] = {}
        self._pruned = monotonic()

    def take(self, client: str) -> float:
        """Take a token for ``client``: 0.0 when there was one, else the seconds until
        there is (nothing taken)."""
        if self.rate <= 0:
            return 0.0
        now = self.monotonic()
        self._prune(now)
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        if now - self._pruned < self.PRUNE_SECONDS:
            return
        self._pruned = now
        full = self.burst / self.rate
        for client in [c for c, b in self._buckets.items() if now - b.updated >= full]:
            del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)
