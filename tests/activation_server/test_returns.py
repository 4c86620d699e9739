"""Returns at the vendor: signed receipts, partial returns, refusals, the cycling limit,
forced returns; and the line terms certificates carry.

The Activation Server runs alone over real gRPC in process, on SQLite and PostgreSQL;
hosts sign their requests with real Ed25519 keys.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select

from services.activation_server.store.tables import activations
from tessera.activation.v1 import activation_pb2 as apb
from tessera.clock import from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.rpc import error_info
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.vendor import (
    LOCAL,
    NETWORK,
    STAFF,
    ActivationServerUnderTest,
    Host,
    activate,
    expect,
    give_back,
    start_vendor,
)

Code = grpc.StatusCode
CREDITED = apb.RETURN_OUTCOME_CREDITED
REFUSED = apb.RETURN_OUTCOME_REFUSED


async def test_a_full_return_credits_every_seat_back(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    host = Host.new()
    line = await vendor.line(count=5)
    certificate = await activate(vendor, host, line, 3)
    assert (await vendor.line_now(line)).activated == 3
    clock.advance(60)

    receipt, _ = await give_back(vendor, host, certificate)

    assert receipt.outcome == CREDITED
    assert (receipt.credited, receipt.certificate_id) == (3, certificate.certificate_id)
    assert (receipt.host_id, receipt.refusal_reason) == (host.host_id, "")
    assert not receipt.HasField("remaining_certificate")
    assert from_timestamp(receipt.decided_at) == clock.now()
    now = await vendor.line_now(line)
    assert (now.activated, now.available) == (0, 5)
    record = await vendor.activation_of(certificate.certificate_id)
    assert record.state == apb.ACTIVATION_STATE_RETURNED
    assert (record.count, record.activated_count, record.revision) == (0, 3, 0)
    assert from_timestamp(record.returned_at) == clock.now()
    [entry] = await vendor.audit("return.credited")
    assert (entry.subject, entry.actor) == (line.activation_id, host.host_id)
    assert json.loads(entry.detail_json)["credited"] == 3

    # The seats can be activated again, elsewhere.
    await activate(vendor, Host.new("machine-b"), line, 5)


async def test_a_partial_return_reissues_the_certificate_for_the_seats_kept(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    host = Host.new()
    line = await vendor.line(
        count=10,
        partial_return_allowed=True,
        maintenance_ends_at=to_timestamp(clock.now() + dt.timedelta(days=400)),
    )
    certificate = await activate(vendor, host, line, 4)
    assert (certificate.revision, certificate.partial_return_allowed) == (0, True)
    clock.advance(3600)

    receipt, _ = await give_back(vendor, host, certificate, count=1)

    assert (receipt.outcome, receipt.credited) == (CREDITED, 1)
    remaining = vendor.open(receipt.remaining_certificate, LicenseCertificate)
    expected = LicenseCertificate()
    expected.CopyFrom(certificate)
    expected.count, expected.revision = 3, 1
    expected.issued_at.CopyFrom(to_timestamp(clock.now()))
    assert remaining == expected  # same id, host, expiry, maintenance: only these changed
    assert (await vendor.line_now(line)).activated == 3
    record = await vendor.activation_of(certificate.certificate_id)
    assert record.state == apb.ACTIVATION_STATE_ACTIVE
    assert (record.count, record.activated_count, record.revision) == (3, 4, 1)

    # The rest goes back with the current revision.
    receipt, _ = await give_back(vendor, host, remaining)
    assert (receipt.outcome, receipt.credited) == (CREDITED, 3)
    assert (await vendor.line_now(line)).activated == 0
    record = await vendor.activation_of(certificate.certificate_id)
    assert (record.state, record.count, record.revision) == (apb.ACTIVATION_STATE_RETURNED, 0, 1)


async def test_refusals_are_signed_receipts_that_credit_nothing(
    vendor: ActivationServerUnderTest, subtests: pytest.Subtests
) -> None:
    host = Host.new()
    whole_only = await vendor.line(count=5)
    partial = await vendor.line(count=5, partial_return_allowed=True)
    held = await activate(vendor, host, whole_only, 4)
    split = await activate(vendor, host, partial, 4)
    receipt, _ = await give_back(vendor, host, split, count=1)
    kept = vendor.open(receipt.remaining_certificate, LicenseCertificate)  # revision 1
    gone = await activate(vendor, host, partial, 1)
    await give_back(vendor, host, gone)

    cases = {
        "partial-not-allowed": (held, 1, 0, "PARTIAL_RETURN_NOT_ALLOWED"),
        "more-than-held": (held, 5, 0, "COUNT_ABOVE_HELD"),
        "none": (held, 0, 0, "COUNT_ABOVE_HELD"),
        "negative": (held, -1, 0, "COUNT_ABOVE_HELD"),
        "stale-revision": (kept, 3, 0, "STALE_REVISION"),
        "revision-from-the-future": (kept, 3, 2, "STALE_REVISION"),
        "already-returned": (gone, 1, 0, "CERTIFICATE_NOT_HELD"),
    }
    for case, (certificate, count, revision, reason) in cases.items():
        with subtests.test(case):
            lines_before = [await vendor.line_now(x) for x in (whole_only, partial)]
            receipt, _ = await give_back(vendor, host, certificate, count, revision)
            assert (receipt.outcome, receipt.credited) == (REFUSED, 0)
            assert receipt.refusal_reason == reason
            assert receipt.refusal_message
            assert not receipt.HasField("remaining_certificate")
            assert [await vendor.line_now(x) for x in (whole_only, partial)] == lines_before
            last = (await vendor.audit())[-1]
            assert last.action == "return.refused"
            assert json.loads(last.detail_json)["reason"] == reason
    record = await vendor.activation_of(held.certificate_id)
    assert (record.state, record.count) == (apb.ACTIVATION_STATE_ACTIVE, 4)


async def test_the_same_request_gets_the_same_receipt_bytes(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    line = await vendor.line(count=5)
    certificate = await activate(vendor, host, line, 2)
    request = host.return_request(certificate.certificate_id, 2, 0)

    replies = await asyncio.gather(
        *(vendor.activation.Return(apb.ReturnRequest(request=request)) for _ in range(5))
    )

    assert len({reply.receipt.SerializeToString() for reply in replies}) == 1
    assert vendor.open(replies[0].receipt, apb.VendorReturnReceipt).credited == 2
    assert (await vendor.line_now(line)).activated == 0  # credited once, not five times
    assert len(await vendor.audit("return.credited")) == 1
    again = await vendor.activation.Return(apb.ReturnRequest(request=request))
    assert again.receipt == replies[0].receipt

    # A refusal is answered again the same way too, even once its rule no longer holds.
    refused = host.return_request(certificate.certificate_id, 2, 0)
    first = await vendor.activation.Return(apb.ReturnRequest(request=refused))
    assert vendor.open(first.receipt, apb.VendorReturnReceipt).outcome == REFUSED
    second = await vendor.activation.Return(apb.ReturnRequest(request=refused))
    assert second.receipt.SerializeToString() == first.receipt.SerializeToString()


async def test_a_retried_activation_still_gets_its_first_answer_after_a_partial_return(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    line = await vendor.line(count=5, partial_return_allowed=True)
    request = host.activation(line.activation_id, 3)
    first = await vendor.activation.Activate(apb.ActivateRequest(request=request))
    certificate = vendor.open(
        vendor.open(first.response, apb.VendorActivationResponse).certificate, LicenseCertificate
    )
    await give_back(vendor, host, certificate, count=1)
    again = await vendor.activation.Activate(apb.ActivateRequest(request=request))
    assert again.response == first.response  # revision 0: the License Server keeps the higher
    assert (await vendor.line_now(line)).activated == 2


async def test_a_request_id_reused_for_another_return_is_refused(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    line = await vendor.line(count=5, partial_return_allowed=True)
    certificate = await activate(vendor, host, line, 3)
    await give_back(vendor, host, certificate, count=1, request_id="ret-1")
    error = await expect(
        vendor.activation.Return(
            apb.ReturnRequest(
                request=host.return_request(certificate.certificate_id, 2, 0, "ret-1")
            )
        ),
        Code.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    info = error_info(error)
    assert info is not None and info.metadata["request_id"] == "ret-1"
    assert (await vendor.line_now(line)).activated == 2


async def test_only_the_host_that_holds_a_certificate_may_return_it(
    vendor: ActivationServerUnderTest, subtests: pytest.Subtests
) -> None:
    owner = Host.new()
    line = await vendor.line(count=5)
    certificate = await activate(vendor, owner, line, 3)
    intruders = {
        "another-host": Host.new("machine-b"),
        # The right key on another machine has another host id: it holds nothing.
        "same-key-other-machine": owner.on("machine-b"),
    }
    for case, intruder in intruders.items():
        with subtests.test(case):
            audited = len(await vendor.audit())
            await expect(
                vendor.activation.Return(
                    apb.ReturnRequest(
                        request=intruder.return_request(certificate.certificate_id, 3, 0)
                    )
                ),
                Code.PERMISSION_DENIED,
                "RETURN_FROM_ANOTHER_HOST",
            )
            assert (await vendor.line_now(line)).activated == 3
            entries = await vendor.audit()
            assert len(entries) == audited + 1  # the refusal is audited, nothing else
            assert (entries[-1].action, entries[-1].actor) == ("return.refused", intruder.host_id)
            assert json.loads(entries[-1].detail_json)["reason"] == "RETURN_FROM_ANOTHER_HOST"
    record = await vendor.activation_of(certificate.certificate_id)
    assert (record.state, record.count) == (apb.ACTIVATION_STATE_ACTIVE, 3)


async def test_unknown_and_local_certificates_cannot_be_returned(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    await expect(
        vendor.activation.Return(
            apb.ReturnRequest(request=host.return_request("no-such-certificate", 1, 0))
        ),
        Code.NOT_FOUND,
        "CERTIFICATE_NOT_FOUND",
    )
    local_line = await vendor.line(count=2, kind=LOCAL)
    local = await activate(vendor, host, local_line, 1, kind=LOCAL)
    await expect(
        vendor.activation.Return(
            apb.ReturnRequest(request=host.return_request(local.certificate_id, 1, 0))
        ),
        Code.FAILED_PRECONDITION,
        "LOCAL_LICENSE_NOT_RETURNABLE",
    )
    assert (await vendor.line_now(local_line)).activated == 1
    reasons = [json.loads(e.detail_json)["reason"] for e in await vendor.audit("return.refused")]
    assert reasons == ["CERTIFICATE_NOT_FOUND", "LOCAL_LICENSE_NOT_RETURNABLE"]
    # Nor repaired: a client host holding only local licenses gets a clear refusal.
    await expect(
        vendor.activation.Repair(apb.RepairRequest(request=host.repair())),
        Code.FAILED_PRECONDITION,
        "LOCAL_LICENSE_NOT_REPAIRABLE",
    )
    assert (await vendor.activation_of(local.certificate_id)).revision == 0


async def test_bad_return_requests_are_refused_before_anything_is_decided(
    vendor: ActivationServerUnderTest, subtests: pytest.Subtests
) -> None:
    host = Host.new()
    certificate = await activate(vendor, host, await vendor.line(count=5), 2)
    genuine = host.return_request(certificate.certificate_id, 2, 0)
    forged = SignedEnvelope()
    forged.CopyFrom(genuine)
    forged.signature = bytes(64)
    cases = {
        "no-request": (apb.ReturnRequest(), Code.INVALID_ARGUMENT, "INVALID_INPUT"),
        "bad-signature": (
            apb.ReturnRequest(request=forged),
            Code.PERMISSION_DENIED,
            "BAD_SIGNATURE",
        ),
        "activation-request": (
            apb.ReturnRequest(request=host.activation("ACT-0000-0000-0000", 1)),
            Code.INVALID_ARGUMENT,
            "WRONG_PAYLOAD_TYPE",
        ),
        "bad-request-id": (
            apb.ReturnRequest(request=host.return_request(certificate.certificate_id, 2, 0, "a b")),
            Code.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
        "no-certificate-id": (
            apb.ReturnRequest(request=host.return_request("", 2, 0)),
            Code.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
    }
    audited = len(await vendor.audit())
    for case, (request, code, reason) in cases.items():
        with subtests.test(case):
            await expect(vendor.activation.Return(request), code, reason)
    assert len(await vendor.audit()) == audited  # unauthenticated or malformed: not audited
    record = await vendor.activation_of(certificate.certificate_id)
    assert (record.state, record.count) == (apb.ACTIVATION_STATE_ACTIVE, 2)


async def test_returns_per_entitlement_are_limited_in_a_rolling_window(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock
) -> None:
    vendor = await start_vendor(
        tmp_path,
        databases,
        clock,
        "--max-returns-per-entitlement",
        "2",
        "--return-window-days",
        "30",
    )
    try:
        host = Host.new()
        line = await vendor.line(count=5)
        first_return_at = clock.now()
        for _ in range(2):
            certificate = await activate(vendor, host, line, 1)
            receipt, _ = await give_back(vendor, host, certificate)
            assert receipt.outcome == CREDITED
            clock.advance(dt.timedelta(days=1).total_seconds())

        certificate = await activate(vendor, host, line, 1)
        receipt, _ = await give_back(vendor, host, certificate)

        assert (receipt.outcome, receipt.refusal_reason) == (REFUSED, "RETURN_LIMIT_REACHED")
        next_allowed = first_return_at + dt.timedelta(days=30)
        assert next_allowed.strftime("%Y-%m-%dT%H:%M:%SZ") in receipt.refusal_message
        assert (await vendor.line_now(line)).activated == 1

        # Another order is not affected; and once the window moves on, it fits again.
        other = await vendor.line(count=1)
        receipt, _ = await give_back(vendor, host, await activate(vendor, host, other, 1))
        assert receipt.outcome == CREDITED
        clock.current = next_allowed
        receipt, _ = await give_back(vendor, host, certificate)
        assert (receipt.outcome, receipt.credited) == (CREDITED, 1)
    finally:
        await vendor.close()


async def test_force_return_credits_a_dead_hosts_seats_with_a_reason(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    host = Host.new()
    line = await vendor.line(count=5)
    certificate = await activate(vendor, host, line, 3)
    await expect(
        vendor.staff.ForceReturn(
            apb.ForceReturnRequest(certificate_id=certificate.certificate_id, reason="  "),
            metadata=STAFF,
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    await expect(
        vendor.staff.ForceReturn(
            apb.ForceReturnRequest(certificate_id="no-such-certificate", reason="fire"),
            metadata=STAFF,
        ),
        Code.NOT_FOUND,
        "CERTIFICATE_NOT_FOUND",
    )
    await expect(
        vendor.staff.ForceReturn(
            apb.ForceReturnRequest(certificate_id=certificate.certificate_id, reason="fire")
        ),
        Code.UNAUTHENTICATED,
        "CREDENTIAL_MISSING",
    )
    assert (await vendor.line_now(line)).activated == 3
    clock.advance(60)

    reply = await vendor.staff.ForceReturn(
        apb.ForceReturnRequest(
            certificate_id=certificate.certificate_id,
            reason="server destroyed in fire, ticket 4411",
        ),
        metadata=STAFF,
    )

    assert reply.activation.state == apb.ACTIVATION_STATE_FORCE_RETURNED
    assert (reply.activation.count, reply.activation.activated_count) == (0, 3)
    assert from_timestamp(reply.activation.returned_at) == clock.now()
    assert (await vendor.line_now(line)).activated == 0
    [entry] = await vendor.audit("force_return")
    assert (entry.subject, entry.actor) == (line.activation_id, "vendor")
    detail = json.loads(entry.detail_json)
    assert detail["reason"] == "server destroyed in fire, ticket 4411"
    assert (detail["credited"], detail["host_id"]) == (3, host.host_id)

    await expect(
        vendor.staff.ForceReturn(
            apb.ForceReturnRequest(certificate_id=certificate.certificate_id, reason="again"),
            metadata=STAFF,
        ),
        Code.FAILED_PRECONDITION,
        "CERTIFICATE_NOT_HELD",
    )
    # Should the host come back and return it, it is told the certificate is not its any more.
    receipt, _ = await give_back(vendor, host, certificate)
    assert (receipt.outcome, receipt.refusal_reason) == (REFUSED, "CERTIFICATE_NOT_HELD")
    assert (await vendor.line_now(line)).activated == 0


async def test_line_terms_reach_the_order_and_the_certificates(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    now = clock.now()
    maintenance = now + dt.timedelta(days=365)
    order = await vendor.order(
        # The term ends before the date: the term decides.
        apb.NewEntitlementLine(
            feature="client.station",
            count=5,
            kind=NETWORK,
            expires_at=to_timestamp(now + dt.timedelta(days=90)),
            duration=Duration(seconds=30 * 86400),
            maintenance_ends_at=to_timestamp(maintenance),
            partial_return_allowed=True,
        ),
        # The date comes first: the date decides.
        apb.NewEntitlementLine(
            feature="server.enterprise.base",
            count=1,
            kind=NETWORK,
            expires_at=to_timestamp(now + dt.timedelta(days=10)),
            duration=Duration(seconds=30 * 86400),
        ),
        # A term only.
        apb.NewEntitlementLine(
            feature="client.script",
            count=1,
            kind=NETWORK,
            duration=Duration(seconds=7 * 86400),
        ),
    )
    termed, dated, term_only = order.lines
    looked_up = await vendor.activation.GetOrder(
        apb.GetOrderRequest(entitlement_id=order.entitlement_id)
    )
    assert list(looked_up.entitlement.lines) == list(order.lines)
    assert termed.duration.seconds == 30 * 86400
    assert from_timestamp(termed.maintenance_ends_at) == maintenance
    assert (termed.partial_return_allowed, dated.partial_return_allowed) == (True, False)
    assert not term_only.HasField("expires_at")

    clock.advance(3600)
    host = Host.new()
    first = await activate(vendor, host, termed, 1)
    assert from_timestamp(first.expires_at) == clock.now() + dt.timedelta(days=30)
    assert from_timestamp(first.maintenance_ends_at) == maintenance
    assert (first.partial_return_allowed, first.revision) == (True, 0)
    second = await activate(vendor, host, dated, 1)
    assert from_timestamp(second.expires_at) == now + dt.timedelta(days=10)
    assert not second.HasField("maintenance_ends_at")
    third = await activate(vendor, host, term_only, 1)
    assert from_timestamp(third.expires_at) == clock.now() + dt.timedelta(days=7)


async def test_bad_line_terms_are_invalid_argument(
    vendor: ActivationServerUnderTest, subtests: pytest.Subtests
) -> None:
    cases = {
        "zero-duration": ({"duration": Duration(seconds=0)}, "lines[0].duration"),
        "sub-second-duration": ({"duration": Duration(nanos=500)}, "lines[0].duration"),
        "negative-duration": ({"duration": Duration(seconds=-60)}, "lines[0].duration"),
        "endless-duration": ({"duration": Duration(seconds=2**62)}, "lines[0].duration"),
        "impossible-maintenance": (
            {"maintenance_ends_at": Timestamp(seconds=2**40)},
            "lines[0].maintenance_ends_at",
        ),
    }
    for case, (fields, field) in cases.items():
        with subtests.test(case):
            error = await expect(
                vendor.staff.CreateEntitlement(
                    apb.CreateEntitlementRequest(
                        customer_organization="ACME",
                        lines=[
                            apb.NewEntitlementLine(
                                feature="client.station",
                                count=1,
                                kind=NETWORK,
                                **fields,
                            )
                        ],
                    ),
                    metadata=STAFF,
                ),
                Code.INVALID_ARGUMENT,
                "INVALID_INPUT",
            )
            info = error_info(error)
            assert info is not None and info.metadata["field"] == field


async def test_registration_is_recorded_with_the_activation(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    registration = apb.Registration(
        organization="ACME Facilities",
        contact_name="Dana Operator",
        email="dana@example.com",
        phone="+1 555 0100",
        site="Building 4, plant room",
    )
    certificate = await activate(
        vendor, host, await vendor.line(count=5), 2, registration=registration
    )
    async with vendor.engine.connect() as connection:
        stored = await connection.scalar(
            select(activations.c.registration).where(
                activations.c.certificate_id == certificate.certificate_id
            )
        )
    expected = {
        "organization": "ACME Facilities",
        "contact_name": "Dana Operator",
        "email": "dana@example.com",
        "phone": "+1 555 0100",
        "site": "Building 4, plant room",
    }
    assert json.loads(stored) == expected
    [entry] = await vendor.audit("activation.granted")
    assert json.loads(entry.detail_json)["registration"] == expected

    await expect(
        vendor.activation.Activate(
            apb.ActivateRequest(
                request=host.activation((await vendor.line()).activation_id, 1),
                registration=apb.Registration(site="x" * 300),
            )
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )


async def test_an_expired_certificate_is_not_credited_back(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    """Crediting it would let the seats be activated again with a fresh term."""
    host = Host.new()
    line = await vendor.line(count=4, duration=Duration(seconds=7 * 86400))
    certificate = await activate(vendor, host, line, 4)
    clock.advance(8 * 86400)

    receipt, _ = await give_back(vendor, host, certificate)

    assert (receipt.outcome, receipt.refusal_reason) == (REFUSED, "CERTIFICATE_EXPIRED")
    assert receipt.credited == 0
    assert (await vendor.line_now(line)).activated == 4
    record = await vendor.activation_of(certificate.certificate_id)
    assert record.state == apb.ACTIVATION_STATE_ACTIVE
