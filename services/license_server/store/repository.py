"""SQL for the License Server. The domain owns transactions; this module owns queries.

Seat counts change only through conditional UPDATEs on the pool row, never by reading
a count into Python and writing it back.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

from sqlalchemy import RowMapping, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.license_server.domain.model import (
    Lease,
    NewLease,
    PendingRequest,
    PoolInformation,
    StoredCertificate,
)
from services.license_server.store.tables import certificates, leases, pending_requests, pools
from tessera.storage import TransactionalStore


class DuplicateKey(Exception):
    """Another transaction inserted the same key first."""


class Repository:
    """Queries within one transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # Trusted storage

    async def get_pending_request(self, request_id: str) -> PendingRequest | None:
        row = (
            (
                await self.session.execute(
                    select(pending_requests).where(pending_requests.c.request_id == request_id)
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        return PendingRequest(
            request_id=row["request_id"],
            activation_id=row["activation_id"],
            count=row["count"],
            request_envelope=row["request_envelope"],
            installed_at=row["installed_at"],
        )

    async def insert_pending_request(
        self, request: PendingRequest, created_at: dt.datetime
    ) -> None:
        try:
            await self.session.execute(
                insert(pending_requests).values(
                    request_id=request.request_id,
                    activation_id=request.activation_id,
                    count=request.count,
                    request_envelope=request.request_envelope,
                    created_at=created_at,
                    installed_at=None,
                )
            )
        except IntegrityError as error:
            raise DuplicateKey(request.request_id) from error

    async def mark_request_installed(self, request_id: str, at: dt.datetime) -> None:
        await self.session.execute(
            update(pending_requests)
            .where(pending_requests.c.request_id == request_id)
            .values(installed_at=at)
        )

    async def get_certificate_for_request(self, request_id: str) -> StoredCertificate | None:
        row = (
            (
                await self.session.execute(
                    select(certificates).where(certificates.c.request_id == request_id)
                )
            )
            .mappings()
            .first()
        )
        return None if row is None else _certificate(row)

    async def list_certificates(self) -> list[StoredCertificate]:
        rows = (
            await self.session.execute(select(certificates).order_by(certificates.c.installed_at))
        ).mappings()
        return [_certificate(row) for row in rows]

    async def insert_certificate(
        self,
        certificate: StoredCertificate,
        expires_at: dt.datetime | None,
    ) -> None:
        """Store a certificate and add its seats to the feature's pool."""
        try:
            await self.session.execute(
                insert(certificates).values(
                    certificate_id=certificate.certificate_id,
                    request_id=certificate.request_id,
                    feature=certificate.feature,
                    count=certificate.count,
                    expires_at=expires_at,
                    envelope=certificate.envelope,
                    installed_at=certificate.installed_at,
                )
            )
        except IntegrityError as error:
            raise DuplicateKey(certificate.certificate_id) from error
        dialect = self.session.get_bind().dialect.name
        upsert = postgresql.insert(pools) if dialect == "postgresql" else sqlite.insert(pools)
        await self.session.execute(
            upsert.values(feature=certificate.feature, activated=0, used=0).on_conflict_do_nothing()
        )
        await self.session.execute(
            update(pools)
            .where(pools.c.feature == certificate.feature)
            .values(activated=pools.c.activated + certificate.count)
        )

    # Pools

    async def take_seats(self, feature: str, count: int) -> bool:
        """Take ``count`` seats if that many are free, in one conditional statement."""
        result = await self.session.execute(
            update(pools)
            .where(pools.c.feature == feature, count <= pools.c.activated - pools.c.used)
            .values(used=pools.c.used + count)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def give_back_seats(self, seats: Counter[str]) -> None:
        for feature, count in seats.items():
            await self.session.execute(
                update(pools).where(pools.c.feature == feature).values(used=pools.c.used - count)
            )

    async def get_pool(self, feature: str) -> PoolInformation | None:
        row = (
            (await self.session.execute(select(pools).where(pools.c.feature == feature)))
            .mappings()
            .first()
        )
        return (
            None if row is None else PoolInformation(row["feature"], row["activated"], row["used"])
        )

    async def list_pools(self) -> list[PoolInformation]:
        rows = (await self.session.execute(select(pools).order_by(pools.c.feature))).mappings()
        return [PoolInformation(row["feature"], row["activated"], row["used"]) for row in rows]

    # Leases

    async def insert_lease(
        self,
        lease_id: str,
        secret_hash: bytes,
        new: NewLease,
        ttl_seconds: int,
        now: dt.datetime,
        expires_at: dt.datetime,
    ) -> None:
        await self.session.execute(
            insert(leases).values(
                lease_id=lease_id,
                secret_hash=secret_hash,
                feature=new.feature,
                count=new.count,
                client_host=new.client_host,
                user=new.user,
                display_name=new.display_name,
                ttl_seconds=ttl_seconds,
                epoch=1,
                granted_at=now,
                last_heartbeat_at=now,
                expires_at=expires_at,
                released_at=None,
            )
        )

    async def get_lease(self, lease_id: str, secret_hash: bytes) -> Lease | None:
        row = (
            (
                await self.session.execute(
                    select(leases).where(
                        leases.c.lease_id == lease_id, leases.c.secret_hash == secret_hash
                    )
                )
            )
            .mappings()
            .first()
        )
        return None if row is None else _lease(row)

    async def extend_lease(
        self, lease_id: str, secret_hash: bytes, epoch: int | None, now: dt.datetime
    ) -> dt.datetime | None:
        """Push a held, unexpired lease's expiry to now + its TTL; None if it is not one."""
        conditions = [
            leases.c.lease_id == lease_id,
            leases.c.secret_hash == secret_hash,
            leases.c.released_at.is_(None),
            leases.c.expires_at > now,
        ]
        if epoch is not None:
            conditions.append(leases.c.epoch == epoch)
        row = (
            await self.session.execute(
                update(leases)
                .where(*conditions)
                .values(last_heartbeat_at=now)
                .returning(leases.c.ttl_seconds)
            )
        ).first()
        if row is None:
            return None
        # The first UPDATE holds the row; the TTL is per lease, so the expiry is set second.
        expires_at = now + dt.timedelta(seconds=row[0])
        await self.session.execute(
            update(leases).where(leases.c.lease_id == lease_id).values(expires_at=expires_at)
        )
        return expires_at

    async def bump_epoch(self, lease_id: str, secret_hash: bytes, now: dt.datetime) -> Lease | None:
        """Fence out older streams of a held, unexpired lease and extend it (resume)."""
        row = (
            await self.session.execute(
                update(leases)
                .where(
                    leases.c.lease_id == lease_id,
                    leases.c.secret_hash == secret_hash,
                    leases.c.released_at.is_(None),
                    leases.c.expires_at > now,
                )
                .values(epoch=leases.c.epoch + 1, last_heartbeat_at=now)
                .returning(leases.c.ttl_seconds)
            )
        ).first()
        if row is None:
            return None
        await self.session.execute(
            update(leases)
            .where(leases.c.lease_id == lease_id)
            .values(expires_at=now + dt.timedelta(seconds=row[0]))
        )
        return await self.get_lease(lease_id, secret_hash)

    async def release_lease(
        self, lease_id: str, secret_hash: bytes, now: dt.datetime, reason: str
    ) -> bool:
        """Release a held lease and give its seats back; False if it was not held."""
        row = (
            await self.session.execute(
                update(leases)
                .where(
                    leases.c.lease_id == lease_id,
                    leases.c.secret_hash == secret_hash,
                    leases.c.released_at.is_(None),
                )
                .values(released_at=now, release_reason=reason)
                .returning(leases.c.feature, leases.c.count)
            )
        ).first()
        if row is None:
            return False
        await self.give_back_seats(Counter({row[0]: row[1]}))
        return True

    async def release_expired(self, now: dt.datetime, limit: int) -> int:
        """Release up to ``limit`` leases whose TTL ran out; returns how many."""
        expired = (
            select(leases.c.lease_id)
            .where(leases.c.released_at.is_(None), leases.c.expires_at <= now)
            .limit(limit)
        )
        if self.session.get_bind().dialect.name == "postgresql":
            expired = expired.with_for_update(skip_locked=True)
        rows = (
            await self.session.execute(
                update(leases)
                .where(
                    leases.c.lease_id.in_(expired.scalar_subquery()), leases.c.released_at.is_(None)
                )
                .values(released_at=now, release_reason="expired")
                .returning(leases.c.feature, leases.c.count)
            )
        ).all()
        seats: Counter[str] = Counter()
        for feature, count in rows:
            seats[feature] += count
        await self.give_back_seats(seats)
        return len(rows)


def _certificate(row: RowMapping) -> StoredCertificate:
    return StoredCertificate(
        certificate_id=row["certificate_id"],
        request_id=row["request_id"],
        feature=row["feature"],
        count=row["count"],
        envelope=row["envelope"],
        installed_at=row["installed_at"],
    )


def _lease(row: RowMapping) -> Lease:
    return Lease(
        lease_id=row["lease_id"],
        feature=row["feature"],
        count=row["count"],
        client_host=row["client_host"],
        user=row["user"],
        display_name=row["display_name"],
        ttl_seconds=row["ttl_seconds"],
        epoch=row["epoch"],
        granted_at=row["granted_at"],
        expires_at=row["expires_at"],
        released_at=row["released_at"],
    )


class LicenseStore(TransactionalStore[Repository]):
    """The License Server's database."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, Repository)
