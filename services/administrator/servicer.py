"""Proto <-> domain translation for the Administrator; no rules and no SQL here."""

from __future__ import annotations

from typing import Any

import grpc

from services.administrator.domain import inputs
from services.administrator.domain.model import (
    Operation,
    OperationKind,
    OperationState,
)
from services.administrator.domain.operations import Operations
from services.administrator.domain.registration import registration_to_proto
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc as pb_grpc
from tessera.clock import to_timestamp
from tessera.errors import InvalidInput

Context = grpc.aio.ServicerContext[Any, Any]

_STATE_TO_PROTO = {
    OperationState.PREPARED: pb.OPERATION_STATE_PREPARED,
    OperationState.ANSWERED: pb.OPERATION_STATE_ANSWERED,
    OperationState.COMPLETED: pb.OPERATION_STATE_COMPLETED,
    OperationState.REFUSED: pb.OPERATION_STATE_REFUSED,
}
_KIND_TO_PROTO = {
    OperationKind.ACTIVATE: pb.OPERATION_KIND_ACTIVATE,
    OperationKind.ACTIVATE_LOCAL: pb.OPERATION_KIND_ACTIVATE_LOCAL,
    OperationKind.RETURN: pb.OPERATION_KIND_RETURN,
    OperationKind.REPAIR: pb.OPERATION_KIND_REPAIR,
    OperationKind.MOVE: pb.OPERATION_KIND_MOVE,
}


def operation_to_proto(operation: Operation) -> pb.Operation:
    return pb.Operation(
        operation_id=operation.operation_id,
        state=_STATE_TO_PROTO[operation.state],
        license_server=operation.license_server,
        host_id=operation.host_id,
        activation_id=operation.activation_id,
        count=operation.count,
        request_id=operation.request_id,
        created_at=to_timestamp(operation.created_at),
        updated_at=to_timestamp(operation.updated_at),
        kind=_KIND_TO_PROTO[operation.kind],
        certificate_id=operation.certificate_id,
        offline=operation.offline,
        target_license_server=operation.target_license_server,
        target_host_id=operation.target_host_id,
        last_error=operation.last_error,
    )


class AdministratorServicer(pb_grpc.AdministratorServiceServicer):
    """tessera.admin.v1.AdministratorService."""

    def __init__(self, operations: Operations) -> None:
        self.operations = operations

    async def GetOrder(self, request: pb.GetOrderRequest, context: Context) -> pb.GetOrderResponse:
        entitlement = await self.operations.overview.get_order(request.entitlement_id)
        return pb.GetOrderResponse(entitlement=entitlement)

    async def Activate(self, request: pb.ActivateRequest, context: Context) -> pb.ActivateResponse:
        if request.HasField("local_request"):
            if request.license_server or request.activation_id or request.count:
                raise InvalidInput(
                    "local_request", "set either local_request or license_server, not both"
                )
            operation, response = await self.operations.activations.activate_local(
                request.local_request
            )
            return pb.ActivateResponse(
                operation=operation_to_proto(operation), local_response=response
            )
        activated = await self.operations.activations.activate(
            request.license_server, request.activation_id, request.count, request.operation_id
        )
        return pb.ActivateResponse(
            operation=operation_to_proto(activated.operation), certificate=activated.certificate
        )

    async def ListLicenses(
        self, request: pb.ListLicensesRequest, context: Context
    ) -> pb.ListLicensesResponse:
        overview = await self.operations.overview.list_licenses(request.license_server)
        return pb.ListLicensesResponse(
            host_id=overview.host_id,
            features=overview.features,
            certificates=overview.certificates,
        )

    async def Return(self, request: pb.ReturnRequest, context: Context) -> pb.ReturnResponse:
        returned = await self.operations.returns.return_seats(
            request.license_server,
            request.certificate_id,
            request.count,
            request.force,
            request.operation_id,
        )
        return pb.ReturnResponse(
            operation=operation_to_proto(returned.operation),
            remaining=returned.remaining,
            revoked_leases=returned.revoked_leases,
        )

    async def Repair(self, request: pb.RepairRequest, context: Context) -> pb.RepairResponse:
        repaired = await self.operations.repairs.repair(
            request.license_server, request.operation_id, request.force
        )
        return pb.RepairResponse(
            operation=operation_to_proto(repaired.operation), health=repaired.health
        )

    async def Move(self, request: pb.MoveRequest, context: Context) -> pb.MoveResponse:
        moved = await self.operations.moves.move(
            request.from_license_server,
            request.to_license_server,
            request.certificate_id,
            request.force,
            request.operation_id,
        )
        return pb.MoveResponse(
            operation=operation_to_proto(moved.operation), certificate=moved.certificate
        )

    async def ListOperations(
        self, request: pb.ListOperationsRequest, context: Context
    ) -> pb.ListOperationsResponse:
        operations = await self.operations.journal.list_operations(
            request.page_size, request.unfinished_only
        )
        return pb.ListOperationsResponse(
            operations=[operation_to_proto(operation) for operation in operations]
        )

    async def GetOperation(
        self, request: pb.GetOperationRequest, context: Context
    ) -> pb.GetOperationResponse:
        operation = await self.operations.journal.lookup(
            inputs.existing_operation_id(request.operation_id)
        )
        return pb.GetOperationResponse(operation=operation_to_proto(operation))

    async def ExportRequest(
        self, request: pb.ExportRequestRequest, context: Context
    ) -> pb.ExportRequestResponse:
        exported = await self.operations.offline.export_request(
            request.kind,
            request.license_server,
            request.activation_id,
            request.count,
            request.certificate_id,
            request.force,
            request.operation_id,
        )
        return pb.ExportRequestResponse(
            operation=operation_to_proto(exported.operation),
            request_file=exported.request_file,
            file_name=exported.file_name,
        )

    async def SubmitRequest(
        self, request: pb.SubmitRequestRequest, context: Context
    ) -> pb.SubmitRequestResponse:
        submitted = await self.operations.offline.submit_request(request.request_file)
        return pb.SubmitRequestResponse(
            response_file=submitted.response_file, file_name=submitted.file_name
        )

    async def ImportResponse(
        self, request: pb.ImportResponseRequest, context: Context
    ) -> pb.ImportResponseResponse:
        operation = await self.operations.offline.import_response(
            request.license_server, request.response_file
        )
        return pb.ImportResponseResponse(operation=operation_to_proto(operation))

    async def CheckIn(self, request: pb.CheckInRequest, context: Context) -> pb.CheckInResponse:
        checked = await self.operations.check_ins.check_in(request.license_server)
        return pb.CheckInResponse(host_id=checked.host_id, status=checked.status)

    async def SetRegistration(
        self, request: pb.SetRegistrationRequest, context: Context
    ) -> pb.SetRegistrationResponse:
        stored = await self.operations.registrations.set(request.registration)
        return pb.SetRegistrationResponse(registration=registration_to_proto(stored))

    async def GetRegistration(
        self, request: pb.GetRegistrationRequest, context: Context
    ) -> pb.GetRegistrationResponse:
        stored = await self.operations.registrations.get()
        return pb.GetRegistrationResponse(registration=registration_to_proto(stored))
