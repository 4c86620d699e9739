"""The Administrator's journal and registration details, over real gRPC in process.

Registration is stored, checked and sent with every activation; every operation is
journaled and can be listed and looked up; an operation id names one operation; and
unfinished operations are resumed when the Administrator starts. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any, TypeVar

import grpc
import pytest

from services.administrator.domain.model import (
    Intent,
    OperationKind,
    OperationState,
    OperationUpdate,
)
from services.administrator.domain.offline_files import read_request_file
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2 as pb
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.errors import PeerRefused
from tessera.license.v1 import license_pb2 as lpb
from tessera.rpc import error_info, reason_of
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import (
    Site,
    ls_server,
    restart_administrator,
    restart_license_server,
)
from tests.support.processes import free_port
from tests.support.tokens import VENDOR_TOKEN

T = TypeVar("T")
VENDOR = bearer_metadata(VENDOR_TOKEN)
Code = grpc.StatusCode

REGISTRATION = apb.Registration(
    organization="Harbour Tower Ltd",
    contact_name="Ada Operator",
    email="bms@harbour.example",
    phone="+44 20 7946 0000",
    site="Building 4, plant room",
)


async def refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    assert failure.value.code() == code, failure.value.details()
    assert reason_of(failure.value) == reason, failure.value.details()
    return failure.value


async def line(site: Site, sold: int = 10) -> str:
    entitlement = await site.create_entitlement([("client.station", sold)])
    return entitlement.lines[0].activation_id


def activate_request(site: Site, activation_id: str, count: int = 1, operation_id: str = "") -> Any:
    return pb.ActivateRequest(
        license_server=site.license_address,
        activation_id=activation_id,
        count=count,
        operation_id=operation_id,
    )


async def activated_seats(site: Site) -> int:
    info = await site.leases.GetLicenseInformation(lpb.GetLicenseInformationRequest())
    return sum(feature.activated for feature in info.features)


async def operation(site: Site, operation_id: str) -> pb.Operation:
    found = await site.administrator.GetOperation(pb.GetOperationRequest(operation_id=operation_id))
    return found.operation


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


async def test_registration_is_empty_until_set_then_stored(site: Site) -> None:
    empty = await site.administrator.GetRegistration(pb.GetRegistrationRequest())
    assert empty.registration == apb.Registration()

    padded = apb.Registration()
    padded.CopyFrom(REGISTRATION)
    padded.organization = "  Harbour Tower Ltd  "
    stored = await site.administrator.SetRegistration(
        pb.SetRegistrationRequest(registration=padded)
    )
    assert stored.registration == REGISTRATION
    got = await site.administrator.GetRegistration(pb.GetRegistrationRequest())
    assert got.registration == REGISTRATION

    changed = apb.Registration(organization="Harbour Tower Facilities")
    await site.administrator.SetRegistration(pb.SetRegistrationRequest(registration=changed))
    got = await site.administrator.GetRegistration(pb.GetRegistrationRequest())
    assert got.registration == changed


async def test_registration_survives_a_restart(site: Site) -> None:
    await site.administrator.SetRegistration(pb.SetRegistrationRequest(registration=REGISTRATION))
    await restart_administrator(site)
    got = await site.administrator.GetRegistration(pb.GetRegistrationRequest())
    assert got.registration == REGISTRATION


BAD_REGISTRATIONS: dict[str, tuple[dict[str, str], str]] = {
    "no-organization": ({"organization": ""}, "registration.organization"),
    "blank-organization": ({"organization": "   "}, "registration.organization"),
    "organization-too-long": ({"organization": "x" * 201}, "registration.organization"),
    "control-character": ({"contact_name": "Ada\x00"}, "registration.contact_name"),
    "not-an-email": ({"email": "bms at harbour"}, "registration.email"),
    "letters-in-phone": ({"phone": "call me"}, "registration.phone"),
    "site-with-newline": ({"site": "Building 4\nplant room"}, "registration.site"),
}


async def test_bad_registration_is_refused_and_changes_nothing(
    site: Site, subtests: pytest.Subtests
) -> None:
    await site.administrator.SetRegistration(pb.SetRegistrationRequest(registration=REGISTRATION))
    for case, (changes, field) in BAD_REGISTRATIONS.items():
        with subtests.test(case):
            bad = apb.Registration()
            bad.CopyFrom(REGISTRATION)
            for name, value in changes.items():
                setattr(bad, name, value)
            error = await refused(
                site.administrator.SetRegistration(pb.SetRegistrationRequest(registration=bad)),
                Code.INVALID_ARGUMENT,
                "INVALID_INPUT",
            )
            info = error_info(error)
            assert info is not None and info.metadata["field"] == field
            got = await site.administrator.GetRegistration(pb.GetRegistrationRequest())
            assert got.registration == REGISTRATION


async def test_every_activation_carries_the_registration(site: Site) -> None:
    """Sent to the vendor with online activations and inside offline request files."""
    sent: list[apb.Registration] = []
    vendor = site.admin.activation_server
    original = vendor.activate

    async def recording(request: SignedEnvelope, registration: apb.Registration) -> SignedEnvelope:
        sent.append(registration)
        return await original(request, registration)

    vendor.activate = recording  # type: ignore[method-assign]
    await site.administrator.SetRegistration(pb.SetRegistrationRequest(registration=REGISTRATION))
    activation_id = await line(site)
    await site.administrator.Activate(activate_request(site, activation_id))
    assert sent == [REGISTRATION]

    exported = await site.administrator.ExportRequest(
        pb.ExportRequestRequest(
            kind=pb.OPERATION_KIND_ACTIVATE,
            license_server=site.license_address,
            activation_id=activation_id,
            count=1,
        )
    )
    assert read_request_file(exported.request_file).registration == REGISTRATION


# ---------------------------------------------------------------------------------------
# Listing and looking up operations
# ---------------------------------------------------------------------------------------


async def test_operations_are_listed_newest_first_and_found_by_id(site: Site) -> None:
    activation_id = await line(site)
    for index in range(3):
        await site.administrator.Activate(activate_request(site, activation_id, 1, f"op-{index}"))

    listed = await site.administrator.ListOperations(pb.ListOperationsRequest())
    assert [o.operation_id for o in listed.operations] == ["op-2", "op-1", "op-0"]
    first = listed.operations[-1]
    assert first.kind == pb.OPERATION_KIND_ACTIVATE
    assert first.state == pb.OPERATION_STATE_COMPLETED
    assert (first.license_server, first.activation_id, first.count) == (
        site.license_address,
        activation_id,
        1,
    )
    assert first.host_id == site.license.identity.host_id
    assert first.request_id == "op-0"
    assert not first.offline and not first.last_error
    assert first.created_at.ToDatetime() <= first.updated_at.ToDatetime()

    page = await site.administrator.ListOperations(pb.ListOperationsRequest(page_size=2))
    assert [o.operation_id for o in page.operations] == ["op-2", "op-1"]
    everything = await site.administrator.ListOperations(pb.ListOperationsRequest(page_size=5000))
    assert len(everything.operations) == 3

    assert await operation(site, "op-1") == listed.operations[1]


async def test_unfinished_only_lists_operations_still_under_way(
    site: Site, databases: DatabaseFactory
) -> None:
    activation_id = await line(site)
    await site.administrator.Activate(activate_request(site, activation_id, 1, "done"))
    await restart_administrator(site, activation_server=f"127.0.0.1:{free_port()}")
    await refused(
        site.administrator.Activate(activate_request(site, activation_id, 1, "stuck")),
        Code.UNAVAILABLE,
        "PEER_UNAVAILABLE",
    )

    unfinished = await site.administrator.ListOperations(
        pb.ListOperationsRequest(unfinished_only=True)
    )
    [stuck] = unfinished.operations
    assert stuck.operation_id == "stuck"
    assert stuck.state == pb.OPERATION_STATE_PREPARED
    assert stuck.last_error.startswith("PEER_UNAVAILABLE: ")
    everything = await site.administrator.ListOperations(pb.ListOperationsRequest())
    assert [o.operation_id for o in everything.operations] == ["stuck", "done"]


async def test_looking_up_operations_refuses_bad_input(site: Site) -> None:
    await refused(
        site.administrator.GetOperation(pb.GetOperationRequest(operation_id="no-such-op")),
        Code.NOT_FOUND,
        "OPERATION_NOT_FOUND",
    )
    for bad in ("", "has spaces", "x" * 129):
        await refused(
            site.administrator.GetOperation(pb.GetOperationRequest(operation_id=bad)),
            Code.INVALID_ARGUMENT,
            "INVALID_INPUT",
        )
    await refused(
        site.administrator.ListOperations(pb.ListOperationsRequest(page_size=-1)),
        Code.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )


# ---------------------------------------------------------------------------------------
# One operation id, one operation
# ---------------------------------------------------------------------------------------


async def test_an_operation_id_reused_for_another_kind_is_refused(site: Site) -> None:
    activation_id = await line(site)
    activated = await site.administrator.Activate(activate_request(site, activation_id, 2, "op-1"))
    certificate_id = activated.certificate.certificate.certificate_id
    before = await operation(site, "op-1")

    attempts: list[Awaitable[Any]] = [
        site.administrator.Return(
            pb.ReturnRequest(
                license_server=site.license_address,
                certificate_id=certificate_id,
                operation_id="op-1",
            )
        ),
        site.administrator.Repair(
            pb.RepairRequest(license_server=site.license_address, operation_id="op-1")
        ),
        site.administrator.Move(
            pb.MoveRequest(
                from_license_server=site.license_address,
                to_license_server="27999@127.0.0.1",
                certificate_id=certificate_id,
                operation_id="op-1",
            )
        ),
        site.administrator.ExportRequest(
            pb.ExportRequestRequest(
                kind=pb.OPERATION_KIND_ACTIVATE,
                license_server=site.license_address,
                activation_id=activation_id,
                count=2,
                operation_id="op-1",
            )
        ),
    ]
    for attempt in attempts:
        error = await refused(attempt, Code.ALREADY_EXISTS, "OPERATION_ID_REUSED")
        info = error_info(error)
        assert info is not None and info.metadata["operation_id"] == "op-1"
    assert await operation(site, "op-1") == before
    assert await activated_seats(site) == 2


async def test_concurrent_calls_with_one_operation_id_activate_once(site: Site) -> None:
    activation_id = await line(site)
    replies = await asyncio.gather(
        *(
            site.administrator.Activate(activate_request(site, activation_id, 3, "together"))
            for _ in range(4)
        )
    )
    assert len({reply.certificate.certificate.certificate_id for reply in replies}) == 1
    assert all(reply == replies[0] for reply in replies)
    assert await activated_seats(site) == 3
    order = await site.activation_service.GetOrder(
        apb.GetOrderRequest(entitlement_id=replies[0].certificate.certificate.entitlement_id)
    )
    assert order.entitlement.lines[0].activated == 3


# ---------------------------------------------------------------------------------------
# Resuming at start
# ---------------------------------------------------------------------------------------


async def test_an_activation_the_vendor_did_not_answer_completes_at_the_next_start(
    site: Site,
) -> None:
    activation_id = await line(site)
    await restart_administrator(site, activation_server=f"127.0.0.1:{free_port()}")
    await site.admin.resumed
    await refused(
        site.administrator.Activate(activate_request(site, activation_id, 2, "op-down")),
        Code.UNAVAILABLE,
        "PEER_UNAVAILABLE",
    )
    stuck = await operation(site, "op-down")
    assert stuck.state == pb.OPERATION_STATE_PREPARED
    assert "Activation Server" in stuck.last_error
    assert await activated_seats(site) == 0

    await restart_administrator(site)
    report = await site.admin.resumed
    assert report.finished == ["op-down"] and not report.failed
    done = await operation(site, "op-down")
    assert done.state == pb.OPERATION_STATE_COMPLETED
    assert not done.last_error
    assert await activated_seats(site) == 2

    # The operator's retry answers the same and activates nothing more.
    again = await site.administrator.Activate(activate_request(site, activation_id, 2, "op-down"))
    assert again.operation == done
    assert await activated_seats(site) == 2


async def prepared_activation(site: Site, operation_id: str, count: int = 2) -> Any:
    """An activation the License Server prepared and the journal recorded as PREPARED."""
    activation_id = await line(site)
    runner = site.admin.operations.activations.runner
    exchange = site.admin.operations.activations.exchange
    intent = Intent(
        kind=OperationKind.ACTIVATE,
        license_server=site.license_address,
        activation_id=activation_id,
        count=count,
    )
    async with runner.license_servers.connected(site.license_address) as server:
        return await runner.prepare(exchange, server, intent, operation_id)


async def vendor_activated(site: Site) -> int:
    listed = await site.vendor.ListActivations(apb.ListActivationsRequest(), metadata=VENDOR)
    return sum(activation.count for activation in listed.activations)


async def test_an_activation_stopped_after_the_vendor_answered_completes_at_the_next_start(
    site: Site,
) -> None:
    """The vendor answered, the Administrator stopped before the License Server installed
    the answer: nothing of the answer was journaled, and asking the vendor again gives
    the same answer, counted once."""
    prepared = await prepared_activation(site, "op-answered")
    runner = site.admin.operations.activations.runner
    answer = await runner.ask_vendor(site.admin.operations.activations.exchange, prepared)
    stopped = await site.admin.operations.journal.get("op-answered")
    assert (stopped.state, stopped.response_envelope) == (OperationState.PREPARED, None)
    assert await activated_seats(site) == 0
    assert await vendor_activated(site) == 2

    await restart_administrator(site)
    report = await site.admin.resumed
    assert report.finished == ["op-answered"]
    assert (await operation(site, "op-answered")).state == pb.OPERATION_STATE_COMPLETED
    assert (await site.admin.operations.journal.get("op-answered")).response_envelope == (
        answer.SerializeToString()
    )
    assert await activated_seats(site) == 2
    assert await vendor_activated(site) == 2


async def test_an_answer_an_older_administrator_journaled_is_installed_at_the_next_start(
    site: Site,
) -> None:
    """Older Administrators journaled the vendor's answer (ANSWERED) before installing."""
    prepared = await prepared_activation(site, "op-old")
    answer = await site.admin.operations.activations.runner.ask_vendor(
        site.admin.operations.activations.exchange, prepared
    )
    async with site.admin.journal.transaction() as repo:
        await repo.advance(
            prepared.operation_id,
            (OperationState.PREPARED,),
            OperationUpdate(
                OperationState.ANSWERED,
                prepared.updated_at,
                response_envelope=answer.SerializeToString(),
            ),
        )

    await restart_administrator(site)
    report = await site.admin.resumed
    assert report.finished == ["op-old"]
    assert (await operation(site, "op-old")).state == pb.OPERATION_STATE_COMPLETED
    assert await activated_seats(site) == 2


async def test_an_online_answer_the_license_server_refuses_is_never_journaled(
    site: Site,
) -> None:
    """An answer altered between the vendor and the License Server (say on a link without
    TLS) is refused by the License Server, is not kept as the operation's answer, and the
    operation still completes with the vendor's own."""
    prepared = await prepared_activation(site, "op-altered")
    activations = site.admin.operations.activations
    answer = await activations.runner.ask_vendor(activations.exchange, prepared)
    altered = SignedEnvelope()
    altered.CopyFrom(answer)
    altered.signature = bytes([answer.signature[0] ^ 1]) + answer.signature[1:]
    async with activations.runner.license_servers.connected(site.license_address) as server:
        with pytest.raises(PeerRefused) as refusal:
            await activations.runner.install(activations.exchange, server, prepared, altered)
    assert refusal.value.reason == "BAD_SIGNATURE"
    kept = await site.admin.operations.journal.get("op-altered")
    assert (kept.state, kept.response_envelope) == (OperationState.PREPARED, None)
    assert kept.last_error.startswith("BAD_SIGNATURE: ")  # why it did not get further
    assert await activated_seats(site) == 0

    reply = await site.administrator.Activate(
        activate_request(site, prepared.activation_id, 2, "op-altered")
    )
    assert reply.operation.state == pb.OPERATION_STATE_COMPLETED
    assert not reply.operation.last_error
    assert (await site.admin.operations.journal.get("op-altered")).response_envelope == (
        answer.SerializeToString()
    )
    assert await activated_seats(site) == 2
    assert await vendor_activated(site) == 2


async def test_resume_keeps_an_operation_unfinished_while_its_license_server_is_down(
    site: Site,
) -> None:
    activation_id = await line(site)
    await restart_administrator(site, activation_server=f"127.0.0.1:{free_port()}")
    await refused(
        site.administrator.Activate(activate_request(site, activation_id, 1, "op-later")),
        Code.UNAVAILABLE,
        "PEER_UNAVAILABLE",
    )
    # The License Server moves to another port: the journaled address answers no more.
    ls_port = site.license.port
    await site.license.stop(0)
    await restart_administrator(site)
    report = await site.admin.resumed
    assert list(report.failed) == ["op-later"]
    assert report.failed["op-later"].startswith("PEER_UNAVAILABLE: ")
    stuck = await operation(site, "op-later")
    assert stuck.state == pb.OPERATION_STATE_PREPARED
    assert "License Server" in stuck.last_error

    # Back on its port, the operator's retry completes the operation.
    settings = site.license_settings
    listen = replace(settings.common, listen=f"127.0.0.1:{ls_port}")
    site.license = await ls_server.build(replace(settings, common=listen), clock=site.license_clock)
    done = await site.administrator.Activate(activate_request(site, activation_id, 1, "op-later"))
    assert done.operation.state == pb.OPERATION_STATE_COMPLETED
    assert await activated_seats(site) == 1


async def test_offline_operations_wait_for_their_file_instead_of_resuming(site: Site) -> None:
    activation_id = await line(site)
    await site.administrator.ExportRequest(
        pb.ExportRequestRequest(
            kind=pb.OPERATION_KIND_ACTIVATE,
            license_server=site.license_address,
            activation_id=activation_id,
            count=1,
            operation_id="op-offline",
        )
    )
    await restart_administrator(site)
    report = await site.admin.resumed
    assert not report.finished and not report.failed
    waiting = await operation(site, "op-offline")
    assert waiting.state == pb.OPERATION_STATE_PREPARED and waiting.offline
    assert await activated_seats(site) == 0


async def test_a_vendor_refusal_is_journaled_as_refused_and_told_again(site: Site) -> None:
    activation_id = await line(site, sold=2)
    error = await refused(
        site.administrator.Activate(activate_request(site, activation_id, 3, "op-greedy")),
        Code.RESOURCE_EXHAUSTED,
        "NOT_ENOUGH_SEATS_LEFT",
    )
    journaled = await operation(site, "op-greedy")
    assert journaled.state == pb.OPERATION_STATE_REFUSED
    assert journaled.last_error.startswith("NOT_ENOUGH_SEATS_LEFT: ")

    # Not resumed at start, and the same refusal when run again.
    await restart_administrator(site)
    report = await site.admin.resumed
    assert not report.finished and not report.failed
    again = await refused(
        site.administrator.Activate(activate_request(site, activation_id, 3, "op-greedy")),
        Code.RESOURCE_EXHAUSTED,
        "NOT_ENOUGH_SEATS_LEFT",
    )
    assert again.details() == error.details() == journaled.last_error.partition(": ")[2]
    assert await activated_seats(site) == 0


async def test_an_operation_continues_only_on_the_license_server_it_began_on(
    site: Site,
) -> None:
    activation_id = await line(site)
    await restart_administrator(site, activation_server=f"127.0.0.1:{free_port()}")
    await refused(
        site.administrator.Activate(activate_request(site, activation_id, 1, "op-moved")),
        Code.UNAVAILABLE,
        "PEER_UNAVAILABLE",
    )
    began_on = site.license.identity.host_id
    # The address now answers with another License Server (another machine, new host id).
    await restart_license_server(site, machine_id="another-machine")
    await restart_administrator(site)
    report = await site.admin.resumed
    assert report.failed["op-moved"].startswith("OPERATION_HOST_CHANGED: ")

    error = await refused(
        site.administrator.Activate(activate_request(site, activation_id, 1, "op-moved")),
        Code.FAILED_PRECONDITION,
        "OPERATION_HOST_CHANGED",
    )
    assert began_on in error.details()
    stuck = await operation(site, "op-moved")
    assert stuck.state == pb.OPERATION_STATE_PREPARED
    assert stuck.last_error.startswith("OPERATION_HOST_CHANGED: ")
    assert await activated_seats(site) == 0
