"""SQL for the Administrator's operations journal and registration details: implements
the journal ports of domain/ports.py (JournalStore, JournalQueries)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from typing import Any

from sqlalchemy import RowMapping, Select, and_, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.administrator.domain.model import (
    Operation,
    OperationKind,
    OperationState,
    OperationUpdate,
    Registration,
)
from services.administrator.domain.ports import DuplicateOperation
from services.administrator.store.tables import operations, registration
from tessera.storage import TransactionalStore, first_row

UNFINISHED = (
    OperationState.PLANNED.value,
    OperationState.PREPARED.value,
    OperationState.ANSWERED.value,
)
# A move's activation half: where its seats go (the move's target_* fields).
_TARGET = operations.alias("target")
_TOP_LEVEL = operations.c.parent_operation_id == ""


def _with_target() -> Select[Any]:
    """Operations, a move with its target License Server and host."""
    return select(
        operations,
        _TARGET.c.license_server.label("target_license_server"),
        _TARGET.c.host_id.label("target_host_id"),
    ).outerjoin(
        _TARGET,
        and_(
            operations.c.kind == OperationKind.MOVE.value,
            _TARGET.c.parent_operation_id == operations.c.operation_id,
            _TARGET.c.kind == OperationKind.ACTIVATE.value,
        ),
    )


_REGISTRATION_ROW = 1


class Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, operation_id: str) -> Operation | None:
        row = await first_row(
            self.session, _with_target().where(operations.c.operation_id == operation_id)
        )
        return None if row is None else _operation(row)

    async def insert(self, operation: Operation) -> None:
        try:
            await self.session.execute(insert(operations).values(**_row(operation)))
        except IntegrityError as error:
            raise DuplicateOperation(operation.operation_id) from error

    async def advance(
        self,
        operation_id: str,
        from_states: Collection[OperationState],
        step: OperationUpdate,
    ) -> bool:
        """Journal ``step`` if the operation still stands in one of ``from_states``;
        False when another call moved it on first. States never go back."""
        values = step.learned()
        values["state"] = step.state.value
        result = await self.session.execute(
            update(operations)
            .where(
                operations.c.operation_id == operation_id,
                operations.c.state.in_([state.value for state in from_states]),
            )
            .values(values)
        )
        return bool(getattr(result, "rowcount", 0))

    async def record_error(
        self, operation_id: str, last_error: str, code: str, at: dt.datetime
    ) -> None:
        """Note why an unfinished operation did not get further this time."""
        await self.session.execute(
            update(operations)
            .where(
                operations.c.operation_id == operation_id,
                operations.c.state.in_(UNFINISHED),
            )
            .values(last_error=last_error, last_error_code=code, updated_at=at)
        )

    async def list_operations(self, limit: int, unfinished_only: bool) -> list[Operation]:
        """Newest first."""
        query = _with_target().where(_TOP_LEVEL)
        if unfinished_only:
            query = query.where(operations.c.state.in_(UNFINISHED))
        query = query.order_by(
            operations.c.created_at.desc(), operations.c.operation_id.desc()
        ).limit(limit)
        rows = (await self.session.execute(query)).mappings().all()
        return [_operation(row) for row in rows]

    async def license_server_addresses(self) -> list[str]:
        """Every License Server address an operation named (a move's source and target
        are its halves'), sorted."""
        rows = await self.session.execute(select(operations.c.license_server).distinct())
        return sorted(address for address in rows.scalars() if address)

    async def unfinished_online(self) -> list[Operation]:
        """Operations to resume at start, oldest first (offline ones wait for a file)."""
        query = (
            _with_target()
            .where(operations.c.state.in_(UNFINISHED), operations.c.offline.is_(False), _TOP_LEVEL)
            .order_by(operations.c.created_at, operations.c.operation_id)
        )
        rows = (await self.session.execute(query)).mappings().all()
        return [_operation(row) for row in rows]

    async def get_registration(self) -> Registration | None:
        row = await first_row(self.session, select(registration))
        if row is None:
            return None
        return Registration(
            organization=row["organization"],
            contact_name=row["contact_name"],
            email=row["email"],
            phone=row["phone"],
            site=row["site"],
        )

    async def put_registration(self, details: Registration, at: dt.datetime) -> None:
        values = {
            "organization": details.organization,
            "contact_name": details.contact_name,
            "email": details.email,
            "phone": details.phone,
            "site": details.site,
            "updated_at": at,
        }
        dialect = postgresql if self.session.get_bind().dialect.name == "postgresql" else sqlite
        statement = dialect.insert(registration).values(id=_REGISTRATION_ROW, **values)
        await self.session.execute(
            statement.on_conflict_do_update(index_elements=["id"], set_=values)
        )


def _row(operation: Operation) -> dict[str, Any]:
    return {
        "operation_id": operation.operation_id,
        "kind": operation.kind.value,
        "state": operation.state.value,
        "license_server": operation.license_server,
        "host_id": operation.host_id,
        "activation_id": operation.activation_id,
        "count": operation.count,
        "request_id": operation.request_id,
        "request_envelope": operation.request_envelope,
        "response_envelope": operation.response_envelope,
        "created_at": operation.created_at,
        "updated_at": operation.updated_at,
        "certificate_id": operation.certificate_id,
        "offline": operation.offline,
        "force": operation.force,
        "parent_operation_id": operation.parent_operation_id,
        "revoked_leases": operation.revoked_leases,
        "result": operation.result,
        "last_error": operation.last_error,
        "last_error_code": operation.last_error_code,
    }


def _operation(row: RowMapping) -> Operation:
    return Operation(
        operation_id=row["operation_id"],
        kind=OperationKind(row["kind"]),
        state=OperationState(row["state"]),
        license_server=row["license_server"],
        host_id=row["host_id"],
        activation_id=row["activation_id"],
        count=row["count"],
        request_id=row["request_id"],
        request_envelope=row["request_envelope"],
        response_envelope=row["response_envelope"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        certificate_id=row["certificate_id"],
        offline=bool(row["offline"]),
        force=bool(row["force"]),
        parent_operation_id=row["parent_operation_id"],
        target_license_server=row["target_license_server"] or "",
        target_host_id=row["target_host_id"] or "",
        revoked_leases=row["revoked_leases"],
        result=row["result"],
        last_error=row["last_error"],
        last_error_code=row["last_error_code"],
    )


class Journal(TransactionalStore[Repository]):
    """The Administrator's database: the operations journal and registration details."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, Repository)
