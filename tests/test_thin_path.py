"""The thin path through all three services, in process over real gRPC, on both databases."""

from __future__ import annotations

import grpc
import pytest

from tessera.admin.v1 import admin_pb2
from tessera.license.v1 import license_pb2
from tessera.rpc import reason_of
from tests.support.clock import FakeClock
from tests.support.in_process_site import Site


def acquire(feature: str = "client.station", count: int = 1) -> license_pb2.LeaseRequest:
    return license_pb2.LeaseRequest(
        acquire=license_pb2.LeaseAcquire(feature=feature, count=count, client_host="ws-01")
    )


async def activate(site: Site, seats: int, sold: int = 5) -> str:
    entitlement = await site.create_entitlement([("client.station", sold)])
    reply = await site.administrator.Activate(
        admin_pb2.ActivateRequest(
            license_server=site.license_address,
            activation_id=entitlement.lines[0].activation_id,
            count=seats,
        )
    )
    assert reply.operation.state == admin_pb2.OPERATION_STATE_COMPLETED
    return entitlement.entitlement_id


async def test_order_shows_what_is_left_after_activation(site: Site) -> None:
    entitlement_id = await activate(site, seats=2, sold=5)
    order = await site.administrator.GetOrder(
        admin_pb2.GetOrderRequest(entitlement_id=entitlement_id)
    )
    line = order.entitlement.lines[0]
    assert (line.count, line.activated, line.available) == (5, 2, 3)


async def test_workstation_leases_heartbeats_and_checks_in(site: Site) -> None:
    await activate(site, seats=2)
    stream = site.leases.Lease()
    await stream.write(acquire())
    granted = (await stream.read()).granted
    assert granted.lease_id and granted.lease_secret and granted.epoch == 1
    await stream.write(license_pb2.LeaseRequest(heartbeat=license_pb2.LeaseHeartbeat()))
    assert (await stream.read()).HasField("heartbeat_ack")

    info = await site.leases.GetLicenseInformation(license_pb2.GetLicenseInformationRequest())
    [station] = info.features
    assert (station.activated, station.used, station.available) == (2, 1, 1)

    await stream.write(license_pb2.LeaseRequest(release=license_pb2.LeaseRelease()))
    assert (await stream.read()).released.lease_id == granted.lease_id
    info = await site.leases.GetLicenseInformation(license_pb2.GetLicenseInformationRequest())
    assert info.features[0].used == 0


async def test_client_beyond_activated_count_is_refused(site: Site) -> None:
    await activate(site, seats=2)
    holders = []
    for _ in range(2):
        stream = site.leases.Lease()
        await stream.write(acquire())
        assert (await stream.read()).HasField("granted")
        holders.append(stream)
    third = site.leases.Lease()
    await third.write(acquire())
    denied = await third.read()
    assert isinstance(denied, license_pb2.LeaseResponse)
    assert denied.denied.reason == "NO_SEAT_AVAILABLE"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await third.read()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(refused.value) == "NO_SEAT_AVAILABLE"
    info = await site.leases.GetLicenseInformation(license_pb2.GetLicenseInformationRequest())
    assert info.features[0].used == 2


async def test_dead_stream_keeps_its_seat_until_the_ttl_then_frees_it(
    site: Site, clock: FakeClock
) -> None:
    await activate(site, seats=1)
    stream = site.leases.Lease()
    await stream.write(acquire())
    await stream.read()
    stream.cancel()  # the client dies without checking in

    clock.advance(89)
    assert await site.license.leasing.release_expired() == 0
    info = await site.leases.GetLicenseInformation(license_pb2.GetLicenseInformationRequest())
    assert info.features[0].used == 1

    clock.advance(2)
    assert await site.license.leasing.release_expired() == 1
    info = await site.leases.GetLicenseInformation(license_pb2.GetLicenseInformationRequest())
    assert info.features[0].used == 0
    assert await site.license.leasing.release_expired() == 0  # idempotent


async def test_activate_retry_with_same_operation_id_completes_once(site: Site) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    request = admin_pb2.ActivateRequest(
        license_server=site.license_address,
        activation_id=entitlement.lines[0].activation_id,
        count=3,
        operation_id="op-retry",
    )
    first = await site.administrator.Activate(request)
    second = await site.administrator.Activate(request)
    assert first.certificate.certificate.certificate_id == (
        second.certificate.certificate.certificate_id
    )
    info = await site.leases.GetLicenseInformation(license_pb2.GetLicenseInformationRequest())
    assert info.features[0].activated == 3
    order = await site.administrator.GetOrder(
        admin_pb2.GetOrderRequest(entitlement_id=entitlement.entitlement_id)
    )
    assert order.entitlement.lines[0].activated == 3
