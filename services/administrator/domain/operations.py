"""Activation as a journaled operation: prepare -> vendor decision -> install.

Every step is idempotent on its peer (the License Server prepares and installs by
request id, the Activation Server answers by request id), and the journal records how
far an operation got. Calling ``activate`` again with the same operation id therefore
resumes where it stopped and completes it exactly once, whichever service died.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, replace

from google.protobuf.message import DecodeError

from services.administrator.domain.errors import OperationHostChanged, OperationIdReused
from services.administrator.domain.model import Operation, OperationState
from services.administrator.peers import ActivationServerClient, LicenseServerClient
from services.administrator.store.repository import DuplicateOperation, Journal
from tessera.activation.v1 import activation_pb2 as activation_pb
from tessera.activation.v1.activation_pb2 import HostActivationRequest, VendorActivationResponse
from tessera.address import parse_address
from tessera.clock import Clock
from tessera.common.v1.common_pb2 import LicenseCertificate, LicenseKind, SignedEnvelope
from tessera.errors import InvalidInput
from tessera.ids import ACTIVATION_PREFIX, ENTITLEMENT_PREFIX, parse_id
from tessera.license.v1 import license_pb2 as license_pb

OPERATION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_COUNT = 100_000


@dataclass(frozen=True)
class Completed:
    operation: Operation
    certificate: LicenseCertificate


@dataclass(frozen=True)
class LicenseOverview:
    host_id: str
    features: list[license_pb.FeatureInformation]
    certificates: list[license_pb.InstalledCertificate]


class Operations:
    """Brokers activation between License Servers and the Activation Server."""

    def __init__(
        self, journal: Journal, activation_server: ActivationServerClient, clock: Clock
    ) -> None:
        self.journal = journal
        self.activation_server = activation_server
        self.clock = clock

    async def get_order(self, entitlement_id: str) -> activation_pb.Entitlement:
        entitlement_id = parse_id(ENTITLEMENT_PREFIX, entitlement_id, "entitlement_id")
        return await self.activation_server.get_order(entitlement_id)

    async def activate(
        self, license_server: str, activation_id: str, count: int, operation_id: str
    ) -> Completed:
        """Activate ``count`` seats of a line onto a License Server, exactly once."""
        parse_address(license_server)  # a typo fails here, before any network call
        activation_id = parse_id(ACTIVATION_PREFIX, activation_id, "activation_id")
        if not 1 <= count <= MAX_COUNT:
            raise InvalidInput("count", f"must be between 1 and {MAX_COUNT}, not {count}")
        if operation_id and not OPERATION_ID.match(operation_id):
            raise InvalidInput("operation_id", "1-128 letters, digits or ._:-")
        operation_id = operation_id or str(uuid.uuid4())

        async with self.journal.transaction() as repo:
            operation = await repo.get(operation_id)
        if operation is not None and (
            operation.activation_id,
            operation.count,
            operation.license_server,
        ) != (activation_id, count, license_server):
            raise OperationIdReused(
                f"operation {operation_id!r} was started with other parameters",
                metadata={"operation_id": operation_id},
            )
        if operation is not None and operation.state is OperationState.COMPLETED:
            return Completed(operation, _certificate_of(operation))

        server = await LicenseServerClient.connect(license_server)
        try:
            if operation is None:
                operation = await self._prepare(
                    server, license_server, activation_id, count, operation_id
                )
            if operation.host_id != server.host_id:
                raise OperationHostChanged(
                    f"operation {operation_id} was prepared on host {operation.host_id}, but "
                    f"{license_server} is now host {server.host_id}"
                )
            if operation.state is OperationState.PREPARED:
                operation = await self._ask_vendor(operation)
            return await self._install(server, operation)
        finally:
            await server.close()

    async def activate_local(
        self, local_request: SignedEnvelope
    ) -> tuple[Operation, SignedEnvelope]:
        """Take a client host's signed request for a local license to the vendor and bring
        back the signed answer (journaled under the client's request id)."""
        request = HostActivationRequest()
        try:
            request.ParseFromString(local_request.payload)
        except DecodeError as error:
            raise InvalidInput("local_request", "is not a signed activation request") from error
        if (
            local_request.payload_type != HostActivationRequest.DESCRIPTOR.full_name
            or request.kind != LicenseKind.LICENSE_KIND_LOCAL
        ):
            raise InvalidInput(
                "local_request", "must be a client host's request for a local license"
            )
        if not OPERATION_ID.match(request.request_id):
            raise InvalidInput("local_request.request_id", "1-128 letters, digits or ._:-")
        activation_id = parse_id(ACTIVATION_PREFIX, request.activation_id, "activation_id")
        operation_id = f"local:{request.host_id}:{request.request_id}"[:128]
        async with self.journal.transaction() as repo:
            operation = await repo.get(operation_id)
        if operation is None:
            now = self.clock.now()
            operation = Operation(
                operation_id=operation_id,
                kind="activate-local",
                state=OperationState.PREPARED,
                license_server="",
                host_id=request.host_id[:32],
                activation_id=activation_id,
                count=request.count,
                request_id=request.request_id,
                request_envelope=local_request.SerializeToString(),
                response_envelope=None,
                created_at=now,
                updated_at=now,
            )
            try:
                async with self.journal.transaction() as repo:
                    await repo.insert(operation)
            except DuplicateOperation:
                async with self.journal.transaction() as repo:
                    operation = await repo.get(operation_id)
                assert operation is not None
        if operation.request_envelope != local_request.SerializeToString():
            raise OperationIdReused(
                f"request {request.request_id!r} of host {request.host_id} was already "
                "brought with other content"
            )
        if operation.state is OperationState.PREPARED:
            operation = await self._ask_vendor(operation)
        if operation.state is OperationState.ANSWERED:
            now = self.clock.now()
            async with self.journal.transaction() as repo:
                await repo.advance(operation.operation_id, OperationState.COMPLETED, now)
            operation = replace(operation, state=OperationState.COMPLETED, updated_at=now)
        assert operation.response_envelope is not None
        return operation, SignedEnvelope.FromString(operation.response_envelope)

    async def list_licenses(self, license_server: str) -> LicenseOverview:
        server = await LicenseServerClient.connect(license_server)
        try:
            certificates = await server.call(
                lambda: server.trusted_storage.ListCertificates(
                    license_pb.ListCertificatesRequest()
                )
            )
            information = await server.call(
                lambda: server.leases.GetLicenseInformation(
                    license_pb.GetLicenseInformationRequest()
                )
            )
        finally:
            await server.close()
        return LicenseOverview(
            server.host_id, list(information.features), list(certificates.certificates)
        )

    async def _prepare(
        self,
        server: LicenseServerClient,
        license_server: str,
        activation_id: str,
        count: int,
        operation_id: str,
    ) -> Operation:
        # The operation id is the request id, so preparing again after a crash returns
        # the very same signed request.
        prepared = await server.call(
            lambda: server.trusted_storage.PrepareActivation(
                license_pb.PrepareActivationRequest(
                    activation_id=activation_id, count=count, request_id=operation_id
                )
            )
        )
        now = self.clock.now()
        operation = Operation(
            operation_id=operation_id,
            kind="activate",
            state=OperationState.PREPARED,
            license_server=license_server,
            host_id=server.host_id,
            activation_id=activation_id,
            count=count,
            request_id=prepared.request_id,
            request_envelope=prepared.request.SerializeToString(),
            response_envelope=None,
            created_at=now,
            updated_at=now,
        )
        try:
            async with self.journal.transaction() as repo:
                await repo.insert(operation)
        except DuplicateOperation:
            # A concurrent call with the same operation id journaled it first.
            async with self.journal.transaction() as repo:
                existing = await repo.get(operation_id)
            assert existing is not None
            return existing
        return operation

    async def _ask_vendor(self, operation: Operation) -> Operation:
        response = await self.activation_server.activate(
            SignedEnvelope.FromString(operation.request_envelope)
        )
        now = self.clock.now()
        raw = response.SerializeToString()
        async with self.journal.transaction() as repo:
            await repo.advance(operation.operation_id, OperationState.ANSWERED, now, raw)
        return replace(
            operation, state=OperationState.ANSWERED, response_envelope=raw, updated_at=now
        )

    async def _install(self, server: LicenseServerClient, operation: Operation) -> Completed:
        assert operation.response_envelope is not None
        response = SignedEnvelope.FromString(operation.response_envelope)
        installed = await server.call(
            lambda: server.trusted_storage.InstallActivation(
                license_pb.InstallActivationRequest(response=response)
            )
        )
        now = self.clock.now()
        async with self.journal.transaction() as repo:
            await repo.advance(operation.operation_id, OperationState.COMPLETED, now)
        done = replace(operation, state=OperationState.COMPLETED, updated_at=now)
        return Completed(done, installed.certificate.certificate)


def _certificate_of(operation: Operation) -> LicenseCertificate:
    """The certificate inside a completed operation's vendor answer (for display)."""
    assert operation.response_envelope is not None
    envelope = SignedEnvelope.FromString(operation.response_envelope)
    response = VendorActivationResponse.FromString(envelope.payload)
    return LicenseCertificate.FromString(response.certificate.payload)
