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
    TrustedStorageBroken,
    WithdrawnByCheckIn,
)
from services.license_server.domain.model import (
    Lease,
    NewLease,
    PoolInformation,
    StoredCertificate,
)
from services.license_server.domain.ports import LeaseQueries, Queries
from services.license_server.domain.vendor_standing import (
    CERTIFICATE_SUPERSEDED,
    CHECK_IN_CAUSES,
    CHECK_IN_OVERDUE,
    LICENSE_NOT_HELD,
)
from tessera.errors import DomainError

# Told to a stream whose lease a newer stream took over.
RESUMED_ELSEWHERE = (
    "the lease was resumed by another stream, which holds its seats now; this stream may "
    "no longer use it"
)


def lease_not_found(lease_id: str) -> LeaseNotFound:
    """No such lease here (or a wrong secret): another server may hold it, else it is gone."""
    return LeaseNotFound(
        f"no lease {lease_id!r} with that secret on this License Server; resume it on the "
        "server that granted it, or acquire anew"
    )


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


async def refusal(repo: Queries, new: NewLease, now: dt.datetime) -> DomainError:
    """Why ``new`` gets no seat now, read within the transaction that refused it."""
    pool = await repo.get_pool(new.feature)
    if pool is None or new.count > pool.activated:
        return await shortfall(repo, new, pool, now)
    queued = (await repo.queued_per_feature(now)).get(new.feature, 0)
    return NoSeatAvailable(
        f"all {pool.activated} seats of {new.feature} are in use or promised to the queue "
        f"({pool.available} free, {queued} waiting, {new.count} asked for); wait for one "
        "(queue with a wait timeout) or ask the operator to activate more",
        metadata={"feature": new.feature, "available": str(pool.available)},
    )


async def shortfall(
    repo: Queries, new: NewLease, pool: PoolInformation | None, now: dt.datetime
) -> DomainError:
    """Why fewer seats of a feature serve here than ``new`` asks for, however long it
    waits: the real cause, since each needs another remedy. Seats that trusted storage
    stopped serving come back with a repair; an expired or returned license, or one that
    was never activated, only with an activation."""
    activated = pool.activated if pool is not None else 0
    held = await repo.held_certificates(new.feature)
    # Seats a check-in withdrew are not broken: a repair does not bring them back.
    withdrawn = [c for c in held if c.broken_cause in CHECK_IN_CAUSES and not _expired(c, now)]
    broken = [
        c
        for c in held
        if c.broken_cause is not None and c not in withdrawn and not _expired(c, now)
    ]
    broken_seats = sum(c.count - c.returning for c in broken)
    withdrawn_seats = sum(c.count - c.returning for c in withdrawn)
    repairable = bool(broken) and new.count <= activated + broken_seats
    if withdrawn and not repairable and new.count <= activated + broken_seats + withdrawn_seats:
        return withdrawn_by_check_in(new.feature, withdrawn[0].broken_cause or "")
    if repairable:
        cause = broken[0].broken_cause or ""
        return TrustedStorageBroken(
            f"{broken_seats} seat(s) of {new.feature} do not serve because trusted storage "
            f"is broken ({cause}: {broken[0].broken_detail}); the operator runs "
            "`tessera trust` to see why and `tessera repair` to re-issue them",
            metadata={
                "feature": new.feature,
                "cause": cause,
                "broken_seats": str(broken_seats),
            },
        )
    if pool is not None and activated:
        return above_activated(new, pool)
    expired = [c for c in held if _expired(c, now)]
    if held and len(expired) == len(held):
        ended = max(c.expires_at or c.retired_at or now for c in expired)
        return FeatureNotLicensed(
            f"the {new.feature} license on this License Server expired at "
            f"{ended.isoformat(timespec='seconds')}; activate a new one (`tessera activate`)",
            metadata={"feature": new.feature, "expired_at": ended.isoformat()},
        )
    if any(c.returning for c in held):
        return FeatureNotLicensed(
            f"the seats of {new.feature} on this License Server are being returned to the "
            "vendor (they serve again only if the vendor refuses the return); activate "
            "others (`tessera activate`)",
            metadata={"feature": new.feature},
        )
    return not_licensed(new.feature)


def withdrawn_by_check_in(feature: str, cause: str) -> WithdrawnByCheckIn:
    """The refusal for seats a check-in with the vendor withdrew (``cause``)."""
    what = {
        CERTIFICATE_SUPERSEDED: "the vendor re-bound them to another License Server (a "
        "repair there, e.g. of a copy of this server's data directory); they do not serve "
        "here again, and a repair does not bring them back",
        LICENSE_NOT_HELD: "the vendor no longer records them as this License Server's "
        "(returned or force-returned)",
        CHECK_IN_OVERDUE: "no check-in with the vendor was verified within the license's "
        "check-in policy; run `tessera check-in`",
    }[cause]
    return WithdrawnByCheckIn(
        cause, f"the {feature} licenses on this License Server do not serve: {what}", feature
    )


def _expired(certificate: StoredCertificate, now: dt.datetime) -> bool:
    return certificate.retired_at is not None or (
        certificate.expires_at is not None and certificate.expires_at <= now
    )


def not_licensed(feature: str) -> FeatureNotLicensed:
    return FeatureNotLicensed(
        f"no {feature} licenses are activated on this License Server; activate them "
        "(`tessera activate`)",
        metadata={"feature": feature},
    )


def above_activated(new: NewLease, pool: PoolInformation) -> CountAboveActivated:
    return CountAboveActivated(
        f"{new.count} seats of {new.feature} asked for, but only {pool.activated} are "
        "activated here; ask for fewer, or activate more (`tessera activate`)",
        metadata={"feature": new.feature, "activated": str(pool.activated)},
    )


async def unusable(
    repo: LeaseQueries, lease_id: str, hashed: bytes, epoch: int | None, now: dt.datetime
) -> DomainError:
    """Why a lease cannot be heartbeaten, resumed or released by this caller now."""
    lease = await repo.get_lease(lease_id, hashed)
    if lease is None:
        return lease_not_found(lease_id)
    if lease.released_at is not None:
        if lease.release_reason == "expired":
            return LeaseExpired(
                f"lease {lease_id} expired (no heartbeat within its TTL) and was released "
                f"at {lease.released_at.isoformat()}; acquire anew"
            )
        return LeaseReleased(
            f"lease {lease_id} was released at {lease.released_at.isoformat()}; acquire anew"
        )
    if lease.expires_at <= now:
        return LeaseExpired(
            f"lease {lease_id} expired at {lease.expires_at.isoformat()}; acquire anew"
        )
    if epoch is not None and lease.epoch != epoch:
        return StaleLeaseEpoch(RESUMED_ELSEWHERE)
    return LeaseNotFound(f"lease {lease_id} cannot be used")  # pragma: no cover
