"""Fair shares of the License Server per client host: open lease streams and the rate
of acquires, so one misbehaving host cannot starve the others.

The host is the address the connection comes from (``tessera.server.limits.peer_host``), not the
``client_host`` a request names: that field is the client's word and free to vary.

Resumes are not rate-limited. After a License Server restarts every client resumes at
once (10,000 on a large site); a resume takes no new seat, needs the lease's secret, and
the client library already spreads its attempts with jittered backoff. Limiting it would
turn a restart into lost leases, which is exactly what resume exists to prevent. Open
streams still count, so a host cannot hold more than its share of streams while it does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.license_server.domain.errors import AcquireRateExceeded, TooManyStreams
from services.license_server.domain.metrics import LeaseMetrics
from tessera.server.limits import StreamCounter, TokenBuckets


@dataclass(frozen=True)
class ClientLimits:
    """Per client host: at most ``max_streams_per_host`` lease streams open, and
    acquires (stream or Checkout) at ``acquire_rate`` a second after a burst of
    ``acquire_burst``; a stream that sends no acquire or resume within
    ``stream_idle_seconds`` is closed. 0 turns a limit off."""

    max_streams_per_host: int = 256
    acquire_rate: float = 50.0
    acquire_burst: int = 100
    stream_idle_seconds: float = 30.0


class Admission:
    """Admits streams and acquires per client host, within ``ClientLimits``."""

    def __init__(
        self,
        limits: ClientLimits,
        metrics: LeaseMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.metrics = metrics or LeaseMetrics()
        self.streams = StreamCounter(limits.max_streams_per_host)
        self.acquires = TokenBuckets(limits.acquire_rate, limits.acquire_burst, monotonic)

    def open_stream(self, host: str) -> None:
        """Count a new lease stream of ``host``, or refuse it (TooManyStreams); a stream
        admitted here must be closed with ``close_stream``."""
        if not self.streams.try_open(host):
            error = TooManyStreams(
                f"{host} has {self.limits.max_streams_per_host} lease streams open, as many "
                "as one host may; end one, or try again later",
                metadata={
                    "client_address": host,
                    "max_streams_per_host": str(self.limits.max_streams_per_host),
                },
            )
            self.metrics.denied(error.reason)
            raise error

    def close_stream(self, host: str) -> None:
        self.streams.close(host)

    def admit_acquire(self, host: str) -> None:
        """Take one acquire from ``host``'s share, or refuse it (AcquireRateExceeded,
        with the seconds until the next one fits)."""
        wait = self.acquires.take(host)
        if wait > 0:
            error = AcquireRateExceeded(
                f"{host} asks for seats faster than one host may ({self.limits.acquire_rate:g} "
                f"a second after a burst of {self.limits.acquire_burst}); "
                f"try again in {wait:.2f} s",
                retry_after=wait,
                host=host,
            )
            self.metrics.denied(error.reason)
            raise error
