"""The Lease stream driven by hand over an in-process site: activate seats, acquire, hold,
release, read what the License Server pushes."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from tessera.admin.v1 import admin_pb2
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import reason_of
from tests.support.in_process_site import Site

Stream = grpc.aio.StreamStreamCall[lpb.LeaseRequest, lpb.LeaseResponse]


async def activate(site: Site, seats: int, feature: str = "client.station") -> None:
    entitlement = await site.create_entitlement([(feature, seats)])
    await site.administrator.Activate(
        admin_pb2.ActivateRequest(
            license_server=site.license_address,
            activation_id=entitlement.lines[0].activation_id,
            count=seats,
        )
    )


def acquire(
    count: int = 1, wait: float = 0, feature: str = "client.station", host: str = "ws"
) -> lpb.LeaseRequest:
    message = lpb.LeaseAcquire(feature=feature, count=count, client_host=host, user="op")
    if wait:
        message.wait_timeout.FromTimedelta(dt.timedelta(seconds=wait))
    return lpb.LeaseRequest(acquire=message)


async def receive(stream: Stream) -> lpb.LeaseResponse:
    response = await stream.read()
    assert isinstance(response, lpb.LeaseResponse), "the stream ended"
    return response


async def hold(
    leases: lpb_grpc.LeaseServiceStub, count: int = 1
) -> tuple[Stream, lpb.LeaseGranted]:
    stream = leases.Lease()
    await stream.write(acquire(count))
    granted = (await receive(stream)).granted
    assert granted.lease_id
    return stream, granted


async def release(stream: Stream) -> None:
    await stream.write(lpb.LeaseRequest(release=lpb.LeaseRelease()))
    assert (await receive(stream)).HasField("released")


async def information(site: Site) -> lpb.FeatureInformation:
    reply = await site.leases.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature="client.station")
    )
    return reply.features[0]


async def expect_revoked(stream: Stream, reason: str) -> None:
    revoked = await receive(stream)
    assert revoked.revoked.reason == reason, revoked
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stream.read()
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(ended.value) == reason
