"""The client start-up rule: a valid local license first, else a network lease, else a
clear refusal, so the application can decide not to start.

The network lease returned here comes from a unary Checkout on the first License Server
of the address list that grants one; the caller keeps it alive with Heartbeat (or
resumes it on a Lease stream) and checks it in on exit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from nacl.signing import VerifyKey

from tessera.address import parse_address
from tessera.common.v1.common_pb2 import LicenseCertificate
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc
from tessera.local_licenses import LocalLicenseStore
from tessera.rpc import reason_of

CONNECT_TIMEOUT = 2.0


@dataclass(frozen=True)
class LocalLicense:
    """The client runs on a node-locked license from its local license store."""

    certificate: LicenseCertificate


@dataclass(frozen=True)
class NetworkLease:
    """The client holds seats on a License Server (target ``host:port``)."""

    target: str
    granted: pb.LeaseGranted


class NoLicense(Exception):
    """Neither a local license nor a network lease: the application must not start."""

    def __init__(self, feature: str, reasons: list[str]) -> None:
        super().__init__(f"no {feature} license: " + "; ".join(reasons))
        self.feature = feature
        self.reasons = reasons


@dataclass
class LicenseRequest:
    feature: str
    address: str
    count: int = 1
    client_host: str = ""
    user: str = ""
    display_name: str = ""
    local_store: LocalLicenseStore | None = None
    vendor_keys: Mapping[str, VerifyKey] = field(default_factory=dict)


async def license_at_startup(request: LicenseRequest) -> LocalLicense | NetworkLease:
    """Apply the start-up rule; raises NoLicense (saying why) when there is no license.

    An unparsable License Server address raises InvalidLicenseServerAddress before any
    network call: EBO's "Invalid license server configuration".
    """
    servers = parse_address(request.address)
    reasons: list[str] = []
    if request.local_store is not None:
        check = request.local_store.check(request.feature, request.vendor_keys)
        if check.certificate is not None:
            return LocalLicense(check.certificate)
        reasons += [f"local: {problem}" for problem in check.problems]
    acquire = pb.LeaseAcquire(
        feature=request.feature,
        count=request.count,
        client_host=request.client_host,
        user=request.user,
        display_name=request.display_name,
    )
    answered = False
    for server in servers:
        for target in server.targets():
            async with grpc.aio.insecure_channel(target) as channel:
                try:
                    reply = await pb_grpc.LeaseServiceStub(channel).Checkout(
                        pb.CheckoutRequest(acquire=acquire), timeout=CONNECT_TIMEOUT
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        continue  # nothing answers on this port; try the next one
                    answered = True
                    reasons.append(
                        f"{target}: {reason_of(error) or error.code().name}: {error.details()}"
                    )
                    break  # this License Server answered; try the next server
                return NetworkLease(target, reply.granted)
    if not answered:
        reasons.append(f"no License Server answers at {request.address}")
    raise NoLicense(request.feature, reasons)
