"""Repair: after trusted storage broke (copied database, restored backup, clock set back,
changed machine), the vendor re-issues exactly what its records say the host holds.

The request must be signed by the License Server that activated the licenses; the vendor
allows four repairs per host a year (RESOURCE_EXHAUSTED / REPAIR_LIMIT_REACHED) and logs
every one. A refusal is the vendor's decision and ends the operation as REFUSED. The
License Server, which knows whether its trusted storage is broken, refuses to prepare a
repair of healthy storage unless forced (FAILED_PRECONDITION / NOTHING_TO_REPAIR): then
nothing is journaled and nothing reaches the vendor.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.administrator.domain import inputs
from services.administrator.domain.exchange import (
    Exchange,
    ExchangeRunner,
    Installed,
    Prepared,
)
from services.administrator.domain.model import Intent, Operation, OperationKind
from services.administrator.domain.ports import LicenseServer
from tessera.activation.v1.activation_pb2 import HostRepairRequest, VendorRepairResponse
from tessera.activation.v1.activation_pb2 import Registration as RegistrationProto
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.license.v1.license_pb2 import CompleteRepairResponse, TrustHealth


class RepairExchange(Exchange):
    kind = OperationKind.REPAIR
    request_type = HostRepairRequest
    response_type = VendorRepairResponse

    async def prepare(self, server: LicenseServer, intent: Intent, request_id: str) -> Prepared:
        prepared = await server.prepare_repair(request_id, intent.force)
        return Prepared(prepared.request_id, prepared.request)

    async def ask_vendor(
        self, request: SignedEnvelope, registration: RegistrationProto
    ) -> SignedEnvelope:
        return await self.activation_server.repair(request)

    async def install(
        self, server: LicenseServer, operation: Operation, response: SignedEnvelope
    ) -> Installed:
        repaired = await server.complete_repair(response)
        return Installed(repaired.SerializeToString())


@dataclass(frozen=True)
class Repaired:
    operation: Operation
    # Trusted storage right after the repair.
    health: TrustHealth | None


def health_after(result: bytes | None) -> TrustHealth | None:
    if result is None:
        return None
    return CompleteRepairResponse.FromString(result).health


class Repairs:
    """Repair a License Server's trusted storage through the vendor."""

    def __init__(self, runner: ExchangeRunner, exchange: RepairExchange) -> None:
        self.runner = runner
        self.exchange = exchange

    async def repair(self, license_server: str, operation_id: str, force: bool = False) -> Repaired:
        """Repair online; ``force`` repairs healthy trusted storage too (it counts)."""
        intent = Intent(
            kind=OperationKind.REPAIR,
            license_server=inputs.license_server(license_server),
            force=force,
        )
        operation_id = inputs.operation_id(operation_id)
        operation = await self.runner.run(self.exchange, intent, operation_id)
        return Repaired(operation, health_after(operation.result))

    async def resume(self, operation_id: str) -> Operation:
        return await self.runner.resume(self.exchange, operation_id)
