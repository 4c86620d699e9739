"""Return, repair and move through the Administrator, in process over real gRPC, on SQLite
and PostgreSQL: what each does to the License Servers and the vendor's books, how it is
journaled, refused, retried and resumed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest

from services.administrator.domain.model import Intent, OperationKind
from services.license_server import server as ls_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2 as pb
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import error_info, reason_of
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import (
    Site,
    restart_activation_server,
    restart_administrator,
    restart_license_server,
    start_another_license_server,
)
from tests.support.processes import free_port
from tests.support.tokens import VENDOR_TOKEN

Code = grpc.StatusCode
VENDOR = bearer_metadata(VENDOR_TOKEN)
STATION = "client.station"


@pytest.fixture
async def host_b(site: Site, databases: DatabaseFactory) -> AsyncIterator[ls_server.LicenseServer]:
    server = await start_another_license_server(site, databases, "license_b", "machine-b")
    yield server
    await server.stop(0)


async def refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    assert failure.value.code() == code, failure.value.details()
    assert reason_of(failure.value) == reason, failure.value.details()
    return failure.value


async def order(site: Site, sold: int = 5, partial: bool = False) -> apb.Entitlement:
    created = await site.vendor.CreateEntitlement(
        apb.CreateEntitlementRequest(
            customer_organization="Harbour Tower",
            lines=[
                apb.NewEntitlementLine(
                    feature=STATION,
                    count=sold,
                    kind=LicenseKind.LICENSE_KIND_NETWORK,
                    partial_return_allowed=partial,
                )
            ],
        ),
        metadata=VENDOR,
    )
    return created.entitlement


async def activate(
    site: Site, entitlement: apb.Entitlement, count: int, address: str = ""
) -> lpb.InstalledCertificate:
    reply = await site.administrator.Activate(
        pb.ActivateRequest(
            license_server=address or site.license_address,
            activation_id=entitlement.lines[0].activation_id,
            count=count,
        )
    )
    return reply.certificate


async def seats(site: Site, port: int | None = None) -> tuple[int, int, int]:
    """Activated, used and available seats of client.station on a License Server."""
    stub = lpb_grpc.LeaseServiceStub(site.channel(port or site.license.port))
    info = await stub.GetLicenseInformation(lpb.GetLicenseInformationRequest())
    for feature in info.features:
        if feature.feature == STATION:
            return (feature.activated, feature.used, feature.available)
    return (0, 0, 0)


async def held(site: Site, port: int | None = None) -> dict[str, tuple[int, int]]:
    """Certificate id -> (seats, revision) in a License Server's trusted storage."""
    stub = lpb_grpc.TrustedStorageServiceStub(site.channel(port or site.license.port))
    listed = await stub.ListCertificates(lpb.ListCertificatesRequest())
    return {
        c.certificate.certificate_id: (c.certificate.count, c.certificate.revision)
        for c in listed.certificates
    }


async def line(site: Site, entitlement: apb.Entitlement) -> tuple[int, int]:
    """Activated and available seats of the order's line, as the vendor counts them."""
    found = await site.activation_service.GetOrder(
        apb.GetOrderRequest(entitlement_id=entitlement.entitlement_id)
    )
    return found.entitlement.lines[0].activated, found.entitlement.lines[0].available


async def activations(site: Site, entitlement: apb.Entitlement) -> list[apb.Activation]:
    listed = await site.vendor.ListActivations(
        apb.ListActivationsRequest(entitlement_id=entitlement.entitlement_id), metadata=VENDOR
    )
    return list(listed.activations)


async def journaled(site: Site, operation_id: str) -> pb.Operation:
    found = await site.administrator.GetOperation(pb.GetOperationRequest(operation_id=operation_id))
    return found.operation


def return_request(
    site: Site, certificate_id: str, count: int = 0, force: bool = False, operation_id: str = ""
) -> pb.ReturnRequest:
    return pb.ReturnRequest(
        license_server=site.license_address,
        certificate_id=certificate_id,
        count=count,
        force=force,
        operation_id=operation_id,
    )


# ---------------------------------------------------------------------------------------
# Return
# ---------------------------------------------------------------------------------------


async def test_a_whole_certificate_returns_to_the_vendor(site: Site) -> None:
    entitlement = await order(site, sold=5)
    certificate = (await activate(site, entitlement, 3)).certificate
    assert await line(site, entitlement) == (3, 2)

    reply = await site.administrator.Return(
        return_request(site, certificate.certificate_id, operation_id="ret-1")
    )
    operation = reply.operation
    assert (operation.kind, operation.state, operation.certificate_id) == (
        pb.OPERATION_KIND_RETURN,
        pb.OPERATION_STATE_COMPLETED,
        certificate.certificate_id,
    )
    assert operation.request_id == "ret-1" and not operation.offline
    assert not reply.HasField("remaining") and reply.revoked_leases == 0
    assert await held(site) == {}
    assert await seats(site) == (0, 0, 0)
    assert await line(site, entitlement) == (0, 5)
    [record] = await activations(site, entitlement)
    assert record.state == apb.ACTIVATION_STATE_RETURNED

    # Run again: the same answer, nothing more returned or changed.
    again = await site.administrator.Return(
        return_request(site, certificate.certificate_id, operation_id="ret-1")
    )
    assert again == reply
    assert await line(site, entitlement) == (0, 5)

    # The seats can be activated again, elsewhere or here.
    await activate(site, entitlement, 5)
    assert await seats(site) == (5, 0, 5)


async def test_some_seats_return_where_the_line_allows_it(site: Site) -> None:
    entitlement = await order(site, sold=5, partial=True)
    certificate = (await activate(site, entitlement, 3)).certificate

    reply = await site.administrator.Return(
        return_request(site, certificate.certificate_id, count=1, operation_id="ret-part")
    )
    assert reply.operation.state == pb.OPERATION_STATE_COMPLETED
    assert reply.operation.count == 1
    remaining = reply.remaining.certificate
    assert (remaining.certificate_id, remaining.count, remaining.revision) == (
        certificate.certificate_id,
        2,
        certificate.revision + 1,
    )
    assert await held(site) == {certificate.certificate_id: (2, certificate.revision + 1)}
    assert await seats(site) == (2, 0, 2)
    assert await line(site, entitlement) == (2, 3)


async def test_some_seats_of_a_whole_only_certificate_are_refused_before_anything_moves(
    site: Site,
) -> None:
    entitlement = await order(site, sold=5)
    certificate = (await activate(site, entitlement, 3)).certificate
    await refused(
        site.administrator.Return(
            return_request(site, certificate.certificate_id, count=1, operation_id="ret-no")
        ),
        Code.FAILED_PRECONDITION,
        "PARTIAL_RETURN_NOT_ALLOWED",
    )
    await refused(
        site.administrator.GetOperation(pb.GetOperationRequest(operation_id="ret-no")),
        Code.NOT_FOUND,
        "OPERATION_NOT_FOUND",
    )
    assert await seats(site) == (3, 0, 3)
    assert await line(site, entitlement) == (3, 2)


async def test_a_return_the_vendor_refuses_lets_the_seats_serve_again(site: Site) -> None:
    entitlement = await order(site, sold=5)
    certificate = (await activate(site, entitlement, 3)).certificate
    await restart_activation_server(site, "--max-returns-per-entitlement", "0")

    error = await refused(
        site.administrator.Return(
            return_request(site, certificate.certificate_id, operation_id="ret-cycle")
        ),
        Code.RESOURCE_EXHAUSTED,
        "RETURN_LIMIT_REACHED",
    )
    info = error_info(error)
    assert info is not None and info.metadata["certificate_id"] == certificate.certificate_id
    operation = await journaled(site, "ret-cycle")
    assert operation.state == pb.OPERATION_STATE_REFUSED
    assert operation.last_error == f"RETURN_LIMIT_REACHED: {error.details()}"
    # The seats were withheld while the vendor decided; they serve again.
    assert await seats(site) == (3, 0, 3)
    assert await held(site) == {certificate.certificate_id: (3, certificate.revision)}
    assert await line(site, entitlement) == (3, 2)
    lease = await site.leases.Checkout(
        lpb.CheckoutRequest(acquire=lpb.LeaseAcquire(feature=STATION, count=3))
    )
    assert lease.granted.count == 3

    # Run again: the same refusal from the journal, nothing changes.
    again = await refused(
        site.administrator.Return(
            return_request(site, certificate.certificate_id, operation_id="ret-cycle")
        ),
        Code.RESOURCE_EXHAUSTED,
        "RETURN_LIMIT_REACHED",
    )
    assert again.details() == error.details()
    assert await journaled(site, "ret-cycle") == operation
    assert await seats(site) == (3, 3, 0)


async def test_seats_in_use_return_only_when_forced(site: Site) -> None:
    entitlement = await order(site, sold=5)
    certificate = (await activate(site, entitlement, 2)).certificate
    await site.leases.Checkout(
        lpb.CheckoutRequest(acquire=lpb.LeaseAcquire(feature=STATION, count=1, client_host="ws"))
    )

    await refused(
        site.administrator.Return(
            return_request(site, certificate.certificate_id, operation_id="ret-busy")
        ),
        Code.FAILED_PRECONDITION,
        "SEATS_IN_USE",
    )
    assert await seats(site) == (2, 1, 1)
    listed = await site.administrator.ListOperations(pb.ListOperationsRequest())
    assert "ret-busy" not in [o.operation_id for o in listed.operations]

    forced = await site.administrator.Return(
        return_request(site, certificate.certificate_id, force=True, operation_id="ret-force")
    )
    assert forced.operation.state == pb.OPERATION_STATE_COMPLETED
    assert forced.revoked_leases == 1
    assert await seats(site) == (0, 0, 0)
    assert await line(site, entitlement) == (0, 5)
    again = await site.administrator.Return(
        return_request(site, certificate.certificate_id, force=True, operation_id="ret-force")
    )
    assert again == forced


async def test_return_refuses_bad_input_before_any_call(
    site: Site, subtests: pytest.Subtests
) -> None:
    cases: dict[str, tuple[pb.ReturnRequest, str, str]] = {
        "no-certificate": (return_request(site, ""), "INVALID_INPUT", "certificate_id"),
        "certificate-with-slash": (
            return_request(site, "../etc/passwd"),
            "INVALID_INPUT",
            "certificate_id",
        ),
        "negative-count": (return_request(site, "c-1", count=-1), "INVALID_INPUT", "count"),
        "bad-operation-id": (
            return_request(site, "c-1", operation_id="two words"),
            "INVALID_INPUT",
            "operation_id",
        ),
        "bad-address": (
            pb.ReturnRequest(license_server="@", certificate_id="c-1"),
            "INVALID_LICENSE_SERVER_ADDRESS",
            "license_server",
        ),
    }
    for case, (request, reason, field) in cases.items():
        with subtests.test(case):
            error = await refused(site.administrator.Return(request), Code.INVALID_ARGUMENT, reason)
            info = error_info(error)
            assert info is not None and info.metadata["field"] == field
    unknown = await refused(
        site.administrator.Return(return_request(site, "no-such-certificate")),
        Code.NOT_FOUND,
        "CERTIFICATE_NOT_FOUND",
    )
    info = error_info(unknown)
    assert info is not None and info.metadata["peer"] == "License Server"
    listed = await site.administrator.ListOperations(pb.ListOperationsRequest())
    assert not listed.operations


# ---------------------------------------------------------------------------------------
# Repair
# ---------------------------------------------------------------------------------------


async def test_repair_reissues_what_the_host_holds_after_a_machine_change(site: Site) -> None:
    entitlement = await order(site, sold=5)
    first = (await activate(site, entitlement, 2)).certificate
    second = (await activate(site, entitlement, 1)).certificate
    old_host = site.license.identity.host_id
    await restart_license_server(site, machine_id="replacement-board")
    new_host = site.license.identity.host_id
    assert new_host != old_host
    assert await seats(site) == (0, 0, 0)  # every certificate broke

    reply = await site.administrator.Repair(
        pb.RepairRequest(license_server=site.license_address, operation_id="fix-1")
    )
    operation = reply.operation
    assert (operation.kind, operation.state, operation.host_id) == (
        pb.OPERATION_KIND_REPAIR,
        pb.OPERATION_STATE_COMPLETED,
        new_host,
    )
    health = reply.health
    assert health.healthy, health
    assert health.host_id == health.sealed_host_id == new_host
    assert health.serving_seats == 3
    assert await held(site) == {
        first.certificate_id: (2, first.revision + 1),
        second.certificate_id: (1, second.revision + 1),
    }
    assert await seats(site) == (3, 0, 3)
    assert {a.host_id for a in await activations(site, entitlement)} == {new_host}

    again = await site.administrator.Repair(
        pb.RepairRequest(license_server=site.license_address, operation_id="fix-1")
    )
    assert again == reply
    assert await held(site) == {
        first.certificate_id: (2, first.revision + 1),
        second.certificate_id: (1, second.revision + 1),
    }


async def repairs_left_at_vendor(site: Site) -> list[int]:
    """What the vendor said was left after each repair it granted, oldest first (every
    decision about a repair is in its audit log)."""
    log = await site.vendor.GetAuditLog(apb.GetAuditLogRequest(page_size=1000), metadata=VENDOR)
    assert not [e for e in log.entries if e.action == "repair.refused"]
    return [
        json.loads(e.detail_json)["repairs_left"]
        for e in log.entries
        if e.action == "repair.granted"
    ]


async def test_a_repair_of_healthy_trusted_storage_runs_only_forced_and_then_counts(
    site: Site,
) -> None:
    entitlement = await order(site, sold=5)
    certificate = (await activate(site, entitlement, 2)).certificate
    # Five in a row would have used up the year's four repairs: each is refused, nothing
    # is journaled, nothing reaches the vendor.
    for attempt in range(5):
        error = await refused(
            site.administrator.Repair(
                pb.RepairRequest(license_server=site.license_address, operation_id=f"fix-{attempt}")
            ),
            Code.FAILED_PRECONDITION,
            "NOTHING_TO_REPAIR",
        )
        assert "--force" in (error.details() or "")
        await refused(journaled(site, f"fix-{attempt}"), Code.NOT_FOUND, "OPERATION_NOT_FOUND")
    assert await repairs_left_at_vendor(site) == []
    assert await held(site) == {certificate.certificate_id: (2, certificate.revision)}

    # Forced, it runs and counts.
    forced = await site.administrator.Repair(
        pb.RepairRequest(license_server=site.license_address, operation_id="forced", force=True)
    )
    assert forced.operation.state == pb.OPERATION_STATE_COMPLETED and forced.health.healthy
    assert await repairs_left_at_vendor(site) == [3]
    assert await held(site) == {certificate.certificate_id: (2, certificate.revision + 1)}

    # Broken trusted storage is repaired without being forced.
    await restart_license_server(site, machine_id="replacement-board")
    repaired = await site.administrator.Repair(
        pb.RepairRequest(license_server=site.license_address, operation_id="fix-broken")
    )
    assert repaired.operation.state == pb.OPERATION_STATE_COMPLETED and repaired.health.healthy
    assert await repairs_left_at_vendor(site) == [3, 2]
    assert await seats(site) == (2, 0, 2)


async def test_a_repair_over_the_yearly_limit_is_refused_and_journaled(site: Site) -> None:
    entitlement = await order(site, sold=5)
    await activate(site, entitlement, 2)
    await restart_activation_server(site, "--max-repairs-per-year", "0")
    await restart_license_server(site, machine_id="replacement-board")

    error = await refused(
        site.administrator.Repair(
            pb.RepairRequest(license_server=site.license_address, operation_id="fix-limit")
        ),
        Code.RESOURCE_EXHAUSTED,
        "REPAIR_LIMIT_REACHED",
    )
    operation = await journaled(site, "fix-limit")
    assert operation.state == pb.OPERATION_STATE_REFUSED
    assert operation.last_error.startswith("REPAIR_LIMIT_REACHED: ")
    again = await refused(
        site.administrator.Repair(
            pb.RepairRequest(license_server=site.license_address, operation_id="fix-limit")
        ),
        Code.RESOURCE_EXHAUSTED,
        "REPAIR_LIMIT_REACHED",
    )
    assert again.details() == error.details()
    assert await seats(site) == (0, 0, 0)


# ---------------------------------------------------------------------------------------
# Move
# ---------------------------------------------------------------------------------------


def move_request(
    site: Site, host_b: ls_server.LicenseServer, certificate_id: str, operation_id: str = ""
) -> pb.MoveRequest:
    return pb.MoveRequest(
        from_license_server=site.license_address,
        to_license_server=f"{host_b.port}@127.0.0.1",
        certificate_id=certificate_id,
        operation_id=operation_id,
    )


async def test_a_certificate_moves_to_another_license_server(
    site: Site, host_b: ls_server.LicenseServer
) -> None:
    entitlement = await order(site, sold=5)
    certificate = (await activate(site, entitlement, 3)).certificate

    reply = await site.administrator.Move(
        move_request(site, host_b, certificate.certificate_id, "move-1")
    )
    operation = reply.operation
    assert (operation.kind, operation.state) == (
        pb.OPERATION_KIND_MOVE,
        pb.OPERATION_STATE_COMPLETED,
    )
    assert (operation.host_id, operation.target_host_id) == (
        site.license.identity.host_id,
        host_b.identity.host_id,
    )
    assert operation.target_license_server == f"{host_b.port}@127.0.0.1"
    assert (operation.activation_id, operation.count, operation.certificate_id) == (
        certificate.activation_id,
        3,
        certificate.certificate_id,
    )
    moved = reply.certificate.certificate
    assert (moved.activation_id, moved.count, moved.host_id) == (
        certificate.activation_id,
        3,
        host_b.identity.host_id,
    )
    assert moved.request_id == "move-1.activate"
    assert await held(site) == {}
    assert await seats(site) == (0, 0, 0)
    assert await held(site, host_b.port) == {moved.certificate_id: (3, moved.revision)}
    assert await seats(site, host_b.port) == (3, 0, 3)
    assert await line(site, entitlement) == (3, 2)
    states = {(a.host_id, a.state, a.activated_count) for a in await activations(site, entitlement)}
    assert states == {
        (site.license.identity.host_id, apb.ACTIVATION_STATE_RETURNED, 3),
        (host_b.identity.host_id, apb.ACTIVATION_STATE_ACTIVE, 3),
    }

    again = await site.administrator.Move(
        move_request(site, host_b, certificate.certificate_id, "move-1")
    )
    assert again == reply
    assert await line(site, entitlement) == (3, 2)


async def test_a_move_whose_return_is_refused_activates_nothing(
    site: Site, host_b: ls_server.LicenseServer
) -> None:
    entitlement = await order(site, sold=5)
    certificate = (await activate(site, entitlement, 3)).certificate
    await restart_activation_server(site, "--max-returns-per-entitlement", "0")

    await refused(
        site.administrator.Move(move_request(site, host_b, certificate.certificate_id, "move-no")),
        Code.RESOURCE_EXHAUSTED,
        "RETURN_LIMIT_REACHED",
    )
    operation = await journaled(site, "move-no")
    assert operation.state == pb.OPERATION_STATE_REFUSED
    assert operation.last_error.startswith("RETURN_LIMIT_REACHED: ")
    assert await seats(site) == (3, 0, 3)
    assert await seats(site, host_b.port) == (0, 0, 0)
    assert await line(site, entitlement) == (3, 2)
    await refused(
        site.administrator.Move(move_request(site, host_b, certificate.certificate_id, "move-no")),
        Code.RESOURCE_EXHAUSTED,
        "RETURN_LIMIT_REACHED",
    )
    assert await seats(site, host_b.port) == (0, 0, 0)


# How far a move got before the Administrator stopped: the steps it took, in order. The
# vendor's answers are journaled only once installed, so a stop right after the vendor
# answered leaves the journal as it was before the vendor was asked.
MOVE_STOPS = {
    "after_prepare": 1,
    "after_vendor": 2,
    "after_target_prepare": 3,
    "after_target_vendor": 4,
}


@pytest.mark.parametrize("stop", list(MOVE_STOPS))
async def test_a_move_stopped_at_any_step_finishes_at_the_next_start(
    site: Site, host_b: ls_server.LicenseServer, stop: str
) -> None:
    entitlement = await order(site, sold=5)
    certificate = (await activate(site, entitlement, 3)).certificate
    request = move_request(site, host_b, certificate.certificate_id, "move-resume")
    moves = site.admin.operations.moves
    taken: dict[str, Any] = {}

    # A move's halves are a return and an activation run by the exchange runner.
    runner, journal = moves.runner, moves.journal

    async def begin() -> None:
        taken["operation"] = await moves._begin(moves_intent(request), "move-resume")

    async def vendor_credits() -> None:
        taken["return"] = await journal.get("move-resume.return")
        taken["receipt"] = await runner.ask_vendor(moves.return_half, taken["return"])

    async def source_returns() -> None:
        async with runner.license_servers.connected(request.from_license_server) as source:
            await runner.install(moves.return_half, source, taken["return"], taken["receipt"])
        await journal.answered(taken["operation"])
        activation = await journal.get("move-resume.activate")
        async with runner.license_servers.connected(request.to_license_server) as target:
            taken["activation"] = await runner.prepare_planned(
                moves.activation_half, target, activation
            )

    async def vendor_activates() -> None:
        await runner.ask_vendor(moves.activation_half, taken["activation"])

    # The steps Move takes, driven one by one, as if the process died after the last.
    for step in [begin, vendor_credits, source_returns, vendor_activates][: MOVE_STOPS[stop]]:
        await step()
    assert (await journaled(site, "move-resume")).state != pb.OPERATION_STATE_COMPLETED
    assert await seats(site, host_b.port) == (0, 0, 0)

    await restart_administrator(site)
    report = await site.admin.resumed
    assert report.finished == ["move-resume"], report.failed
    done = await journaled(site, "move-resume")
    assert done.state == pb.OPERATION_STATE_COMPLETED
    assert await held(site) == {}
    assert await seats(site, host_b.port) == (3, 0, 3)
    assert await line(site, entitlement) == (3, 2)
    on_b = [a for a in await activations(site, entitlement) if a.host_id == host_b.identity.host_id]
    assert len(on_b) == 1

    # The operator's retry answers from the journal.
    reply = await site.administrator.Move(request)
    assert reply.operation == done
    assert reply.certificate.certificate.host_id == host_b.identity.host_id


def moves_intent(request: pb.MoveRequest) -> Intent:
    return Intent(
        kind=OperationKind.MOVE,
        license_server=request.from_license_server,
        target_license_server=request.to_license_server,
        certificate_id=request.certificate_id,
        force=request.force,
    )


async def test_a_move_waits_for_the_vendor_and_resumes(
    site: Site, host_b: ls_server.LicenseServer
) -> None:
    entitlement = await order(site, sold=5)
    certificate = (await activate(site, entitlement, 2)).certificate
    await restart_administrator(site, activation_server=f"127.0.0.1:{free_port()}")
    await refused(
        site.administrator.Move(move_request(site, host_b, certificate.certificate_id, "move-w")),
        Code.UNAVAILABLE,
        "PEER_UNAVAILABLE",
    )
    waiting = await journaled(site, "move-w")
    assert waiting.state == pb.OPERATION_STATE_PREPARED
    assert waiting.last_error.startswith("PEER_UNAVAILABLE: ")
    assert await seats(site) == (0, 0, 0)  # withheld while the vendor decides

    await restart_administrator(site)
    await site.admin.resumed
    assert (await journaled(site, "move-w")).state == pb.OPERATION_STATE_COMPLETED
    assert await seats(site, host_b.port) == (2, 0, 2)


async def test_move_refuses_bad_input_before_anything_changes(
    site: Site, host_b: ls_server.LicenseServer, subtests: pytest.Subtests
) -> None:
    entitlement = await order(site, sold=5)
    certificate = (await activate(site, entitlement, 2)).certificate
    good = move_request(site, host_b, certificate.certificate_id)

    def changed(**fields: Any) -> pb.MoveRequest:
        request = pb.MoveRequest()
        request.CopyFrom(good)
        for name, value in fields.items():
            setattr(request, name, value)
        return request

    cases: dict[str, tuple[pb.MoveRequest, Code, str, str]] = {
        "bad-target": (
            changed(to_license_server="@bad host"),
            Code.INVALID_ARGUMENT,
            "INVALID_LICENSE_SERVER_ADDRESS",
            "to_license_server",
        ),
        "bad-source": (
            changed(from_license_server=""),
            Code.INVALID_ARGUMENT,
            "INVALID_LICENSE_SERVER_ADDRESS",
            "from_license_server",
        ),
        "operation-id-too-long-for-its-steps": (
            changed(operation_id="m" * 120),
            Code.INVALID_ARGUMENT,
            "INVALID_INPUT",
            "operation_id",
        ),
        "same-license-server-by-another-name": (
            changed(to_license_server=f"{site.license.port}@localhost"),
            Code.INVALID_ARGUMENT,
            "SAME_LICENSE_SERVER",
            "",
        ),
        "unknown-certificate": (
            changed(certificate_id="not-on-this-server"),
            Code.NOT_FOUND,
            "CERTIFICATE_NOT_FOUND",
            "",
        ),
        "target-down": (
            changed(to_license_server=f"{free_port()}@127.0.0.1"),
            Code.UNAVAILABLE,
            "PEER_UNAVAILABLE",
            "",
        ),
    }
    for case, (request, code, reason, field) in cases.items():
        with subtests.test(case):
            error = await refused(site.administrator.Move(request), code, reason)
            if field:
                info = error_info(error)
                assert info is not None and info.metadata["field"] == field
    listed = await site.administrator.ListOperations(pb.ListOperationsRequest())
    assert [o.kind for o in listed.operations] == [pb.OPERATION_KIND_ACTIVATE]
    assert await seats(site) == (2, 0, 2)
    assert await line(site, entitlement) == (2, 3)
