"""Fitting a seat pool to the certificates behind it.

A pool's activated seats are the seats of its serving certificates. When certificates
stop serving (expired, returned, broken), the pool shrinks; if fewer seats remain than
leases hold, the newest leases are revoked first, each holder told why. The pool row is
set by one conditional UPDATE that refuses to go below the seats in use, so a lease
granted concurrently on another replica is never left without a seat.
"""

from __future__ import annotations

import datetime as dt

from services.license_server.domain.errors import SeatsInUse
from services.license_server.domain.model import LeaseEnded, LeaseEvent, SeatsFreed
from services.license_server.domain.ports import Queries

# Why the pool shrank, as (lease release reason stored, reason told on the stream).
LICENSE_EXPIRED = ("license_expired", "LICENSE_EXPIRED")
LICENSE_RETURNED = ("license_returned", "LICENSE_RETURNED")
TRUSTED_STORAGE_BROKEN = ("trust_broken", "TRUSTED_STORAGE_BROKEN")
LICENSE_NOT_HELD = ("license_not_held", "LICENSE_NOT_HELD")
CERTIFICATE_SUPERSEDED = ("superseded", "CERTIFICATE_SUPERSEDED")
CHECK_IN_OVERDUE = ("check_in_overdue", "CHECK_IN_OVERDUE")


async def fit_pool(
    repo: Queries,
    feature: str,
    now: dt.datetime,
    why: tuple[str, str],
    message: str,
    *,
    revoke: bool = True,
) -> list[LeaseEvent]:
    """Set ``feature``'s pool to its serving seats and announce what changed.

    With ``revoke`` false, raise SeatsInUse instead of revoking leases. The caller
    publishes the returned events after its transaction commits.
    """
    before = await repo.lock_pool(feature)
    target = await repo.serving_seats(feature)
    events: list[LeaseEvent] = []
    while not await repo.set_pool_activated(feature, target):
        pool = await repo.get_pool(feature)
        assert pool is not None
        excess = pool.used - target
        if not revoke:
            raise SeatsInUse(
                f"{pool.used} seat(s) of {feature} are in use and only {target} would remain; "
                "wait for the leases to end or force the return (their holders are told)",
                metadata={"feature": feature, "used": str(pool.used)},
            )
        freed = 0
        for lease in await repo.newest_held_leases(feature, excess):
            if freed >= excess:
                break
            if await repo.revoke_lease(lease.lease_id, now, why[0]):
                freed += lease.count
                events.append(LeaseEnded(lease.lease_id, why[1], message))
        if freed == 0:
            raise AssertionError(f"cannot fit the {feature} pool: no lease left to revoke")
    if target > before.activated or events:
        events.append(SeatsFreed(feature))
    for event in events:
        await repo.announce(event)
    return events
