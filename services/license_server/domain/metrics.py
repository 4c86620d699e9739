"""What the License Server shows Prometheus: lease counters and the seat pools.

Counters go up in the domain where the thing happens, after its transaction commits, and
are this process's own (a Prometheus ``sum`` over replicas gives the site's). On the
lease hot path that is one counter increment per grant; heartbeats count nothing here
(their calls are in ``tessera_rpc_duration_seconds``). The seat gauges are read from the
database by the scrape itself, in one statement, so every replica reports the site's
pools as the database has them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.license_server.domain.model import LeaseEnded, LeaseEvent, PoolInformation
from services.license_server.domain.ports import LicenseStore
from tessera.clock import Clock


class LeaseMetrics:
    """Counters of grants, denials, resumes, expiries and revocations; open streams."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.grants = Counter(
            "tessera_lease_grants_total",
            "Leases granted (at once or from the queue), by feature",
            ["feature"],
            registry=registry,
        )
        self.denials = Counter(
            "tessera_lease_denials_total",
            "Acquires refused, by reason (NO_SEAT_AVAILABLE, QUEUE_TIMEOUT, …)",
            ["reason"],
            registry=registry,
        )
        self.resumes = Counter(
            "tessera_lease_resumes_total",
            "Leases resumed by a new stream (same seats, new epoch)",
            registry=registry,
        )
        self.expiries = Counter(
            "tessera_lease_expiries_total",
            "Leases freed because no heartbeat came within their TTL",
            registry=registry,
        )
        self.revocations = Counter(
            "tessera_lease_revocations_total",
            "Leases ended by the server, by reason (REVOKED_BY_OPERATOR, LICENSE_RETURNED, …)",
            ["reason"],
            registry=registry,
        )
        self.open_streams = Gauge(
            "tessera_lease_streams_open",
            "Lease streams open on this process",
            registry=registry,
        )
        self.group_commits = Counter(
            "tessera_lease_group_commits_total",
            "Transactions of the checkout/check-in group commit",
            registry=registry,
        )
        self.group_commit_calls = Counter(
            "tessera_lease_group_commit_calls_total",
            "Checkouts and check-ins those transactions served (calls per transaction = "
            "this / tessera_lease_group_commits_total)",
            registry=registry,
        )
        self._grants: dict[str, Counter] = {}

    def granted(self, feature: str) -> None:
        # Features granted are the licensed ones: a handful, so the children are cached.
        child = self._grants.get(feature)
        if child is None:
            child = self._grants[feature] = self.grants.labels(feature)
        child.inc()

    def group_committed(self, calls: int) -> None:
        self.group_commits.inc()
        self.group_commit_calls.inc(calls)

    def denied(self, reason: str) -> None:
        self.denials.labels(reason).inc()

    def resumed(self) -> None:
        self.resumes.inc()

    def expired(self, count: int) -> None:
        if count:
            self.expiries.inc(count)

    def revoked(self, events: Iterable[LeaseEvent]) -> None:
        """Count the leases that ``events`` end, by the reason their holders are told."""
        for event in events:
            if isinstance(event, LeaseEnded):
                self.revocations.labels(event.reason).inc()

    def count_open_streams(self, count: Callable[[], int]) -> None:
        """Read the number of open lease streams from ``count`` at each scrape."""
        self.open_streams.set_function(lambda: float(count()))


class SeatGauges(Collector):
    """Activated, used, available and queued seats per feature, as of the last refresh."""

    def __init__(self, store: LicenseStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._pools: Sequence[PoolInformation] | None = None

    async def refresh(self) -> None:
        """Read every pool and its queue (one statement); a failed read shows no seats."""
        self._pools = None
        async with self.store.transaction() as repo:
            self._pools = await repo.pools_with_queues(self.clock.now())

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        activated, used, available, queued = families
        for pool in self._pools or ():
            activated.add_metric([pool.feature], pool.activated)
            used.add_metric([pool.feature], pool.used)
            available.add_metric([pool.feature], pool.available)
            queued.add_metric([pool.feature], pool.queued)
        return iter(families)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        def family(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=["feature"])

        return [
            family("tessera_seats_activated", "Seats activated on this License Server"),
            family("tessera_seats_used", "Seats held by leases"),
            family("tessera_seats_available", "Seats free to lease"),
            family("tessera_seats_queued", "Clients waiting in the feature's queue"),
        ]
