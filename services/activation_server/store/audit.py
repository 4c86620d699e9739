"""SQL for the hash-chained audit log: append under the head row's lock, read in order."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from sqlalchemy import RowMapping, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.activation_server.domain.model import (
    GENESIS,
    AuditEntry,
    AuditHead,
    canonical_json,
    entry_hash,
)
from services.activation_server.store.tables import audit_head, audit_log
from tessera.storage import first_row

HEAD_ID = 1


class AuditQueries:
    """The audit log within one transaction (``domain.ports.AuditTrail``)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def head(self) -> AuditHead:
        row = await first_row(self.session, select(audit_head).where(audit_head.c.id == HEAD_ID))
        if row is None:
            return AuditHead(0, GENESIS)
        return AuditHead(row["sequence"], row["hash"])

    async def append(
        self, at: dt.datetime, action: str, subject: str, actor: str, detail: Mapping[str, object]
    ) -> AuditEntry:
        """Chain a new entry onto the head. The head row stays locked until the caller's
        transaction ends, so append last, just before commit."""
        row = await first_row(
            self.session,
            select(audit_head).where(audit_head.c.id == HEAD_ID).with_for_update(),
        )
        if row is None:
            raise RuntimeError("the audit_head row is missing; the audit log was tampered with")
        detail_json = canonical_json(detail)
        sequence = row["sequence"] + 1
        entry = AuditEntry(
            sequence=sequence,
            at=at,
            action=action,
            subject=subject,
            actor=actor,
            detail=detail_json,
            previous_hash=row["hash"],
            hash=entry_hash(row["hash"], sequence, at, action, subject, actor, detail_json),
        )
        await self.session.execute(
            insert(audit_log).values(
                sequence=entry.sequence,
                at=entry.at,
                action=entry.action,
                subject=entry.subject,
                actor=entry.actor,
                detail=entry.detail,
                previous_hash=entry.previous_hash,
                hash=entry.hash,
            )
        )
        moved = await self.session.execute(
            update(audit_head)
            .where(audit_head.c.id == HEAD_ID, audit_head.c.sequence == row["sequence"])
            .values(sequence=entry.sequence, hash=entry.hash)
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            raise RuntimeError("the audit head moved under its lock")
        return entry

    async def entries(
        self, after_sequence: int, limit: int, subject: str | None
    ) -> list[AuditEntry]:
        """Up to ``limit`` entries after ``after_sequence``, in sequence order."""
        query = (
            select(audit_log)
            .where(audit_log.c.sequence > after_sequence)
            .order_by(audit_log.c.sequence)
            .limit(limit)
        )
        if subject is not None:
            query = query.where(audit_log.c.subject == subject)
        rows = (await self.session.execute(query)).mappings()
        return [_entry(row) for row in rows]


def _entry(row: RowMapping) -> AuditEntry:
    return AuditEntry(
        sequence=row["sequence"],
        at=row["at"],
        action=row["action"],
        subject=row["subject"],
        actor=row["actor"],
        detail=row["detail"],
        previous_hash=row["previous_hash"],
        hash=row["hash"],
    )
