"""Proto <-> domain translation for the License Server; no rules and no SQL here."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from services.license_server.domain.errors import LeaseProtocolViolation, ServerShuttingDown
from services.license_server.domain.leasing import Leasing
from services.license_server.domain.model import Grant, NewLease
from services.license_server.domain.trusted_storage import TrustedStorage
from services.license_server.errors import ERRORS
from tessera.clock import to_timestamp
from tessera.errors import DomainError, InvalidInput
from tessera.keys import HostIdentity
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

_END = object()  # the client half-closed or went away
_SHUTDOWN = object()  # the server is stopping


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(dt.timedelta(seconds=seconds))
    return duration


def granted_to_proto(grant: Grant) -> pb.LeaseGranted:
    lease = grant.lease
    return pb.LeaseGranted(
        lease_id=lease.lease_id,
        lease_secret=grant.secret,
        feature=lease.feature,
        count=lease.count,
        ttl=_duration(lease.ttl_seconds),
        heartbeat_interval=_duration(grant.heartbeat_interval_seconds),
        expires_at=to_timestamp(lease.expires_at),
        epoch=lease.epoch,
        resumed=grant.resumed,
    )


def new_lease_from_proto(acquire: pb.LeaseAcquire) -> tuple[NewLease, int | None]:
    ttl = None
    if acquire.HasField("ttl"):
        if acquire.ttl.seconds < 0 or not 0 <= acquire.ttl.nanos < 1_000_000_000:
            raise InvalidInput("ttl", "must be a positive duration")
        # Round a sub-second remainder up: never a shorter lease than the client asked for.
        ttl = acquire.ttl.seconds + (1 if acquire.ttl.nanos else 0)
    new = NewLease(
        feature=acquire.feature,
        count=acquire.count,
        client_host=acquire.client_host,
        user=acquire.user,
        display_name=acquire.display_name,
    )
    return new, ttl


async def _pump(requests: AsyncIterator[pb.LeaseRequest], inbox: asyncio.Queue[object]) -> None:
    try:
        async for message in requests:
            await inbox.put(message)
    except DomainError as error:  # e.g. a message that does not parse
        await inbox.put(error)
    except Exception:  # the client went away mid-read; treat like a half-close
        pass
    finally:
        await inbox.put(_END)


class LeaseServicer(pb_grpc.LeaseServiceServicer):
    """tessera.license.v1.LeaseService."""

    def __init__(self, leasing: Leasing) -> None:
        self.leasing = leasing
        self._inboxes: set[asyncio.Queue[object]] = set()
        self._closing = False

    def close_streams(self) -> None:
        """Tell every open lease stream that the server is stopping (they may resume)."""
        self._closing = True
        for inbox in self._inboxes:
            inbox.put_nowait(_SHUTDOWN)

    @ERRORS.stream
    async def Lease(
        self, request_iterator: AsyncIterator[pb.LeaseRequest], context: Context
    ) -> AsyncIterator[pb.LeaseResponse]:
        inbox: asyncio.Queue[object] = asyncio.Queue()
        self._inboxes.add(inbox)
        reader = asyncio.create_task(_pump(request_iterator, inbox))
        held: Grant | None = None
        try:
            while True:
                item = _SHUTDOWN if self._closing else await inbox.get()
                if item is _END:
                    # A stream that ends without release keeps its lease until the TTL
                    # runs out, so the client can resume it after a network blip.
                    return
                if item is _SHUTDOWN:
                    raise ServerShuttingDown(
                        "the License Server is stopping; resume the lease after it restarts "
                        "or on another server"
                    )
                if isinstance(item, DomainError):
                    raise item
                assert isinstance(item, pb.LeaseRequest)
                kind = item.WhichOneof("kind")
                if kind in ("acquire", "resume") and held is not None:
                    raise LeaseProtocolViolation(f"{kind} on a stream that already holds a lease")
                if kind in ("heartbeat", "release") and held is None:
                    raise LeaseProtocolViolation(f"{kind} before acquire or resume")
                if kind == "acquire":
                    new, ttl = new_lease_from_proto(item.acquire)
                    held = await self.leasing.acquire(new, ttl)
                    yield pb.LeaseResponse(granted=granted_to_proto(held))
                elif kind == "resume":
                    held = await self.leasing.resume(item.resume.lease_id, item.resume.lease_secret)
                    yield pb.LeaseResponse(granted=granted_to_proto(held))
                elif kind == "heartbeat":
                    assert held is not None
                    lease = held.lease
                    expires_at = await self.leasing.heartbeat(
                        lease.lease_id, held.secret, lease.epoch
                    )
                    ack = pb.LeaseHeartbeatAck(expires_at=to_timestamp(expires_at))
                    yield pb.LeaseResponse(heartbeat_ack=ack)
                elif kind == "release":
                    assert held is not None
                    lease = held.lease
                    await self.leasing.release(lease.lease_id, held.secret, lease.epoch)
                    yield pb.LeaseResponse(released=pb.LeaseReleased(lease_id=lease.lease_id))
                    return
                else:
                    raise LeaseProtocolViolation(
                        "empty lease request: set acquire, resume, heartbeat or release"
                    )
        finally:
            self._inboxes.discard(inbox)
            reader.cancel()

    @ERRORS.unary
    async def Checkout(self, request: pb.CheckoutRequest, context: Context) -> pb.CheckoutResponse:
        if not request.HasField("acquire"):
            raise InvalidInput("acquire", "is required")
        new, ttl = new_lease_from_proto(request.acquire)
        grant = await self.leasing.acquire(new, ttl)
        return pb.CheckoutResponse(granted=granted_to_proto(grant))

    @ERRORS.unary
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        expires_at = await self.leasing.heartbeat(request.lease_id, request.lease_secret)
        return pb.HeartbeatResponse(expires_at=to_timestamp(expires_at))

    @ERRORS.unary
    async def Checkin(self, request: pb.CheckinRequest, context: Context) -> pb.CheckinResponse:
        released = await self.leasing.release(request.lease_id, request.lease_secret)
        return pb.CheckinResponse(released=released)

    @ERRORS.unary
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
                )
                for pool in pools
            ]
        )


class TrustedStorageServicer(pb_grpc.TrustedStorageServiceServicer):
    """tessera.license.v1.TrustedStorageService."""

    def __init__(self, trusted_storage: TrustedStorage, identity: HostIdentity) -> None:
        self.trusted_storage = trusted_storage
        self.identity = identity

    @ERRORS.unary
    async def GetHostIdentity(
        self, request: pb.GetHostIdentityRequest, context: Context
    ) -> pb.GetHostIdentityResponse:
        return pb.GetHostIdentityResponse(
            host_id=self.identity.host_id,
            public_key=self.identity.public_key,
            machine_binding=self.identity.machine_binding,
        )

    @ERRORS.unary
    async def PrepareActivation(
        self, request: pb.PrepareActivationRequest, context: Context
    ) -> pb.PrepareActivationResponse:
        request_id, envelope = await self.trusted_storage.prepare_activation(
            request.activation_id, request.count, request.request_id
        )
        return pb.PrepareActivationResponse(request_id=request_id, request=envelope)

    @ERRORS.unary
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

    @ERRORS.unary
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
