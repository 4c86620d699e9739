"""Return: a certificate's seats (or some of them, where the line allows) go back to the
vendor, to be activated again elsewhere.

The License Server withholds the seats when it signs the request, so they stop serving
before the vendor credits them. The vendor answers with a signed receipt either way: a
credited receipt removes the seats for good, a refused one (e.g. RETURN_LIMIT_REACHED)
lets them serve again. A refused receipt is therefore installed like a credited one, and
only then is the refusal told to the operator.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.administrator.domain import inputs
from services.administrator.domain.errors import ReturnLimitReached, ReturnRefused
from services.administrator.domain.exchange import (
    Exchange,
    ExchangeRunner,
    Installed,
    Prepared,
)
from services.administrator.domain.model import Intent, Operation, OperationKind
from services.administrator.domain.ports import LicenseServer
from tessera.activation.v1.activation_pb2 import HostReturnRequest, VendorReturnReceipt
from tessera.activation.v1.activation_pb2 import Registration as RegistrationProto
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.errors import DomainError
from tessera.license.v1.license_pb2 import CompleteReturnResponse, InstalledCertificate


def refusal_in(receipt: SignedEnvelope, operation: Operation) -> ReturnRefused:
    """The refusal a vendor's refused receipt carries, in the vendor's own words."""
    document = VendorReturnReceipt.FromString(receipt.payload)
    reason = document.refusal_reason or ReturnRefused.reason
    message = (
        document.refusal_message
        or f"the vendor refused to take back certificate {operation.certificate_id}"
    )
    metadata = {
        "peer": "Activation Server",
        "operation_id": operation.operation_id,
        "certificate_id": operation.certificate_id,
    }
    if reason == ReturnLimitReached.reason:
        return ReturnLimitReached(reason, message, metadata)
    return ReturnRefused(reason, message, metadata)


class ReturnExchange(Exchange):
    kind = OperationKind.RETURN
    request_type = HostReturnRequest
    response_type = VendorReturnReceipt
    # A vendor error (not a signed receipt) leaves the seats withheld: not finished.
    refusal_is_final = False

    async def prepare(self, server: LicenseServer, intent: Intent, request_id: str) -> Prepared:
        prepared = await server.prepare_return(
            intent.certificate_id, intent.count, request_id, intent.force
        )
        return Prepared(prepared.request_id, prepared.request, prepared.revoked_leases)

    async def ask_vendor(
        self, request: SignedEnvelope, registration: RegistrationProto
    ) -> SignedEnvelope:
        return await self.activation_server.return_seats(request)

    async def install(
        self, server: LicenseServer, operation: Operation, response: SignedEnvelope
    ) -> Installed:
        completed = await server.complete_return(response)
        refusal = None if completed.credited else refusal_in(response, operation)
        return Installed(completed.SerializeToString(), refusal)

    def refusal(self, operation: Operation) -> DomainError:
        if operation.response_envelope is None:
            return super().refusal(operation)
        return refusal_in(SignedEnvelope.FromString(operation.response_envelope), operation)


@dataclass(frozen=True)
class Returned:
    operation: Operation
    # After a partial return: the re-issued certificate for the seats kept.
    remaining: InstalledCertificate | None
    revoked_leases: int


def remaining_certificate(result: bytes | None) -> InstalledCertificate | None:
    if result is None:
        return None
    completed = CompleteReturnResponse.FromString(result)
    return completed.remaining if completed.HasField("remaining") else None


class Returns:
    """Return seats from a License Server to the vendor."""

    def __init__(self, runner: ExchangeRunner, exchange: ReturnExchange) -> None:
        self.runner = runner
        self.exchange = exchange

    async def return_seats(
        self, license_server: str, certificate_id: str, count: int, force: bool, operation_id: str
    ) -> Returned:
        """Return ``count`` seats (0: all) of a certificate, exactly once; raises the
        vendor's refusal after the withheld seats serve again."""
        intent = Intent(
            kind=OperationKind.RETURN,
            license_server=inputs.license_server(license_server),
            certificate_id=inputs.certificate_id(certificate_id),
            count=inputs.seats_to_return(count),
            force=force,
        )
        operation_id = inputs.operation_id(operation_id)
        operation = await self.runner.run(self.exchange, intent, operation_id)
        return Returned(
            operation, remaining_certificate(operation.result), operation.revoked_leases
        )

    async def resume(self, operation_id: str) -> Operation:
        return await self.runner.resume(self.exchange, operation_id)
