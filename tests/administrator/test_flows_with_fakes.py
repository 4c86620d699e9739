"""The Administrator's flows over in-memory fakes of their ports (domain/ports.py): no
Activation Server, no License Server, no database. What each step journals, in order,
and that an operation run again with its id completes exactly once."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace

import pytest
from google.protobuf.message import Message

from services.administrator.domain.errors import ReturnRefused
from services.administrator.domain.model import (
    Operation,
    OperationState,
    OperationUpdate,
    Registration,
)
from services.administrator.domain.operations import Operations
from services.administrator.domain.ports import ACTIVATION_SERVER, DuplicateOperation
from services.administrator.server import wire_operations
from tessera.activation.v1 import activation_pb2 as apb
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.errors import PeerUnavailable
from tessera.ids import ACTIVATION_PREFIX, new_id
from tessera.license.v1 import license_pb2 as lpb
from tests.support.clock import FakeClock

PREPARED, ANSWERED = OperationState.PREPARED, OperationState.ANSWERED
COMPLETED, REFUSED = OperationState.COMPLETED, OperationState.REFUSED
PLANNED = OperationState.PLANNED
ADDRESS, OTHER_ADDRESS = "27000@es-host", "27000@new-host"


class FakeJournal:
    """The journal in memory (JournalStore and JournalQueries), keeping every write."""

    def __init__(self) -> None:
        self.rows: dict[str, Operation] = {}
        self.registration: Registration | None = None
        # (operation id, state written), in order.
        self.writes: list[tuple[str, OperationState]] = []

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[FakeJournal]:
        rows, writes = dict(self.rows), list(self.writes)
        try:
            yield self
        except BaseException:
            self.rows, self.writes = rows, writes
            raise

    def transaction(self) -> AbstractAsyncContextManager[FakeJournal]:
        return self._transaction()

    def states(self, operation_id: str) -> list[OperationState]:
        return [state for written, state in self.writes if written == operation_id]

    async def get(self, operation_id: str) -> Operation | None:
        return self.rows.get(operation_id)

    async def insert(self, operation: Operation) -> None:
        if operation.operation_id in self.rows:
            raise DuplicateOperation(operation.operation_id)
        self.rows[operation.operation_id] = operation
        self.writes.append((operation.operation_id, operation.state))

    async def advance(
        self, operation_id: str, from_states: Collection[OperationState], step: OperationUpdate
    ) -> bool:
        operation = self.rows.get(operation_id)
        if operation is None or operation.state not in from_states:
            return False
        self.rows[operation_id] = step.applied_to(operation)
        self.writes.append((operation_id, step.state))
        return True

    async def record_error(
        self, operation_id: str, last_error: str, code: str, at: dt.datetime
    ) -> None:
        operation = self.rows.get(operation_id)
        if operation is not None and not operation.state.finished:
            self.rows[operation_id] = replace(
                operation, last_error=last_error, last_error_code=code, updated_at=at
            )

    def _top_level(self) -> list[Operation]:
        return [o for o in self.rows.values() if not o.parent_operation_id]

    async def list_operations(self, limit: int, unfinished_only: bool) -> list[Operation]:
        listed = [o for o in self._top_level() if not (unfinished_only and o.state.finished)]
        return sorted(listed, key=lambda o: (o.created_at, o.operation_id), reverse=True)[:limit]

    async def license_server_addresses(self) -> list[str]:
        return sorted({o.license_server for o in self.rows.values() if o.license_server})

    async def unfinished_online(self) -> list[Operation]:
        return [o for o in self._top_level() if not o.state.finished and not o.offline]

    async def get_registration(self) -> Registration | None:
        return self.registration

    async def put_registration(self, details: Registration, at: dt.datetime) -> None:
        self.registration = details


def signed(message: Message) -> SignedEnvelope:
    """An envelope as a peer signs it (the fakes check no signatures)."""
    return SignedEnvelope(
        payload=message.SerializeToString(),
        payload_type=message.DESCRIPTOR.full_name,
        key_id="fake",
        signature=b"fake",
    )


@dataclass
class FakeLicenseServer:
    """A License Server: prepares by request id, installs an answer once."""

    address: str
    host_id: str
    certificates: dict[str, LicenseCertificate] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    async def list_certificates(self) -> list[lpb.InstalledCertificate]:
        return [lpb.InstalledCertificate(certificate=c) for c in self.certificates.values()]

    async def license_information(self) -> list[lpb.FeatureInformation]:
        return []

    async def prepare_activation(
        self, activation_id: str, count: int, request_id: str
    ) -> lpb.PrepareActivationResponse:
        self.calls.append(f"prepare_activation {request_id}")
        request = apb.HostActivationRequest(
            request_id=request_id, activation_id=activation_id, count=count, host_id=self.host_id
        )
        return lpb.PrepareActivationResponse(request_id=request_id, request=signed(request))

    async def install_activation(self, response: SignedEnvelope) -> lpb.InstallActivationResponse:
        answer = apb.VendorActivationResponse.FromString(response.payload)
        self.calls.append(f"install_activation {answer.request_id}")
        certificate = LicenseCertificate.FromString(answer.certificate.payload)
        installed = certificate.certificate_id in self.certificates
        self.certificates[certificate.certificate_id] = certificate
        return lpb.InstallActivationResponse(
            certificate=lpb.InstalledCertificate(certificate=certificate),
            already_installed=installed,
        )

    async def prepare_return(
        self, certificate_id: str, count: int, request_id: str, force: bool
    ) -> lpb.PrepareReturnResponse:
        self.calls.append(f"prepare_return {request_id}")
        request = apb.HostReturnRequest(
            request_id=request_id, host_id=self.host_id, certificate_id=certificate_id, count=count
        )
        return lpb.PrepareReturnResponse(request_id=request_id, request=signed(request))

    async def complete_return(self, receipt: SignedEnvelope) -> lpb.CompleteReturnResponse:
        document = apb.VendorReturnReceipt.FromString(receipt.payload)
        self.calls.append(f"complete_return {document.request_id}")
        credited = document.outcome == apb.RETURN_OUTCOME_CREDITED
        if credited:
            self.certificates.pop(document.certificate_id, None)
        return lpb.CompleteReturnResponse(credited=credited, count=document.credited)

    async def prepare_repair(
        self, request_id: str, force: bool = False
    ) -> lpb.PrepareRepairResponse:
        raise NotImplementedError

    async def complete_repair(self, response: SignedEnvelope) -> lpb.CompleteRepairResponse:
        raise NotImplementedError

    async def prepare_check_in(self, only_if_due: bool) -> lpb.PrepareCheckInResponse:
        return lpb.PrepareCheckInResponse()

    async def complete_check_in(self, result: SignedEnvelope) -> lpb.CompleteCheckInResponse:
        raise NotImplementedError

    async def close(self) -> None:
        pass


@dataclass
class FakeLicenseServers:
    """The LicenseServerDirectory: each address answers with its fake."""

    servers: dict[str, FakeLicenseServer]

    async def connect(self, address: str) -> FakeLicenseServer:
        return self.servers[address]

    def connected(self, address: str) -> AbstractAsyncContextManager[FakeLicenseServer]:
        @asynccontextmanager
        async def block() -> AsyncIterator[FakeLicenseServer]:
            yield self.servers[address]

        return block()


@dataclass
class FakeVendor:
    """The Activation Server: the same request id always gets the same answer."""

    # Calls to fail as unreachable before answering.
    unreachable: int = 0
    refuse_returns: bool = False
    calls: list[str] = field(default_factory=list)

    def _reached(self, what: str) -> None:
        self.calls.append(what)
        if self.unreachable:
            self.unreachable -= 1
            raise PeerUnavailable(ACTIVATION_SERVER, "vendor:443", "connection refused")

    async def get_order(self, entitlement_id: str) -> apb.Entitlement:
        return apb.Entitlement(entitlement_id=entitlement_id)

    async def activate(
        self, request: SignedEnvelope, registration: apb.Registration
    ) -> SignedEnvelope:
        asked = apb.HostActivationRequest.FromString(request.payload)
        self._reached(f"activate {asked.request_id}")
        certificate = LicenseCertificate(
            certificate_id=f"C-{asked.request_id}",
            activation_id=asked.activation_id,
            feature="client.station",
            count=asked.count,
            host_id=asked.host_id,
            request_id=asked.request_id,
        )
        answer = apb.VendorActivationResponse(
            request_id=asked.request_id, host_id=asked.host_id, certificate=signed(certificate)
        )
        return signed(answer)

    async def return_seats(self, request: SignedEnvelope) -> SignedEnvelope:
        asked = apb.HostReturnRequest.FromString(request.payload)
        self._reached(f"return {asked.request_id}")
        receipt = apb.VendorReturnReceipt(
            request_id=asked.request_id, host_id=asked.host_id, certificate_id=asked.certificate_id
        )
        if self.refuse_returns:
            receipt.outcome = apb.RETURN_OUTCOME_REFUSED
            receipt.refusal_reason = "RETURN_LIMIT_REACHED"
            receipt.refusal_message = "returned too often"
        else:
            receipt.outcome = apb.RETURN_OUTCOME_CREDITED
            receipt.credited = 3
        return signed(receipt)

    async def repair(self, request: SignedEnvelope) -> SignedEnvelope:
        raise NotImplementedError

    async def check_in(self, request: SignedEnvelope) -> SignedEnvelope:
        raise NotImplementedError


@dataclass
class Fakes:
    journal: FakeJournal
    vendor: FakeVendor
    here: FakeLicenseServer
    there: FakeLicenseServer
    operations: Operations


@pytest.fixture
def fakes(clock: FakeClock) -> Fakes:
    journal, vendor = FakeJournal(), FakeVendor()
    here = FakeLicenseServer(ADDRESS, "HOST-HERE")
    there = FakeLicenseServer(OTHER_ADDRESS, "HOST-THERE")
    servers = FakeLicenseServers({ADDRESS: here, OTHER_ADDRESS: there})
    # The same wiring as the real service, over the fakes.
    operations = wire_operations(journal, vendor, servers, clock)
    return Fakes(journal, vendor, here, there, operations)


ACTIVATION_ID = new_id(ACTIVATION_PREFIX)


async def test_an_activation_is_journaled_step_by_step_and_completes_once(fakes: Fakes) -> None:
    activated = await fakes.operations.activations.activate(ADDRESS, ACTIVATION_ID, 3, "op-1")

    assert activated.operation.state is COMPLETED
    assert activated.certificate.certificate.request_id == "op-1"
    assert fakes.journal.states("op-1") == [PREPARED, COMPLETED]
    assert fakes.here.calls == ["prepare_activation op-1", "install_activation op-1"]

    again = await fakes.operations.activations.activate(ADDRESS, ACTIVATION_ID, 3, "op-1")
    assert again == activated
    # Answered from the journal: nothing journaled, nobody asked again.
    assert fakes.journal.states("op-1") == [PREPARED, COMPLETED]
    assert fakes.vendor.calls == ["activate op-1"]
    assert len(fakes.here.calls) == 2


async def test_an_activation_the_vendor_could_not_answer_completes_on_retry(
    fakes: Fakes,
) -> None:
    fakes.vendor.unreachable = 1
    with pytest.raises(PeerUnavailable):
        await fakes.operations.activations.activate(ADDRESS, ACTIVATION_ID, 2, "op-2")
    waiting = await fakes.operations.journal.get("op-2")
    assert waiting.state is PREPARED
    assert waiting.last_error.startswith("PEER_UNAVAILABLE: ")

    done = await fakes.operations.activations.activate(ADDRESS, ACTIVATION_ID, 2, "op-2")
    assert (done.operation.state, done.operation.last_error) == (COMPLETED, "")
    assert fakes.journal.states("op-2") == [PREPARED, COMPLETED]
    # Prepared once (the journal kept the signed request); the vendor asked twice.
    assert fakes.here.calls == ["prepare_activation op-2", "install_activation op-2"]
    assert fakes.vendor.calls == ["activate op-2", "activate op-2"]


async def test_a_return_completes_once_and_a_refused_one_stays_refused(fakes: Fakes) -> None:
    await fakes.operations.activations.activate(ADDRESS, ACTIVATION_ID, 3, "op-3")
    returned = await fakes.operations.returns.return_seats(ADDRESS, "C-op-3", 0, False, "ret-1")
    assert returned.operation.state is COMPLETED
    assert fakes.journal.states("ret-1") == [PREPARED, COMPLETED]
    assert fakes.here.certificates == {}
    again = await fakes.operations.returns.return_seats(ADDRESS, "C-op-3", 0, False, "ret-1")
    assert again == returned
    assert fakes.vendor.calls.count("return ret-1") == 1

    fakes.vendor.refuse_returns = True
    await fakes.operations.activations.activate(ADDRESS, ACTIVATION_ID, 3, "op-4")
    for _ in range(2):
        with pytest.raises(ReturnRefused) as refusal:
            await fakes.operations.returns.return_seats(ADDRESS, "C-op-4", 0, False, "ret-2")
        assert refusal.value.reason == "RETURN_LIMIT_REACHED"
    assert fakes.journal.states("ret-2") == [PREPARED, REFUSED]
    assert fakes.vendor.calls.count("return ret-2") == 1
    assert fakes.here.calls.count("complete_return ret-2") == 1


async def test_a_move_is_a_return_then_an_activation_under_one_parent(fakes: Fakes) -> None:
    await fakes.operations.activations.activate(ADDRESS, ACTIVATION_ID, 3, "op-5")
    moved = await fakes.operations.moves.move(ADDRESS, OTHER_ADDRESS, "C-op-5", False, "mv")

    assert moved.operation.state is COMPLETED
    assert moved.certificate.certificate.request_id == "mv.activate"
    assert (moved.operation.target_license_server, moved.operation.target_host_id) == (
        OTHER_ADDRESS,
        "HOST-THERE",
    )
    assert fakes.journal.states("mv") == [PREPARED, ANSWERED, COMPLETED]
    assert fakes.journal.states("mv.return") == [PREPARED, COMPLETED]
    assert fakes.journal.states("mv.activate") == [PLANNED, PREPARED, COMPLETED]
    assert fakes.here.certificates == {}
    assert list(fakes.there.certificates) == ["C-mv.activate"]
    # Only the move is the operator's: its halves are steps of it.
    listed = await fakes.operations.journal.list_operations(0, unfinished_only=False)
    assert sorted(o.operation_id for o in listed) == ["mv", "op-5"]

    again = await fakes.operations.moves.move(ADDRESS, OTHER_ADDRESS, "C-op-5", False, "mv")
    assert again == moved
    assert fakes.vendor.calls.count("activate mv.activate") == 1
