"""gRPC clients for the Administrator's peers: the Activation Server and License Servers.

Failures of a peer become domain errors here: unreachable -> PeerUnavailable, a refusal
-> PeerRefused carrying the peer's own status code and reason, so the operator sees
exactly why the vendor or the License Server said no.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from tessera.activation.v1 import activation_pb2 as activation_pb
from tessera.activation.v1 import activation_pb2_grpc as activation_grpc
from tessera.address import parse_address
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.errors import PeerRefused, PeerUnavailable
from tessera.license.v1 import license_pb2 as license_pb
from tessera.license.v1 import license_pb2_grpc as license_grpc
from tessera.rpc import error_info

T = TypeVar("T")

ACTIVATION_SERVER = "Activation Server"
LICENSE_SERVER = "License Server"
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
    """The vendor's Activation Server at one gRPC target."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = activation_grpc.ActivationServiceStub(self._channel)

    async def get_order(self, entitlement_id: str) -> activation_pb.Entitlement:
        response = await call_peer(
            ACTIVATION_SERVER,
            self.target,
            lambda: self._stub.GetOrder(
                activation_pb.GetOrderRequest(entitlement_id=entitlement_id),
                timeout=CALL_TIMEOUT,
            ),
        )
        return response.entitlement

    async def activate(self, request: SignedEnvelope) -> SignedEnvelope:
        response = await call_peer(
            ACTIVATION_SERVER,
            self.target,
            lambda: self._stub.Activate(
                activation_pb.ActivateRequest(request=request), timeout=CALL_TIMEOUT
            ),
        )
        return response.response

    async def close(self) -> None:
        await self._channel.close()


class LicenseServerClient:
    """One License Server, found at the first answering target of an EBO address."""

    def __init__(self, channel: grpc.aio.Channel, address: str, host_id: str) -> None:
        self._channel = channel
        self.address = address
        self.host_id = host_id
        self.trusted_storage = license_grpc.TrustedStorageServiceStub(channel)
        self.leases = license_grpc.LeaseServiceStub(channel)

    @classmethod
    async def connect(cls, address: str) -> LicenseServerClient:
        """Try each server and port of ``address`` in order; the first that answers wins."""
        tried = []
        for server in parse_address(address):
            for target in server.targets():
                channel = grpc.aio.insecure_channel(target)
                stub = license_grpc.TrustedStorageServiceStub(channel)
                try:
                    identity = await stub.GetHostIdentity(
                        license_pb.GetHostIdentityRequest(), timeout=PROBE_TIMEOUT
                    )
                except grpc.aio.AioRpcError as error:
                    await channel.close()
                    tried.append(f"{target} ({error.code().name})")
                    continue
                return cls(channel, address, identity.host_id)
        raise PeerUnavailable(LICENSE_SERVER, address, "no answer from " + ", ".join(tried))

    async def call(self, call: Callable[[], Awaitable[T]]) -> T:
        return await call_peer(LICENSE_SERVER, self.address, call)

    async def close(self) -> None:
        await self._channel.close()
