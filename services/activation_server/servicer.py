"""Proto <-> domain translation for the Activation Server; no rules and no SQL here."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from services.activation_server.domain.activations import Activations
from services.activation_server.domain.audit import AuditLog
from services.activation_server.domain.check_ins import CheckIns
from services.activation_server.domain.entitlements import Entitlements
from services.activation_server.domain.model import (
    ActivationRecord,
    ActivationState,
    AuditEntry,
    CheckInPolicy,
    Entitlement,
    LicenseKind,
    NewLine,
    Registration,
    VendorPublicKey,
)
from services.activation_server.domain.repairs import Repairs
from services.activation_server.domain.returns import Returns
from services.activation_server.domain.vendor_key import VendorKeys
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
_STATE_TO_PROTO = {
    ActivationState.ACTIVE: pb.ACTIVATION_STATE_ACTIVE,
    ActivationState.RETURNED: pb.ACTIVATION_STATE_RETURNED,
    ActivationState.FORCE_RETURNED: pb.ACTIVATION_STATE_FORCE_RETURNED,
}


def _duration(value: dt.timedelta | None) -> Duration | None:
    if value is None:
        return None
    duration = Duration()
    duration.FromTimedelta(value)
    return duration


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
                duration=_duration(line.duration),
                maintenance_ends_at=to_timestamp(line.maintenance_ends_at),
                partial_return_allowed=line.partial_return_allowed,
                check_in_interval=_duration(line.check_in.interval if line.check_in else None),
                check_in_grace=_duration(line.check_in.grace if line.check_in else None),
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
        host_id=record.holder_host_id,
        certificate_id=record.certificate_id,
        activated_at=to_timestamp(record.activated_at),
        state=_STATE_TO_PROTO[record.state],
        revision=record.revision,
        returned_at=to_timestamp(record.returned_at),
        activated_count=record.activated_count,
    )


def vendor_key_to_proto(key: VendorPublicKey) -> pb.VendorPublicKey:
    return pb.VendorPublicKey(
        key_id=key.key_id,
        public_key=key.public_key,
        active=key.active,
        created_at=to_timestamp(key.created_at),
    )


def audit_entry_to_proto(entry: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(
        sequence=entry.sequence,
        at=to_timestamp(entry.at),
        action=entry.action,
        subject=entry.subject,
        actor=entry.actor,
        detail_json=entry.detail,
        previous_hash=entry.previous_hash,
        hash=entry.hash,
    )


def _time(field: str, stamp: Timestamp) -> dt.datetime:
    try:
        return from_timestamp(stamp)
    except (ValueError, OverflowError) as error:
        raise InvalidInput(field, "is not a valid timestamp") from error


def new_line_from_proto(index: int, line: pb.NewEntitlementLine) -> NewLine:
    kind = _KIND_FROM_PROTO.get(line.kind)
    if kind is None:
        raise InvalidInput(f"lines[{index}].kind", "must be LICENSE_KIND_NETWORK or _LOCAL")
    if not line.feature:
        raise InvalidInput(f"lines[{index}].feature", "is required")
    expires_at = None
    if line.HasField("expires_at"):
        expires_at = _time(f"lines[{index}].expires_at", line.expires_at)
    duration = None
    if line.HasField("duration"):
        try:
            # Terms are kept in whole seconds.
            duration = dt.timedelta(seconds=line.duration.seconds)
        except OverflowError as error:
            raise InvalidInput(f"lines[{index}].duration", "is not a valid duration") from error
    maintenance_ends_at = None
    if line.HasField("maintenance_ends_at"):
        maintenance_ends_at = _time(f"lines[{index}].maintenance_ends_at", line.maintenance_ends_at)
    return NewLine(
        feature=line.feature,
        count=line.count,
        kind=kind,
        expires_at=expires_at,
        duration=duration,
        maintenance_ends_at=maintenance_ends_at,
        partial_return_allowed=line.partial_return_allowed,
        check_in=_check_in_policy(index, line),
    )


def _seconds(field: str, duration: Duration) -> dt.timedelta:
    if duration.seconds < 0 or duration.nanos < 0:
        raise InvalidInput(field, "must not be negative")
    try:
        # Policies are kept in whole seconds.
        return dt.timedelta(seconds=duration.seconds)
    except OverflowError as error:
        raise InvalidInput(field, "is not a valid duration") from error


def _check_in_policy(index: int, line: pb.NewEntitlementLine) -> CheckInPolicy | None:
    interval = (
        _seconds(f"lines[{index}].check_in_interval", line.check_in_interval)
        if line.HasField("check_in_interval")
        else dt.timedelta(0)
    )
    grace = (
        _seconds(f"lines[{index}].check_in_grace", line.check_in_grace)
        if line.HasField("check_in_grace")
        else dt.timedelta(0)
    )
    if not interval:
        if grace:
            raise InvalidInput(
                f"lines[{index}].check_in_grace", "needs a check_in_interval (0 means no check-in)"
            )
        return None  # 0 or unset: no check-in, the default
    return CheckInPolicy(interval, grace)


def registration_from_proto(request: pb.ActivateRequest) -> Registration | None:
    if not request.HasField("registration"):
        return None
    registration = request.registration
    return Registration(
        organization=registration.organization,
        contact_name=registration.contact_name,
        email=registration.email,
        phone=registration.phone,
        site=registration.site,
    )


class ActivationServicer(pb_grpc.ActivationServiceServicer):
    """tessera.activation.v1.ActivationService."""

    def __init__(
        self,
        entitlements: Entitlements,
        activations: Activations,
        returns: Returns,
        repairs: Repairs,
        vendor_keys: VendorKeys,
        check_ins: CheckIns,
    ) -> None:
        self.entitlements = entitlements
        self.activations = activations
        self.returns = returns
        self.repairs = repairs
        self.vendor_keys = vendor_keys
        self.check_ins = check_ins

    async def GetOrder(self, request: pb.GetOrderRequest, context: Context) -> pb.GetOrderResponse:
        entitlement = await self.entitlements.get_order(request.entitlement_id)
        return pb.GetOrderResponse(entitlement=entitlement_to_proto(entitlement))

    async def Activate(self, request: pb.ActivateRequest, context: Context) -> pb.ActivateResponse:
        if not request.HasField("request"):
            raise InvalidInput("request", "a signed activation request is required")
        response = await self.activations.activate(
            request.request, registration_from_proto(request)
        )
        return pb.ActivateResponse(response=response)

    async def Return(self, request: pb.ReturnRequest, context: Context) -> pb.ReturnResponse:
        if not request.HasField("request"):
            raise InvalidInput("request", "a signed return request is required")
        receipt = await self.returns.return_seats(request.request)
        return pb.ReturnResponse(receipt=receipt)

    async def Repair(self, request: pb.RepairRequest, context: Context) -> pb.RepairResponse:
        if not request.HasField("request"):
            raise InvalidInput("request", "a signed repair request is required")
        response = await self.repairs.repair(request.request)
        return pb.RepairResponse(response=response)

    async def CheckIn(self, request: pb.CheckInRequest, context: Context) -> pb.CheckInResponse:
        if not request.HasField("request"):
            raise InvalidInput("request", "a signed check-in request is required")
        result = await self.check_ins.check_in(request.request)
        return pb.CheckInResponse(result=result)

    async def GetVendorKeys(
        self, request: pb.GetVendorKeysRequest, context: Context
    ) -> pb.GetVendorKeysResponse:
        return pb.GetVendorKeysResponse(
            keys=[vendor_key_to_proto(key) for key in self.vendor_keys.public_keys()]
        )


class VendorServicer(pb_grpc.VendorServiceServicer):
    """tessera.activation.v1.VendorService (vendor credential checked by AccessControl)."""

    def __init__(
        self,
        entitlements: Entitlements,
        activations: Activations,
        returns: Returns,
        audit_log: AuditLog,
        vendor_keys: VendorKeys,
    ) -> None:
        self.entitlements = entitlements
        self.activations = activations
        self.returns = returns
        self.audit_log = audit_log
        self.vendor_keys = vendor_keys

    async def CreateEntitlement(
        self, request: pb.CreateEntitlementRequest, context: Context
    ) -> pb.CreateEntitlementResponse:
        lines = [new_line_from_proto(index, line) for index, line in enumerate(request.lines)]
        entitlement = await self.entitlements.create(
            request.customer_organization, request.contact, lines
        )
        return pb.CreateEntitlementResponse(entitlement=entitlement_to_proto(entitlement))

    async def ListActivations(
        self, request: pb.ListActivationsRequest, context: Context
    ) -> pb.ListActivationsResponse:
        records = await self.activations.list(request.entitlement_id, request.host_id)
        return pb.ListActivationsResponse(
            activations=[activation_to_proto(record) for record in records]
        )

    async def ForceReturn(
        self, request: pb.ForceReturnRequest, context: Context
    ) -> pb.ForceReturnResponse:
        record = await self.returns.force_return(request.certificate_id, request.reason)
        return pb.ForceReturnResponse(activation=activation_to_proto(record))

    async def GetAuditLog(
        self, request: pb.GetAuditLogRequest, context: Context
    ) -> pb.GetAuditLogResponse:
        page = await self.audit_log.page(request.subject, request.after_sequence, request.page_size)
        return pb.GetAuditLogResponse(
            entries=[audit_entry_to_proto(entry) for entry in page.entries],
            next_after_sequence=page.next_after_sequence,
            head_sequence=page.head.sequence,
            head_hash=page.head.hash,
        )

    async def VerifyAuditLog(
        self, request: pb.VerifyAuditLogRequest, context: Context
    ) -> pb.VerifyAuditLogResponse:
        verdict = await self.audit_log.verify()
        return pb.VerifyAuditLogResponse(
            intact=verdict.intact,
            entries_checked=verdict.entries_checked,
            first_bad_sequence=verdict.first_bad_sequence,
            problem=verdict.problem,
            head_sequence=verdict.head.sequence,
            head_hash=verdict.head.hash,
        )

    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, context: Context
    ) -> pb.RotateSigningKeyResponse:
        key = await self.vendor_keys.rotate()
        return pb.RotateSigningKeyResponse(
            key=vendor_key_to_proto(key),
            keys=[vendor_key_to_proto(key) for key in self.vendor_keys.public_keys()],
        )
