"""What a new lease is, and why a checkout gets no seat: shared by the one-call path and
the group commit."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid

from services.license_server.domain.errors import (
    CountAboveActivated,
    FeatureNotLicensed,
    LeaseExpired,
    LeaseNotFound,
    LeaseReleased,
    NoSeatAvailable,
    StaleLeaseEpoch,
)
from services.license_server.domain.model import Lease, NewLease, PoolInformation
from services.license_server.store.repository import Repository
from tessera.errors import DomainError


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_lease(new: NewLease, ttl: int, now: dt.datetime) -> tuple[Lease, str]:
    """A lease on ``new``'s seats granted now, and its secret (known in clear only here)."""
    expires_at = now + dt.timedelta(seconds=ttl)
    lease = Lease(
        lease_id=str(uuid.uuid4()),
        feature=new.feature,
        count=new.count,
        client_host=new.client_host,
        user=new.user,
        display_name=new.display_name,
        ttl_seconds=ttl,
        epoch=1,
        granted_at=now,
        last_heartbeat_at=now,
        expires_at=expires_at,
        released_at=None,
    )
    return lease, secrets.token_urlsafe(24)


async def refusal(repo: Repository, new: NewLease, now: dt.datetime) -> DomainError:
    """Why ``new`` gets no seat now, read within the transaction that refused it."""
    pool = await repo.get_pool(new.feature)
    if pool is None or pool.activated == 0:
        return not_licensed(new.feature)
    if new.count > pool.activated:
        return above_activated(new, pool)
    queued = (await repo.queued_per_feature(now)).get(new.feature, 0)
    return NoSeatAvailable(
        f"all {pool.activated} seats of {new.feature} are in use or promised to the queue "
        f"({pool.available} free, {queued} waiting, {new.count} asked for)",
        metadata={"feature": new.feature, "available": str(pool.available)},
    )


def not_licensed(feature: str) -> FeatureNotLicensed:
    return FeatureNotLicensed(
        f"no {feature} licenses are activated on this License Server",
        metadata={"feature": feature},
    )


def above_activated(new: NewLease, pool: PoolInformation) -> CountAboveActivated:
    return CountAboveActivated(
        f"{new.count} seats of {new.feature} asked for, but only {pool.activated} are "
        "activated here",
        metadata={"feature": new.feature, "activated": str(pool.activated)},
    )


async def unusable(
    repo: Repository, lease_id: str, hashed: bytes, epoch: int | None, now: dt.datetime
) -> DomainError:
    """Why a lease cannot be heartbeaten, resumed or released by this caller now."""
    lease = await repo.get_lease(lease_id, hashed)
    if lease is None:
        return LeaseNotFound(f"no lease {lease_id!r} with that secret")
    if lease.released_at is not None:
        if lease.release_reason == "expired":
            return LeaseExpired(
                f"lease {lease_id} expired (no heartbeat within its TTL) and was released "
                f"at {lease.released_at.isoformat()}; acquire anew"
            )
        return LeaseReleased(f"lease {lease_id} was released at {lease.released_at.isoformat()}")
    if lease.expires_at <= now:
        return LeaseExpired(
            f"lease {lease_id} expired at {lease.expires_at.isoformat()}; acquire anew"
        )
    if epoch is not None and lease.epoch != epoch:
        return StaleLeaseEpoch("the lease was resumed by another stream")
    return LeaseNotFound(f"lease {lease_id} cannot be used")  # pragma: no cover
