"""Check-in on the License Server: the vendor's word on what this host holds, and the
check-in policy a certificate may carry.

Each test runs a real License Server (gRPC on loopback, SQLite and PostgreSQL, a fake
clock) and plays the vendor with a real signing key, so it can hand the License Server
genuine check-in results, forged ones, ones for other hosts and old ones held back.
"""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import select

from services.license_server.store.tables import check_ins
from tessera.activation.v1 import activation_pb2 as apb
from tessera.clock import from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.license.v1 import license_pb2 as pb
from tessera.rpc import reason_of
from tests.support.clock import FakeClock
from tests.support.trust import LicenseServerUnderTest, SigningVendor, new_activation_id

State = pb.CertificateState
Standing = apb.CheckInStanding
Code = grpc.StatusCode
DAY = 86400
STATION = "client.station"
WRONG_HOST = "CERTIFICATE_FOR_ANOTHER_HOST"


async def activate(
    lone_license_server: LicenseServerUnderTest,
    signing_vendor: SigningVendor,
    clock: FakeClock,
    count: int,
    *,
    interval_days: int = 0,
    grace_days: int = 0,
) -> LicenseCertificate:
    """Activate ``count`` seats whose certificate carries a check-in policy (0: none),
    issued at the fake clock's now."""
    prepared = await lone_license_server.storage.PrepareActivation(
        pb.PrepareActivationRequest(activation_id=new_activation_id(), count=count)
    )
    request = apb.HostActivationRequest.FromString(prepared.request.payload)
    certificate = signing_vendor.certificate(request)
    certificate.issued_at.CopyFrom(to_timestamp(clock.now()))
    if interval_days:
        certificate.check_in_interval.CopyFrom(Duration(seconds=interval_days * DAY))
        certificate.check_in_grace.CopyFrom(Duration(seconds=grace_days * DAY))
    answer = signing_vendor.sign(
        apb.VendorActivationResponse(
            request_id=request.request_id,
            host_id=request.host_id,
            certificate=signing_vendor.sign(certificate),
        )
    )
    installed = await lone_license_server.storage.InstallActivation(
        pb.InstallActivationRequest(response=answer)
    )
    return installed.certificate.certificate


def result_for(
    signing_vendor: SigningVendor,
    request: apb.HostCheckInRequest,
    checked_at: dt.datetime,
    standing: int = Standing.CHECK_IN_STANDING_CURRENT,
    holder: str = "",
) -> SignedEnvelope:
    """The vendor's answer to ``request``: every certificate listed has ``standing``."""
    superseded = standing == Standing.CHECK_IN_STANDING_SUPERSEDED
    return signing_vendor.sign(
        apb.VendorCheckInResult(
            request_id=request.request_id,
            host_id=request.host_id,
            checked_at=to_timestamp(checked_at),
            standing=Standing.CHECK_IN_STANDING_SUPERSEDED
            if superseded
            else Standing.CHECK_IN_STANDING_CURRENT,
            certificates=[
                apb.CertificateCheckIn(
                    certificate_id=c.certificate_id,
                    revision=c.revision,
                    standing=standing,  # type: ignore[arg-type]
                    holder_host_id=holder,
                )
                for c in request.certificates
            ],
            superseded_by_host_id=holder if superseded else "",
            superseded_at=to_timestamp(checked_at) if superseded else None,
            generation=0,
            current_generation=1 if superseded else 0,
        )
    )


async def prepare(
    lone_license_server: LicenseServerUnderTest, only_if_due: bool = False
) -> tuple[pb.PrepareCheckInResponse, apb.HostCheckInRequest]:
    prepared = await lone_license_server.storage.PrepareCheckIn(
        pb.PrepareCheckInRequest(only_if_due=only_if_due)
    )
    request = apb.HostCheckInRequest()
    if prepared.request_id:
        request.ParseFromString(prepared.request.payload)
    return prepared, request


async def complete(
    lone_license_server: LicenseServerUnderTest, result: SignedEnvelope
) -> pb.CheckInStatus:
    done = await lone_license_server.storage.CompleteCheckIn(
        pb.CompleteCheckInRequest(result=result)
    )
    return done.status


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    return error.value


async def checkout(
    lone_license_server: LicenseServerUnderTest, count: int = 1
) -> pb.CheckoutResponse:
    return await lone_license_server.leases.Checkout(
        pb.CheckoutRequest(acquire=pb.LeaseAcquire(feature=STATION, count=count))
    )


async def stored_results(lone_license_server: LicenseServerUnderTest) -> list[bytes | None]:
    assert lone_license_server.server is not None
    async with lone_license_server.server.store.engine.connect() as connection:
        rows = await connection.execute(select(check_ins.c.result_envelope))
        return [row.result_envelope for row in rows]


async def test_without_a_policy_no_check_in_is_ever_needed(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    await activate(lone_license_server, signing_vendor, clock, 2)
    clock.advance(2 * 365 * DAY)  # two years without the Internet
    prepared, _ = await prepare(lone_license_server, only_if_due=True)
    assert prepared.request_id == "" and not prepared.HasField("request")
    assert not prepared.status.required and not prepared.status.HasField("deadline")
    health = await lone_license_server.health()
    assert health.healthy and not health.check_in.required
    assert not health.certificates[0].HasField("check_in_deadline")
    assert (await checkout(lone_license_server, 2)).granted.count == 2
    assert await stored_results(lone_license_server) == []  # nothing was even prepared


async def test_an_overdue_check_in_stops_the_seats_until_the_vendor_finds_them_current(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    issued = clock.now()
    certificate = await activate(
        lone_license_server, signing_vendor, clock, 2, interval_days=7, grace_days=1
    )
    health = await lone_license_server.health()
    assert health.check_in.required
    assert from_timestamp(health.check_in.due_at) == issued + dt.timedelta(days=7)
    assert from_timestamp(health.check_in.deadline) == issued + dt.timedelta(days=8)
    assert from_timestamp(health.certificates[0].check_in_deadline) == issued + dt.timedelta(days=8)
    clock.advance(6 * DAY)
    prepared, _ = await prepare(lone_license_server, only_if_due=True)
    assert prepared.request_id == ""  # not due yet

    stream = lone_license_server.leases.Lease()
    await stream.write(pb.LeaseRequest(acquire=pb.LeaseAcquire(feature=STATION, count=1)))
    assert (await stream.read()).HasField("granted")
    clock.advance(2 * DAY - 1)  # due, in the grace period: still serving
    assert (await lone_license_server.health()).healthy
    prepared, due_request = await prepare(lone_license_server, only_if_due=True)
    assert prepared.request_id and [c.certificate_id for c in due_request.certificates] == [
        certificate.certificate_id
    ]

    clock.advance(2)  # past due + grace, and no check-in verified
    health = await lone_license_server.health()
    [trust] = health.certificates
    assert (trust.state, trust.cause) == (
        State.CERTIFICATE_STATE_CHECK_IN_OVERDUE,
        "CHECK_IN_OVERDUE",
    )
    assert "tessera check-in" in health.repair_advice
    assert health.check_in.withdrawn_seats == 2
    told = await stream.read()
    assert told.HasField("revoked") and told.revoked.reason == "CHECK_IN_OVERDUE"
    error = await refused(checkout(lone_license_server))
    assert (error.code(), reason_of(error)) == (Code.FAILED_PRECONDITION, "CHECK_IN_OVERDUE")
    assert await lone_license_server.activated() == 0

    # The check-in prepared while due is answered now: current, and the seats serve.
    status = await complete(
        lone_license_server, result_for(signing_vendor, due_request, clock.now())
    )
    assert status.withdrawn_seats == 0 and not status.superseded
    assert from_timestamp(status.last_checked_at) == clock.now()
    assert from_timestamp(status.deadline) == clock.now() + dt.timedelta(days=8)
    assert await lone_license_server.activated() == 2
    assert (await checkout(lone_license_server)).granted.count == 1

    # A clock set back would stretch the deadline: it breaks the license as it does a
    # time-limited one.
    clock.advance(3600)
    assert (await lone_license_server.health()).healthy
    clock.advance(-2 * 3600)
    [trust] = (await lone_license_server.health()).certificates
    assert trust.cause == "CLOCK_SET_BACK"


async def test_a_superseded_certificate_stops_serving_at_once_and_for_good(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    # No policy: the vendor's word stands all the same when the site checks in.
    await activate(lone_license_server, signing_vendor, clock, 2)
    stream = lone_license_server.leases.Lease()
    await stream.write(pb.LeaseRequest(acquire=pb.LeaseAcquire(feature=STATION, count=2)))
    assert (await stream.read()).HasField("granted")

    _, request = await prepare(lone_license_server)
    status = await complete(
        lone_license_server,
        result_for(
            signing_vendor,
            request,
            clock.now(),
            Standing.CHECK_IN_STANDING_SUPERSEDED,
            "HOLD-ERHO-STEL",
        ),
    )
    assert status.superseded and status.superseded_by_host_id == "HOLD-ERHO-STEL"
    assert status.withdrawn_seats == 2 and not status.required
    told = await stream.read()
    assert told.HasField("revoked") and told.revoked.reason == "CERTIFICATE_SUPERSEDED"
    assert "HOLD-ERHO-STEL" in told.revoked.message
    error = await refused(checkout(lone_license_server))
    assert (error.code(), reason_of(error)) == (Code.FAILED_PRECONDITION, "CERTIFICATE_SUPERSEDED")
    health = await lone_license_server.health()
    [trust] = health.certificates
    assert (trust.state, trust.cause) == (
        State.CERTIFICATE_STATE_SUPERSEDED,
        "CERTIFICATE_SUPERSEDED",
    )
    assert not health.healthy and "repair does not bring them back" in health.repair_advice
    # A repair would re-issue nothing and count: it is refused unless forced.
    error = await refused(lone_license_server.storage.PrepareRepair(pb.PrepareRepairRequest()))
    assert (error.code(), reason_of(error)) == (Code.FAILED_PRECONDITION, "NOTHING_TO_REPAIR")
    assert "withdrawn by a check-in" in error.details()

    # Durable: a restart, or a year later, changes nothing.
    await lone_license_server.stop()
    await lone_license_server.start()
    clock.advance(365 * DAY)
    assert await lone_license_server.activated() == 0
    assert (await lone_license_server.health()).certificates[
        0
    ].state == State.CERTIFICATE_STATE_SUPERSEDED


async def test_a_forged_or_misaddressed_check_in_result_is_refused_and_stores_nothing(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    await activate(lone_license_server, signing_vendor, clock, 3)
    _, request = await prepare(lone_license_server)
    superseded = result_for(
        signing_vendor,
        request,
        clock.now(),
        Standing.CHECK_IN_STANDING_SUPERSEDED,
        "HOLD-ERHO-STEL",
    )

    # One payload byte changed: the signature no longer matches.
    altered = SignedEnvelope()
    altered.CopyFrom(superseded)
    altered.payload = altered.payload[:-1] + bytes([altered.payload[-1] ^ 1])
    # Signed by a key this server does not trust.
    stranger = SigningVendor().sign(apb.VendorCheckInResult.FromString(superseded.payload))
    # For another host, for a check-in never prepared, about other certificates.
    elsewhere = apb.HostCheckInRequest()
    elsewhere.CopyFrom(request)
    elsewhere.host_id = "HOST-ELSE-WHER-E000"
    unknown = apb.HostCheckInRequest()
    unknown.CopyFrom(request)
    unknown.request_id = "never-prepared"
    other = apb.HostCheckInRequest()
    other.CopyFrom(request)
    other.certificates[0].revision = 7
    now = clock.now()
    cases = [
        (altered, Code.PERMISSION_DENIED, "BAD_SIGNATURE"),
        (stranger, Code.PERMISSION_DENIED, "UNKNOWN_SIGNING_KEY"),
        (result_for(signing_vendor, elsewhere, now), Code.PERMISSION_DENIED, WRONG_HOST),
        (result_for(signing_vendor, unknown, now), Code.NOT_FOUND, "REQUEST_NOT_PREPARED_HERE"),
        (result_for(signing_vendor, other, now), Code.INVALID_ARGUMENT,
         "ANSWER_DOES_NOT_MATCH_REQUEST"),
    ]  # fmt: skip
    for forged, code, reason in cases:
        error = await refused(complete(lone_license_server, forged))
        assert (error.code(), reason_of(error)) == (code, reason), error.details()
        assert await stored_results(lone_license_server) == [
            None
        ]  # the prepared check-in, unanswered
        assert await lone_license_server.activated() == 3
        assert (await lone_license_server.health()).healthy

    # The genuine answer then installs, once.
    assert (await complete(lone_license_server, superseded)).superseded
    again = await lone_license_server.storage.CompleteCheckIn(
        pb.CompleteCheckInRequest(result=superseded)
    )
    assert again.already_completed and again.status.superseded
    assert await stored_results(lone_license_server) == [superseded.SerializeToString()]
    # The same check-in answered again with other bytes is refused too.
    error = await refused(
        complete(lone_license_server, result_for(signing_vendor, request, clock.now()))
    )
    assert reason_of(error) == "ANSWER_DOES_NOT_MATCH_REQUEST"
    assert await lone_license_server.activated() == 0


async def test_an_older_answer_held_back_and_installed_later_changes_nothing(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    await activate(lone_license_server, signing_vendor, clock, 2, interval_days=7, grace_days=1)
    _, first = await prepare(lone_license_server)
    current_then = result_for(signing_vendor, first, clock.now())
    clock.advance(3 * DAY)
    _, second = await prepare(lone_license_server)
    superseded_now = result_for(
        signing_vendor, second, clock.now(), Standing.CHECK_IN_STANDING_SUPERSEDED, "HOLD-ERHO-STEL"
    )
    assert (await complete(lone_license_server, superseded_now)).superseded
    # The "current" answer from three days before, kept back and offered now.
    status = await complete(lone_license_server, current_then)
    assert status.superseded and status.withdrawn_seats == 2
    assert from_timestamp(status.last_checked_at) == clock.now()
    assert await lone_license_server.activated() == 0
    # Nor does a "current" answer stamped later (a vendor replica whose clock runs
    # ahead, or a forged time): the vendor never hands a re-bound revision back.
    _, third = await prepare(lone_license_server)
    status = await complete(
        lone_license_server, result_for(signing_vendor, third, clock.now() + dt.timedelta(days=1))
    )
    assert status.superseded and status.superseded_by_host_id == "HOLD-ERHO-STEL"
    assert await lone_license_server.activated() == 0
    await lone_license_server.stop()
    await lone_license_server.start()
    assert (await lone_license_server.health()).certificates[
        0
    ].state == State.CERTIFICATE_STATE_SUPERSEDED


async def test_a_server_whose_storage_is_broken_repairs_before_it_checks_in(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    await activate(lone_license_server, signing_vendor, clock, 2, interval_days=7, grace_days=1)
    clock.advance(8 * DAY)  # due
    await lone_license_server.stop()
    lone_license_server.machine_id = (
        "machine-b"  # new hardware: every certificate is another host's
    )
    await lone_license_server.start()
    prepared, _ = await prepare(lone_license_server, only_if_due=True)
    assert prepared.request_id == ""  # the Administrator's pass skips it
    error = await refused(prepare(lone_license_server))
    assert (error.code(), reason_of(error)) == (Code.FAILED_PRECONDITION, "TRUSTED_STORAGE_BROKEN")
    assert await stored_results(lone_license_server) == []
