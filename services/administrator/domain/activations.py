"""Activation: seats of an entitlement line onto a License Server, exactly once.

Also the local license of a client host, which the Administrator only carries to the
vendor and back: the client's own local license store signed the request and installs
the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from services.administrator.domain import inputs
from services.administrator.domain.errors import OperationIdReused
from services.administrator.domain.exchange import (
    Exchange,
    ExchangeRunner,
    Installed,
    Prepared,
)
from services.administrator.domain.journal import OperationJournal
from services.administrator.domain.model import (
    Intent,
    Operation,
    OperationKind,
    OperationState,
)
from services.administrator.domain.ports import LicenseServer
from tessera.activation.v1.activation_pb2 import HostActivationRequest, VendorActivationResponse
from tessera.activation.v1.activation_pb2 import Registration as RegistrationProto
from tessera.clock import Clock
from tessera.common.v1.common_pb2 import LicenseCertificate, LicenseKind, SignedEnvelope
from tessera.errors import InvalidInput
from tessera.license.v1.license_pb2 import InstallActivationResponse, InstalledCertificate


class ActivationExchange(Exchange):
    kind = OperationKind.ACTIVATE
    request_type = HostActivationRequest
    response_type = VendorActivationResponse

    async def prepare(self, server: LicenseServer, intent: Intent, request_id: str) -> Prepared:
        prepared = await server.prepare_activation(intent.activation_id, intent.count, request_id)
        return Prepared(prepared.request_id, prepared.request)

    async def ask_vendor(
        self, request: SignedEnvelope, registration: RegistrationProto
    ) -> SignedEnvelope:
        return await self.activation_server.activate(request, registration)

    async def install(
        self, server: LicenseServer, operation: Operation, response: SignedEnvelope
    ) -> Installed:
        installed = await server.install_activation(response)
        return Installed(installed.SerializeToString())


def installed_certificate(result: bytes | None, response: bytes | None) -> InstalledCertificate:
    """The certificate a completed activation installed, as the License Server said."""
    if result is not None:
        return InstallActivationResponse.FromString(result).certificate
    # Journaled before install results were kept: the certificate inside the answer.
    assert response is not None
    answer = VendorActivationResponse.FromString(SignedEnvelope.FromString(response).payload)
    return InstalledCertificate(
        certificate=LicenseCertificate.FromString(answer.certificate.payload)
    )


@dataclass(frozen=True)
class Activated:
    operation: Operation
    certificate: InstalledCertificate


class Activations:
    """Activate onto a License Server, or carry a client's local license request."""

    def __init__(
        self,
        journal: OperationJournal,
        runner: ExchangeRunner,
        exchange: ActivationExchange,
        clock: Clock,
    ) -> None:
        self.journal = journal
        self.runner = runner
        self.exchange = exchange
        self.clock = clock

    async def activate(
        self, license_server: str, activation_id: str, count: int, operation_id: str
    ) -> Activated:
        """Activate ``count`` seats of a line onto a License Server, exactly once."""
        intent = Intent(
            kind=OperationKind.ACTIVATE,
            license_server=inputs.license_server(license_server),
            activation_id=inputs.activation_id(activation_id),
            count=inputs.seats(count),
        )
        operation_id = inputs.operation_id(operation_id)
        operation = await self.runner.run(self.exchange, intent, operation_id)
        return Activated(
            operation, installed_certificate(operation.result, operation.response_envelope)
        )

    async def resume(self, operation_id: str) -> Operation:
        return await self.runner.resume(self.exchange, operation_id)

    async def activate_local(
        self, local_request: SignedEnvelope
    ) -> tuple[Operation, SignedEnvelope]:
        """Take a client host's signed request for a local license to the vendor and bring
        back the signed answer (the operation is journaled under the client's request
        id; the answer is not)."""
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
        if not inputs.OPERATION_ID.match(request.request_id):
            raise InvalidInput("local_request.request_id", "1-128 letters, digits or ._:-")
        activation_id = inputs.activation_id(request.activation_id)
        operation_id = f"local:{request.host_id}:{request.request_id}"[:128]
        raw = local_request.SerializeToString()
        async with self.journal.exclusive(operation_id):
            operation = await self.journal.find(operation_id)
            if operation is None:
                now = self.clock.now()
                operation = await self.journal.start(
                    Operation(
                        operation_id=operation_id,
                        kind=OperationKind.ACTIVATE_LOCAL,
                        state=OperationState.PREPARED,
                        license_server="",
                        host_id=request.host_id[:32],
                        activation_id=activation_id,
                        count=request.count,
                        request_id=request.request_id,
                        request_envelope=raw,
                        response_envelope=None,
                        created_at=now,
                        updated_at=now,
                    )
                )
            if operation.request_envelope != raw:
                raise OperationIdReused(
                    f"request {request.request_id!r} of host {request.host_id} was already "
                    "brought with other content",
                    metadata={"operation_id": operation_id},
                )
            return await self._complete_local(operation)

    async def resume_local(self, operation_id: str) -> Operation:
        async with self.journal.exclusive(operation_id):
            operation, _ = await self._complete_local(await self.journal.get(operation_id))
            return operation

    async def _complete_local(self, operation: Operation) -> tuple[Operation, SignedEnvelope]:
        """The vendor's answer, carried to the client's local license store, which is
        what verifies and installs it. Carried, not kept: the Administrator holds no
        vendor keys to tell a forged answer from the vendor's, so each call asks the
        vendor, which gives the same answer to the same request."""
        operation = self.runner.outcome(self.exchange, operation)
        response = await self.runner.ask_vendor(self.exchange, operation)
        if not operation.state.finished:
            operation = await self.journal.complete(operation)
        return operation, response
