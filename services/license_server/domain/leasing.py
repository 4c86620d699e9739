"""Network seat leasing: acquire, heartbeat, resume, release, and expiry.

Every change of a seat count is one conditional UPDATE in the database, and every
expiry is computed from stored times, so several License Server processes over one
database agree, and a restart loses nothing. A lease is proved by its secret (stored
only as a hash) and fenced by an epoch that each resume raises.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from dataclasses import dataclass

from services.license_server.domain.errors import (
    CountAboveActivated,
    FeatureNotLicensed,
    LeaseExpired,
    LeaseNotFound,
    LeaseReleased,
    NoSeatAvailable,
    StaleLeaseEpoch,
)
from services.license_server.domain.model import Grant, Lease, NewLease, PoolInformation
from services.license_server.store.repository import LicenseStore, Repository
from tessera.clock import Clock
from tessera.errors import InvalidInput
from tessera.validation import checked_text

MAX_SEATS_PER_LEASE = 10_000
MAX_TEXT = 256


@dataclass(frozen=True)
class LeasePolicy:
    """Server settings for leases."""

    ttl_seconds: int = 90
    heartbeat_interval_seconds: float = 30.0
    sweep_batch: int = 1000


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Leasing:
    """Seat pools and the leases on them."""

    def __init__(self, store: LicenseStore, policy: LeasePolicy, clock: Clock) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock

    async def acquire(self, new: NewLease, ttl_seconds: int | None = None) -> Grant:
        """Take ``new.count`` seats of a feature, all or nothing."""
        new = _validated(new)
        ttl = self._ttl(ttl_seconds)
        lease_id = str(uuid.uuid4())
        secret = secrets.token_urlsafe(24)
        now = self.clock.now()
        async with self.store.transaction() as repo:
            if not await repo.take_seats(new.feature, new.count):
                await self._refuse(repo, new)
            await repo.insert_lease(
                lease_id, secret_hash(secret), new, ttl, now, now + dt.timedelta(seconds=ttl)
            )
            lease = await repo.get_lease(lease_id, secret_hash(secret))
        assert lease is not None
        return self._grant(lease, secret, resumed=False)

    async def heartbeat(self, lease_id: str, secret: str, epoch: int | None = None) -> dt.datetime:
        """Extend a held lease by its TTL; returns the new expiry."""
        _require_lease_credentials(lease_id, secret)
        now = self.clock.now()
        async with self.store.transaction() as repo:
            expires_at = await repo.extend_lease(lease_id, secret_hash(secret), epoch, now)
            if expires_at is None:
                await self._explain_unusable(repo, lease_id, secret, epoch, now)
        assert expires_at is not None
        return expires_at

    async def resume(self, lease_id: str, secret: str) -> Grant:
        """Take over a held lease from a broken stream: same seats, a new epoch."""
        _require_lease_credentials(lease_id, secret)
        now = self.clock.now()
        async with self.store.transaction() as repo:
            lease = await repo.bump_epoch(lease_id, secret_hash(secret), now)
            if lease is None:
                await self._explain_unusable(repo, lease_id, secret, None, now)
        assert lease is not None
        return self._grant(lease, secret, resumed=True)

    async def release(self, lease_id: str, secret: str, epoch: int | None = None) -> bool:
        """Check a lease in; False when it was already released (not an error)."""
        _require_lease_credentials(lease_id, secret)
        now = self.clock.now()
        async with self.store.transaction() as repo:
            lease = await repo.get_lease(lease_id, secret_hash(secret))
            if lease is None:
                raise LeaseNotFound(f"no lease {lease_id!r} with that secret")
            if epoch is not None and lease.epoch != epoch and lease.released_at is None:
                raise StaleLeaseEpoch("the lease was resumed by another stream")
            return await repo.release_lease(lease_id, secret_hash(secret), now, "checked_in")

    async def release_expired(self) -> int:
        """Free the seats of every lease whose TTL ran out; safe on any replica, any time."""
        freed = 0
        while True:
            async with self.store.transaction() as repo:
                batch = await repo.release_expired(self.clock.now(), self.policy.sweep_batch)
            freed += batch
            if batch < self.policy.sweep_batch:
                return freed

    async def information(self, feature: str = "") -> list[PoolInformation]:
        """License Information per feature: Activated, Used, Available."""
        feature = checked_text("feature", feature, 64)
        async with self.store.transaction() as repo:
            if feature:
                pool = await repo.get_pool(feature)
                if pool is None:
                    raise FeatureNotLicensed(
                        f"no {feature} licenses are activated on this License Server",
                        metadata={"feature": feature},
                    )
                return [pool]
            return await repo.list_pools()

    def _ttl(self, requested: int | None) -> int:
        """The client may ask for a shorter TTL than the server's, never a longer one."""
        if requested is None:
            return self.policy.ttl_seconds
        if requested < 1:
            raise InvalidInput("ttl", f"must be at least 1 second, not {requested}")
        return min(requested, self.policy.ttl_seconds)

    def _grant(self, lease: Lease, secret: str, resumed: bool) -> Grant:
        interval = min(self.policy.heartbeat_interval_seconds, lease.ttl_seconds / 3)
        return Grant(lease, secret, interval, resumed)

    async def _refuse(self, repo: Repository, new: NewLease) -> None:
        pool = await repo.get_pool(new.feature)
        if pool is None or pool.activated == 0:
            raise FeatureNotLicensed(
                f"no {new.feature} licenses are activated on this License Server",
                metadata={"feature": new.feature},
            )
        if new.count > pool.activated:
            raise CountAboveActivated(
                f"{new.count} seats of {new.feature} asked for, but only {pool.activated} "
                "are activated here",
                metadata={"feature": new.feature, "activated": str(pool.activated)},
            )
        raise NoSeatAvailable(
            f"all {pool.activated} seats of {new.feature} are in use "
            f"({pool.available} free, {new.count} asked for)",
            metadata={"feature": new.feature, "available": str(pool.available)},
        )

    async def _explain_unusable(
        self, repo: Repository, lease_id: str, secret: str, epoch: int | None, now: dt.datetime
    ) -> None:
        lease = await repo.get_lease(lease_id, secret_hash(secret))
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id!r} with that secret")
        if lease.released_at is not None:
            raise LeaseReleased(f"lease {lease_id} was released at {lease.released_at.isoformat()}")
        if lease.expires_at <= now:
            raise LeaseExpired(
                f"lease {lease_id} expired at {lease.expires_at.isoformat()}; acquire anew"
            )
        if epoch is not None and lease.epoch != epoch:
            raise StaleLeaseEpoch("the lease was resumed by another stream")
        raise LeaseNotFound(f"lease {lease_id} cannot be used")  # pragma: no cover


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
