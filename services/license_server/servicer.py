"""Proto <-> domain translation for the License Server; no rules and no SQL here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc

from services.license_server.domain.admission import Admission, ClientLimits
from services.license_server.domain.check_ins import CheckIns
from services.license_server.domain.errors import LeaseStreamIdle, ServerShuttingDown
from services.license_server.domain.leasing import Leasing
from services.license_server.domain.repairs import Repairs
from services.license_server.domain.returns import Returns
from services.license_server.domain.trusted_storage import TrustedStorage
from services.license_server.session import LEASE_GONE, LeaseSession
from services.license_server.translate import (
    check_in_status_to_proto,
    granted_to_proto,
    health_to_proto,
    lease_entry_to_proto,
    new_lease_from_proto,
)
from tessera.clock import to_timestamp
from tessera.errors import DomainError, InvalidInput
from tessera.keys import HostIdentity
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc
from tessera.server.limits import peer_host

Context = grpc.aio.ServicerContext[Any, Any]

_END = object()  # the client half-closed or went away
_SHUTDOWN = object()  # the server is stopping


# Client messages read ahead of the session: beyond this the stream stops reading, so a
# client that writes without reading the answers is held back by HTTP/2 flow control
# instead of filling the server's memory.
READ_AHEAD = 16


class _Reader:
    """Reads a Lease stream's client messages ahead of its session.

    A heartbeat, while the session has nothing else to do (no earlier message or event
    waiting, no answer being written), is answered here once its flush has written it:
    most of a stream's traffic, so it skips the inbox and the session's loop. Meanwhile
    this stream reads nothing more (its client beats again an interval later). Everything
    else goes to the inbox, in order. ``turn`` is held by whoever writes to the stream, so
    answers go out one at a time and in the order the session decided them.
    """

    def __init__(self, session: LeaseSession, context: Context, turn: asyncio.Lock) -> None:
        self.session = session
        self.context = context
        self.turn = turn
        # Client messages read but not yet handled by the session's loop.
        self.unhandled = 0
        self.credit = asyncio.Semaphore(READ_AHEAD)

    def handled(self) -> None:
        """The session's loop finished with one client message from the inbox."""
        self.unhandled -= 1
        self.credit.release()

    async def read(self) -> None:
        """Read until the client half-closes or goes away (``context.read``: the request
        iterator grpc offers is one more async generator around it per message)."""
        session, inbox, turn, context = self.session, self.session.inbox, self.turn, self.context
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                if (
                    not self.unhandled
                    and inbox.empty()
                    and not turn.locked()
                    and session.answers_on_the_spot(message)
                ):
                    async with turn:  # free, so taken without waiting: nothing comes between
                        try:
                            ack = await session.acknowledge()
                        except LEASE_GONE as error:  # the loop tells it, as a lease event
                            inbox.put_nowait(session.ended(error))
                            continue
                        except Exception as error:  # a fault of ours: the loop raises it
                            inbox.put_nowait(error)
                            return
                        if await _answer(context, ack):
                            continue
                        return  # the client is gone
                self.unhandled += 1
                inbox.put_nowait(message)  # unbounded: the credit below is what holds back
                await self.credit.acquire()
        except DomainError as error:  # e.g. a message that does not parse
            inbox.put_nowait(error)
        except Exception:  # the client went away mid-read; treat like a half-close
            pass
        finally:
            inbox.put_nowait(_END)


async def _answer(context: Context, response: pb.LeaseResponse) -> bool:
    """Write one answer to the stream; False when the client went away under the write
    (grpc ended the call), which ends the stream as quietly as a half-close."""
    try:
        await context.write(response)
    except grpc.aio.InternalError:
        if context.done() or context.cancelled():
            return False
        raise
    return True


async def _within(next_item: Awaitable[object], remaining: float, idle: float) -> object:
    """The stream's next item, unless none comes before the idle limit runs out."""
    try:
        return await asyncio.wait_for(next_item, max(0.0, remaining))
    except TimeoutError:
        raise LeaseStreamIdle(
            f"the lease stream sent no acquire or resume within {idle:g} s of opening; "
            "open a stream when there is a lease to ask for",
            metadata={"stream_idle_seconds": f"{idle:g}"},
        ) from None


class LeaseServicer(pb_grpc.LeaseServiceServicer):
    """tessera.license.v1.LeaseService."""

    def __init__(self, leasing: Leasing, admission: Admission | None = None) -> None:
        self.leasing = leasing
        self.admission = admission or Admission(ClientLimits(), leasing.metrics)
        self._inboxes: set[asyncio.Queue[object]] = set()
        self._closing = False
        leasing.metrics.count_open_streams(lambda: len(self._inboxes))

    def close_streams(self) -> None:
        """Tell every open lease stream that the server is stopping (they may resume)."""
        self._closing = True
        for inbox in self._inboxes:
            inbox.put_nowait(_SHUTDOWN)

    async def Lease(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.LeaseRequest], context: Context
    ) -> None:
        host = peer_host(context.peer())
        session = LeaseSession(self.leasing, lambda: self.admission.admit_acquire(host))
        self.admission.open_stream(host)  # from here on, closed in the finally below
        self._inboxes.add(session.inbox)
        turn = asyncio.Lock()
        reader = _Reader(session, context, turn)
        reading = asyncio.create_task(reader.read())
        idle = self.admission.limits.stream_idle_seconds
        loop = asyncio.get_running_loop()
        idle_at = loop.time() + idle
        try:
            while True:
                if self._closing:
                    item: object = _SHUTDOWN
                elif idle > 0 and not session.started:
                    item = await _within(session.next_item(), idle_at - loop.time(), idle)
                else:
                    item = await session.next_item()
                if item is _END:
                    # A stream that ends without release keeps its lease until the TTL
                    # runs out, so the client can resume it after a network blip.
                    return
                # Holding the turn: no acknowledgement of the reader's is in flight while
                # this item is handled, nor when the stream ends with an error below.
                async with turn:
                    if item is _SHUTDOWN:
                        raise ServerShuttingDown(
                            "the License Server is stopping; resume the lease after it "
                            "restarts or on another server"
                        )
                    if isinstance(item, Exception):  # a DomainError, or a fault of ours
                        raise item
                    async for response in session.handle(item):
                        if not await _answer(context, response):
                            return  # the client is gone
                if isinstance(item, pb.LeaseRequest):
                    reader.handled()
                if session.finished:
                    return
        finally:
            self.admission.close_stream(host)
            self._inboxes.discard(session.inbox)
            reading.cancel()
            await session.close()

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
