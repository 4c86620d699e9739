"""SQL for the Administrator's operations journal."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import RowMapping, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.administrator.domain.model import Operation, OperationState
from services.administrator.store.tables import operations
from tessera.storage import TransactionalStore, first_row


class DuplicateOperation(Exception):
    """Another call journaled this operation id first."""


class Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, operation_id: str) -> Operation | None:
        row = await first_row(
            self.session, select(operations).where(operations.c.operation_id == operation_id)
        )
        return None if row is None else _operation(row)

    async def insert(self, operation: Operation) -> None:
        try:
            await self.session.execute(
                insert(operations).values(
                    operation_id=operation.operation_id,
                    kind=operation.kind,
                    state=operation.state.value,
                    license_server=operation.license_server,
                    host_id=operation.host_id,
                    activation_id=operation.activation_id,
                    count=operation.count,
                    request_id=operation.request_id,
                    request_envelope=operation.request_envelope,
                    response_envelope=operation.response_envelope,
                    created_at=operation.created_at,
                    updated_at=operation.updated_at,
                )
            )
        except IntegrityError as error:
            raise DuplicateOperation(operation.operation_id) from error

    async def advance(
        self,
        operation_id: str,
        state: OperationState,
        at: dt.datetime,
        response_envelope: bytes | None = None,
    ) -> None:
        values: dict[str, object] = {"state": state.value, "updated_at": at}
        if response_envelope is not None:
            values["response_envelope"] = response_envelope
        await self.session.execute(
            update(operations).where(operations.c.operation_id == operation_id).values(**values)
        )


def _operation(row: RowMapping) -> Operation:
    return Operation(
        operation_id=row["operation_id"],
        kind=row["kind"],
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
    )


class Journal(TransactionalStore[Repository]):
    """The Administrator's database: the operations journal."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, Repository)
