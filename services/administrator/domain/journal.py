"""The journal's rules: an operation id names one operation, and states only go forward.

Every flow journals a step before it takes the next, so a crash anywhere leaves the
journal saying how far the operation got, and running it again continues from there.
Within this process one call at a time works on an operation (a lock per operation id);
across crashes the peers' idempotency by request id does the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from services.administrator.domain.errors import OperationIdReused, OperationNotFound
from services.administrator.domain.metrics import OperationMetrics
from services.administrator.domain.model import Intent, Operation, OperationState
from services.administrator.domain.ports import DuplicateOperation, JournalStore
from tessera.clock import Clock
from tessera.errors import DomainError, InvalidInput, PeerRefused

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# The states an operation may be moved on to a state from.
_EARLIER = {
    OperationState.ANSWERED: (OperationState.PREPARED,),
    OperationState.COMPLETED: (OperationState.PREPARED, OperationState.ANSWERED),
    OperationState.REFUSED: (OperationState.PREPARED, OperationState.ANSWERED),
}


def error_text(error: DomainError) -> str:
    """How the journal writes a refusal or failure: "REASON: message"."""
    return f"{error.reason}: {error.message}"


def status_name(error: DomainError, default: str) -> str:
    return error.status_name if isinstance(error, PeerRefused) else default


class OperationJournal:
    """The journal as the flows use it."""

    def __init__(
        self, store: JournalStore, clock: Clock, metrics: OperationMetrics | None = None
    ) -> None:
        self.store = store
        self.clock = clock
        self.metrics = metrics or OperationMetrics()
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}

    @asynccontextmanager
    async def exclusive(self, operation_id: str) -> AsyncIterator[None]:
        """Work on one operation at a time (e.g. the resume at start and an operator's
        retry of the same operation)."""
        lock = self._locks.setdefault(operation_id, asyncio.Lock())
        self._waiting[operation_id] = self._waiting.get(operation_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._waiting[operation_id] -= 1
            if not self._waiting[operation_id]:
                del self._waiting[operation_id]
                del self._locks[operation_id]

    async def find(self, operation_id: str) -> Operation | None:
        async with self.store.transaction() as repo:
            return await repo.get(operation_id)

    async def get(self, operation_id: str) -> Operation:
        operation = await self.find(operation_id)
        if operation is None:
            raise OperationNotFound(
                f"no operation {operation_id!r} in the journal",
                metadata={"operation_id": operation_id},
            )
        return operation

    async def existing(self, operation_id: str, intent: Intent) -> Operation | None:
        """The journaled operation this call retries, or None for a new one; an id that
        names an operation with another intent is refused."""
        operation = await self.find(operation_id)
        if operation is not None and not operation.matches(intent):
            raise OperationIdReused(
                f"operation {operation_id!r} was started as another {operation.kind.value} "
                "or with other parameters",
                metadata={"operation_id": operation_id, "kind": operation.kind.value},
            )
        return operation

    async def start(self, operation: Operation) -> Operation:
        """Journal a prepared operation; when another call journaled it first, that one."""
        try:
            async with self.store.transaction() as repo:
                await repo.insert(operation)
        except DuplicateOperation:
            return await self.get(operation.operation_id)
        return operation

    async def advance(
        self, operation: Operation, state: OperationState, **values: Any
    ) -> Operation:
        """Move ``operation`` on to ``state``; if another call already moved it further,
        the journal's version (the flows continue from whatever it says)."""
        now = self.clock.now()
        if state is not OperationState.REFUSED:
            values = {"last_error": "", "last_error_code": "", **values}
        async with self.store.transaction() as repo:
            moved = await repo.advance(
                operation.operation_id, state, _EARLIER[state], now, **values
            )
        if not moved:
            return await self.get(operation.operation_id)
        if state.finished:
            reason = str(values.get("last_error", "")).partition(": ")[0]
            self.metrics.operation_finished(operation.kind, state, reason)
        return replace(operation, state=state, updated_at=now, **values)

    async def fill(
        self, operation: Operation, column: str, value: bytes, **values: Any
    ) -> Operation:
        """Record one more step of an unfinished operation without changing its state."""
        now = self.clock.now()
        values = {"last_error": "", "last_error_code": "", **values}
        async with self.store.transaction() as repo:
            filled = await repo.fill(operation.operation_id, column, value, now, **values)
        if not filled:
            return await self.get(operation.operation_id)
        return replace(operation, updated_at=now, **{column: value, **values})

    async def refuse(self, operation: Operation, error: DomainError, **values: Any) -> Operation:
        """The vendor decided against the operation: it is finished, as refused."""
        return await self.advance(
            operation,
            OperationState.REFUSED,
            last_error=error_text(error),
            last_error_code=status_name(error, ""),
            **values,
        )

    async def record_error(self, operation: Operation, error: DomainError) -> None:
        """Note why the operation did not get further this time (it stays unfinished)."""
        async with self.store.transaction() as repo:
            await repo.record_error(
                operation.operation_id,
                error_text(error),
                status_name(error, ""),
                self.clock.now(),
            )
        self.metrics.step_failed(operation.kind, error.reason)

    @asynccontextmanager
    async def noting_errors(self, operation: Operation) -> AsyncIterator[None]:
        """Run a step of ``operation``; if it fails, note why in the journal and re-raise."""
        try:
            yield
        except DomainError as error:
            await self.record_error(operation, error)
            raise

    async def list_operations(self, page_size: int, unfinished_only: bool) -> list[Operation]:
        """Newest first; ``page_size`` 0 means 100, more than 1000 means 1000."""
        if page_size < 0:
            raise InvalidInput("page_size", f"must not be negative, not {page_size}")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        async with self.store.transaction() as repo:
            return await repo.list_operations(limit, unfinished_only)

    async def unfinished_online(self) -> list[Operation]:
        async with self.store.transaction() as repo:
            return await repo.unfinished_online()
