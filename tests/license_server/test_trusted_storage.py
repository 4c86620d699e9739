"""Trusted storage: returns, repairs, and the tamper-evident ledger, attacked.

Each test runs a real License Server (gRPC on loopback, SQLite and PostgreSQL) and plays
the vendor with a real signing key, so it can hand the License Server good answers,
forged ones and answers for other hosts.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
from sqlalchemy import delete, select, update

from services.license_server.store.tables import certificates, pending_requests, trust_ledger
from tessera.activation.v1 import activation_pb2 as apb
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.license.v1 import license_pb2 as pb
from tessera.rpc import reason_of
from tests.support.clock import FakeClock
from tests.support.trust import LicenseServerUnderTest, SigningVendor, restore, snapshot

State = pb.CertificateState


async def restart(server: LicenseServerUnderTest, **changes: object) -> None:
    await server.stop()
    for name, value in changes.items():
        setattr(server, name, value)
    await server.start()


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    return error.value


# Returns


async def test_a_return_withholds_the_seats_before_the_vendor_credits_them(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    certificate = await lone_license_server.activate(signing_vendor, 5)
    assert await lone_license_server.activated() == 5
    prepared, request = await lone_license_server.prepare_return(certificate.certificate_id)
    assert request.count == 5 and request.host_id == lone_license_server.host_id
    # Not credited yet, and already not serving.
    assert await lone_license_server.activated() == 0
    [trust] = (await lone_license_server.health()).certificates
    assert (trust.state, trust.returning) == (State.CERTIFICATE_STATE_RETURNING, 5)
    again, _ = await lone_license_server.prepare_return(
        certificate.certificate_id, request_id=request.request_id
    )
    assert again.request == prepared.request  # same request id, same signed bytes

    receipt = signing_vendor.credit(request)
    done = await lone_license_server.storage.CompleteReturn(
        pb.CompleteReturnRequest(receipt=receipt)
    )
    assert (done.credited, done.count, done.already_completed) == (True, 5, False)
    listed = await lone_license_server.storage.ListCertificates(pb.ListCertificatesRequest())
    assert list(listed.certificates) == []
    twice = await lone_license_server.storage.CompleteReturn(
        pb.CompleteReturnRequest(receipt=receipt)
    )
    assert twice.already_completed
    assert await lone_license_server.activated() == 0
    assert (await lone_license_server.health()).healthy


async def test_seats_in_use_are_not_returned_unless_forced_and_then_holders_are_told(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    certificate = await lone_license_server.activate(signing_vendor, 2)
    stream = lone_license_server.leases.Lease()
    await stream.write(pb.LeaseRequest(acquire=pb.LeaseAcquire(feature="client.station", count=2)))
    granted = await stream.read()
    assert granted.HasField("granted")

    error = await refused(lone_license_server.prepare_return(certificate.certificate_id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(error) == "SEATS_IN_USE"
    assert await lone_license_server.activated() == 2  # nothing changed

    prepared, _ = await lone_license_server.prepare_return(certificate.certificate_id, force=True)
    assert prepared.revoked_leases == 1
    told = await stream.read()
    assert told.HasField("revoked") and told.revoked.reason == "LICENSE_RETURNED"
    assert await lone_license_server.activated() == 0


async def test_what_one_activation_brought_returns_together_unless_the_line_allows_less(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    whole = await lone_license_server.activate(signing_vendor, 4)
    error = await refused(lone_license_server.prepare_return(whole.certificate_id, count=1))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(error) == "PARTIAL_RETURN_NOT_ALLOWED"
    assert await lone_license_server.activated() == 4

    partial = await lone_license_server.activate(signing_vendor, 3, partial_return_allowed=True)
    _, request = await lone_license_server.prepare_return(partial.certificate_id, count=1)
    assert await lone_license_server.activated() == 6
    kept = signing_vendor.certificate(
        apb.HostActivationRequest(
            request_id=partial.request_id,
            activation_id=partial.activation_id,
            host_id=lone_license_server.host_id,
        ),
        certificate_id=partial.certificate_id,
        count=2,
        revision=1,
        partial_return_allowed=True,
    )
    done = await lone_license_server.storage.CompleteReturn(
        pb.CompleteReturnRequest(receipt=signing_vendor.credit(request, remaining=kept))
    )
    assert done.remaining.certificate.count == 2
    assert done.remaining.certificate.revision == 1
    assert await lone_license_server.activated() == 6
    assert (await lone_license_server.health()).healthy


async def test_a_refused_return_serves_again_and_a_not_held_one_leaves(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    certificate = await lone_license_server.activate(signing_vendor, 3)
    _, request = await lone_license_server.prepare_return(certificate.certificate_id)
    assert await lone_license_server.activated() == 0
    done = await lone_license_server.storage.CompleteReturn(
        pb.CompleteReturnRequest(receipt=signing_vendor.refuse(request, "RETURN_LIMIT_REACHED"))
    )
    assert not done.credited
    assert await lone_license_server.activated() == 3

    _, request = await lone_license_server.prepare_return(certificate.certificate_id)
    await lone_license_server.storage.CompleteReturn(
        pb.CompleteReturnRequest(receipt=signing_vendor.refuse(request, "CERTIFICATE_NOT_HELD"))
    )
    assert await lone_license_server.activated() == 0
    assert (await lone_license_server.health()).healthy


async def test_forged_and_misaddressed_receipts_change_nothing(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, tmp_path: Path
) -> None:
    certificate = await lone_license_server.activate(signing_vendor, 3)
    _, request = await lone_license_server.prepare_return(certificate.certificate_id)
    good = signing_vendor.credit(request)

    flipped = SignedEnvelope()
    flipped.CopyFrom(good)
    flipped.payload = bytes([flipped.payload[0] ^ 1]) + flipped.payload[1:]
    error = await refused(
        lone_license_server.storage.CompleteReturn(pb.CompleteReturnRequest(receipt=flipped))
    )
    assert reason_of(error) == "BAD_SIGNATURE"

    stranger = SigningVendor()
    error = await refused(
        lone_license_server.storage.CompleteReturn(
            pb.CompleteReturnRequest(receipt=stranger.credit(request))
        )
    )
    assert reason_of(error) == "UNKNOWN_SIGNING_KEY"

    elsewhere = apb.HostReturnRequest()
    elsewhere.CopyFrom(request)
    elsewhere.host_id = "HOST-ELSE-WHERE-0000"
    error = await refused(
        lone_license_server.storage.CompleteReturn(
            pb.CompleteReturnRequest(receipt=signing_vendor.credit(elsewhere))
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED

    unknown = apb.HostReturnRequest()
    unknown.CopyFrom(request)
    unknown.request_id = "never-prepared"
    error = await refused(
        lone_license_server.storage.CompleteReturn(
            pb.CompleteReturnRequest(receipt=signing_vendor.credit(unknown))
        )
    )
    assert reason_of(error) == "REQUEST_NOT_PREPARED_HERE"

    [trust] = (await lone_license_server.health()).certificates
    assert trust.state == State.CERTIFICATE_STATE_RETURNING  # still withheld, still there
    done = await lone_license_server.storage.CompleteReturn(pb.CompleteReturnRequest(receipt=good))
    assert done.credited


# Trusted storage that breaks


async def test_a_changed_machine_breaks_every_certificate_until_repair(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    first = await lone_license_server.activate(signing_vendor, 2)
    second = await lone_license_server.activate(signing_vendor, 3, feature="server.enterprise.base")
    old_host = lone_license_server.host_id
    await restart(lone_license_server, machine_id="machine-b")
    assert lone_license_server.host_id != old_host

    health = await lone_license_server.health()
    assert not health.healthy
    assert {c.cause for c in health.certificates} == {"MACHINE_CHANGED"}
    assert health.sealed_host_id == old_host
    assert health.serving_seats == 0 and health.broken_seats == 5
    assert "re-bound to this machine" in health.repair_advice
    assert await lone_license_server.activated() == 0
    error = await refused(
        lone_license_server.leases.Checkout(
            pb.CheckoutRequest(acquire=pb.LeaseAcquire(feature="client.station", count=1))
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(error) == "TRUSTED_STORAGE_BROKEN"  # repair it, not activate again

    # Nothing else changes while broken.
    error = await refused(lone_license_server.prepare_return(first.certificate_id))
    assert reason_of(error) == "TRUSTED_STORAGE_BROKEN"

    prepared = await lone_license_server.storage.PrepareRepair(pb.PrepareRepairRequest())
    request = apb.HostRepairRequest.FromString(prepared.request.payload)
    assert request.previous_host_id == old_host
    assert request.host_id == lone_license_server.host_id
    reissued = [
        signing_vendor.certificate(
            apb.HostActivationRequest(
                request_id=c.request_id,
                activation_id=c.activation_id,
                host_id=lone_license_server.host_id,
            ),
            feature=c.feature,
            certificate_id=c.certificate_id,
            count=c.count,
            revision=1,
        )
        for c in (first, second)
    ]
    repaired = await lone_license_server.storage.CompleteRepair(
        pb.CompleteRepairRequest(response=signing_vendor.repair(request, reissued))
    )
    assert repaired.health.healthy, repaired.health.problems
    assert repaired.health.sealed_host_id == lone_license_server.host_id
    assert await lone_license_server.activated() == 2
    assert await lone_license_server.activated("server.enterprise.base") == 3
    again = await lone_license_server.storage.CompleteRepair(
        pb.CompleteRepairRequest(response=signing_vendor.repair(request, reissued))
    )
    assert again.already_completed
    await restart(lone_license_server)
    assert (await lone_license_server.health()).healthy


async def test_a_database_copied_to_another_server_serves_nothing(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, tmp_path: Path
) -> None:
    await lone_license_server.activate(signing_vendor, 4)
    # Same database, another server's data directory (another host key).
    await restart(lone_license_server, data_dir=tmp_path / "other-server")
    health = await lone_license_server.health()
    assert {c.cause for c in health.certificates} == {"DATABASE_COPIED"}
    assert await lone_license_server.activated() == 0
    # It may not claim the other host's licenses, and a repair would only empty trusted
    # storage (the vendor records nothing for this key): refused before anything is signed.
    error = await refused(lone_license_server.storage.PrepareRepair(pb.PrepareRepairRequest()))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(error) == "REPAIR_FROM_ANOTHER_HOST"
    assert "host.key" in (error.details() or "")
    assert await lone_license_server.activated() == 0


async def test_a_restored_older_backup_is_detected(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    certificate = await lone_license_server.activate(signing_vendor, 5)
    backup = await snapshot(lone_license_server)
    _, request = await lone_license_server.prepare_return(certificate.certificate_id)
    await lone_license_server.storage.CompleteReturn(
        pb.CompleteReturnRequest(receipt=signing_vendor.credit(request))
    )
    assert await lone_license_server.activated() == 0

    await restore(lone_license_server, backup)  # the returned seats are back in the database...
    await restart(lone_license_server)
    health = await lone_license_server.health()
    assert {c.cause for c in health.certificates} == {"BACKUP_RESTORED"}
    assert await lone_license_server.activated() == 0  # ...and do not serve


async def test_a_clock_set_back_breaks_time_limited_licenses_until_repair(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    limited = await lone_license_server.activate(
        signing_vendor, 2, expires_at=clock.now() + dt.timedelta(days=30)
    )
    await lone_license_server.activate(signing_vendor, 3)
    clock.advance(3600)
    assert (await lone_license_server.health()).healthy  # moves the high-water mark on
    clock.advance(-2 * 3600)
    health = await lone_license_server.health()
    causes = {c.certificate_id: c.cause for c in health.certificates}
    assert causes[limited.certificate_id] == "CLOCK_SET_BACK"
    assert sorted(causes.values()) == ["", "CLOCK_SET_BACK"]
    assert await lone_license_server.activated() == 3
    clock.advance(4 * 3600)  # putting the clock right does not undo it
    assert not (await lone_license_server.health()).healthy


async def test_edited_rows_and_deleted_ledger_entries_are_found(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    first = await lone_license_server.activate(signing_vendor, 2)
    second = await lone_license_server.activate(signing_vendor, 3)
    _, request = await lone_license_server.prepare_return(second.certificate_id)
    await lone_license_server.storage.CompleteReturn(
        pb.CompleteReturnRequest(receipt=signing_vendor.credit(request))
    )
    assert lone_license_server.server is not None
    engine = lone_license_server.server.store.engine

    # Un-return a returned certificate by hand.
    async with engine.begin() as connection:
        await connection.execute(
            update(certificates)
            .where(certificates.c.certificate_id == second.certificate_id)
            .values(returned_at=None)
        )
    health = await lone_license_server.health()
    causes = {c.certificate_id: c.cause for c in health.certificates}
    assert causes == {first.certificate_id: "", second.certificate_id: "LEDGER_TAMPERED"}
    assert await lone_license_server.activated() == 2

    # Delete a ledger entry: the chain no longer holds, nothing serves.
    async with engine.begin() as connection:
        middle = await connection.scalar(select(trust_ledger.c.sequence).limit(1).offset(2))
        await connection.execute(delete(trust_ledger).where(trust_ledger.c.sequence == middle))
    health = await lone_license_server.health()
    assert {c.cause for c in health.certificates} == {"LEDGER_TAMPERED"}
    assert any("missing" in problem for problem in health.problems)
    assert await lone_license_server.activated() == 0


async def test_a_repair_keeps_only_what_the_vendor_records(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    kept = await lone_license_server.activate(signing_vendor, 2)
    returned = await lone_license_server.activate(signing_vendor, 4)
    _, request = await lone_license_server.prepare_return(returned.certificate_id)
    await lone_license_server.storage.CompleteReturn(
        pb.CompleteReturnRequest(receipt=signing_vendor.credit(request))
    )
    await lone_license_server.activate(signing_vendor, 3)  # force-returned by the vendor meanwhile
    await restart(lone_license_server, machine_id="machine-b")  # and the machine changed
    prepared = await lone_license_server.storage.PrepareRepair(pb.PrepareRepairRequest())
    request = apb.HostRepairRequest.FromString(prepared.request.payload)
    reissue = signing_vendor.certificate(
        apb.HostActivationRequest(
            request_id=kept.request_id,
            activation_id=kept.activation_id,
            host_id=lone_license_server.host_id,
        ),
        certificate_id=kept.certificate_id,
        count=2,
        revision=1,
    )
    repaired = await lone_license_server.storage.CompleteRepair(
        pb.CompleteRepairRequest(response=signing_vendor.repair(request, [reissue]))
    )
    assert repaired.health.healthy, repaired.health.problems
    assert [c.certificate_id for c in repaired.health.certificates] == [kept.certificate_id]
    assert await lone_license_server.activated() == 2
    listed = await lone_license_server.storage.ListCertificates(pb.ListCertificatesRequest())
    assert [c.certificate.revision for c in listed.certificates] == [1]


async def test_a_repair_of_healthy_storage_is_refused_and_prepares_nothing(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    await lone_license_server.activate(signing_vendor, 2)
    before = await snapshot(lone_license_server)
    error = await refused(
        lone_license_server.storage.PrepareRepair(pb.PrepareRepairRequest(request_id="fix-1"))
    )
    assert (error.code(), reason_of(error)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOTHING_TO_REPAIR",
    )
    assert "--force" in (error.details() or "")
    assert (
        await snapshot(lone_license_server) == before
    )  # no request journaled, nothing judged anew

    # Forced, it is prepared (and would count at the vendor); a retry of the same id is
    # the same request, forced or not.
    forced = await lone_license_server.storage.PrepareRepair(
        pb.PrepareRepairRequest(request_id="fix-1", force=True)
    )
    again = await lone_license_server.storage.PrepareRepair(
        pb.PrepareRepairRequest(request_id="fix-1")
    )
    assert again.request == forced.request
    assert lone_license_server.server is not None
    async with lone_license_server.server.store.engine.connect() as connection:
        kinds = (await connection.execute(select(pending_requests.c.kind))).scalars().all()
    assert sorted(kinds) == ["activate", "repair"]


async def test_broken_storage_is_repaired_without_force(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor, clock: FakeClock
) -> None:
    limited = await lone_license_server.activate(
        signing_vendor, 2, expires_at=clock.now() + dt.timedelta(days=30)
    )
    clock.advance(3600)
    await lone_license_server.health()
    clock.advance(-2 * 3600)
    assert not (await lone_license_server.health()).healthy  # CLOCK_SET_BACK
    prepared = await lone_license_server.storage.PrepareRepair(pb.PrepareRepairRequest())
    request = apb.HostRepairRequest.FromString(prepared.request.payload)
    reissue = signing_vendor.certificate(
        apb.HostActivationRequest(
            request_id=limited.request_id,
            activation_id=limited.activation_id,
            host_id=lone_license_server.host_id,
        ),
        certificate_id=limited.certificate_id,
        count=2,
        revision=1,
        expires_at=clock.now() + dt.timedelta(days=30),
    )
    repaired = await lone_license_server.storage.CompleteRepair(
        pb.CompleteRepairRequest(response=signing_vendor.repair(request, [reissue]))
    )
    assert repaired.health.healthy, repaired.health.problems
    # Healthy again, so another repair is refused.
    error = await refused(lone_license_server.storage.PrepareRepair(pb.PrepareRepairRequest()))
    assert reason_of(error) == "NOTHING_TO_REPAIR"


async def test_a_repair_for_another_host_is_refused(
    lone_license_server: LicenseServerUnderTest, signing_vendor: SigningVendor
) -> None:
    await lone_license_server.activate(signing_vendor, 2)
    prepared = await lone_license_server.storage.PrepareRepair(pb.PrepareRepairRequest(force=True))
    request = apb.HostRepairRequest.FromString(prepared.request.payload)
    request.host_id = "HOST-ELSE-WHERE-0000"
    error = await refused(
        lone_license_server.storage.CompleteRepair(
            pb.CompleteRepairRequest(response=signing_vendor.repair(request, []))
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await lone_license_server.activated() == 2
