"""Check-in policies, host generations and check-ins at the vendor.

A line's check-in policy is signed into its certificates; each repair that re-binds a
host key's licenses to another host id is a new generation that supersedes the host it
came from; a check-in tells a host, per certificate, whether the vendor still records it
as that host's, and a superseded host that checks in is flagged in the audit log.

The Activation Server runs alone over real gRPC in process, on SQLite and PostgreSQL;
hosts sign their requests with real Ed25519 keys.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tessera.activation.v1 import activation_pb2 as apb
from tessera.clock import from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tests.support.clock import FakeClock
from tests.support.vendor import (
    STAFF,
    ActivationServerUnderTest,
    Host,
    activate,
    expect,
    give_back,
)

Code = grpc.StatusCode
Standing = apb.CheckInStanding
WEEK = Duration(seconds=7 * 86400)
DAY = Duration(seconds=86400)


def check_in_request(
    host: Host, *certificates: LicenseCertificate, request_id: str = ""
) -> SignedEnvelope:
    return host.sign(
        apb.HostCheckInRequest(
            request_id=request_id or f"chk-{uuid.uuid4()}",
            host_id=host.host_id,
            host_public_key=host.identity.public_key,
            machine_binding=host.identity.machine_binding,
            certificates=[
                apb.HeldCertificate(certificate_id=c.certificate_id, revision=c.revision)
                for c in certificates
            ],
            created_at=to_timestamp(dt.datetime.now(dt.UTC)),
        )
    )


async def check_in(
    vendor: ActivationServerUnderTest, request: SignedEnvelope
) -> tuple[apb.VendorCheckInResult, bytes]:
    reply = await vendor.activation.CheckIn(apb.CheckInRequest(request=request))
    return vendor.open(reply.result, apb.VendorCheckInResult), reply.result.SerializeToString()


async def repair(
    vendor: ActivationServerUnderTest, host: Host, previous_host_id: str = ""
) -> list[LicenseCertificate]:
    reply = await vendor.activation.Repair(
        apb.RepairRequest(request=host.repair(previous_host_id=previous_host_id))
    )
    answer = vendor.open(reply.response, apb.VendorRepairResponse)
    return [vendor.open(envelope, LicenseCertificate) for envelope in answer.certificates]


async def test_a_lines_check_in_policy_is_signed_into_every_issue_of_its_certificates(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    checked = await vendor.line(count=4, check_in_interval=WEEK, check_in_grace=DAY)
    assert (checked.check_in_interval, checked.check_in_grace) == (WEEK, DAY)
    assert (await vendor.line_now(checked)).check_in_interval == WEEK  # GetOrder shows it
    certificate = await activate(vendor, host, checked, 2)
    assert (certificate.check_in_interval, certificate.check_in_grace) == (WEEK, DAY)

    # A repair re-issues it with the policy it was signed with.
    [reissued] = await repair(vendor, host.on("machine-b"), previous_host_id=host.host_id)
    assert reissued.revision == 1
    assert (reissued.check_in_interval, reissued.check_in_grace) == (WEEK, DAY)

    # No policy unless the vendor sets one: the default line asks for no check-in.
    plain = await activate(vendor, Host.new(), await vendor.line(count=1), 1)
    assert not plain.HasField("check_in_interval") and not plain.HasField("check_in_grace")
    [entry] = [
        e
        for e in await vendor.audit("entitlement.created")
        if json.loads(e.detail_json)["lines"][0]["activation_id"] == checked.activation_id
    ]
    line_detail = json.loads(entry.detail_json)["lines"][0]
    assert (line_detail["check_in_interval_seconds"], line_detail["check_in_grace_seconds"]) == (
        7 * 86400,
        86400,
    )


@pytest.mark.parametrize(
    ("interval", "grace", "field"),
    [
        (None, DAY, "check_in_grace"),  # a grace without an interval
        (Duration(seconds=30), None, "check_in_interval"),  # below a minute
        (Duration(seconds=400 * 86400), None, "check_in_interval"),
        (WEEK, Duration(seconds=-1), "check_in_grace"),
    ],
)
async def test_a_bad_check_in_policy_is_refused_and_creates_nothing(
    vendor: ActivationServerUnderTest, interval: Duration | None, grace: Duration | None, field: str
) -> None:
    before = len(await vendor.audit())
    line = apb.NewEntitlementLine(feature="client.station", count=1, kind=1)
    if interval is not None:
        line.check_in_interval.CopyFrom(interval)
    if grace is not None:
        line.check_in_grace.CopyFrom(grace)
    error = await expect(vendor.order(line), Code.INVALID_ARGUMENT, "INVALID_INPUT")
    assert field in error.details()
    assert len(await vendor.audit()) == before


async def test_a_rebinding_is_a_new_generation_that_supersedes_the_host_it_came_from(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    original = Host.new("machine-a")
    line = await vendor.line(count=2, check_in_interval=WEEK, check_in_grace=DAY)
    certificate = await activate(vendor, original, line, 2)
    answer, _ = await check_in(vendor, check_in_request(original, certificate))
    assert answer.standing == Standing.CHECK_IN_STANDING_CURRENT
    assert (answer.generation, answer.current_generation) == (0, 0)
    assert from_timestamp(answer.checked_at) == clock.now()

    # The whole data directory copied to machine-b. Checking in before its repair, the
    # copy holds nothing of its own yet: not superseded, nothing flagged.
    clock.advance(3600)
    copy = original.on("machine-b")
    early, _ = await check_in(vendor, check_in_request(copy, certificate))
    assert early.standing == Standing.CHECK_IN_STANDING_CURRENT
    assert [(c.standing, c.holder_host_id) for c in early.certificates] == [
        (Standing.CHECK_IN_STANDING_UNKNOWN, "")
    ]
    # Repaired there, it takes the licenses over.
    [rebound] = await repair(vendor, copy, previous_host_id=original.host_id)
    [entry] = await vendor.audit("repair.rebound")
    assert (entry.subject, entry.actor) == (original.host_id, copy.host_id)
    detail = json.loads(entry.detail_json)
    assert (detail["generation"], detail["previous_host_id"], detail["host_id"]) == (
        1,
        original.host_id,
        copy.host_id,
    )
    assert detail["certificate_ids"] == [certificate.certificate_id]

    # The original checks in: superseded, by whom and since when; flagged in the audit.
    clock.advance(60)
    told, _ = await check_in(vendor, check_in_request(original, certificate))
    assert told.standing == Standing.CHECK_IN_STANDING_SUPERSEDED
    assert (told.superseded_by_host_id, from_timestamp(told.superseded_at)) == (
        copy.host_id,
        clock.now() - dt.timedelta(seconds=60),
    )
    assert (told.generation, told.current_generation) == (0, 1)
    [standing] = told.certificates
    assert (standing.certificate_id, standing.revision, standing.standing) == (
        certificate.certificate_id,
        0,
        Standing.CHECK_IN_STANDING_SUPERSEDED,
    )
    assert standing.holder_host_id == copy.host_id
    await check_in(vendor, check_in_request(original, certificate))
    flagged = await vendor.audit("checkin.superseded")
    assert [json.loads(e.detail_json)["check_ins_since_superseded"] for e in flagged] == [1, 2]
    first = json.loads(flagged[0].detail_json)
    assert first["flagged"] is True and first["superseded_by_host_id"] == copy.host_id
    assert first["superseded_certificate_ids"] == [certificate.certificate_id]
    assert flagged[0].subject == original.host_id

    # What the superseded host is sold afterwards is its own; only the old is superseded.
    fresh = await activate(vendor, original, await vendor.line(count=1), 1)
    mixed, _ = await check_in(vendor, check_in_request(original, certificate, fresh))
    assert [c.standing for c in mixed.certificates] == [
        Standing.CHECK_IN_STANDING_SUPERSEDED,
        Standing.CHECK_IN_STANDING_CURRENT,
    ]
    only_fresh, _ = await check_in(vendor, check_in_request(original, fresh))
    assert only_fresh.standing == Standing.CHECK_IN_STANDING_CURRENT
    flagged = await vendor.audit("checkin.superseded")
    assert len(flagged) == 3  # the one that still listed the re-bound certificate

    # The copy is the current generation; its check-in is not flagged.
    current, _ = await check_in(vendor, check_in_request(copy, rebound))
    assert current.standing == Standing.CHECK_IN_STANDING_CURRENT
    assert (current.generation, current.current_generation) == (1, 1)
    assert [c.standing for c in current.certificates] == [Standing.CHECK_IN_STANDING_CURRENT]
    assert len(await vendor.audit("checkin.superseded")) == 3

    # A repair on the same machine keeps the host id: no new generation.
    await repair(vendor, copy)
    assert len(await vendor.audit("repair.rebound")) == 1
    again, _ = await check_in(vendor, check_in_request(copy, rebound))
    assert (again.generation, again.current_generation) == (1, 1)


async def test_a_check_in_answers_the_same_request_id_the_same_and_tells_strangers_nothing(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    line = await vendor.line(count=5)
    kept = await activate(vendor, host, line, 2)
    returned = await activate(vendor, host, line, 1)
    await give_back(vendor, host, returned)

    request = check_in_request(host, kept, returned, request_id="chk-1")
    answer, exact = await check_in(vendor, request)
    assert [(c.certificate_id, c.standing) for c in answer.certificates] == [
        (kept.certificate_id, Standing.CHECK_IN_STANDING_CURRENT),
        (returned.certificate_id, Standing.CHECK_IN_STANDING_RETURNED),
    ]
    assert answer.standing == Standing.CHECK_IN_STANDING_CURRENT
    _, again = await check_in(vendor, request)
    assert again == exact  # same request id, same signed bytes
    await expect(
        vendor.activation.CheckIn(
            apb.CheckInRequest(request=check_in_request(host, kept, request_id="chk-1"))
        ),
        Code.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )

    # Another host key asking about these certificates learns nothing about them.
    stranger = Host.new("machine-z")
    nosy, _ = await check_in(vendor, check_in_request(stranger, kept))
    [told] = nosy.certificates
    assert (told.standing, told.holder_host_id) == (Standing.CHECK_IN_STANDING_UNKNOWN, "")

    # A request in another host's name is refused, and audits nothing: signed by another
    # key than the one it names, or naming a host id that is not its key's.
    forged = apb.HostCheckInRequest.FromString(check_in_request(host, kept).payload)
    await expect(
        vendor.activation.CheckIn(apb.CheckInRequest(request=stranger.sign(forged))),
        Code.PERMISSION_DENIED,
        "BAD_SIGNATURE",
    )
    forged.host_public_key = stranger.identity.public_key
    await expect(
        vendor.activation.CheckIn(apb.CheckInRequest(request=stranger.sign(forged))),
        Code.PERMISSION_DENIED,
        "HOST_KEY_MISMATCH",
    )
    assert await vendor.audit("checkin.superseded") == []
    listed = await vendor.staff.ListActivations(apb.ListActivationsRequest(), metadata=STAFF)
    assert sorted(a.count for a in listed.activations) == [0, 2]  # a check-in changes nothing
