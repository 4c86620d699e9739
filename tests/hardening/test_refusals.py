"""Refusals on the License Server's lease and trust paths name the real cause, and with it
the way out: seats that broken trusted storage stopped serving are TRUSTED_STORAGE_BROKEN
(repair), never FEATURE_NOT_LICENSED (activate again, which would not help and would use
seats of the order).

A real License Server in process over real gRPC, on SQLite and PostgreSQL, with the
vendor played by a real signing key (tests/trust_support.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import LicenseClient
from clients import TrustedStorageBroken as ClientTrustedStorageBroken
from tessera.license.v1 import license_pb2 as pb
from tessera.rpc import error_info, reason_of
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.trust import LicenseServerUnderTest, SigningVendor

Code = grpc.StatusCode
STATION = "client.station"


@pytest.fixture
async def vendor(tmp_path: Path) -> SigningVendor:
    vendor = SigningVendor()
    vendor.publish(tmp_path / "vendor-keys.pub")
    return vendor


@pytest.fixture
async def site(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock
) -> AsyncIterator[LicenseServerUnderTest]:
    server = LicenseServerUnderTest(
        data_dir=tmp_path / "license_server",
        database_url=await databases.new("license"),
        vendor_keys=tmp_path / "vendor-keys.pub",
        machine_id="machine-a",
        clock=clock,
    )
    await server.start()
    yield server
    await server.stop()


async def refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    assert (failure.value.code(), reason_of(failure.value)) == (code, reason), (
        failure.value.details()
    )
    return failure.value


def checkout(count: int = 1, feature: str = STATION) -> pb.CheckoutRequest:
    return pb.CheckoutRequest(
        acquire=pb.LeaseAcquire(feature=feature, count=count, client_host="ws-01")
    )


def metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    info = error_info(error)
    assert info is not None
    return dict(info.metadata)


async def denied_on_stream(site: LicenseServerUnderTest, wait: float = 0) -> pb.LeaseDenied:
    """Acquire on a lease stream (queueing for ``wait`` s): the denial, and the status the
    stream ends with."""
    acquire = pb.LeaseAcquire(feature=STATION, count=1, client_host="ws-01")
    if wait:
        acquire.wait_timeout.FromTimedelta(dt.timedelta(seconds=wait))
    stream = site.leases.Lease()
    await stream.write(pb.LeaseRequest(acquire=acquire))
    response = await stream.read()
    assert isinstance(response, pb.LeaseResponse) and response.HasField("denied"), response
    assert await stream.code() == Code.FAILED_PRECONDITION
    return response.denied


async def set_clock_back(site: LicenseServerUnderTest, clock: FakeClock) -> None:
    clock.advance(3600)
    assert (await site.health()).healthy  # the high-water mark moves on
    clock.advance(-2 * 3600)
    assert not (await site.health()).healthy  # re-judged: the time-limited license broke


async def test_a_feature_whose_only_certificate_broke_is_refused_as_broken_storage(
    site: LicenseServerUnderTest, vendor: SigningVendor, clock: FakeClock
) -> None:
    await site.activate(vendor, 2, expires_at=clock.now() + dt.timedelta(days=30))
    await set_clock_back(site, clock)

    error = await refused(
        site.leases.Checkout(checkout()), Code.FAILED_PRECONDITION, "TRUSTED_STORAGE_BROKEN"
    )
    assert metadata(error) == {"feature": STATION, "cause": "CLOCK_SET_BACK", "broken_seats": "2"}
    assert "tessera repair" in (error.details() or "")
    assert "activated" not in (error.details() or "")

    # The same on a lease stream, and for a client that would wait in the queue.
    for wait in (0, 5):
        denied = await denied_on_stream(site, wait)
        assert denied.reason == "TRUSTED_STORAGE_BROKEN" and "tessera repair" in denied.message

    # The client library raises its TrustedStorageBroken ("the operator repairs").
    assert site.server is not None
    async with LicenseClient(f"{site.server.port}@127.0.0.1") as client:
        with pytest.raises(ClientTrustedStorageBroken) as raised:
            await client.acquire(STATION)
    assert raised.value.reason == "TRUSTED_STORAGE_BROKEN"


async def test_broken_seats_that_would_serve_the_request_are_named_as_the_cause(
    site: LicenseServerUnderTest, vendor: SigningVendor, clock: FakeClock
) -> None:
    await site.activate(vendor, 2)  # perpetual: a clock set back does not break it
    await site.activate(vendor, 3, expires_at=clock.now() + dt.timedelta(days=30))
    await set_clock_back(site, clock)
    assert await site.activated() == 2

    error = await refused(
        site.leases.Checkout(checkout(4)), Code.FAILED_PRECONDITION, "TRUSTED_STORAGE_BROKEN"
    )
    assert metadata(error)["broken_seats"] == "3"
    # Six seats do not exist here even repaired: that is asking for too many.
    await refused(
        site.leases.Checkout(checkout(6)), Code.FAILED_PRECONDITION, "COUNT_ABOVE_ACTIVATED"
    )
    granted = await site.leases.Checkout(checkout(2))
    assert granted.granted.lease_id


async def test_a_machine_change_is_refused_as_broken_storage_on_every_path(
    site: LicenseServerUnderTest, vendor: SigningVendor
) -> None:
    await site.activate(vendor, 2)
    await site.stop()
    site.machine_id = "machine-b"
    await site.start()

    error = await refused(
        site.leases.Checkout(checkout()), Code.FAILED_PRECONDITION, "TRUSTED_STORAGE_BROKEN"
    )
    assert metadata(error)["cause"] == "MACHINE_CHANGED"
    assert (await denied_on_stream(site, wait=5)).reason == "TRUSTED_STORAGE_BROKEN"
    # Nothing that changes trusted storage goes through either; the message says how out.
    [certificate] = (await site.health()).certificates
    error = await refused(
        site.storage.PrepareReturn(
            pb.PrepareReturnRequest(certificate_id=certificate.certificate_id)
        ),
        Code.FAILED_PRECONDITION,
        "TRUSTED_STORAGE_BROKEN",
    )
    assert "tessera repair" in (error.details() or "")


async def test_an_expired_license_is_refused_with_its_expiry_and_a_new_activation_as_remedy(
    site: LicenseServerUnderTest, vendor: SigningVendor, clock: FakeClock
) -> None:
    ends = clock.now() + dt.timedelta(days=1)
    await site.activate(vendor, 2, expires_at=ends)
    clock.advance(dt.timedelta(days=2).total_seconds())
    assert site.server is not None
    assert await site.server.leasing.retire_expired_certificates() == 1

    error = await refused(site.leases.Checkout(checkout()), Code.NOT_FOUND, "FEATURE_NOT_LICENSED")
    details = error.details() or ""
    assert "expired at" in details and "tessera activate" in details
    assert metadata(error)["expired_at"] == ends.isoformat()


async def test_seats_being_returned_are_refused_saying_so(
    site: LicenseServerUnderTest, vendor: SigningVendor
) -> None:
    certificate = await site.activate(vendor, 2)
    await site.prepare_return(certificate.certificate_id)

    error = await refused(site.leases.Checkout(checkout()), Code.NOT_FOUND, "FEATURE_NOT_LICENSED")
    assert "being returned" in (error.details() or "")


async def test_every_lease_refusal_says_what_to_do(
    site: LicenseServerUnderTest, vendor: SigningVendor
) -> None:
    never = await refused(
        site.leases.Checkout(checkout(feature="client.graphiceditor")),
        Code.NOT_FOUND,
        "FEATURE_NOT_LICENSED",
    )
    assert "tessera activate" in (never.details() or "")

    await site.activate(vendor, 1)
    held = (await site.leases.Checkout(checkout())).granted
    busy = await refused(
        site.leases.Checkout(checkout()), Code.RESOURCE_EXHAUSTED, "NO_SEAT_AVAILABLE"
    )
    assert "wait" in (busy.details() or "") and "activate more" in (busy.details() or "")
    above = await refused(
        site.leases.Checkout(checkout(2)), Code.FAILED_PRECONDITION, "COUNT_ABOVE_ACTIVATED"
    )
    assert "ask for fewer" in (above.details() or "")

    unknown = await refused(
        site.leases.Heartbeat(pb.HeartbeatRequest(lease_id=held.lease_id, lease_secret="wrong")),
        Code.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )
    assert "acquire anew" in (unknown.details() or "")
    await site.leases.Checkin(
        pb.CheckinRequest(lease_id=held.lease_id, lease_secret=held.lease_secret)
    )
    released = await refused(
        site.leases.Heartbeat(
            pb.HeartbeatRequest(lease_id=held.lease_id, lease_secret=held.lease_secret)
        ),
        Code.FAILED_PRECONDITION,
        "LEASE_RELEASED",
    )
    assert "acquire anew" in (released.details() or "")

    stream = site.leases.Lease()
    await stream.write(pb.LeaseRequest(heartbeat=pb.LeaseHeartbeat()))
    assert await stream.code() == Code.FAILED_PRECONDITION
    assert "send acquire or resume first" in (await stream.details() or "")
