"""Proto <-> domain translation for the Activation Server; no rules and no SQL here."""

from __future__ import annotations

from typing import Any

import grpc

from services.activation_server.domain.activations import Activations
from services.activation_server.domain.entitlements import Entitlements
from services.activation_server.domain.model import (
    ActivationRecord,
    Entitlement,
    LicenseKind,
    NewLine,
)
from services.activation_server.errors import ERRORS
from tessera.activation.v1 import activation_pb2 as pb
from tessera.activation.v1 import activation_pb2_grpc as pb_grpc
from tessera.clock import from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import LicenseKind as LicenseKindProto
from tessera.errors import InvalidInput

Context = grpc.aio.ServicerContext[Any, Any]

_KIND_FROM_PROTO = {
    LicenseKindProto.LICENSE_KIND_NETWORK: LicenseKind.NETWORK,
    LicenseKindProto.LICENSE_KIND_LOCAL: LicenseKind.LOCAL,
}
_KIND_TO_PROTO = {kind: proto for proto, kind in _KIND_FROM_PROTO.items()}


def entitlement_to_proto(entitlement: Entitlement) -> pb.Entitlement:
    return pb.Entitlement(
        entitlement_id=entitlement.entitlement_id,
        customer_organization=entitlement.customer_organization,
        contact=entitlement.contact,
        created_at=to_timestamp(entitlement.created_at),
        lines=[
            pb.EntitlementLine(
                activation_id=line.activation_id,
                feature=line.feature,
                kind=_KIND_TO_PROTO[line.kind],
                count=line.count,
                activated=line.activated,
                available=line.available,
                expires_at=to_timestamp(line.expires_at),
            )
            for line in entitlement.lines
        ],
    )


def activation_to_proto(record: ActivationRecord) -> pb.Activation:
    return pb.Activation(
        request_id=record.request_id,
        entitlement_id=record.entitlement_id,
        activation_id=record.activation_id,
        feature=record.feature,
        count=record.count,
        host_id=record.host_id,
        certificate_id=record.certificate_id,
        activated_at=to_timestamp(record.activated_at),
    )


def new_line_from_proto(index: int, line: pb.NewEntitlementLine) -> NewLine:
    kind = _KIND_FROM_PROTO.get(line.kind)
    if kind is None:
        raise InvalidInput(f"lines[{index}].kind", "must be LICENSE_KIND_NETWORK or _LOCAL")
    if not line.feature:
        raise InvalidInput(f"lines[{index}].feature", "is required")
    expires_at = None
    if line.HasField("expires_at"):
        try:
            expires_at = from_timestamp(line.expires_at)
        except (ValueError, OverflowError) as error:
            raise InvalidInput(f"lines[{index}].expires_at", "is not a valid timestamp") from error
    return NewLine(feature=line.feature, count=line.count, kind=kind, expires_at=expires_at)


class ActivationServicer(pb_grpc.ActivationServiceServicer):
    """tessera.activation.v1.ActivationService."""

    def __init__(self, entitlements: Entitlements, activations: Activations) -> None:
        self.entitlements = entitlements
        self.activations = activations

    @ERRORS.unary
    async def GetOrder(self, request: pb.GetOrderRequest, context: Context) -> pb.GetOrderResponse:
        entitlement = await self.entitlements.get_order(request.entitlement_id)
        return pb.GetOrderResponse(entitlement=entitlement_to_proto(entitlement))

    @ERRORS.unary
    async def Activate(self, request: pb.ActivateRequest, context: Context) -> pb.ActivateResponse:
        if not request.HasField("request"):
            raise InvalidInput("request", "a signed activation request is required")
        response = await self.activations.activate(request.request)
        return pb.ActivateResponse(response=response)


class VendorServicer(pb_grpc.VendorServiceServicer):
    """tessera.activation.v1.VendorService (vendor credential checked by the interceptor)."""

    def __init__(self, entitlements: Entitlements, activations: Activations) -> None:
        self.entitlements = entitlements
        self.activations = activations

    @ERRORS.unary
    async def CreateEntitlement(
        self, request: pb.CreateEntitlementRequest, context: Context
    ) -> pb.CreateEntitlementResponse:
        lines = [new_line_from_proto(index, line) for index, line in enumerate(request.lines)]
        entitlement = await self.entitlements.create(
            request.customer_organization, request.contact, lines
        )
        return pb.CreateEntitlementResponse(entitlement=entitlement_to_proto(entitlement))

    @ERRORS.unary
    async def ListActivations(
        self, request: pb.ListActivationsRequest, context: Context
    ) -> pb.ListActivationsResponse:
        records = await self.activations.list(request.entitlement_id, request.host_id)
        return pb.ListActivationsResponse(
            activations=[activation_to_proto(record) for record in records]
        )
