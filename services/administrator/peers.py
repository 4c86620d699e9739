"""gRPC clients for the Administrator's peers: the Activation Server and License Servers,
implementing the ports the flows name (domain/ports.py: Vendor, LicenseServer,
LicenseServerDirectory).

Failures of a peer become domain errors here: unreachable -> PeerUnavailable, a refusal
-> PeerRefused carrying the peer's own status code and reason, so the operator sees
exactly why the vendor or the License Server said no.

The Administrator presents its License Server credential (role ``administrator``, or the
operator's) on every call to a License Server; the Activation Server needs none (its
requests are envelopes signed by the License Server's host key).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypeVar

import grpc

from services.administrator.domain.ports import ACTIVATION_SERVER, LICENSE_SERVER
from tessera.activation.v1 import activation_pb2 as activation_pb
from tessera.activation.v1 import activation_pb2_grpc as activation_grpc
from tessera.address import parse_address
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.errors import PeerRefused, PeerUnavailable
from tessera.license.v1 import license_pb2 as license_pb
from tessera.license.v1 import license_pb2_grpc as license_grpc
from tessera.rpc import error_info
from tessera.tls import ClientTls, open_channel

T = TypeVar("T")

CALL_TIMEOUT = 30.0
PROBE_TIMEOUT = 2.0
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def call_peer(peer: str, address: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run one call to a peer, turning its failure into a domain error."""
    try:
        return await call()
    except grpc.aio.AioRpcError as error:
        if error.code() in _UNREACHABLE:
            raise PeerUnavailable(peer, address, error.details() or error.code().name) from error
        info = error_info(error)
        raise PeerRefused(
            peer,
            error.code().name,
            info.reason if info else error.code().name,
            error.details() or "",
            dict(info.metadata) if info else {},
        ) from error


class ActivationServerClient:
    """The vendor's Activation Server at one gRPC target (over TLS with ``tls``)."""

    def __init__(self, target: str, tls: ClientTls | None = None) -> None:
        self.target = target
        self._channel = open_channel(target, tls)
        self._stub = activation_grpc.ActivationServiceStub(self._channel)

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        return await call_peer(ACTIVATION_SERVER, self.target, call)

    async def get_order(self, entitlement_id: str) -> activation_pb.Entitlement:
        request = activation_pb.GetOrderRequest(entitlement_id=entitlement_id)
        response = await self._call(lambda: self._stub.GetOrder(request, timeout=CALL_TIMEOUT))
        return response.entitlement

    async def activate(
        self, request: SignedEnvelope, registration: activation_pb.Registration
    ) -> SignedEnvelope:
        """The vendor's signed VendorActivationResponse to a host-signed request."""
        message = activation_pb.ActivateRequest(request=request, registration=registration)
        response = await self._call(lambda: self._stub.Activate(message, timeout=CALL_TIMEOUT))
        return response.response

    async def return_seats(self, request: SignedEnvelope) -> SignedEnvelope:
        """The vendor's signed VendorReturnReceipt (credited or refused)."""
        message = activation_pb.ReturnRequest(request=request)
        response = await self._call(lambda: self._stub.Return(message, timeout=CALL_TIMEOUT))
        return response.receipt

    async def repair(self, request: SignedEnvelope) -> SignedEnvelope:
        """The vendor's signed VendorRepairResponse re-issuing what the host holds."""
        message = activation_pb.RepairRequest(request=request)
        response = await self._call(lambda: self._stub.Repair(message, timeout=CALL_TIMEOUT))
        return response.response

    async def check_in(self, request: SignedEnvelope) -> SignedEnvelope:
        """The vendor's signed VendorCheckInResult to a host-signed check-in."""
        message = activation_pb.CheckInRequest(request=request)
        response = await self._call(lambda: self._stub.CheckIn(message, timeout=CALL_TIMEOUT))
        return response.result

    async def close(self) -> None:
        await self._channel.close()


class LicenseServerClient:
    """One License Server, found at the first answering target of an EBO address."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        address: str,
        host_id: str,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._channel = channel
        self.address = address
        self.host_id = host_id
        self.metadata = metadata
        self.trusted_storage = license_grpc.TrustedStorageServiceStub(channel)
        self.leases = license_grpc.LeaseServiceStub(channel)

    @classmethod
    async def connect(
        cls, address: str, tls: ClientTls | None = None, token: str | None = None
    ) -> LicenseServerClient:
        """Try each server and port of ``address`` in order; the first that answers wins.
        ``tls``: how to dial (None: plaintext); ``token``, when given, is presented on
        every call but the probe."""
        tried = []
        for server in parse_address(address):
            for target in server.targets():
                channel = open_channel(target, tls)
                stub = license_grpc.TrustedStorageServiceStub(channel)
                try:
                    identity = await stub.GetHostIdentity(
                        license_pb.GetHostIdentityRequest(), timeout=PROBE_TIMEOUT
                    )
                except grpc.aio.AioRpcError as error:
                    await channel.close()
                    tried.append(f"{target} ({error.code().name})")
                    continue
                metadata = bearer_metadata(token) if token else ()
                return cls(channel, address, identity.host_id, metadata)
        raise PeerUnavailable(LICENSE_SERVER, address, "no answer from " + ", ".join(tried))

    async def call(self, call: Callable[[], Awaitable[T]]) -> T:
        return await call_peer(LICENSE_SERVER, self.address, call)

    async def list_certificates(self) -> list[license_pb.InstalledCertificate]:
        request = license_pb.ListCertificatesRequest()
        response = await self.call(
            lambda: self.trusted_storage.ListCertificates(
                request, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
        )
        return list(response.certificates)

    async def license_information(self) -> list[license_pb.FeatureInformation]:
        request = license_pb.GetLicenseInformationRequest()
        response = await self.call(
            lambda: self.leases.GetLicenseInformation(
                request, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
        )
        return list(response.features)

    async def prepare_activation(
        self, activation_id: str, count: int, request_id: str
    ) -> license_pb.PrepareActivationResponse:
        request = license_pb.PrepareActivationRequest(
            activation_id=activation_id, count=count, request_id=request_id
        )
        return await self.call(
            lambda: self.trusted_storage.PrepareActivation(
                request, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
        )

    async def install_activation(
        self, response: SignedEnvelope
    ) -> license_pb.InstallActivationResponse:
        request = license_pb.InstallActivationRequest(response=response)
        return await self.call(
            lambda: self.trusted_storage.InstallActivation(
                request, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
        )

    async def prepare_return(
        self, certificate_id: str, count: int, request_id: str, force: bool
    ) -> license_pb.PrepareReturnResponse:
        request = license_pb.PrepareReturnRequest(
            certificate_id=certificate_id, count=count, request_id=request_id, force=force
        )
        return await self.call(
            lambda: self.trusted_storage.PrepareReturn(
                request, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
        )

    async def complete_return(self, receipt: SignedEnvelope) -> license_pb.CompleteReturnResponse:
        request = license_pb.CompleteReturnRequest(receipt=receipt)
        return await self.call(
            lambda: self.trusted_storage.CompleteReturn(
                request, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
        )

    async def prepare_repair(
        self, request_id: str, force: bool = False
    ) -> license_pb.PrepareRepairResponse:
        request = license_pb.PrepareRepairRequest(request_id=request_id, force=force)
        return await self.call(
            lambda: self.trusted_storage.PrepareRepair(
                request, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
        )

    async def complete_repair(self, response: SignedEnvelope) -> license_pb.CompleteRepairResponse:
        request = license_pb.CompleteRepairRequest(response=response)
        return await self.call(
            lambda: self.trusted_storage.CompleteRepair(
                request, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
        )

    async def prepare_check_in(self, only_if_due: bool) -> license_pb.PrepareCheckInResponse:
        request = license_pb.PrepareCheckInRequest(only_if_due=only_if_due)
        return await self.call(
            lambda: self.trusted_storage.PrepareCheckIn(
                request, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
        )

    async def complete_check_in(self, result: SignedEnvelope) -> license_pb.CompleteCheckInResponse:
        request = license_pb.CompleteCheckInRequest(result=result)
        return await self.call(
            lambda: self.trusted_storage.CompleteCheckIn(
                request, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
        )

    async def close(self) -> None:
        await self._channel.close()


@asynccontextmanager
async def connected(
    address: str, tls: ClientTls | None = None, token: str | None = None
) -> AsyncIterator[LicenseServerClient]:
    """The License Server at ``address`` for the duration of a block."""
    server = await LicenseServerClient.connect(address, tls, token)
    try:
        yield server
    finally:
        await server.close()


class LicenseServers:
    """How the Administrator reaches License Servers: each dialled with ``tls`` (None:
    plaintext), presenting the Administrator's credential for them. ``token`` is asked
    each time (a token file is read per connection, so a rotated one is picked up
    without a restart)."""

    def __init__(
        self, tls: ClientTls | None = None, token: Callable[[], str | None] = lambda: None
    ) -> None:
        self.tls = tls
        self._token = token

    async def connect(self, address: str) -> LicenseServerClient:
        return await LicenseServerClient.connect(address, self.tls, self._token())

    def connected(self, address: str) -> AbstractAsyncContextManager[LicenseServerClient]:
        return connected(address, self.tls, self._token())
