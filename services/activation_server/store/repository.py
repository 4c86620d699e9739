"""SQL for the Activation Server. The domain owns transactions; this module owns queries."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import RowMapping, Select, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.activation_server.domain.model import (
    ActivationRecord,
    Entitlement,
    EntitlementLine,
    LicenseKind,
    NewLine,
)
from services.activation_server.store.tables import (
    activations,
    audit_log,
    entitlement_lines,
    entitlements,
    features,
)
from tessera.storage import TransactionalStore, first_row


class DuplicateRequest(Exception):
    """Another transaction recorded this request id first."""


class Repository:
    """Queries within one transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

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

    async def get_activation(self, host_id: str, request_id: str) -> ActivationRecord | None:
        row = await first_row(
            self.session,
            _activation_query().where(
                activations.c.host_id == host_id, activations.c.request_id == request_id
            ),
        )
        return None if row is None else _activation(row)

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
                )
            )
        except IntegrityError as error:
            raise DuplicateRequest(record.request_id) from error

    async def list_activations(
        self, entitlement_id: str | None, host_id: str | None
    ) -> list[ActivationRecord]:
        query = _activation_query().order_by(activations.c.activated_at, activations.c.request_id)
        if entitlement_id:
            query = query.where(entitlement_lines.c.entitlement_id == entitlement_id)
        if host_id:
            query = query.where(activations.c.host_id == host_id)
        rows = (await self.session.execute(query)).mappings()
        return [_activation(row) for row in rows]

    async def append_audit(
        self, at: dt.datetime, action: str, subject: str, detail: dict[str, object]
    ) -> None:
        await self.session.execute(
            insert(audit_log).values(
                at=at, action=action, subject=subject, detail=json.dumps(detail, sort_keys=True)
            )
        )


def _activation_query() -> Select[Any]:
    return select(
        activations, entitlement_lines.c.entitlement_id, entitlement_lines.c.feature
    ).join(entitlement_lines)


def _line(row: RowMapping) -> EntitlementLine:
    return EntitlementLine(
        activation_id=row["activation_id"],
        entitlement_id=row["entitlement_id"],
        feature=row["feature"],
        kind=LicenseKind(row["kind"]),
        count=row["count"],
        activated=row["activated"],
        expires_at=row["expires_at"],
    )


def _activation(row: RowMapping) -> ActivationRecord:
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
    )


class ActivationStore(TransactionalStore[Repository]):
    """The Activation Server's database."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, Repository)
