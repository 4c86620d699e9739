"""Proto <-> domain translation for the Administrator; no rules and no SQL here."""

from __future__ import annotations

from typing import Any

import grpc

from services.administrator.domain.model import Operation, OperationState
from services.administrator.domain.operations import Operations
from services.administrator.errors import ERRORS
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc as pb_grpc
from tessera.clock import to_timestamp
from tessera.errors import InvalidInput
from tessera.license.v1 import license_pb2 as license_pb

Context = grpc.aio.ServicerContext[Any, Any]

_STATE_TO_PROTO = {
    OperationState.PREPARED: pb.OPERATION_STATE_PREPARED,
    OperationState.ANSWERED: pb.OPERATION_STATE_ANSWERED,
    OperationState.COMPLETED: pb.OPERATION_STATE_COMPLETED,
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
    )


class AdministratorServicer(pb_grpc.AdministratorServiceServicer):
    """tessera.admin.v1.AdministratorService."""

    def __init__(self, operations: Operations) -> None:
        self.operations = operations

    @ERRORS.unary
    async def GetOrder(self, request: pb.GetOrderRequest, context: Context) -> pb.GetOrderResponse:
        entitlement = await self.operations.get_order(request.entitlement_id)
        return pb.GetOrderResponse(entitlement=entitlement)

    @ERRORS.unary
    async def Activate(self, request: pb.ActivateRequest, context: Context) -> pb.ActivateResponse:
        if request.HasField("local_request"):
            if request.license_server or request.activation_id or request.count:
                raise InvalidInput(
                    "local_request", "set either local_request or license_server, not both"
                )
            operation, response = await self.operations.activate_local(request.local_request)
            return pb.ActivateResponse(
                operation=operation_to_proto(operation), local_response=response
            )
        completed = await self.operations.activate(
            request.license_server, request.activation_id, request.count, request.operation_id
        )
        return pb.ActivateResponse(
            operation=operation_to_proto(completed.operation),
            certificate=license_pb.InstalledCertificate(certificate=completed.certificate),
        )

    @ERRORS.unary
    async def ListLicenses(
        self, request: pb.ListLicensesRequest, context: Context
    ) -> pb.ListLicensesResponse:
        overview = await self.operations.list_licenses(request.license_server)
        return pb.ListLicensesResponse(
            host_id=overview.host_id,
            features=overview.features,
            certificates=overview.certificates,
        )
