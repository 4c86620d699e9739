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

from services.administrator.domain.errors import OperationIdReused, OperationNotFound
from services.administrator.domain.metrics import OperationMetrics
from services.administrator.domain.model import (
    Intent,
    Operation,
    OperationState,
    OperationUpdate,
)
from services.administrator.domain.ports import DuplicateOperation, JournalStore
from tessera.clock import Clock
from tessera.errors import DomainError, InvalidInput, PeerRefused

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# The states an operation may be moved on to a state from.
_EARLIER = {
    OperationState.PREPARED: (OperationState.PLANNED,),
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

    async def lookup(self, operation_id: str) -> Operation:
        """An operation the operator started (a move's halves are steps of the move)."""
        operation = await self.find(operation_id)
        if operation is None or operation.parent_operation_id:
            raise OperationNotFound(
                f"no operation {operation_id!r} in the journal",
                metadata={"operation_id": operation_id},
            )
        return operation

    async def existing(self, operation_id: str, intent: Intent) -> Operation | None:
        """The journaled operation this call retries, or None for a new one; an id that
        names an operation with another intent, or a move's half, is refused."""
        operation = await self.find(operation_id)
        if operation is not None and (
            operation.parent_operation_id or not operation.matches(intent)
        ):
            raise OperationIdReused(
                f"operation {operation_id!r} was started as another {operation.kind.value} "
                "or with other parameters",
                metadata={"operation_id": operation_id, "kind": operation.kind.value},
            )
        return operation

    async def start(self, operation: Operation, *halves: Operation) -> Operation:
        """Journal a prepared operation (a move with its halves, in one transaction);
        when another call journaled it first, that one."""
        try:
            async with self.store.transaction() as repo:
                for journaled in (operation, *halves):
                    await repo.insert(journaled)
        except DuplicateOperation:
            return await self.get(operation.operation_id)
        return operation

    async def prepared(
        self, operation: Operation, request_id: str, request: bytes, revoked_leases: int = 0
    ) -> Operation:
        """A planned operation's request, signed by its License Server."""
        return await self._advance(
            operation,
            OperationUpdate(
                OperationState.PREPARED,
                self.clock.now(),
                request_id=request_id,
                request_envelope=request,
                revoked_leases=revoked_leases,
            ),
        )

    async def answered(self, operation: Operation) -> Operation:
        """A move between its halves: the return is done, the activation is not."""
        return await self._advance(
            operation, OperationUpdate(OperationState.ANSWERED, self.clock.now())
        )

    async def complete(
        self,
        operation: Operation,
        result: bytes | None = None,
        response_envelope: bytes | None = None,
    ) -> Operation:
        """The operation is finished, as completed, with the answer and what installing it
        did (when it has them)."""
        return await self._advance(
            operation,
            OperationUpdate(
                OperationState.COMPLETED,
                self.clock.now(),
                response_envelope=response_envelope,
                result=result,
            ),
        )

    async def refuse(
        self,
        operation: Operation,
        error: DomainError,
        result: bytes | None = None,
        response_envelope: bytes | None = None,
    ) -> Operation:
        """The vendor decided against the operation: it is finished, as refused."""
        return await self._advance(
            operation,
            OperationUpdate(
                OperationState.REFUSED,
                self.clock.now(),
                last_error=error_text(error),
                last_error_code=status_name(error, ""),
                response_envelope=response_envelope,
                result=result,
            ),
        )

    async def _advance(self, operation: Operation, update: OperationUpdate) -> Operation:
        """Move ``operation`` on; if another call already moved it further, the journal's
        version (the flows continue from whatever it says)."""
        async with self.store.transaction() as repo:
            moved = await repo.advance(operation.operation_id, _EARLIER[update.state], update)
        if not moved:
            return await self.get(operation.operation_id)
        if update.state.finished and not operation.parent_operation_id:
            reason = update.last_error.partition(": ")[0]
            self.metrics.operation_finished(operation.kind, update.state, reason)
        return update.applied_to(operation)

    async def record_error(self, operation: Operation, error: DomainError) -> None:
        """Note why the operation did not get further this time (it stays unfinished)."""
        async with self.store.transaction() as repo:
            await repo.record_error(
                operation.operation_id,
                error_text(error),
                status_name(error, ""),
                self.clock.now(),
            )
        if not operation.parent_operation_id:  # a move's failed step counts as the move's
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
