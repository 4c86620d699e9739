"""Proto <-> domain translation for the License Server; no rules and no SQL here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.license_server.domain.admission import Admission
from services.license_server.domain.check_ins import CheckIns
from services.license_server.domain.leasing import Leasing
from services.license_server.domain.repairs import Repairs
from services.license_server.domain.returns import Returns
from services.license_server.domain.trusted_storage import TrustedStorage
from services.license_server.lease_stream import LeaseStream, LeaseStreams
from services.license_server.translate import (
    check_in_status_to_proto,
    granted_to_proto,
    health_to_proto,
    lease_entry_to_proto,
    new_lease_from_proto,
)
from tessera.clock import to_timestamp
from tessera.errors import InvalidInput
from tessera.keys import HostIdentity
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc
from tessera.server.limits import peer_host

Context = grpc.aio.ServicerContext[Any, Any]


class LeaseServicer(pb_grpc.LeaseServiceServicer):
    """tessera.license.v1.LeaseService."""

    def __init__(self, leasing: Leasing, admission: Admission) -> None:
        self.leasing = leasing
        self.admission = admission
        self.streams = LeaseStreams(leasing, admission)

    def close_streams(self) -> None:
        """Tell every open lease stream that the server is stopping (they may resume)."""
        self.streams.close()

    async def Lease(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.LeaseRequest], context: Context
    ) -> None:
        await LeaseStream(self.streams, context).run()

    async def DeclareRequirement(
        self, request: pb.DeclareRequirementRequest, context: Context
    ) -> pb.DeclareRequirementResponse:
        await self.leasing.declare_requirement(
            request.client_host, request.feature, request.required
        )
        return pb.DeclareRequirementResponse()

    async def Checkout(self, request: pb.CheckoutRequest, context: Context) -> pb.CheckoutResponse:
        if not request.HasField("acquire"):
            raise InvalidInput("acquire", "is required")
        new, ttl = new_lease_from_proto(request.acquire)
        self.admission.admit_acquire(peer_host(context.peer()))
        grant = await self.leasing.acquire(new, ttl)
        return pb.CheckoutResponse(granted=granted_to_proto(grant))

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        expires_at = await self.leasing.heartbeat(request.lease_id, request.lease_secret)
        return pb.HeartbeatResponse(expires_at=to_timestamp(expires_at))

    async def Checkin(self, request: pb.CheckinRequest, context: Context) -> pb.CheckinResponse:
        released = await self.leasing.release(request.lease_id, request.lease_secret)
        return pb.CheckinResponse(released=released)

    async def GetLicenseInformation(
        self, request: pb.GetLicenseInformationRequest, context: Context
    ) -> pb.GetLicenseInformationResponse:
        pools = await self.leasing.information(request.feature)
        return pb.GetLicenseInformationResponse(
            features=[
                pb.FeatureInformation(
                    feature=pool.feature,
                    activated=pool.activated,
                    used=pool.used,
                    available=pool.available,
                    queued=pool.queued,
                    required=pool.required,
                    violation=pool.violation,
                    withdrawn=pool.withdrawn,
                    withdrawn_reason=pool.withdrawn_reason,
                )
                for pool in pools
            ]
        )


class LeaseAdminServicer(pb_grpc.LeaseAdminServiceServicer):
    """tessera.license.v1.LeaseAdminService (operator credential checked by AccessControl)."""

    def __init__(self, leasing: Leasing) -> None:
        self.leasing = leasing

    async def ListLeases(
        self, request: pb.ListLeasesRequest, context: Context
    ) -> pb.ListLeasesResponse:
        entries = await self.leasing.list_leases(request.feature)
        return pb.ListLeasesResponse(leases=[lease_entry_to_proto(entry) for entry in entries])

    async def RevokeLease(
        self, request: pb.RevokeLeaseRequest, context: Context
    ) -> pb.RevokeLeaseResponse:
        revoked = await self.leasing.revoke(request.lease_id, request.reason)
        return pb.RevokeLeaseResponse(revoked=revoked)


class TrustedStorageServicer(pb_grpc.TrustedStorageServiceServicer):
    """tessera.license.v1.TrustedStorageService."""

    def __init__(
        self,
        trusted_storage: TrustedStorage,
        returns: Returns,
        repairs: Repairs,
        identity: HostIdentity,
        check_ins: CheckIns,
    ) -> None:
        self.trusted_storage = trusted_storage
        self.returns = returns
        self.repairs = repairs
        self.identity = identity
        self.check_ins = check_ins

    async def GetHostIdentity(
        self, request: pb.GetHostIdentityRequest, context: Context
    ) -> pb.GetHostIdentityResponse:
        return pb.GetHostIdentityResponse(
            host_id=self.identity.host_id,
            public_key=self.identity.public_key,
            machine_binding=self.identity.machine_binding,
        )

    async def PrepareActivation(
        self, request: pb.PrepareActivationRequest, context: Context
    ) -> pb.PrepareActivationResponse:
        request_id, envelope = await self.trusted_storage.prepare_activation(
            request.activation_id, request.count, request.request_id
        )
        return pb.PrepareActivationResponse(request_id=request_id, request=envelope)

    async def InstallActivation(
        self, request: pb.InstallActivationRequest, context: Context
    ) -> pb.InstallActivationResponse:
        if not request.HasField("response"):
            raise InvalidInput("response", "a signed vendor answer is required")
        installed = await self.trusted_storage.install_activation(request.response)
        return pb.InstallActivationResponse(
            certificate=pb.InstalledCertificate(
                certificate=installed.certificate,
                installed_at=to_timestamp(installed.stored.installed_at),
            ),
            already_installed=installed.already_installed,
        )

    async def ListCertificates(
        self, request: pb.ListCertificatesRequest, context: Context
    ) -> pb.ListCertificatesResponse:
        certificates = await self.trusted_storage.list_certificates()
        return pb.ListCertificatesResponse(
            certificates=[
                pb.InstalledCertificate(
                    certificate=certificate, installed_at=to_timestamp(stored.installed_at)
                )
                for certificate, stored in certificates
            ]
        )

    async def PrepareReturn(
        self, request: pb.PrepareReturnRequest, context: Context
    ) -> pb.PrepareReturnResponse:
        prepared = await self.returns.prepare(
            request.certificate_id, request.count, request.request_id, request.force
        )
        return pb.PrepareReturnResponse(
            request_id=prepared.request_id,
            request=prepared.request,
            revoked_leases=prepared.revoked_leases,
        )

    async def CompleteReturn(
        self, request: pb.CompleteReturnRequest, context: Context
    ) -> pb.CompleteReturnResponse:
        if not request.HasField("receipt"):
            raise InvalidInput("receipt", "a signed vendor receipt is required")
        completed = await self.returns.complete(request.receipt)
        remaining = None
        if completed.remaining is not None:
            certificate, stored = completed.remaining
            remaining = pb.InstalledCertificate(
                certificate=certificate, installed_at=to_timestamp(stored.installed_at)
            )
        return pb.CompleteReturnResponse(
            credited=completed.credited,
            count=completed.count,
            remaining=remaining,
            already_completed=completed.already_completed,
        )

    async def PrepareRepair(
        self, request: pb.PrepareRepairRequest, context: Context
    ) -> pb.PrepareRepairResponse:
        request_id, envelope = await self.repairs.prepare(request.request_id, request.force)
        return pb.PrepareRepairResponse(request_id=request_id, request=envelope)

    async def CompleteRepair(
        self, request: pb.CompleteRepairRequest, context: Context
    ) -> pb.CompleteRepairResponse:
        if not request.HasField("response"):
            raise InvalidInput("response", "a signed vendor repair answer is required")
        repaired = await self.repairs.complete(request.response)
        return pb.CompleteRepairResponse(
            health=health_to_proto(repaired.health, self.trusted_storage.clock.now()),
            already_completed=repaired.already_completed,
        )

    async def GetTrustHealth(
        self, request: pb.GetTrustHealthRequest, context: Context
    ) -> pb.GetTrustHealthResponse:
        report = await self.trusted_storage.check()
        return pb.GetTrustHealthResponse(
            health=health_to_proto(report, self.trusted_storage.clock.now())
        )

    async def PrepareCheckIn(
        self, request: pb.PrepareCheckInRequest, context: Context
    ) -> pb.PrepareCheckInResponse:
        prepared = await self.check_ins.prepare(request.only_if_due)
        return pb.PrepareCheckInResponse(
            request_id=prepared.request_id or "",
            request=prepared.request,
            status=check_in_status_to_proto(prepared.status),
        )

    async def CompleteCheckIn(
        self, request: pb.CompleteCheckInRequest, context: Context
    ) -> pb.CompleteCheckInResponse:
        if not request.HasField("result"):
            raise InvalidInput("result", "a signed vendor check-in result is required")
        completed = await self.check_ins.complete(request.result)
        return pb.CompleteCheckInResponse(
            status=check_in_status_to_proto(completed.status),
            already_completed=completed.already_completed,
        )
