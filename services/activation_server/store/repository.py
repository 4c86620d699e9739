"""SQL for the Activation Server. The domain owns transactions; this module owns queries.

``Repository`` implements ``domain.ports.VendorRecords`` and ``ActivationStore``
``domain.ports.VendorStore``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import RowMapping, Select, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.activation_server.domain.model import (
    ActivationRecord,
    ActivationState,
    CheckInPolicy,
    CheckInRecord,
    CheckInStanding,
    Entitlement,
    EntitlementLine,
    HostGeneration,
    LicenseKind,
    NewLine,
    Registration,
    RepairRecord,
    ReturnOutcome,
    ReturnRecord,
)
from services.activation_server.domain.ports import DuplicateRequest
from services.activation_server.store.audit import AuditQueries
from services.activation_server.store.tables import (
    activations,
    check_ins,
    entitlement_lines,
    entitlements,
    features,
    host_generations,
    repair_hosts,
    repairs,
    return_receipts,
)
from tessera.storage import TransactionalStore, first_row


class Repository:
    """Queries within one transaction (``domain.ports.VendorRecords``)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.audit = AuditQueries(session)

    # -- catalog and orders -------------------------------------------------------------

    async def known_features(self, names: Iterable[str]) -> set[str]:
        rows = await self.session.execute(
            select(features.c.name).where(features.c.name.in_(list(names)))
        )
        return set(rows.scalars())

    async def insert_entitlement(
        self,
        entitlement_id: str,
        customer_organization: str,
        contact: str,
        created_at: dt.datetime,
        lines: Iterable[tuple[str, NewLine]],
    ) -> None:
        await self.session.execute(
            insert(entitlements).values(
                entitlement_id=entitlement_id,
                customer_organization=customer_organization,
                contact=contact,
                created_at=created_at,
            )
        )
        await self.session.execute(
            insert(entitlement_lines),
            [
                {
                    "activation_id": activation_id,
                    "entitlement_id": entitlement_id,
                    "position": position,
                    "feature": line.feature,
                    "kind": line.kind.value,
                    "count": line.count,
                    "activated": 0,
                    "expires_at": line.expires_at,
                    "duration_seconds": None
                    if line.duration is None
                    else int(line.duration.total_seconds()),
                    "maintenance_ends_at": line.maintenance_ends_at,
                    "partial_return_allowed": line.partial_return_allowed,
                    "check_in_interval_seconds": None
                    if line.check_in is None
                    else int(line.check_in.interval.total_seconds()),
                    "check_in_grace_seconds": None
                    if line.check_in is None
                    else int(line.check_in.grace.total_seconds()),
                }
                for position, (activation_id, line) in enumerate(lines)
            ],
        )

    async def get_entitlement(self, entitlement_id: str) -> Entitlement | None:
        row = await first_row(
            self.session,
            select(entitlements).where(entitlements.c.entitlement_id == entitlement_id),
        )
        if row is None:
            return None
        lines = (
            await self.session.execute(
                select(entitlement_lines)
                .where(entitlement_lines.c.entitlement_id == entitlement_id)
                .order_by(entitlement_lines.c.position)
            )
        ).mappings()
        return Entitlement(
            entitlement_id=row["entitlement_id"],
            customer_organization=row["customer_organization"],
            contact=row["contact"],
            created_at=row["created_at"],
            lines=tuple(_line(line) for line in lines),
        )

    async def lock_entitlement(self, entitlement_id: str) -> None:
        """Hold the order's row until the transaction ends (return cycling is per order)."""
        await self.session.execute(
            select(entitlements.c.entitlement_id)
            .where(entitlements.c.entitlement_id == entitlement_id)
            .with_for_update()
        )

    async def get_line(self, activation_id: str) -> tuple[EntitlementLine, str] | None:
        """The line and its customer organization."""
        row = await first_row(
            self.session,
            select(entitlement_lines, entitlements.c.customer_organization)
            .join(entitlements)
            .where(entitlement_lines.c.activation_id == activation_id),
        )
        return None if row is None else (_line(row), row["customer_organization"])

    async def take_seats(self, activation_id: str, count: int) -> bool:
        """Activate ``count`` more seats of a line if that many are left (one statement)."""
        result = await self.session.execute(
            update(entitlement_lines)
            .where(
                entitlement_lines.c.activation_id == activation_id,
                # Written as a difference so a huge count cannot overflow the column type.
                count <= entitlement_lines.c.count - entitlement_lines.c.activated,
            )
            .values(activated=entitlement_lines.c.activated + count)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def credit_seats(self, activation_id: str, count: int) -> bool:
        """Give ``count`` activated seats back to a line, never below none (one statement)."""
        result = await self.session.execute(
            update(entitlement_lines)
            .where(
                entitlement_lines.c.activation_id == activation_id,
                entitlement_lines.c.activated >= count,
            )
            .values(activated=entitlement_lines.c.activated - count)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    # -- activations --------------------------------------------------------------------

    async def get_activation(self, host_id: str, request_id: str) -> ActivationRecord | None:
        row = await first_row(
            self.session,
            _activation_query().where(
                activations.c.host_id == host_id, activations.c.request_id == request_id
            ),
        )
        return None if row is None else _activation(row)

    async def find_certificate(self, certificate_id: str) -> ActivationRecord | None:
        """The activation whose certificate this is, locked until the transaction ends."""
        row = await first_row(
            self.session,
            _activation_query()
            .where(activations.c.certificate_id == certificate_id)
            .with_for_update(of=activations),
        )
        return None if row is None else _activation(row)

    async def activation_id_of(self, certificate_id: str) -> str | None:
        """The line a certificate was activated from, if the certificate exists."""
        row = await first_row(
            self.session,
            select(activations.c.activation_id).where(
                activations.c.certificate_id == certificate_id
            ),
        )
        return None if row is None else str(row["activation_id"])

    async def held_by(self, holder_host_id: str) -> list[ActivationRecord]:
        """The active network activations a host holds, locked, in certificate id order."""
        rows = (
            await self.session.execute(
                _activation_query()
                .where(
                    activations.c.holder_host_id == holder_host_id,
                    activations.c.state == ActivationState.ACTIVE.value,
                    entitlement_lines.c.kind == LicenseKind.NETWORK.value,
                )
                .order_by(activations.c.certificate_id)
                .with_for_update(of=activations)
            )
        ).mappings()
        return [_activation(row) for row in rows]

    async def holds_local_licenses(self, holder_host_id: str) -> bool:
        """Whether a host holds active local (node-locked) licenses."""
        found = await self.session.scalar(
            select(activations.c.request_id)
            .join(entitlement_lines)
            .where(
                activations.c.holder_host_id == holder_host_id,
                activations.c.state == ActivationState.ACTIVE.value,
                entitlement_lines.c.kind == LicenseKind.LOCAL.value,
            )
            .limit(1)
        )
        return found is not None

    async def insert_activation(self, record: ActivationRecord) -> None:
        """Record an activation; DuplicateRequest when its request id is already recorded."""
        try:
            await self.session.execute(
                insert(activations).values(
                    request_id=record.request_id,
                    activation_id=record.activation_id,
                    host_id=record.host_id,
                    host_public_key=record.host_public_key,
                    count=record.count,
                    certificate_id=record.certificate_id,
                    response_envelope=record.response_envelope,
                    activated_at=record.activated_at,
                    holder_host_id=record.holder_host_id,
                    activated_count=record.activated_count,
                    revision=record.revision,
                    state=record.state.value,
                    certificate_envelope=record.certificate_envelope,
                    returned_at=record.returned_at,
                    registration=None
                    if record.registration is None
                    else json.dumps(dataclasses.asdict(record.registration), sort_keys=True),
                )
            )
        except IntegrityError as error:
            raise DuplicateRequest(record.request_id) from error

    async def save_certificate(self, record: ActivationRecord) -> None:
        """Store what changes over an activation's life: holder, count, revision, state,
        the current certificate and when it was returned."""
        await self.session.execute(
            update(activations)
            .where(activations.c.certificate_id == record.certificate_id)
            .values(
                holder_host_id=record.holder_host_id,
                count=record.count,
                revision=record.revision,
                state=record.state.value,
                certificate_envelope=record.certificate_envelope,
                returned_at=record.returned_at,
            )
        )

    async def list_activations(
        self, entitlement_id: str | None, host_id: str | None
    ) -> list[ActivationRecord]:
        query = _activation_query().order_by(activations.c.activated_at, activations.c.request_id)
        if entitlement_id:
            query = query.where(entitlement_lines.c.entitlement_id == entitlement_id)
        if host_id:
            query = query.where(activations.c.holder_host_id == host_id)
        rows = (await self.session.execute(query)).mappings()
        return [_activation(row) for row in rows]

    # -- returns ------------------------------------------------------------------------

    async def get_return(self, host_id: str, request_id: str) -> ReturnRecord | None:
        row = await first_row(
            self.session,
            select(return_receipts).where(
                return_receipts.c.host_id == host_id, return_receipts.c.request_id == request_id
            ),
        )
        return None if row is None else _return(row)

    async def insert_return(self, record: ReturnRecord) -> None:
        """Record a return decision; DuplicateRequest when its request id is already recorded."""
        try:
            await self.session.execute(
                insert(return_receipts).values(
                    host_id=record.host_id,
                    request_id=record.request_id,
                    certificate_id=record.certificate_id,
                    count=record.count,
                    revision=record.revision,
                    outcome=record.outcome.value,
                    credited=record.credited,
                    entitlement_id=record.entitlement_id,
                    receipt_envelope=record.receipt_envelope,
                    decided_at=record.decided_at,
                )
            )
        except IntegrityError as error:
            raise DuplicateRequest(record.request_id) from error

    async def network_activations_since(
        self, entitlement_id: str, since: dt.datetime
    ) -> list[dt.datetime]:
        """When each network activation of the order was granted after ``since``, oldest
        first."""
        rows = await self.session.execute(
            select(activations.c.activated_at)
            .join(entitlement_lines)
            .where(
                entitlement_lines.c.entitlement_id == entitlement_id,
                entitlement_lines.c.kind == LicenseKind.NETWORK.value,
                activations.c.activated_at > since,
            )
            .order_by(activations.c.activated_at)
        )
        return list(rows.scalars())

    async def credited_returns_since(
        self, entitlement_id: str, since: dt.datetime
    ) -> list[dt.datetime]:
        """When each return of the order credited seats after ``since``, oldest first."""
        rows = await self.session.execute(
            select(return_receipts.c.decided_at)
            .where(
                return_receipts.c.entitlement_id == entitlement_id,
                return_receipts.c.outcome == ReturnOutcome.CREDITED.value,
                return_receipts.c.decided_at > since,
            )
            .order_by(return_receipts.c.decided_at)
        )
        return list(rows.scalars())

    # -- repairs ------------------------------------------------------------------------

    async def lock_repair_host(self, host_public_key: bytes) -> None:
        """Hold the host key's repair row (created on first use) until the transaction ends."""
        dialect = self.session.get_bind().dialect.name
        upsert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(repair_hosts)
        await self.session.execute(
            upsert.values(host_public_key=host_public_key).on_conflict_do_nothing()
        )
        await self.session.execute(
            select(repair_hosts.c.host_public_key)
            .where(repair_hosts.c.host_public_key == host_public_key)
            .with_for_update()
        )

    async def get_repair(self, host_id: str, request_id: str) -> RepairRecord | None:
        row = await first_row(
            self.session,
            select(repairs).where(repairs.c.host_id == host_id, repairs.c.request_id == request_id),
        )
        return None if row is None else _repair(row)

    async def insert_repair(self, record: RepairRecord) -> None:
        """Record a repair; DuplicateRequest when its request id is already recorded."""
        try:
            await self.session.execute(
                insert(repairs).values(
                    host_id=record.host_id,
                    request_id=record.request_id,
                    host_public_key=record.host_public_key,
                    previous_host_id=record.previous_host_id,
                    response_envelope=record.response_envelope,
                    repaired_at=record.repaired_at,
                )
            )
        except IntegrityError as error:
            raise DuplicateRequest(record.request_id) from error

    async def repairs_since(self, host_public_key: bytes, since: dt.datetime) -> list[dt.datetime]:
        """When each repair of the host key was granted after ``since``, oldest first."""
        rows = await self.session.execute(
            select(repairs.c.repaired_at)
            .where(repairs.c.host_public_key == host_public_key, repairs.c.repaired_at > since)
            .order_by(repairs.c.repaired_at)
        )
        return list(rows.scalars())

    # -- generations and check-ins ------------------------------------------------------

    async def newest_generation(self, host_public_key: bytes) -> int:
        """The host key's newest generation: 0 until a repair re-bound its licenses."""
        newest = await self.session.scalar(
            select(func.max(host_generations.c.generation)).where(
                host_generations.c.host_public_key == host_public_key
            )
        )
        return int(newest or 0)

    async def insert_generation(self, generation: HostGeneration) -> None:
        await self.session.execute(
            insert(host_generations).values(
                host_public_key=generation.host_public_key,
                generation=generation.generation,
                host_id=generation.host_id,
                previous_host_id=generation.previous_host_id,
                request_id=generation.request_id,
                rebound_at=generation.rebound_at,
            )
        )

    async def generations_of(self, host_public_key: bytes) -> list[HostGeneration]:
        """Every re-binding of the host key's licenses, oldest first."""
        rows = (
            await self.session.execute(
                select(host_generations)
                .where(host_generations.c.host_public_key == host_public_key)
                .order_by(host_generations.c.generation)
            )
        ).mappings()
        return [_generation(row) for row in rows]

    async def certificates_by_id(self, certificate_ids: Iterable[str]) -> list[ActivationRecord]:
        """The activations whose certificates these are (unknown ids are left out)."""
        wanted = list(certificate_ids)
        if not wanted:
            return []
        rows = (
            await self.session.execute(
                _activation_query().where(activations.c.certificate_id.in_(wanted))
            )
        ).mappings()
        return [_activation(row) for row in rows]

    async def get_check_in(self, host_id: str, request_id: str) -> CheckInRecord | None:
        row = await first_row(
            self.session,
            select(check_ins).where(
                check_ins.c.host_id == host_id, check_ins.c.request_id == request_id
            ),
        )
        return None if row is None else _check_in(row)

    async def insert_check_in(self, record: CheckInRecord) -> None:
        """Record a check-in; DuplicateRequest when its request id is already recorded."""
        try:
            await self.session.execute(
                insert(check_ins).values(
                    host_id=record.host_id,
                    request_id=record.request_id,
                    host_public_key=record.host_public_key,
                    standing=record.standing.value,
                    result_envelope=record.result_envelope,
                    checked_at=record.checked_at,
                )
            )
        except IntegrityError as error:
            raise DuplicateRequest(record.request_id) from error

    async def check_ins_since(
        self, host_id: str, standing: CheckInStanding, since: dt.datetime
    ) -> int:
        """How many check-ins of the host with this standing were recorded since then."""
        count = await self.session.scalar(
            select(func.count())
            .select_from(check_ins)
            .where(
                check_ins.c.host_id == host_id,
                check_ins.c.standing == standing.value,
                check_ins.c.checked_at >= since,
            )
        )
        return int(count or 0)


def _activation_query() -> Select[Any]:
    return select(
        activations,
        entitlement_lines.c.entitlement_id,
        entitlement_lines.c.feature,
        entitlement_lines.c.kind,
    ).join(entitlement_lines)


def _line(row: RowMapping) -> EntitlementLine:
    seconds = row["duration_seconds"]
    check_in_seconds = row["check_in_interval_seconds"]
    return EntitlementLine(
        activation_id=row["activation_id"],
        entitlement_id=row["entitlement_id"],
        feature=row["feature"],
        kind=LicenseKind(row["kind"]),
        count=row["count"],
        activated=row["activated"],
        expires_at=row["expires_at"],
        duration=None if seconds is None else dt.timedelta(seconds=seconds),
        maintenance_ends_at=row["maintenance_ends_at"],
        partial_return_allowed=bool(row["partial_return_allowed"]),
        check_in=None
        if not check_in_seconds
        else CheckInPolicy(
            dt.timedelta(seconds=check_in_seconds),
            dt.timedelta(seconds=row["check_in_grace_seconds"] or 0),
        ),
    )


def _activation(row: RowMapping) -> ActivationRecord:
    registration = row["registration"]
    return ActivationRecord(
        request_id=row["request_id"],
        activation_id=row["activation_id"],
        entitlement_id=row["entitlement_id"],
        feature=row["feature"],
        host_id=row["host_id"],
        host_public_key=row["host_public_key"],
        count=row["count"],
        certificate_id=row["certificate_id"],
        response_envelope=row["response_envelope"],
        activated_at=row["activated_at"],
        kind=LicenseKind(row["kind"]),
        holder_host_id=row["holder_host_id"],
        activated_count=row["activated_count"],
        revision=row["revision"],
        state=ActivationState(row["state"]),
        certificate_envelope=row["certificate_envelope"],
        returned_at=row["returned_at"],
        registration=None if registration is None else Registration(**json.loads(registration)),
    )


def _return(row: RowMapping) -> ReturnRecord:
    return ReturnRecord(
        host_id=row["host_id"],
        request_id=row["request_id"],
        certificate_id=row["certificate_id"],
        count=row["count"],
        revision=row["revision"],
        outcome=ReturnOutcome(row["outcome"]),
        credited=row["credited"],
        entitlement_id=row["entitlement_id"],
        receipt_envelope=row["receipt_envelope"],
        decided_at=row["decided_at"],
    )


def _repair(row: RowMapping) -> RepairRecord:
    return RepairRecord(
        host_id=row["host_id"],
        request_id=row["request_id"],
        host_public_key=row["host_public_key"],
        previous_host_id=row["previous_host_id"],
        response_envelope=row["response_envelope"],
        repaired_at=row["repaired_at"],
    )


def _generation(row: RowMapping) -> HostGeneration:
    return HostGeneration(
        host_public_key=row["host_public_key"],
        generation=row["generation"],
        host_id=row["host_id"],
        previous_host_id=row["previous_host_id"],
        request_id=row["request_id"],
        rebound_at=row["rebound_at"],
    )


def _check_in(row: RowMapping) -> CheckInRecord:
    return CheckInRecord(
        host_id=row["host_id"],
        request_id=row["request_id"],
        host_public_key=row["host_public_key"],
        standing=CheckInStanding(row["standing"]),
        result_envelope=row["result_envelope"],
        checked_at=row["checked_at"],
    )


class ActivationStore(TransactionalStore[Repository]):
    """The Activation Server's database (``domain.ports.VendorStore``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, Repository)
        self._snapshots = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Repository]:
        """A transaction that sees one consistent state throughout (for reading the audit
        log while decisions append to it). SQLite transactions here already do."""
        async with self._snapshots() as session, session.begin():
            if session.get_bind().dialect.name == "postgresql":
                await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            yield Repository(session)
