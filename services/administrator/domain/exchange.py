"""The one pattern behind activation, return and repair (DESIGN §4), as journaled steps.

1. the License Server *prepares*: it signs a request (same request id, same bytes), and
   the journal records the operation as PREPARED;
2. the vendor answers the signed request (same request id, same answer);
3. the License Server *verifies and installs* the answer (installing twice is a no-op),
   and only then is the answer journaled, with the outcome: COMPLETED, or REFUSED when
   the answer was a refusal the License Server has now applied.

The Administrator holds no vendor keys: the License Server an answer is for is what
verifies it (vendor signature, host, pending request). So nothing unverified is ever
journaled as an answer: an answer the License Server refuses (forged, altered, for
another host) leaves the operation as it was, and the genuine one still completes it.
Until installed, an answer is not needed again: asked again, the vendor gives the same.
(ANSWERED is a move's state between its two halves, and what older Administrators
journaled between steps 2 and 3; such an answer is still installed, and verified then.)

Each kind says how it prepares, asks and installs (an ``Exchange``); the ``ExchangeRunner``
journals each step before the next and passes the failpoints the crash suite arms. A
move's two halves are exchanges too (moves.py): its activation is journaled PLANNED with
the move and prepared by the runner once the return is done.
Online, the runner takes an operation all the way; offline, ExportRequest stops after
step 1 and ImportResponse brings the answer for step 3.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, cast

from google.protobuf.message import Message

from services.administrator.domain.errors import OperationHostChanged, VendorRefused
from services.administrator.domain.journal import OperationJournal
from services.administrator.domain.model import (
    Intent,
    Operation,
    OperationKind,
    OperationState,
)
from services.administrator.domain.ports import (
    LicenseServer,
    LicenseServerDirectory,
    Vendor,
)
from services.administrator.domain.registration import Registrations
from tessera.activation.v1.activation_pb2 import Registration as RegistrationProto
from tessera.clock import Clock
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.errors import DomainError, PeerRefused
from tessera.server import failpoints

log = logging.getLogger("tessera.administrator")

# Vendor refusals that are decisions about the signed request, not passing trouble.
DECISIONS = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "OUT_OF_RANGE",
    }
)


def reach(operation: Operation, step: str) -> None:
    """The failpoint ``administrator.<flow>.<step>`` (the crash suite kills us here)."""
    failpoints.reach(f"administrator.{operation.flow.value}.{step}")


def check_host(server: LicenseServer, host_id: str, operation_id: str) -> None:
    """The address must still answer with the License Server the operation began on."""
    if server.host_id != host_id:
        raise OperationHostChanged(
            f"operation {operation_id} was prepared on host {host_id}, but "
            f"{server.address} is now host {server.host_id}",
            metadata={"operation_id": operation_id, "host_id": host_id},
        )


class _Answer(Protocol):
    """What every vendor answer says: which request of which host it answers."""

    request_id: str
    host_id: str


@dataclass(frozen=True)
class Prepared:
    """A request the License Server signed."""

    request_id: str
    request: SignedEnvelope
    # Leases revoked to free seats being returned (a forced return).
    revoked_leases: int = 0


@dataclass(frozen=True)
class Installed:
    """The License Server's answer to the install step."""

    # Serialized, so that the operation run again returns the same.
    result: bytes
    # Set when the vendor's answer was a refusal that the License Server has now applied.
    refusal: DomainError | None = None


class Exchange(ABC):
    """How one kind of operation prepares, asks the vendor and installs."""

    kind: OperationKind
    # The host-signed request and the vendor-signed answer it travels as.
    request_type: type[Message]
    response_type: type[Message]
    # Whether the vendor refusing the request (an error, not a signed answer) ends the
    # operation. Not for a return: its seats stay withheld until a signed receipt says.
    refusal_is_final = True

    def __init__(self, activation_server: Vendor) -> None:
        self.activation_server = activation_server

    def reach(self, operation: Operation, step: str) -> None:
        """Past ``step`` of ``operation``: its failpoint (a move's halves name theirs
        after the move's steps)."""
        reach(operation, step)

    @abstractmethod
    async def prepare(self, server: LicenseServer, intent: Intent, request_id: str) -> Prepared: ...

    @abstractmethod
    async def ask_vendor(
        self, request: SignedEnvelope, registration: RegistrationProto
    ) -> SignedEnvelope: ...

    @abstractmethod
    async def install(
        self, server: LicenseServer, operation: Operation, response: SignedEnvelope
    ) -> Installed: ...

    def addressee(self, response: SignedEnvelope) -> tuple[str, str]:
        """The request id and host id a vendor answer names (read, not verified: the
        License Server verifies the signature when it installs the answer)."""
        document = self.response_type()
        document.ParseFromString(response.payload)
        answer = cast(_Answer, document)
        return answer.request_id, answer.host_id

    def refusal(self, operation: Operation) -> DomainError:
        """The refusal of a REFUSED operation, told again."""
        reason, _, message = operation.last_error.partition(": ")
        return VendorRefused(
            operation.last_error_code or "FAILED_PRECONDITION",
            reason or "REFUSED",
            message or f"operation {operation.operation_id} was refused",
            operation.operation_id,
        )


class ExchangeRunner:
    """Takes journaled operations through prepare -> vendor -> install."""

    def __init__(
        self,
        journal: OperationJournal,
        registrations: Registrations,
        clock: Clock,
        license_servers: LicenseServerDirectory,
    ) -> None:
        self.journal = journal
        self.registrations = registrations
        self.clock = clock
        self.license_servers = license_servers

    async def run(self, exchange: Exchange, intent: Intent, operation_id: str) -> Operation:
        """The whole operation, online; run again with the same id it continues where it
        stopped and completes exactly once. Raises the vendor's refusal if it refused."""
        async with self.journal.exclusive(operation_id):
            operation = await self.journal.existing(operation_id, intent)
            if operation is not None and operation.state.finished:
                return self.outcome(exchange, operation)
            if operation is None:
                async with self.license_servers.connected(intent.license_server) as server:
                    operation = await self.prepare(exchange, server, intent, operation_id)
                    return await self.complete(exchange, server, operation)
            async with self.reach_license_server(operation, intent.license_server) as server:
                return await self.complete(exchange, server, operation)

    async def resume(self, exchange: Exchange, operation_id: str) -> Operation:
        """Continue a journaled operation from its journaled state."""
        async with self.journal.exclusive(operation_id):
            operation = await self.journal.get(operation_id)
            if operation.state.finished:
                return self.outcome(exchange, operation)
            async with self.reach_license_server(operation, operation.license_server) as server:
                return await self.complete(exchange, server, operation)

    @asynccontextmanager
    async def reach_license_server(
        self, operation: Operation, address: str
    ) -> AsyncIterator[LicenseServer]:
        """The License Server a journaled operation continues on; if it cannot be reached,
        the journal notes why."""
        async with self.journal.noting_errors(operation):
            server = await self.license_servers.connect(address)
        try:
            yield server
        finally:
            await server.close()

    def outcome(self, exchange: Exchange, operation: Operation) -> Operation:
        """A finished operation, or its refusal raised."""
        if operation.state is OperationState.REFUSED:
            raise exchange.refusal(operation)
        return operation

    async def prepare(
        self, exchange: Exchange, server: LicenseServer, intent: Intent, operation_id: str
    ) -> Operation:
        """Step 1: the License Server signs (the operation id is the request id, so doing
        this again after a crash returns the very same request); then journal it."""
        prepared = await exchange.prepare(server, intent, operation_id)
        now = self.clock.now()
        operation = await self.journal.start(
            Operation(
                operation_id=operation_id,
                kind=exchange.kind,
                state=OperationState.PREPARED,
                license_server=intent.license_server,
                host_id=server.host_id,
                activation_id=intent.activation_id,
                count=intent.count,
                request_id=prepared.request_id,
                request_envelope=prepared.request.SerializeToString(),
                response_envelope=None,
                created_at=now,
                updated_at=now,
                certificate_id=intent.certificate_id,
                offline=intent.offline,
                force=intent.force,
                revoked_leases=prepared.revoked_leases,
            )
        )
        exchange.reach(operation, "after_prepare")
        return operation

    async def complete(
        self, exchange: Exchange, server: LicenseServer, operation: Operation
    ) -> Operation:
        """Steps 2 and 3 from wherever the journal says the operation stands; raises the
        vendor's refusal if it refused."""
        return self.outcome(exchange, await self.advance(exchange, server, operation))

    async def advance(
        self, exchange: Exchange, server: LicenseServer, operation: Operation
    ) -> Operation:
        """The remaining steps (a planned operation is prepared first), as far as they
        go: finished, or an error raised and noted in the journal."""
        async with self.journal.noting_errors(operation):
            check_host(server, operation.host_id, operation.operation_id)
        if operation.state is OperationState.PLANNED:
            operation = await self.prepare_planned(exchange, server, operation)
        if operation.state is OperationState.PREPARED:
            response = await self.ask_vendor(exchange, operation)
            operation = await self.install(exchange, server, operation, response)
        elif operation.state is OperationState.ANSWERED:
            # Journaled by an older Administrator before it was installed.
            assert operation.response_envelope is not None
            response = SignedEnvelope.FromString(operation.response_envelope)
            operation = await self.install(exchange, server, operation, response)
        return operation

    async def prepare_planned(
        self, exchange: Exchange, server: LicenseServer, operation: Operation
    ) -> Operation:
        """Step 1 of an operation journaled before it could be prepared (a move's
        activation half): the License Server signs its journaled request id."""
        async with self.journal.noting_errors(operation):
            prepared = await exchange.prepare(server, operation.intent, operation.request_id)
        operation = await self.journal.prepared(
            operation,
            prepared.request_id,
            prepared.request.SerializeToString(),
            prepared.revoked_leases,
        )
        exchange.reach(operation, "after_prepare")
        return operation

    async def ask_vendor(self, exchange: Exchange, operation: Operation) -> SignedEnvelope:
        """Step 2: the vendor's signed answer (not journaled: unverified until the
        License Server installs it). A refusal that decides the operation is journaled."""
        request = SignedEnvelope.FromString(operation.request_envelope)
        registration = await self.registrations.for_vendor()
        try:
            response = await exchange.ask_vendor(request, registration)
        except PeerRefused as refusal:
            if exchange.refusal_is_final and refusal.status_name in DECISIONS:
                await self.journal.refuse(operation, refusal)
            else:
                await self.journal.record_error(operation, refusal)
            raise
        except DomainError as error:
            await self.journal.record_error(operation, error)
            raise
        exchange.reach(operation, "after_vendor")
        return response

    async def install(
        self,
        exchange: Exchange,
        server: LicenseServer,
        operation: Operation,
        response: SignedEnvelope,
    ) -> Operation:
        """Step 3: the License Server verifies and installs the vendor's answer; then
        the answer and the outcome are journaled together."""
        async with self.journal.noting_errors(operation):
            installed = await exchange.install(server, operation, response)
        return await self.installed(exchange, operation, response, installed)

    async def installed(
        self,
        exchange: Exchange,
        operation: Operation,
        response: SignedEnvelope,
        installed: Installed,
    ) -> Operation:
        """Journal an answer the License Server has verified and installed, with what
        installing it did."""
        exchange.reach(operation, "after_install")
        envelope = response.SerializeToString()
        if installed.refusal is not None:
            return await self.journal.refuse(
                operation, installed.refusal, result=installed.result, response_envelope=envelope
            )
        return await self.journal.complete(
            operation, result=installed.result, response_envelope=envelope
        )
