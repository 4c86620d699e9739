"""The lease protocol over real gRPC in process, on SQLite and PostgreSQL: queueing,
pushed revocations, resume with fencing, operator RPCs, requirements, expiring licenses."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.auth import bearer_metadata
from tessera.clock import to_timestamp
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import reason_of
from tests.support.clock import FakeClock
from tests.support.in_process_site import Site
from tests.support.lease_stream import (
    acquire,
    activate,
    expect_revoked,
    hold,
    information,
    receive,
    release,
)
from tests.support.tokens import OPERATOR_TOKEN, VENDOR_TOKEN

OPERATOR = bearer_metadata(OPERATOR_TOKEN)


async def test_waiters_are_served_first_come_first_served(site: Site) -> None:
    await activate(site, seats=1)
    holder, _ = await hold(site.leases)
    first, second = site.leases.Lease(), site.leases.Lease()
    await first.write(acquire(wait=30, host="first"))
    assert (await receive(first)).queued.position == 1
    await second.write(acquire(wait=30, host="second"))
    assert (await receive(second)).queued.position == 2
    assert (await information(site)).queued == 2

    # A client that does not queue cannot jump the line.
    with pytest.raises(grpc.aio.AioRpcError) as jumped:
        await site.leases.Checkout(lpb.CheckoutRequest(acquire=acquire().acquire))
    assert reason_of(jumped.value) == "NO_SEAT_AVAILABLE"

    await release(holder)
    assert (await receive(first)).HasField("granted")
    assert (await receive(second)).queued.position == 1
    await release(first)
    assert (await receive(second)).HasField("granted")
    info = await information(site)
    assert (info.used, info.queued) == (1, 0)


async def test_queue_timeout_is_denied_and_leaves_the_queue(site: Site) -> None:
    await activate(site, seats=1)
    await hold(site.leases)
    waiter = site.leases.Lease()
    await waiter.write(acquire(wait=0.3))
    assert (await receive(waiter)).queued.position == 1
    denied = await receive(waiter)
    assert denied.denied.reason == "QUEUE_TIMEOUT"
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await waiter.read()
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await information(site)).queued == 0


async def test_operator_sees_holders_and_waiters_and_revokes_with_a_push(site: Site) -> None:
    await activate(site, seats=1)
    holder, granted = await hold(site.leases)
    waiter = site.leases.Lease()
    await waiter.write(acquire(wait=30, host="waiting-ws"))
    await receive(waiter)

    listing = await site.lease_admin.ListLeases(lpb.ListLeasesRequest(), metadata=OPERATOR)
    states = [(entry.state, entry.client_host) for entry in listing.leases]
    assert states == [(lpb.LEASE_STATE_HELD, "ws"), (lpb.LEASE_STATE_QUEUED, "waiting-ws")]

    revoked = await site.lease_admin.RevokeLease(
        lpb.RevokeLeaseRequest(lease_id=granted.lease_id, reason="maintenance"),
        metadata=OPERATOR,
    )
    assert revoked.revoked
    await expect_revoked(holder, "REVOKED_BY_OPERATOR")
    assert (await receive(waiter)).HasField("granted")  # the freed seat goes to the queue
    again = await site.lease_admin.RevokeLease(
        lpb.RevokeLeaseRequest(lease_id=granted.lease_id), metadata=OPERATOR
    )
    assert not again.revoked


async def test_operator_rpcs_need_the_operator_credential(site: Site) -> None:
    for metadata, reason in (
        ((), "CREDENTIAL_MISSING"),
        (bearer_metadata("x"), "CREDENTIAL_INVALID"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await site.lease_admin.ListLeases(lpb.ListLeasesRequest(), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(refused.value) == reason


async def test_an_expired_lease_is_told_to_its_holder(site: Site, clock: FakeClock) -> None:
    await activate(site, seats=1)
    holder, _ = await hold(site.leases)
    clock.advance(91)
    assert await site.license.leasing.release_expired() == 1
    await expect_revoked(holder, "LEASE_EXPIRED")
    assert (await information(site)).used == 0


async def test_resume_keeps_the_seat_and_fences_out_the_old_stream(site: Site) -> None:
    await activate(site, seats=2)
    old, granted = await hold(site.leases)
    new = site.leases.Lease()
    await new.write(
        lpb.LeaseRequest(
            resume=lpb.LeaseResume(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
        )
    )
    resumed = (await receive(new)).granted
    assert (resumed.lease_id, resumed.resumed, resumed.epoch) == (granted.lease_id, True, 2)
    await expect_revoked(old, "LEASE_RESUMED_ELSEWHERE")
    assert (await information(site)).used == 1  # never a second seat for one client
    await new.write(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
    assert (await receive(new)).HasField("heartbeat_ack")
    await release(new)
    assert (await information(site)).used == 0


async def test_resume_with_a_wrong_secret_or_after_expiry_is_refused(
    site: Site, clock: FakeClock
) -> None:
    await activate(site, seats=1)
    old, granted = await hold(site.leases)
    old.cancel()
    for secret, reason in ((granted.lease_secret + "x", "LEASE_NOT_FOUND"),):
        stream = site.leases.Lease()
        await stream.write(
            lpb.LeaseRequest(resume=lpb.LeaseResume(lease_id=granted.lease_id, lease_secret=secret))
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream.read()
        assert reason_of(refused.value) == reason
    clock.advance(91)
    stream = site.leases.Lease()
    await stream.write(
        lpb.LeaseRequest(
            resume=lpb.LeaseResume(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await stream.read()
    assert reason_of(expired.value) == "LEASE_EXPIRED"


async def test_required_above_activated_raises_the_violation_flag(site: Site) -> None:
    await activate(site, seats=30, feature="server.device.es")
    await site.leases.DeclareRequirement(
        lpb.DeclareRequirementRequest(client_host="es-1", feature="server.device.es", required=40)
    )
    reply = await site.leases.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature="server.device.es")
    )
    [devices] = reply.features
    assert (devices.activated, devices.required, devices.violation) == (30, 40, True)
    await site.leases.DeclareRequirement(
        lpb.DeclareRequirementRequest(client_host="es-1", feature="server.device.es", required=25)
    )
    reply = await site.leases.GetLicenseInformation(lpb.GetLicenseInformationRequest())
    assert [(f.required, f.violation) for f in reply.features] == [(25, False)]


async def test_counted_checkout_is_all_or_nothing(site: Site) -> None:
    await activate(site, seats=40, feature="server.device.es")
    stream = site.leases.Lease()
    await stream.write(acquire(count=30, feature="server.device.es"))
    assert (await receive(stream)).granted.count == 30
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await site.leases.Checkout(
            lpb.CheckoutRequest(acquire=acquire(count=11, feature="server.device.es").acquire)
        )
    assert reason_of(refused.value) == "NO_SEAT_AVAILABLE"
    reply = await site.leases.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature="server.device.es")
    )
    assert reply.features[0].used == 30


async def test_an_expired_license_revokes_the_newest_leases(site: Site, clock: FakeClock) -> None:
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    reply = await site.vendor.CreateEntitlement(
        apb.CreateEntitlementRequest(
            customer_organization="Site",
            lines=[
                apb.NewEntitlementLine(
                    feature="client.station",
                    count=2,
                    kind=LicenseKind.LICENSE_KIND_NETWORK,
                    expires_at=to_timestamp(expires),
                )
            ],
        ),
        metadata=bearer_metadata(VENDOR_TOKEN),
    )
    await site.administrator.Activate(
        admin_pb2.ActivateRequest(
            license_server=site.license_address,
            activation_id=reply.entitlement.lines[0].activation_id,
            count=2,
        )
    )
    await activate(site, seats=1)  # a permanent seat stays
    _, first_grant = await hold(site.leases)
    clock.advance(1)
    second, _ = await hold(site.leases)
    clock.advance(1)
    third, _ = await hold(site.leases)
    clock.current = expires + dt.timedelta(seconds=1)
    assert await site.license.leasing.retire_expired_certificates() == 1
    await expect_revoked(third, "LICENSE_EXPIRED")
    await expect_revoked(second, "LICENSE_EXPIRED")
    info = await information(site)
    assert (info.activated, info.used) == (1, 1)
    listing = await site.lease_admin.ListLeases(lpb.ListLeasesRequest(), metadata=OPERATOR)
    assert [entry.lease_id for entry in listing.leases] == [first_grant.lease_id]


@pytest.mark.parametrize("databases", ["postgres"], indirect=True)
async def test_a_revocation_on_one_replica_reaches_a_stream_on_another(site: Site) -> None:
    await activate(site, seats=1)
    replica = await site.start_replica()
    on_replica = lpb_grpc.LeaseServiceStub(site.channel(replica.port))
    holder, granted = await hold(on_replica)
    await site.lease_admin.RevokeLease(
        lpb.RevokeLeaseRequest(lease_id=granted.lease_id), metadata=OPERATOR
    )
    await expect_revoked(holder, "REVOKED_BY_OPERATOR")


@pytest.mark.parametrize("databases", ["postgres"], indirect=True)
async def test_a_seat_freed_on_one_replica_serves_a_waiter_on_another(site: Site) -> None:
    await activate(site, seats=1)
    replica = await site.start_replica()
    holder, _ = await hold(site.leases)
    waiter = lpb_grpc.LeaseServiceStub(site.channel(replica.port)).Lease()
    await waiter.write(acquire(wait=30))
    assert (await receive(waiter)).queued.position == 1
    await release(holder)
    assert (await receive(waiter)).HasField("granted")


async def test_a_stream_heartbeat_is_acknowledged_only_once_written(
    site: Site, clock: FakeClock
) -> None:
    """The acknowledgement comes after the flush that writes the heartbeat committed, and
    tells the expiry on disk: read back without another flush, the lease's row already
    says it, and the sweeper leaves it alone until then."""
    await activate(site, seats=1)
    holder, _ = await hold(site.leases)
    clock.advance(30)
    await holder.write(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
    ack = (await receive(holder)).heartbeat_ack
    told = ack.expires_at.ToDatetime(tzinfo=dt.UTC)
    assert told == clock.now() + dt.timedelta(seconds=90)

    listing = await site.lease_admin.ListLeases(lpb.ListLeasesRequest(), metadata=OPERATOR)
    [entry] = listing.leases
    assert entry.last_heartbeat_at.ToDatetime(tzinfo=dt.UTC) == clock.now()
    assert entry.expires_at.ToDatetime(tzinfo=dt.UTC) == told
    assert await site.license.leasing.heartbeats.flush() == 0  # nothing left to write
    clock.advance(89)  # within the acknowledged expiry: the sweeper leaves it alone
    assert await site.license.leasing.release_expired() == 0


async def test_messages_written_back_to_back_are_answered_in_their_order(site: Site) -> None:
    """A heartbeat answered on the spot never overtakes an earlier message still being
    handled, nor is one after a release answered: heartbeat, release, heartbeat written at
    once get an acknowledgement, then the release, then the stream's end."""
    await activate(site, seats=1)
    holder, granted = await hold(site.leases)
    heartbeat = lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat())
    for message in (heartbeat, lpb.LeaseRequest(release=lpb.LeaseRelease()), heartbeat):
        await holder.write(message)
    assert (await receive(holder)).HasField("heartbeat_ack")
    assert (await receive(holder)).released.lease_id == granted.lease_id
    assert await holder.read() is grpc.aio.EOF
    assert (await information(site)).used == 0


async def test_a_lease_found_gone_when_its_heartbeat_is_written_is_told(
    site: Site, clock: FakeClock
) -> None:
    """A heartbeat whose flush finds the lease released (behind this replica's back, as
    if another replica's NOTIFY were lost) is not acknowledged: the stream is told why."""
    await activate(site, seats=1)
    holder, granted = await hold(site.leases)
    async with site.license.store.transaction() as repo:
        assert await repo.revoke_lease(granted.lease_id, clock.now(), "revoked")
    await holder.write(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
    await expect_revoked(holder, "LEASE_RELEASED")


async def test_a_heartbeat_after_the_known_expiry_asks_the_database(
    site: Site, clock: FakeClock
) -> None:
    await activate(site, seats=1)
    holder, _ = await hold(site.leases)
    clock.advance(91)
    await holder.write(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
    await expect_revoked(holder, "LEASE_EXPIRED")
