"""Refusals on the License Server's lease and trust paths name the real cause, and with it
the way out: seats that broken trusted storage stopped serving are TRUSTED_STORAGE_BROKEN
(repair), never FEATURE_NOT_LICENSED (activate again, which would not help and would use
seats of the order).

A real License Server in process over real gRPC, on SQLite and PostgreSQL, with the
vendor played by a real signing key (tests/support/trust.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from clients import LicenseClient
from clients import TrustedStorageBroken as ClientTrustedStorageBroken
from tessera.license.v1 import license_pb2 as pb
from tessera.rpc import error_info, reason_of
from tests.support.clock import FakeClock
from tests.support.trust import LicenseServerUnderTest, SigningVendor

Code = grpc.StatusCode
STATION = "client.station"


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


async def denied_on_stream(
    lone_license_server: LicenseServerUnderTest, wait: float = 0
) -> pb.LeaseDenied:
    """Acquire on a lease stream (queueing for ``wait`` s): the denial, and the status the
    stream ends with."""
    acquire = pb.LeaseAcquire(feature=STATION, count=1, client_host="ws-01")
    if wait:
        acquire.wait_timeout.FromTimedelta(dt.timedelta(seconds=wait))
    stream = lone_license_server.leases.Lease()
    await stream.write(pb.LeaseRequest(acquire=acquire))
    response = await stream.read()
    assert isinstance(response, pb.LeaseResponse) and response.HasField("denied"), response
    assert await stream.code() == Code.FAILED_PRECONDITION
    return response.denied


async def set_clock_back(lone_license_server: LicenseServerUnderTest, clock: FakeClock) -> None:
    clock.advance(3600)
    assert (await lone_license_server.health()).healthy  # the high-water mark moves on
    clock.advance(-2 * 3600)
    assert not (
        await lone_license_server.health()
    ).healthy  # re-judged: the time-limited license broke


async def test_a_feature_whose_only_certificate_broke_is_refused_as_broken_storage(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    await lone_license_server.activate(
        signing_vendor, 2, expires_at=clock.now() + dt.timedelta(days=30)
    )
    await set_clock_back(lone_license_server, clock)

    error = await refused(
        lone_license_server.leases.Checkout(checkout()),
        Code.FAILED_PRECONDITION,
        "TRUSTED_STORAGE_BROKEN",
    )
    assert metadata(error) == {"feature": STATION, "cause": "CLOCK_SET_BACK", "broken_seats": "2"}
    assert "tessera repair" in (error.details() or "")
    assert "activated" not in (error.details() or "")

    # The same on a lease stream, and for a client that would wait in the queue.
    for wait in (0, 5):
        denied = await denied_on_stream(lone_license_server, wait)
        assert denied.reason == "TRUSTED_STORAGE_BROKEN" and "tessera repair" in denied.message

    # The client library raises its TrustedStorageBroken ("the operator repairs").
    assert lone_license_server.server is not None
    async with LicenseClient(f"{lone_license_server.server.port}@127.0.0.1") as client:
        with pytest.raises(ClientTrustedStorageBroken) as raised:
            await client.acquire(STATION)
    assert raised.value.reason == "TRUSTED_STORAGE_BROKEN"


async def test_broken_seats_that_would_serve_the_request_are_named_as_the_cause(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    await lone_license_server.activate(
        signing_vendor, 2
    )  # perpetual: a clock set back does not break it
    await lone_license_server.activate(
        signing_vendor, 3, expires_at=clock.now() + dt.timedelta(days=30)
    )
    await set_clock_back(lone_license_server, clock)
    assert await lone_license_server.activated() == 2

    error = await refused(
        lone_license_server.leases.Checkout(checkout(4)),
        Code.FAILED_PRECONDITION,
        "TRUSTED_STORAGE_BROKEN",
    )
    assert metadata(error)["broken_seats"] == "3"
    # Six seats do not exist here even repaired: that is asking for too many.
    await refused(
        lone_license_server.leases.Checkout(checkout(6)),
        Code.FAILED_PRECONDITION,
        "COUNT_ABOVE_ACTIVATED",
    )
    granted = await lone_license_server.leases.Checkout(checkout(2))
    assert granted.granted.lease_id


async def test_a_machine_change_is_refused_as_broken_storage_on_every_path(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    await lone_license_server.activate(signing_vendor, 2)
    await lone_license_server.stop()
    lone_license_server.machine_id = "machine-b"
    await lone_license_server.start()

    error = await refused(
        lone_license_server.leases.Checkout(checkout()),
        Code.FAILED_PRECONDITION,
        "TRUSTED_STORAGE_BROKEN",
    )
    assert metadata(error)["cause"] == "MACHINE_CHANGED"
    assert (await denied_on_stream(lone_license_server, wait=5)).reason == "TRUSTED_STORAGE_BROKEN"
    # Nothing that changes trusted storage goes through either; the message says how out.
    [certificate] = (await lone_license_server.health()).certificates
    error = await refused(
        lone_license_server.storage.PrepareReturn(
            pb.PrepareReturnRequest(certificate_id=certificate.certificate_id)
        ),
        Code.FAILED_PRECONDITION,
        "TRUSTED_STORAGE_BROKEN",
    )
    assert "tessera repair" in (error.details() or "")


async def test_an_expired_license_is_refused_with_its_expiry_and_a_new_activation_as_remedy(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    ends = clock.now() + dt.timedelta(days=1)
    await lone_license_server.activate(signing_vendor, 2, expires_at=ends)
    clock.advance(dt.timedelta(days=2).total_seconds())
    assert lone_license_server.server is not None
    assert await lone_license_server.server.leasing.retire_expired_certificates() == 1

    error = await refused(
        lone_license_server.leases.Checkout(checkout()), Code.NOT_FOUND, "FEATURE_NOT_LICENSED"
    )
    details = error.details() or ""
    assert "expired at" in details and "tessera activate" in details
    assert metadata(error)["expired_at"] == ends.isoformat()


async def test_seats_being_returned_are_refused_saying_so(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    certificate = await lone_license_server.activate(signing_vendor, 2)
    await lone_license_server.prepare_return(certificate.certificate_id)

    error = await refused(
        lone_license_server.leases.Checkout(checkout()), Code.NOT_FOUND, "FEATURE_NOT_LICENSED"
    )
    assert "being returned" in (error.details() or "")


async def test_every_lease_refusal_says_what_to_do(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    never = await refused(
        lone_license_server.leases.Checkout(checkout(feature="client.graphiceditor")),
        Code.NOT_FOUND,
        "FEATURE_NOT_LICENSED",
    )
    assert "tessera activate" in (never.details() or "")

    await lone_license_server.activate(signing_vendor, 1)
    held = (await lone_license_server.leases.Checkout(checkout())).granted
    busy = await refused(
        lone_license_server.leases.Checkout(checkout()),
        Code.RESOURCE_EXHAUSTED,
        "NO_SEAT_AVAILABLE",
    )
    assert "wait" in (busy.details() or "") and "activate more" in (busy.details() or "")
    above = await refused(
        lone_license_server.leases.Checkout(checkout(2)),
        Code.FAILED_PRECONDITION,
        "COUNT_ABOVE_ACTIVATED",
    )
    assert "ask for fewer" in (above.details() or "")

    unknown = await refused(
        lone_license_server.leases.Heartbeat(
            pb.HeartbeatRequest(lease_id=held.lease_id, lease_secret="wrong")
        ),
        Code.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )
    assert "acquire anew" in (unknown.details() or "")
    await lone_license_server.leases.Checkin(
        pb.CheckinRequest(lease_id=held.lease_id, lease_secret=held.lease_secret)
    )
    released = await refused(
        lone_license_server.leases.Heartbeat(
            pb.HeartbeatRequest(lease_id=held.lease_id, lease_secret=held.lease_secret)
        ),
        Code.FAILED_PRECONDITION,
        "LEASE_RELEASED",
    )
    assert "acquire anew" in (released.details() or "")

    stream = lone_license_server.leases.Lease()
    await stream.write(pb.LeaseRequest(heartbeat=pb.LeaseHeartbeat()))
    assert await stream.code() == Code.FAILED_PRECONDITION
    assert "send acquire or resume first" in (await stream.details() or "")
