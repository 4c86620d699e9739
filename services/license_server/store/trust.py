"""Trusted storage's SQL: pending requests, certificates, check-ins with the vendor, the
ledger and its seal. Implements ``domain.ports.TrustQueries``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import RowMapping, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.license_server.domain.model import (
    CheckInRow,
    LedgerEntry,
    PendingRequest,
    RequestKind,
    Seal,
    StoredCertificate,
)
from services.license_server.domain.ports import DuplicateKey
from services.license_server.store.tables import (
    certificates,
    check_ins,
    pending_requests,
    pools,
    trust_ledger,
    trust_seal,
)
from tessera.storage import first_row


class SqlTrustQueries:
    """Trusted storage's queries within one transaction (``session``'s)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # Requests to the vendor and the certificates they brought

    async def get_pending_request(self, request_id: str) -> PendingRequest | None:
        row = await first_row(
            self.session,
            select(pending_requests).where(pending_requests.c.request_id == request_id),
        )
        if row is None:
            return None
        return PendingRequest(
            request_id=row["request_id"],
            activation_id=row["activation_id"],
            count=row["count"],
            request_envelope=row["request_envelope"],
            installed_at=row["installed_at"],
            kind=RequestKind(row["kind"]),
            certificate_id=row["certificate_id"],
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
                    kind=request.kind.value,
                    certificate_id=request.certificate_id,
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
        row = await first_row(
            self.session, select(certificates).where(certificates.c.request_id == request_id)
        )
        return None if row is None else _certificate(row)

    async def list_certificates(self) -> list[StoredCertificate]:
        rows = (
            await self.session.execute(select(certificates).order_by(certificates.c.installed_at))
        ).mappings()
        return [_certificate(row) for row in rows]

    async def get_certificate(self, certificate_id: str) -> StoredCertificate | None:
        row = await first_row(
            self.session,
            select(certificates).where(certificates.c.certificate_id == certificate_id),
        )
        return None if row is None else _certificate(row)

    async def insert_certificate(self, certificate: StoredCertificate) -> None:
        """Store a certificate; its seats join the pool when the pool is recounted."""
        try:
            await self.session.execute(
                insert(certificates).values(
                    certificate_id=certificate.certificate_id,
                    request_id=certificate.request_id,
                    feature=certificate.feature,
                    count=certificate.count,
                    expires_at=certificate.expires_at,
                    envelope=certificate.envelope,
                    installed_at=certificate.installed_at,
                    revision=certificate.revision,
                )
            )
        except IntegrityError as error:
            raise DuplicateKey(certificate.certificate_id) from error

    async def update_certificate(self, certificate: StoredCertificate) -> None:
        """Write a certificate's changing fields (re-issue, return, breakage)."""
        await self.session.execute(
            update(certificates)
            .where(certificates.c.certificate_id == certificate.certificate_id)
            .values(
                count=certificate.count,
                envelope=certificate.envelope,
                expires_at=certificate.expires_at,
                revision=certificate.revision,
                withheld=certificate.returning,
                return_request_id=certificate.return_request_id,
                returned_at=certificate.returned_at,
                broken_cause=certificate.broken_cause,
                broken_detail=certificate.broken_detail,
            )
        )

    async def serving_seats(self, feature: str) -> int:
        """Seats of a feature in certificates that serve: not expired, returned, broken
        or withheld by a return in progress."""
        total = await self.session.scalar(
            select(
                func.coalesce(func.sum(certificates.c.count - certificates.c.withheld), 0)
            ).where(
                certificates.c.feature == feature,
                certificates.c.retired_at.is_(None),
                certificates.c.returned_at.is_(None),
                certificates.c.broken_cause.is_(None),
            )
        )
        return int(total or 0)

    async def held_certificates(self, feature: str) -> list[StoredCertificate]:
        """Certificates of a feature that were not returned, serving or not: why a
        feature has fewer seats than asked for is read from these."""
        rows = (
            await self.session.execute(
                select(certificates)
                .where(certificates.c.feature == feature, certificates.c.returned_at.is_(None))
                .order_by(certificates.c.installed_at)
            )
        ).mappings()
        return [_certificate(row) for row in rows]

    async def pool_features(self) -> list[str]:
        """Every feature with a pool or a certificate."""
        rows = await self.session.execute(
            select(pools.c.feature).union(select(certificates.c.feature))
        )
        return sorted(rows.scalars())

    async def expired_certificates(self, now: dt.datetime) -> list[StoredCertificate]:
        rows = (
            await self.session.execute(
                select(certificates).where(
                    certificates.c.retired_at.is_(None),
                    certificates.c.expires_at.is_not(None),
                    certificates.c.expires_at <= now,
                )
            )
        ).mappings()
        return [_certificate(row) for row in rows]

    async def retire_certificate(self, certificate: StoredCertificate, now: dt.datetime) -> bool:
        """Mark an expired certificate retired; its seats leave the pool on recount."""
        result = await self.session.execute(
            update(certificates)
            .where(
                certificates.c.certificate_id == certificate.certificate_id,
                certificates.c.retired_at.is_(None),
            )
            .values(retired_at=now)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    # Check-ins with the vendor

    async def withdrawn_per_feature(self, causes: Iterable[str]) -> dict[str, tuple[int, str]]:
        """Per feature, the seats of certificates one of ``causes`` keeps from serving, and
        one such cause."""
        rows = await self.session.execute(
            select(
                certificates.c.feature,
                func.sum(certificates.c.count - certificates.c.withheld),
                func.min(certificates.c.broken_cause),
            )
            .where(
                certificates.c.returned_at.is_(None),
                certificates.c.retired_at.is_(None),
                certificates.c.broken_cause.in_(list(causes)),
            )
            .group_by(certificates.c.feature)
        )
        return {feature: (int(seats or 0), str(cause)) for feature, seats, cause in rows}

    async def insert_check_in(self, row: CheckInRow) -> None:
        await self.session.execute(
            insert(check_ins).values(
                request_id=row.request_id,
                host_id=row.host_id,
                request_envelope=row.request_envelope,
                prepared_at=row.prepared_at,
            )
        )

    async def get_check_in(self, request_id: str, *, lock: bool = False) -> CheckInRow | None:
        query = select(check_ins).where(check_ins.c.request_id == request_id)
        row = await first_row(self.session, query.with_for_update() if lock else query)
        return None if row is None else _check_in(row)

    async def install_check_in(
        self,
        request_id: str,
        result_envelope: bytes,
        checked_at: dt.datetime,
        at: dt.datetime,
        withdraws: bool,
    ) -> None:
        await self.session.execute(
            update(check_ins)
            .where(check_ins.c.request_id == request_id)
            .values(
                result_envelope=result_envelope,
                checked_at=checked_at,
                installed_at=at,
                withdraws=withdraws,
            )
        )

    async def installed_check_ins(self, host_id: str) -> list[CheckInRow]:
        """Every installed check-in of ``host_id``, oldest decided first."""
        rows = await self.session.execute(
            select(check_ins)
            .where(check_ins.c.host_id == host_id, check_ins.c.checked_at.is_not(None))
            .order_by(check_ins.c.checked_at, check_ins.c.request_id)
        )
        return [_check_in(row) for row in rows.mappings()]

    async def newest_check_in(self, host_id: str) -> CheckInRow | None:
        """The installed check-in of ``host_id`` the vendor decided last."""
        row = await first_row(
            self.session,
            select(check_ins)
            .where(check_ins.c.host_id == host_id, check_ins.c.checked_at.is_not(None))
            .order_by(check_ins.c.checked_at.desc(), check_ins.c.request_id)
            .limit(1),
        )
        return None if row is None else _check_in(row)

    async def forget_check_ins(
        self, host_id: str, decided_before: dt.datetime, prepared_before: dt.datetime
    ) -> None:
        """Drop check-ins of ``host_id`` the vendor decided before ``decided_before`` that
        took nothing away (a newer one stands; those that withdrew a certificate stay),
        and those prepared before ``prepared_before`` and never answered."""
        await self.session.execute(
            delete(check_ins).where(
                check_ins.c.host_id == host_id,
                or_(
                    and_(
                        check_ins.c.checked_at < decided_before,
                        check_ins.c.withdraws.is_(False),
                    ),
                    and_(
                        check_ins.c.checked_at.is_(None),
                        check_ins.c.prepared_at < prepared_before,
                    ),
                ),
            )
        )

    # The ledger and its seal

    async def get_seal(self, *, lock: bool = False) -> Seal | None:
        """The seal; ``lock`` holds it until commit, so ledger appends take turns."""
        query = select(trust_seal).where(trust_seal.c.id == 1)
        if lock:
            query = query.with_for_update()
        row = await first_row(self.session, query)
        if row is None:
            return None
        return Seal(
            host_id=row["host_id"],
            host_public_key=row["host_public_key"],
            machine_binding=row["machine_binding"],
            head_sequence=row["head_sequence"],
            head_hash=row["head_hash"],
            clock_high_water=row["clock_high_water"],
            clock_set_back_at=row["clock_set_back_at"],
            signature=row["signature"],
        )

    async def put_seal(self, seal: Seal) -> None:
        values = {
            "host_id": seal.host_id,
            "host_public_key": seal.host_public_key,
            "machine_binding": seal.machine_binding,
            "head_sequence": seal.head_sequence,
            "head_hash": seal.head_hash,
            "clock_high_water": seal.clock_high_water,
            "clock_set_back_at": seal.clock_set_back_at,
            "signature": seal.signature,
        }
        result = await self.session.execute(
            update(trust_seal).where(trust_seal.c.id == 1).values(**values)
        )
        if result.rowcount == 0:  # type: ignore[attr-defined]
            try:
                await self.session.execute(insert(trust_seal).values(id=1, **values))
            except IntegrityError as error:
                raise DuplicateKey("trust_seal") from error

    async def append_ledger(self, entries: list[LedgerEntry]) -> None:
        if not entries:
            return
        try:
            await self.session.execute(
                insert(trust_ledger),
                [
                    {
                        "sequence": entry.sequence,
                        "at": entry.at,
                        "action": entry.action,
                        "certificate_id": entry.certificate_id,
                        "state": entry.state,
                        "previous_hash": entry.previous_hash,
                        "hash": entry.hash,
                    }
                    for entry in entries
                ],
            )
        except IntegrityError as error:
            raise DuplicateKey("trust_ledger") from error

    async def ledger_since_last_seal(self) -> list[LedgerEntry]:
        """The current segment: the newest ``sealed`` entry and everything after it."""
        start = await self.session.scalar(
            select(func.max(trust_ledger.c.sequence)).where(trust_ledger.c.action == "sealed")
        )
        query = select(trust_ledger).order_by(trust_ledger.c.sequence)
        if start is not None:
            query = query.where(trust_ledger.c.sequence >= start)
        rows = (await self.session.execute(query)).mappings()
        return [
            LedgerEntry(
                sequence=row["sequence"],
                at=row["at"],
                action=row["action"],
                certificate_id=row["certificate_id"],
                state=row["state"],
                previous_hash=row["previous_hash"],
                hash=row["hash"],
            )
            for row in rows
        ]

    async def ledger_hash_at(self, sequence: int) -> bytes | None:
        value = await self.session.scalar(
            select(trust_ledger.c.hash).where(trust_ledger.c.sequence == sequence)
        )
        return None if value is None else bytes(value)


def _certificate(row: RowMapping) -> StoredCertificate:
    return StoredCertificate(
        certificate_id=row["certificate_id"],
        request_id=row["request_id"],
        feature=row["feature"],
        count=row["count"],
        envelope=row["envelope"],
        installed_at=row["installed_at"],
        expires_at=row["expires_at"],
        revision=row["revision"],
        returning=row["withheld"],
        return_request_id=row["return_request_id"],
        returned_at=row["returned_at"],
        retired_at=row["retired_at"],
        broken_cause=row["broken_cause"],
        broken_detail=row["broken_detail"],
    )


def _check_in(row: RowMapping) -> CheckInRow:
    return CheckInRow(
        request_id=row["request_id"],
        host_id=row["host_id"],
        request_envelope=row["request_envelope"],
        prepared_at=row["prepared_at"],
        result_envelope=row["result_envelope"],
        checked_at=row["checked_at"],
        installed_at=row["installed_at"],
        withdraws=bool(row["withdraws"]),
    )
