"""Repairs at the vendor: re-binding what a host holds to its new machine, the limit of
four a year, idempotent answers, and repairs signed by another key.

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

from tessera.activation.v1 import activation_pb2 as apb
from tessera.clock import from_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.rpc import error_info, reason_of
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.vendor import (
    LOCAL,
    STAFF,
    ActivationServerUnderTest,
    Host,
    activate,
    expect,
    give_back,
    start_vendor,
)

Code = grpc.StatusCode


async def repair(
    vendor: ActivationServerUnderTest, request: SignedEnvelope
) -> tuple[apb.VendorRepairResponse, bytes]:
    reply = await vendor.activation.Repair(apb.RepairRequest(request=request))
    return vendor.open(reply.response, apb.VendorRepairResponse), reply.response.SerializeToString()


def certificates_of(
    vendor: ActivationServerUnderTest, answer: apb.VendorRepairResponse
) -> list[LicenseCertificate]:
    return sorted(
        (vendor.open(envelope, LicenseCertificate) for envelope in answer.certificates),
        key=lambda certificate: certificate.certificate_id,
    )


async def test_a_repair_rebinds_the_hosts_certificates_to_its_new_machine(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    old = Host.new("machine-a")
    stations = await vendor.line(count=10)
    servers = await vendor.line(count=2, feature="server.enterprise.base")
    held = sorted(
        [await activate(vendor, old, stations, 3), await activate(vendor, old, servers, 1)],
        key=lambda certificate: certificate.certificate_id,
    )
    returned = await activate(vendor, old, stations, 2)
    await give_back(vendor, old, returned)
    local_line = await vendor.line(count=1, kind=LOCAL)
    await activate(vendor, old, local_line, 1, kind=LOCAL)
    someone_else = await activate(vendor, Host.new("machine-z"), stations, 1)
    clock.advance(86400)

    new = old.on("machine-b")  # the same host key after a hardware change
    answer, _ = await repair(vendor, new.repair(previous_host_id=old.host_id))

    assert (answer.host_id, answer.repairs_left) == (new.host_id, 3)
    assert from_timestamp(answer.repaired_at) == clock.now()
    reissued = certificates_of(vendor, answer)
    assert len(reissued) == 2  # not the returned one, not the local one
    for before, after in zip(held, reissued, strict=True):
        expected = LicenseCertificate()
        expected.CopyFrom(before)
        expected.host_id, expected.revision = new.host_id, 1
        expected.issued_at.CopyFrom(answer.repaired_at)
        assert after == expected
    listed = await vendor.staff.ListActivations(
        apb.ListActivationsRequest(host_id=new.host_id), metadata=STAFF
    )
    assert sorted((a.certificate_id, a.revision) for a in listed.activations) == [
        (certificate.certificate_id, 1) for certificate in held
    ]
    assert (await vendor.activation_of(someone_else.certificate_id)).revision == 0
    [entry] = await vendor.audit("repair.granted")
    assert (entry.subject, entry.actor) == (new.host_id, new.host_id)
    detail = json.loads(entry.detail_json)
    assert detail["previous_host_id"] == old.host_id
    assert sorted(detail["certificate_ids"]) == [c.certificate_id for c in held]

    # The licenses are the new host's now: it may return them; the old host id may not.
    [moved] = [c for c in reissued if c.feature == "client.station"]
    await expect(
        vendor.activation.Return(
            apb.ReturnRequest(request=old.return_request(moved.certificate_id, 3, 1))
        ),
        Code.PERMISSION_DENIED,
        "RETURN_FROM_ANOTHER_HOST",
    )
    receipt, _ = await give_back(vendor, new, moved)
    assert (receipt.outcome, receipt.credited) == (apb.RETURN_OUTCOME_CREDITED, 3)


async def test_a_repair_on_the_same_machine_reissues_at_the_next_revision(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    line = await vendor.line(count=5, partial_return_allowed=True)
    certificate = await activate(vendor, host, line, 4)
    receipt, _ = await give_back(vendor, host, certificate, count=1)  # revision 1
    answer, _ = await repair(vendor, host.repair())
    [reissued] = certificates_of(vendor, answer)
    assert (reissued.certificate_id, reissued.host_id) == (certificate.certificate_id, host.host_id)
    assert (reissued.count, reissued.revision) == (3, 2)
    # A return must now name revision 2.
    stale, _ = await give_back(vendor, host, reissued, revision=1)
    assert stale.refusal_reason == "STALE_REVISION"
    receipt, _ = await give_back(vendor, host, reissued)
    assert receipt.credited == 3


async def test_the_fifth_repair_in_a_year_is_refused_with_the_date_of_the_next(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    host = Host.new()
    certificate = await activate(vendor, host, await vendor.line(count=5), 2)
    first_at = clock.now()
    first_request = host.repair(request_id="repair-1")
    answers = []
    for number in range(1, 5):
        request = first_request if number == 1 else host.repair(request_id=f"repair-{number}")
        answer, raw = await repair(vendor, request)
        assert answer.repairs_left == 4 - number
        # The same request again: the same bytes, and it does not count.
        assert (await repair(vendor, request))[1] == raw
        answers.append(raw)
        clock.advance(dt.timedelta(days=30).total_seconds())

    audited = len(await vendor.audit())
    error = await expect(
        vendor.activation.Repair(apb.RepairRequest(request=host.repair(request_id="repair-5"))),
        Code.RESOURCE_EXHAUSTED,
        "REPAIR_LIMIT_REACHED",
    )
    next_allowed = first_at + dt.timedelta(days=365)
    info = error_info(error)
    assert info is not None
    assert info.metadata["next_allowed_at"] == next_allowed.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert next_allowed.strftime("%Y-%m-%d") in (error.details() or "")
    entries = await vendor.audit()
    assert len(entries) == audited + 1
    assert entries[-1].action == "repair.refused"
    assert json.loads(entries[-1].detail_json)["reason"] == "REPAIR_LIMIT_REACHED"
    assert (await vendor.activation_of(certificate.certificate_id)).revision == 4

    # An old request still gets its old answer; after a year the window has room again.
    assert (await repair(vendor, first_request))[1] == answers[0]
    clock.current = next_allowed
    answer, _ = await repair(vendor, host.repair(request_id="repair-5"))
    assert answer.repairs_left == 0


async def test_concurrent_repairs_never_exceed_the_limit(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock
) -> None:
    vendor = await start_vendor(tmp_path, databases, clock, "--max-repairs-per-year", "3")
    try:
        host = Host.new()
        await activate(vendor, host, await vendor.line(count=5), 1)
        results = await asyncio.gather(
            *(vendor.activation.Repair(apb.RepairRequest(request=host.repair())) for _ in range(8)),
            return_exceptions=True,
        )
        granted = [r for r in results if isinstance(r, apb.RepairResponse)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert (len(granted), len(refused)) == (3, 5)
        assert {reason_of(error) for error in refused} == {"REPAIR_LIMIT_REACHED"}
        left = sorted(
            vendor.open(r.response, apb.VendorRepairResponse).repairs_left for r in granted
        )
        assert left == [0, 1, 2]
    finally:
        await vendor.close()


async def test_a_repair_signed_by_another_key_is_refused(vendor: ActivationServerUnderTest) -> None:
    owner = Host.new("machine-a")
    certificate = await activate(vendor, owner, await vendor.line(count=5), 2)
    thief = Host.new("machine-b")
    await expect(
        vendor.activation.Repair(
            apb.RepairRequest(request=thief.repair(previous_host_id=owner.host_id))
        ),
        Code.PERMISSION_DENIED,
        "REPAIR_FROM_ANOTHER_HOST",
    )
    record = await vendor.activation_of(certificate.certificate_id)
    assert (record.host_id, record.revision) == (owner.host_id, 0)
    [entry] = await vendor.audit("repair.refused")
    assert entry.actor == thief.host_id
    assert json.loads(entry.detail_json)["reason"] == "REPAIR_FROM_ANOTHER_HOST"
    # The refusal did not count against the thief's limit either.
    answer, _ = await repair(vendor, thief.repair())
    assert (list(answer.certificates), answer.repairs_left) == ([], 3)


async def test_a_host_that_holds_nothing_gets_an_empty_repair_that_still_counts(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    first, _ = await repair(vendor, host.repair())
    second, _ = await repair(vendor, host.repair())
    assert (list(first.certificates), first.repairs_left) == ([], 3)
    assert second.repairs_left == 2


async def test_bad_repair_requests_are_refused_and_not_audited(
    vendor: ActivationServerUnderTest, subtests: pytest.Subtests
) -> None:
    host = Host.new()
    other = Host.new("machine-b")
    document = apb.HostRepairRequest.FromString(host.repair(request_id="r-1").payload)
    document.host_id = other.host_id  # a host id that is not this key's
    cases = {
        "no-request": (apb.RepairRequest(), Code.INVALID_ARGUMENT, "INVALID_INPUT"),
        "host-id-of-another-key": (
            apb.RepairRequest(request=host.sign(document)),
            Code.PERMISSION_DENIED,
            "HOST_KEY_MISMATCH",
        ),
        "bad-request-id": (
            apb.RepairRequest(request=host.repair(request_id="no spaces")),
            Code.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
        "overlong-previous-host-id": (
            apb.RepairRequest(request=host.repair(previous_host_id="X" * 33)),
            Code.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
    }
    for case, (request, code, reason) in cases.items():
        with subtests.test(case):
            await expect(vendor.activation.Repair(request), code, reason)
    assert await vendor.audit("repair.refused") == []
    answer, _ = await repair(vendor, host.repair())
    assert answer.repairs_left == 3  # none of the refusals counted


async def test_a_repair_request_id_reused_with_other_content_is_refused(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    await repair(vendor, host.repair(request_id="r-1"))
    await expect(
        vendor.activation.Repair(
            apb.RepairRequest(
                request=host.repair(request_id="r-1", previous_host_id="AAAA-BBBB-CCCC-DDDD")
            )
        ),
        Code.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
