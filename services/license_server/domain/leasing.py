"""Network seat leasing: acquire, queue, heartbeat, resume, release, revoke, expiry.

Every change of a seat count is one conditional UPDATE in the database, and every
expiry is computed from stored times, so several License Server processes over one
database agree, and a restart loses nothing. A lease is proved by its secret (stored
only as a hash) and fenced by an epoch that each resume raises. What a holder or a
waiter must hear at once is published as a lease event after the change commits.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from services.license_server.domain import pools
from services.license_server.domain.errors import (
    LeaseNotFound,
    QueueTimeout,
    StaleLeaseEpoch,
)
from services.license_server.domain.events import LeaseBus
from services.license_server.domain.group_commit import GATHER_SECONDS, GroupCommit
from services.license_server.domain.heartbeats import HeartbeatBatcher
from services.license_server.domain.metrics import LeaseMetrics
from services.license_server.domain.model import (
    Grant,
    Lease,
    LeaseEnded,
    LeaseEvent,
    NewLease,
    PoolInformation,
    SeatsFreed,
    Waiter,
)
from services.license_server.domain.pools import fit_pool
from services.license_server.domain.ports import LicenseStore, Queries
from services.license_server.domain.replicas import ReplicaRoster
from services.license_server.domain.seats import (
    RESUMED_ELSEWHERE,
    lease_not_found,
    new_lease,
    not_licensed,
    secret_hash,
    shortfall,
    unusable,
)
from services.license_server.domain.vendor_standing import CHECK_IN_CAUSES
from tessera.clock import Clock
from tessera.errors import DomainError, InvalidInput
from tessera.validation import checked_text

log = logging.getLogger(__name__)

MAX_SEATS_PER_LEASE = 10_000
# Tries to queue a client under this replica's id, registering anew between them.
REGISTER_ATTEMPTS = 3
# A step back of the clock up to this much is noise (NTP corrections, replicas' clocks a
# few milliseconds apart) and stretches a lease by at most this much; a longer one is
# noticed, and every lease is cut back to at most one TTL from the corrected time.
CLOCK_STEP_TOLERANCE = dt.timedelta(seconds=1)
MAX_TEXT = 256

# Why a lease ended without its holder asking, as told on its stream.
REVOKED_BY_OPERATOR = "REVOKED_BY_OPERATOR"
LEASE_EXPIRED = "LEASE_EXPIRED"
LEASE_RESUMED_ELSEWHERE = "LEASE_RESUMED_ELSEWHERE"


@dataclass(frozen=True)
class LeasePolicy:
    """Server settings for leases."""

    ttl_seconds: int = 90
    heartbeat_interval_seconds: float = 30.0
    sweep_batch: int = 1000
    # A waiter's stream proves it is alive this often; a waiter silent for
    # waiter_ttl_seconds (its stream is gone, its leaving was lost) drops out of the queue.
    waiter_refresh_seconds: float = 5.0
    waiter_ttl_seconds: float = 15.0
    # A replica whose beat stands still this long is declared dead by the others, and its
    # queued clients leave the queue (domain/replicas.py).
    replica_timeout_seconds: float = 1.0
    # Stream heartbeats are written to the database together, at most this long after
    # the first of them (sooner for short heartbeat intervals), and acknowledged then.
    heartbeat_flush_seconds: float = 1.0
    # Under load, how long a checkout/check-in/resume transaction waits for more calls to
    # join it (group_commit.GATHER_SECONDS); 0: never.
    group_commit_delay_seconds: float = GATHER_SECONDS


@dataclass(frozen=True)
class QueuePlace:
    """Where a waiter stands: its place in line (1 is next), as queued now. ``waiter`` is
    another one than was asked about when its place was lost (its replica was declared
    dead) and it queued again at the back."""

    waiter: Waiter
    position: int


class _PlaceLost(Exception):
    """The waiter is no longer live: the transaction that would grant it rolls back."""


@dataclass(frozen=True)
class LeaseEntry:
    """The operator's view of one lease or waiter."""

    lease: Lease | None
    waiter: Waiter | None


class Leasing:
    """Seat pools, the leases on them and the clients waiting for them."""

    def __init__(
        self,
        store: LicenseStore,
        policy: LeasePolicy,
        clock: Clock,
        bus: LeaseBus | None = None,
        metrics: LeaseMetrics | None = None,
        sole_process: bool = False,
    ) -> None:
        """``sole_process``: no other process serves this database (SQLite), so queued
        clients found at start belong to a process that is gone."""
        self.store = store
        self.policy = policy
        self.clock = clock
        self.bus = bus or LeaseBus()
        self.metrics = metrics or LeaseMetrics()
        # The latest time this process has seen, to notice the clock going back.
        self._latest_now: dt.datetime | None = None
        self.heartbeats = HeartbeatBatcher(store, clock, policy.heartbeat_flush_seconds)
        self.group_commit = GroupCommit(
            store,
            clock,
            self.bus.publish,
            self.metrics,
            gather_seconds=policy.group_commit_delay_seconds,
        )
        self.replicas = ReplicaRoster(
            store, self.bus, clock, policy.replica_timeout_seconds, sole_process
        )

    # Holding seats

    async def acquire(self, new: NewLease, ttl_seconds: int | None = None) -> Grant:
        """Take ``new.count`` seats of a feature, all or nothing, behind any waiters."""
        try:
            grant = await self._acquire(new, ttl_seconds)
        except DomainError as refusal:
            self.metrics.denied(refusal.reason)
            raise
        self.metrics.granted(grant.lease.feature)
        return grant

    async def _acquire(self, new: NewLease, ttl_seconds: int | None) -> Grant:
        new = _validated(new)
        lease, secret = await self.group_commit.checkout(new, self._ttl(ttl_seconds))
        return self._grant(lease, secret, resumed=False)

    async def heartbeat(
        self,
        lease_id: str,
        secret: str,
        epoch: int | None = None,
        ttl_seconds: int | None = None,
    ) -> dt.datetime:
        """Extend a held lease by its TTL; returns the new expiry. A stream passes the
        lease's epoch (fencing) and TTL (one statement instead of two)."""
        _require_lease_credentials(lease_id, secret)
        now = self.clock.now()
        async with self.store.transaction() as repo:
            expires_at = await repo.extend_lease(
                lease_id, secret_hash(secret), epoch, now, ttl_seconds
            )
            if expires_at is None:
                raise await unusable(repo, lease_id, secret_hash(secret), epoch, now)
        assert expires_at is not None
        return expires_at

    async def keep_alive(self, grant: Grant, known_expiry: dt.datetime) -> dt.datetime:
        """A heartbeat on the stream that holds ``grant``: the new expiry, once it is
        written. Before the expiry the stream last heard it joins the next heartbeat
        flush; after it, or when the flush did not extend the lease at the stream's
        epoch, it is written alone, which says why the lease is no longer held
        (LeaseExpired, LeaseReleased, StaleLeaseEpoch) or extends it."""
        lease = grant.lease
        if self.clock.now() < known_expiry:
            written = await self.heartbeats.beat(lease, grant.heartbeat_interval_seconds)
            if written is not None:
                return written
        return await self.heartbeat(lease.lease_id, grant.secret, lease.epoch, lease.ttl_seconds)

    async def resume(self, lease_id: str, secret: str) -> Grant:
        """Take over a held lease from a broken stream: same seats, a new epoch."""
        _require_lease_credentials(lease_id, secret)
        lease = await self.group_commit.resume(lease_id, secret)
        self.metrics.resumed()
        return self._grant(lease, secret, resumed=True)

    async def release(self, lease_id: str, secret: str, epoch: int | None = None) -> bool:
        """Check a lease in; False when it was already released (not an error). A stream
        passes its epoch (fencing); a check-in without one joins the group commit."""
        _require_lease_credentials(lease_id, secret)
        if epoch is None:
            return await self.group_commit.checkin(lease_id, secret)
        now = self.clock.now()
        async with self.store.transaction() as repo:
            # The check-in itself first; the lease is read only to explain a refusal.
            feature = await repo.release_lease(
                lease_id, secret_hash(secret), now, "checked_in", epoch
            )
            if feature is None:
                lease = await repo.get_lease(lease_id, secret_hash(secret))
                if lease is None:
                    raise lease_not_found(lease_id)
                if lease.released_at is None:
                    raise StaleLeaseEpoch(RESUMED_ELSEWHERE)
                return False
            await repo.announce(SeatsFreed(feature))
        self.bus.publish(SeatsFreed(feature))
        return True

    # Waiting for seats

    async def enqueue(self, new: NewLease) -> Waiter:
        """Put a client at the back of its feature's queue (it must be licensed here)."""
        try:
            return await self._enqueue(new)
        except DomainError as refusal:
            self.metrics.denied(refusal.reason)
            raise

    async def _enqueue(self, new: NewLease) -> Waiter:
        new = _validated(new)
        replica_id = self.replicas.replica_id
        for _ in range(REGISTER_ATTEMPTS):
            now = self.clock.now()
            async with self.store.transaction() as repo:
                pool = await repo.get_pool(new.feature)
                if pool is None or new.count > pool.activated:
                    raise await shortfall(repo, new, pool, now)
                if await repo.hold_replica(replica_id):
                    waiter = Waiter(str(uuid.uuid4()), new, now, replica_id=replica_id)
                    alive_until = now + _seconds(self.policy.waiter_ttl_seconds)
                    ticket = await repo.enqueue(waiter, alive_until, replica_id)
                    return replace(waiter, ticket=ticket)
            # This replica was declared dead (or never registered): queue under a new id.
            replica_id = await self.replicas.renew(replica_id)
        raise RuntimeError(f"this replica's registration was dropped {REGISTER_ATTEMPTS} times")

    async def try_dequeue(self, waiter: Waiter, ttl_seconds: int | None) -> Grant | QueuePlace:
        """Grant a waiter's seats if it is first in line and they are free; otherwise its
        place in the queue. Keeps the waiter alive; one whose place was lost (its replica
        was declared dead) queues again at the back, and is granted if that is first."""
        outcome = await self._try_dequeue(waiter, ttl_seconds)
        if isinstance(outcome, QueuePlace) and outcome.waiter is not waiter:
            # At the back now, which may be first: seats free now would wait for a turn.
            return await self._try_dequeue(outcome.waiter, ttl_seconds)
        return outcome

    async def _try_dequeue(self, waiter: Waiter, ttl_seconds: int | None) -> Grant | QueuePlace:
        ttl = self._ttl(ttl_seconds)
        now = self.clock.now()
        request = waiter.request
        passing = False
        try:
            async with self.store.transaction() as repo:
                pool = await repo.get_pool(request.feature)
                if (
                    pool is not None
                    and pool.available >= request.count
                    and await repo.take_seats(request.feature, request.count, now, waiter.ticket)
                ):
                    # Granted only while still in line: a dropped waiter's place is gone.
                    if not await repo.claim_waiter(waiter.waiter_id, now):
                        raise _PlaceLost
                    grant = await self._grant_new(repo, request, ttl, now)
                    # Seats left over go to whoever is next, on any replica.
                    passing = pool.available > request.count
                    if passing:
                        await repo.announce(SeatsFreed(request.feature))
                else:
                    alive_until = now + _seconds(self.policy.waiter_ttl_seconds)
                    if not await repo.keep_waiter_alive(waiter.waiter_id, alive_until, now):
                        raise _PlaceLost
                    return QueuePlace(waiter, await repo.queue_position(waiter, now))
        except _PlaceLost:
            return await self._queue_again(waiter)
        self.bus.unwatch_queue(request.feature, waiter.ticket)
        if passing:
            self.bus.publish(SeatsFreed(request.feature))
        self.metrics.granted(request.feature)
        return grant

    async def _queue_again(self, waiter: Waiter) -> QueuePlace:
        """Put a waiter that lost its place at the back of the line, under this replica's
        current id (a new one if this replica was declared dead)."""
        self.bus.unwatch_queue(waiter.request.feature, waiter.ticket)
        async with self.store.transaction() as repo:
            await repo.leave_queue(waiter.waiter_id)  # what is left of it, if anything
        again = await self.enqueue(waiter.request)
        log.info(
            "queued client %s for %s had lost its place (its replica was declared dead): "
            "queued again as %s",
            waiter.waiter_id,
            waiter.request.feature,
            again.waiter_id,
        )
        async with self.store.transaction() as repo:
            position = await repo.queue_position(again, self.clock.now())
        return QueuePlace(again, position)

    async def leave_queue(self, waiter: Waiter) -> None:
        feature = waiter.request.feature
        self.bus.unwatch_queue(feature, waiter.ticket)
        async with self.store.transaction() as repo:
            await repo.leave_queue(waiter.waiter_id)
            pool = await repo.get_pool(feature)
            # Whoever waited behind may be first now, on any replica, and seats are free.
            free = pool is not None and pool.available > 0
            if free:
                await repo.announce(SeatsFreed(feature))
        if free:
            self.bus.publish(SeatsFreed(feature))

    # The operator

    async def revoke(self, lease_id: str, reason: str) -> bool:
        """Release a lease now (FlexNet's lmremove); its holder is told at once."""
        lease_id = checked_text("lease_id", lease_id, 128, required=True)
        reason = checked_text("reason", reason, MAX_TEXT)
        now = self.clock.now()
        message = "the operator revoked this lease" + (f": {reason}" if reason else "")
        async with self.store.transaction() as repo:
            lease = await repo.revoke_lease(lease_id, now, "revoked")
            if lease is None:
                if not await repo.lease_exists(lease_id):
                    raise LeaseNotFound(
                        f"no lease {lease_id!r} on this License Server; `tessera leases` "
                        "lists the leases held"
                    )
                return False
            events: list[LeaseEvent] = [
                LeaseEnded(lease_id, REVOKED_BY_OPERATOR, message),
                SeatsFreed(lease.feature),
            ]
            for event in events:
                await repo.announce(event)
        self._publish(events)
        self.metrics.revoked(events)
        return True

    async def list_leases(self, feature: str = "") -> list[LeaseEntry]:
        """Who holds seats, then who waits for them, oldest first."""
        feature = checked_text("feature", feature, 64)
        now = self.clock.now()
        async with self.store.transaction() as repo:
            held = await repo.list_held_leases(feature)
            waiting = await repo.list_waiters(feature, now)
        return [LeaseEntry(lease, None) for lease in held] + [
            LeaseEntry(None, waiter) for waiter in waiting
        ]

    async def declare_requirement(self, client_host: str, feature: str, required: int) -> None:
        """Record how many seats of a feature a client needs (EBO's Required)."""
        client_host = checked_text("client_host", client_host, MAX_TEXT, required=True)
        feature = _feature(feature)
        if not 0 <= required <= 1_000_000:
            raise InvalidInput("required", f"must be between 0 and 1000000, not {required}")
        async with self.store.transaction() as repo:
            await repo.declare_requirement(client_host, feature, required, self.clock.now())

    async def information(self, feature: str = "") -> list[PoolInformation]:
        """License Information per feature: Activated, Used, Available, Queued, Required."""
        feature = checked_text("feature", feature, 64)
        now = self.clock.now()
        async with self.store.transaction() as repo:
            pools = {pool.feature: pool for pool in await repo.list_pools()}
            queued = await repo.queued_per_feature(now)
            required = await repo.required_per_feature()
            withdrawn = await repo.withdrawn_per_feature(CHECK_IN_CAUSES)
        names = sorted(set(pools) | set(required))
        if feature:
            if feature not in names:
                raise not_licensed(feature)
            names = [feature]
        return [
            PoolInformation(
                name,
                pools[name].activated if name in pools else 0,
                pools[name].used if name in pools else 0,
                queued=queued.get(name, 0),
                required=required.get(name, 0),
                withdrawn=withdrawn.get(name, (0, ""))[0],
                withdrawn_reason=withdrawn.get(name, (0, ""))[1],
            )
            for name in names
        ]

    # Housekeeping, on any replica, any time

    async def release_expired(self) -> int:
        """Free the seats of every lease whose TTL ran out; tell holders still connected."""
        freed = 0
        while True:
            now = self.clock.now()
            async with self.store.transaction() as repo:
                expired = await repo.release_expired(now, self.policy.sweep_batch)
                events = _expiry_events(expired)
                for event in events:
                    await repo.announce(event)
                await repo.drop_dead_waiters(now)
            self._publish(events)
            self.metrics.expired(len(expired))
            freed += len(expired)
            if len(expired) < self.policy.sweep_batch:
                return freed

    async def notice_clock_step(self) -> int:
        """Cut leases back to one TTL from now if the clock went back since the last call
        (while this process runs); returns how many were cut. Cheap when it did not."""
        now = self.clock.now()
        latest = self._latest_now
        if latest is None or now >= latest - CLOCK_STEP_TOLERANCE:
            self._latest_now = now if latest is None else max(latest, now)
            return 0
        log.warning(
            "the clock went back %s (from %s to %s)",
            latest - now,
            latest.isoformat(timespec="seconds"),
            now.isoformat(timespec="seconds"),
        )
        return await self.shorten_stretched_leases()

    async def shorten_stretched_leases(self) -> int:
        """Give every held lease at most one TTL from now: a lease granted or extended
        while the clock was ahead (noticed after a restart with the clock put right, or
        while running) must not keep its seat with no heartbeat until that future time.
        Run at start and when the clock is seen going back; returns how many were cut."""
        now = self.clock.now()
        self._latest_now = now
        async with self.store.transaction() as repo:
            shortened = await repo.shorten_stretched_leases(now, CLOCK_STEP_TOLERANCE)
        if shortened:
            log.warning(
                "%d lease(s) expired more than one TTL from now (%s), as if granted or "
                "heartbeaten while the clock was ahead: cut back to one TTL from now",
                len(shortened),
                now.isoformat(timespec="seconds"),
            )
        return len(shortened)

    async def retire_expired_certificates(self) -> int:
        """Take expired certificates' seats out of their pools, revoking the newest leases
        first when fewer seats remain than are in use; returns how many were retired."""
        now = self.clock.now()
        retired = 0
        async with self.store.transaction() as repo:
            certificates = await repo.expired_certificates(now)
        for certificate in certificates:
            async with self.store.transaction() as repo:
                if not await repo.retire_certificate(certificate, now):
                    continue
                retired += 1
                events = await fit_pool(
                    repo,
                    certificate.feature,
                    now,
                    pools.LICENSE_EXPIRED,
                    f"the {certificate.feature} license behind this lease expired",
                )
            self._publish(events)
            self.metrics.revoked(events)
        return retired

    # Rules

    def _ttl(self, requested: int | None) -> int:
        """The client may ask for a shorter TTL than the server's, never a longer one."""
        if requested is None:
            return self.policy.ttl_seconds
        if requested < 1:
            raise InvalidInput("ttl", f"must be at least 1 second, not {requested}")
        return min(requested, self.policy.ttl_seconds)

    async def _grant_new(self, repo: Queries, new: NewLease, ttl: int, now: dt.datetime) -> Grant:
        lease, secret = new_lease(new, ttl, now)
        await repo.insert_leases([(lease, secret_hash(secret))])
        return self._grant(lease, secret, resumed=False)

    def _grant(self, lease: Lease, secret: str, resumed: bool) -> Grant:
        interval = min(self.policy.heartbeat_interval_seconds, lease.ttl_seconds / 3)
        return Grant(lease, secret, interval, resumed)

    def _publish(self, events: Sequence[LeaseEvent]) -> None:
        for event in events:
            self.bus.publish(event)

    # What a lease stream asks of leasing besides the verbs above (lease_stream.py): it
    # never reaches into the bus, the metrics or the policy itself.

    @property
    def waiter_refresh_seconds(self) -> float:
        """How long a queued stream may go without trying its turn (``try_dequeue``):
        each try keeps its waiter alive."""
        return self.policy.waiter_refresh_seconds

    def count_open_streams(self, count: Callable[[], int]) -> None:
        """Report ``count()`` as the number of open lease streams at each scrape."""
        self.metrics.count_open_streams(count)

    def watch_lease(self, grant: Grant, listener: Callable[[LeaseEvent], None]) -> None:
        """Tell ``listener`` when the lease ``grant`` holds ends without its holder
        asking or is resumed elsewhere, on any replica, until ``unwatch_lease``."""
        self.bus.watch_lease(grant.lease.lease_id, listener)

    def unwatch_lease(self, grant: Grant, listener: Callable[[LeaseEvent], None]) -> None:
        """Stop telling ``listener`` about the lease ``grant`` holds."""
        self.bus.unwatch_lease(grant.lease.lease_id, listener)

    def watch_queue(self, waiter: Waiter, listener: Callable[[LeaseEvent], None]) -> None:
        """Wake ``listener`` (with SeatsFreed) when seats of the waiter's feature free up
        while it is this process's first in line, until it is granted (``try_dequeue``),
        leaves the line (``leave_queue``) or ``unwatch_queue``."""
        self.bus.watch_queue(waiter.request.feature, waiter.ticket, listener)

    def unwatch_queue(self, waiter: Waiter) -> None:
        """Stop waking the waiter's stream."""
        self.bus.unwatch_queue(waiter.request.feature, waiter.ticket)

    def pass_on(self, freed: SeatsFreed) -> None:
        """Hand a wake-up to whoever is first in line now: it reached a stream that had
        just left the line."""
        self.bus.publish(freed)

    def wait_ran_out(self, waiter: Waiter, position: int) -> QueueTimeout:
        """The refusal of a waiter whose wait ended before a seat freed for it, counted
        as a denial. The waiter stays in line until it leaves (``leave_queue``)."""
        feature = waiter.request.feature
        refusal = QueueTimeout(
            f"no {feature} seat freed while waiting in the queue (position {position}); "
            "wait longer, or ask the operator to activate more",
            metadata={"feature": feature},
        )
        self.metrics.denied(refusal.reason)
        return refusal


def _expiry_events(expired: list[tuple[str, str]]) -> list[LeaseEvent]:
    events: list[LeaseEvent] = [
        LeaseEnded(lease_id, LEASE_EXPIRED, "no heartbeat within the lease's TTL")
        for lease_id, _ in expired
    ]
    events += [SeatsFreed(feature) for feature in sorted({feature for _, feature in expired})]
    return events


def _seconds(value: float) -> dt.timedelta:
    return dt.timedelta(seconds=value)


def _validated(new: NewLease) -> NewLease:
    if not 1 <= new.count <= MAX_SEATS_PER_LEASE:
        raise InvalidInput("count", f"must be between 1 and {MAX_SEATS_PER_LEASE}, not {new.count}")
    return NewLease(
        feature=_feature(new.feature),
        count=new.count,
        client_host=checked_text("client_host", new.client_host, MAX_TEXT),
        user=checked_text("user", new.user, MAX_TEXT),
        display_name=checked_text("display_name", new.display_name, MAX_TEXT),
    )


def _feature(feature: str) -> str:
    if not feature.strip():
        raise InvalidInput("feature", "is required, e.g. client.station")
    return checked_text("feature", feature, 64)


def _require_lease_credentials(lease_id: str, secret: str) -> None:
    checked_text("lease_id", lease_id, 128, required=True)
    checked_text("lease_secret", secret, 128, required=True)
