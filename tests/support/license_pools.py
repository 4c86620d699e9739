"""Seat pools of a License Server seeded straight through its store, for tests of seat
counting that need no signatures."""

from __future__ import annotations

import uuid

from services.license_server.domain.leasing import Leasing
from services.license_server.domain.model import NewLease, StoredCertificate

FEATURE = "client.station"


async def seed(leasing: Leasing, seats: int, feature: str = FEATURE) -> None:
    """Install a certificate for ``seats`` seats of ``feature`` straight into storage."""
    certificate_id = str(uuid.uuid4())
    async with leasing.store.transaction() as repo:
        await repo.insert_certificate(
            StoredCertificate(
                certificate_id=certificate_id,
                request_id=f"request-{certificate_id}",
                feature=feature,
                count=seats,
                envelope=b"not-verified-in-these-tests",
                installed_at=leasing.clock.now(),
            )
        )
        await repo.lock_pool(feature)
        assert await repo.set_pool_activated(feature, await repo.serving_seats(feature))


def new_lease(count: int = 1, client: str = "ws-01", feature: str = FEATURE) -> NewLease:
    return NewLease(feature, count, client, "operator", "WorkStation")
