"""Air-gapped sites: export a request file, submit it where the Internet is, import the
answer file. In process over real gRPC, on SQLite and PostgreSQL.

The site's Administrator exports and imports; a second Administrator with its own
journal and no License Server anywhere near it stands for the machine with Internet
access that submits the file.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from sqlalchemy import select

from services.activation_server.store import tables as vendor_tables
from services.administrator import config as admin_config
from services.administrator import server as admin_server
from services.administrator.domain.offline_files import (
    MAX_FILE_BYTES,
    RESPONSE,
    armour,
    read_request_file,
    read_response_file,
)
from services.administrator.store import tables as admin_tables
from services.license_server import server as ls_server
from services.license_server.store import tables as ls_tables
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc as pb_grpc
from tessera.auth import bearer_metadata
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import error_info, reason_of
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import (
    Site,
    restart_license_server,
    start_another_license_server,
)
from tests.support.snapshots import count_rows
from tests.support.tokens import ADMINISTRATOR_FLAGS, VENDOR_TOKEN

Code = grpc.StatusCode
# "Files must be small": a few KB.
SMALL = 4 * 1024


@pytest.fixture
async def internet(
    site: Site, databases: DatabaseFactory
) -> AsyncIterator[pb_grpc.AdministratorServiceStub]:
    """An Administrator on a machine with Internet access and no License Server."""
    internet = await admin_server.build(
        admin_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(site.tmp_path / "administrator_internet"),
                "--database-url", await databases.new("admin_internet"),
                "--activation-server", f"127.0.0.1:{site.activation.port}",
                *ADMINISTRATOR_FLAGS,
            ],
            environ={},
        )
    )  # fmt: skip
    yield pb_grpc.AdministratorServiceStub(site.channel(internet.port))
    await internet.stop(0)


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


async def information(site: Site) -> list[tuple[str, int, int]]:
    info = await site.leases.GetLicenseInformation(lpb.GetLicenseInformationRequest())
    return [(f.feature, f.activated, f.available) for f in info.features]


async def line_left(site: Site, entitlement_id: str) -> tuple[int, int]:
    order = await site.activation_service.GetOrder(
        apb.GetOrderRequest(entitlement_id=entitlement_id)
    )
    return order.entitlement.lines[0].activated, order.entitlement.lines[0].available


async def vendor_audit(site: Site) -> int:
    return await count_rows(site.activation.store.engine, vendor_tables.audit_log)


async def journal_rows(site: Site) -> int:
    return await count_rows(site.admin.journal.engine, admin_tables.operations)


def export_activation(
    site: Site, activation_id: str, count: int, operation_id: str = ""
) -> pb.ExportRequestRequest:
    return pb.ExportRequestRequest(
        kind=pb.OPERATION_KIND_ACTIVATE,
        license_server=site.license_address,
        activation_id=activation_id,
        count=count,
        operation_id=operation_id,
    )


# ---------------------------------------------------------------------------------------
# The round trip
# ---------------------------------------------------------------------------------------


async def test_offline_activation_round_trip(
    site: Site, internet: pb_grpc.AdministratorServiceStub
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    activation_id = entitlement.lines[0].activation_id

    exported = await site.administrator.ExportRequest(
        export_activation(site, activation_id, 2, "air-1")
    )
    operation = exported.operation
    assert (operation.kind, operation.state, operation.offline) == (
        pb.OPERATION_KIND_ACTIVATE,
        pb.OPERATION_STATE_PREPARED,
        True,
    )
    assert operation.host_id == site.license.identity.host_id
    text = exported.request_file.decode("ascii")
    assert text.startswith("-----BEGIN TESSERA REQUEST-----\n")
    assert text.endswith("-----END TESSERA REQUEST-----\n")
    assert "Kind: activate\n" in text and "Operation: air-1\n" in text
    assert max(len(line) for line in text.splitlines()) <= 64
    assert len(exported.request_file) < SMALL
    assert exported.file_name == "tessera-activate-air-1-request.txt"
    request_file = read_request_file(exported.request_file)
    assert (request_file.format_version, request_file.kind, request_file.operation_id) == (
        1,
        pb.OPERATION_KIND_ACTIVATE,
        "air-1",
    )
    assert request_file.request.payload_type == "tessera.activation.v1.HostActivationRequest"
    assert await information(site) == []  # nothing yet

    # Exporting again writes the same request.
    again = await site.administrator.ExportRequest(
        export_activation(site, activation_id, 2, "air-1")
    )
    assert again.request_file == exported.request_file

    submitted = await internet.SubmitRequest(
        pb.SubmitRequestRequest(request_file=exported.request_file)
    )
    assert submitted.response_file.startswith(b"-----BEGIN TESSERA RESPONSE-----\n")
    assert len(submitted.response_file) < SMALL
    assert submitted.file_name == "tessera-activate-air-1-response.txt"
    assert await line_left(site, entitlement.entitlement_id) == (2, 3)
    # Submitting twice gets the same answer from the vendor, not a second activation.
    resubmitted = await internet.SubmitRequest(
        pb.SubmitRequestRequest(request_file=exported.request_file)
    )
    assert resubmitted.response_file == submitted.response_file
    assert await line_left(site, entitlement.entitlement_id) == (2, 3)

    imported = await site.administrator.ImportResponse(
        pb.ImportResponseRequest(
            license_server=site.license_address, response_file=submitted.response_file
        )
    )
    assert imported.operation.state == pb.OPERATION_STATE_COMPLETED
    assert imported.operation.offline
    assert await information(site) == [("client.station", 2, 2)]

    # Importing twice: same result, nothing changes.
    twice = await site.administrator.ImportResponse(
        pb.ImportResponseRequest(
            license_server=site.license_address, response_file=submitted.response_file
        )
    )
    assert twice == imported
    assert await information(site) == [("client.station", 2, 2)]
    assert await line_left(site, entitlement.entitlement_id) == (2, 3)


async def test_offline_return_round_trip(
    site: Site, internet: pb_grpc.AdministratorServiceStub
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    activated = await site.administrator.Activate(
        pb.ActivateRequest(
            license_server=site.license_address,
            activation_id=entitlement.lines[0].activation_id,
            count=3,
        )
    )
    certificate_id = activated.certificate.certificate.certificate_id

    exported = await site.administrator.ExportRequest(
        pb.ExportRequestRequest(
            kind=pb.OPERATION_KIND_RETURN,
            license_server=site.license_address,
            certificate_id=certificate_id,
            operation_id="air-return",
        )
    )
    assert exported.operation.certificate_id == certificate_id
    assert exported.file_name == "tessera-return-air-return-request.txt"
    assert len(exported.request_file) < SMALL
    # The seats stop serving as soon as the request is signed.
    assert await information(site) in ([], [("client.station", 0, 0)])

    submitted = await internet.SubmitRequest(
        pb.SubmitRequestRequest(request_file=exported.request_file)
    )
    assert len(submitted.response_file) < SMALL
    assert await line_left(site, entitlement.entitlement_id) == (0, 5)

    imported = await site.administrator.ImportResponse(
        pb.ImportResponseRequest(
            license_server=site.license_address, response_file=submitted.response_file
        )
    )
    assert imported.operation.state == pb.OPERATION_STATE_COMPLETED
    certificates = await site.trusted_storage.ListCertificates(lpb.ListCertificatesRequest())
    assert certificate_id not in [c.certificate.certificate_id for c in certificates.certificates]


async def test_offline_repair_round_trip(
    site: Site, internet: pb_grpc.AdministratorServiceStub
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    await site.administrator.Activate(
        pb.ActivateRequest(
            license_server=site.license_address,
            activation_id=entitlement.lines[0].activation_id,
            count=2,
        )
    )
    await restart_license_server(site, machine_id="replacement-board")
    health = await site.trusted_storage.GetTrustHealth(lpb.GetTrustHealthRequest())
    assert not health.health.healthy

    exported = await site.administrator.ExportRequest(
        pb.ExportRequestRequest(
            kind=pb.OPERATION_KIND_REPAIR,
            license_server=site.license_address,
            operation_id="air-repair",
        )
    )
    assert len(exported.request_file) < SMALL
    submitted = await internet.SubmitRequest(
        pb.SubmitRequestRequest(request_file=exported.request_file)
    )
    assert len(submitted.response_file) < SMALL
    imported = await site.administrator.ImportResponse(
        pb.ImportResponseRequest(
            license_server=site.license_address, response_file=submitted.response_file
        )
    )
    assert imported.operation.state == pb.OPERATION_STATE_COMPLETED
    health = await site.trusted_storage.GetTrustHealth(lpb.GetTrustHealthRequest())
    assert health.health.healthy, health.health
    assert await information(site) == [("client.station", 2, 2)]


async def test_an_offline_repair_of_healthy_storage_is_exported_only_when_forced(
    site: Site, internet: pb_grpc.AdministratorServiceStub
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    await site.administrator.Activate(
        pb.ActivateRequest(
            license_server=site.license_address,
            activation_id=entitlement.lines[0].activation_id,
            count=2,
        )
    )
    export = pb.ExportRequestRequest(
        kind=pb.OPERATION_KIND_REPAIR, license_server=site.license_address, operation_id="air"
    )
    journal, pending = (
        await journal_rows(site),
        await count_rows(site.license.store.engine, ls_tables.pending_requests),
    )
    await refused(
        site.administrator.ExportRequest(export), Code.FAILED_PRECONDITION, "NOTHING_TO_REPAIR"
    )
    assert await journal_rows(site) == journal
    assert await count_rows(site.license.store.engine, ls_tables.pending_requests) == pending

    # Forced: the file is written, and the vendor counts the repair when it is submitted.
    export.force = True
    exported = await site.administrator.ExportRequest(export)
    assert exported.operation.state == pb.OPERATION_STATE_PREPARED
    await internet.SubmitRequest(pb.SubmitRequestRequest(request_file=exported.request_file))
    assert await count_rows(site.activation.store.engine, vendor_tables.repairs) == 1


async def test_a_refused_return_is_imported_then_told(
    site: Site, internet: pb_grpc.AdministratorServiceStub
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    activated = await site.administrator.Activate(
        pb.ActivateRequest(
            license_server=site.license_address,
            activation_id=entitlement.lines[0].activation_id,
            count=3,
        )
    )
    certificate_id = activated.certificate.certificate.certificate_id
    exported = await site.administrator.ExportRequest(
        pb.ExportRequestRequest(
            kind=pb.OPERATION_KIND_RETURN,
            license_server=site.license_address,
            certificate_id=certificate_id,
            operation_id="air-refused",
        )
    )
    # The vendor forced the certificate back meanwhile (e.g. the operator asked by phone):
    # the vendor no longer records it as this host's and refuses the return.
    await site.vendor.ForceReturn(
        apb.ForceReturnRequest(certificate_id=certificate_id, reason="ticket 4411"),
        metadata=bearer_metadata(VENDOR_TOKEN),
    )
    submitted = await internet.SubmitRequest(
        pb.SubmitRequestRequest(request_file=exported.request_file)
    )
    response_file = read_response_file(submitted.response_file)
    receipt = apb.VendorReturnReceipt.FromString(response_file.response.payload)
    assert receipt.outcome == apb.RETURN_OUTCOME_REFUSED

    error = await refused(
        site.administrator.ImportResponse(
            pb.ImportResponseRequest(
                license_server=site.license_address, response_file=submitted.response_file
            )
        ),
        Code.FAILED_PRECONDITION,
        receipt.refusal_reason,
    )
    assert error.details() == receipt.refusal_message
    found = await site.administrator.GetOperation(
        pb.GetOperationRequest(operation_id="air-refused")
    )
    assert found.operation.state == pb.OPERATION_STATE_REFUSED
    assert found.operation.last_error == f"{receipt.refusal_reason}: {receipt.refusal_message}"
    # The vendor holds the seats already: they left this License Server for good.
    assert receipt.refusal_reason == "CERTIFICATE_NOT_HELD"
    certificates = await site.trusted_storage.ListCertificates(lpb.ListCertificatesRequest())
    assert not certificates.certificates
    assert await line_left(site, entitlement.entitlement_id) == (0, 5)
    # Importing again tells the same refusal.
    await refused(
        site.administrator.ImportResponse(
            pb.ImportResponseRequest(
                license_server=site.license_address, response_file=submitted.response_file
            )
        ),
        Code.FAILED_PRECONDITION,
        receipt.refusal_reason,
    )


# ---------------------------------------------------------------------------------------
# The right License Server, the right operation
# ---------------------------------------------------------------------------------------


async def test_an_answer_file_is_installed_only_on_the_license_server_that_asked(
    site: Site, internet: pb_grpc.AdministratorServiceStub, host_b: ls_server.LicenseServer
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    exported = await site.administrator.ExportRequest(
        export_activation(site, entitlement.lines[0].activation_id, 2, "air-host")
    )
    submitted = await internet.SubmitRequest(
        pb.SubmitRequestRequest(request_file=exported.request_file)
    )
    address_b = f"{host_b.port}@127.0.0.1"
    storage_b = lpb_grpc.TrustedStorageServiceStub(site.channel(host_b.port))

    error = await refused(
        site.administrator.ImportResponse(
            pb.ImportResponseRequest(
                license_server=address_b, response_file=submitted.response_file
            )
        ),
        Code.PERMISSION_DENIED,
        "CERTIFICATE_FOR_ANOTHER_HOST",
    )
    assert host_b.identity.host_id in error.details()
    listed = await storage_b.ListCertificates(lpb.ListCertificatesRequest())
    assert not listed.certificates
    found = await site.administrator.GetOperation(pb.GetOperationRequest(operation_id="air-host"))
    assert found.operation.state == pb.OPERATION_STATE_PREPARED

    # The License Server refuses it on its own as well.
    answer = read_response_file(submitted.response_file).response
    await refused(
        storage_b.InstallActivation(lpb.InstallActivationRequest(response=answer)),
        Code.PERMISSION_DENIED,
        "CERTIFICATE_FOR_ANOTHER_HOST",
    )

    # On the License Server that asked, it installs.
    imported = await site.administrator.ImportResponse(
        pb.ImportResponseRequest(
            license_server=site.license_address, response_file=submitted.response_file
        )
    )
    assert imported.operation.state == pb.OPERATION_STATE_COMPLETED


async def test_an_answer_file_must_answer_a_journaled_operation(
    site: Site, internet: pb_grpc.AdministratorServiceStub
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    activation_id = entitlement.lines[0].activation_id
    first = await site.administrator.ExportRequest(
        export_activation(site, activation_id, 1, "air-a")
    )
    await site.administrator.ExportRequest(export_activation(site, activation_id, 1, "air-b"))
    submitted = await internet.SubmitRequest(
        pb.SubmitRequestRequest(request_file=first.request_file)
    )
    answer = read_response_file(submitted.response_file)

    def relabelled(operation_id: str) -> bytes:
        file = pb.ResponseFile()
        file.CopyFrom(answer)
        file.operation_id = operation_id
        return armour(RESPONSE, file.SerializeToString(), [])

    await refused(
        site.administrator.ImportResponse(
            pb.ImportResponseRequest(
                license_server=site.license_address, response_file=relabelled("air-unknown")
            )
        ),
        Code.NOT_FOUND,
        "OPERATION_NOT_FOUND",
    )
    await refused(
        site.administrator.ImportResponse(
            pb.ImportResponseRequest(
                license_server=site.license_address, response_file=relabelled("air-b")
            )
        ),
        Code.INVALID_ARGUMENT,
        "RESPONSE_MISMATCH",
    )
    assert await information(site) == []


# ---------------------------------------------------------------------------------------
# Junk
# ---------------------------------------------------------------------------------------


def request_armour(payload: bytes, *headers: tuple[str, str]) -> bytes:
    return armour("TESSERA REQUEST", payload, list(headers))


def junk_files(good: bytes, good_response: bytes) -> dict[str, tuple[bytes, str]]:
    text = good.decode("ascii")
    lines = text.splitlines()
    body_line = next(i for i, line in enumerate(lines) if i > 0 and not line)  # blank
    altered = list(lines)
    first_body = altered[body_line + 1]
    altered[body_line + 1] = ("B" if first_body[0] != "B" else "C") + first_body[1:]
    file = read_request_file(good)
    file.format_version = 2
    future = file.SerializeToString()
    return {
        "empty": (b"", "NOT_A_TESSERA_FILE"),
        "binary": (bytes(range(256)) * 4, "NOT_A_TESSERA_FILE"),
        "plain-text": (b"please activate 2 seats, thanks\n", "NOT_A_TESSERA_FILE"),
        "pgp-armour": (
            b"-----BEGIN PGP MESSAGE-----\n\nhQEMA\n-----END PGP MESSAGE-----\n",
            "NOT_A_TESSERA_FILE",
        ),
        "a-response-file": (good_response, "WRONG_FILE_TYPE"),
        "cut-short": ("\n".join(lines[:-3]).encode(), "DAMAGED_FILE"),
        "not-base64": (
            b"-----BEGIN TESSERA REQUEST-----\n\n!!!not base64!!!\n-----END TESSERA REQUEST-----\n",
            "DAMAGED_FILE",
        ),
        "altered": ("\n".join(altered).encode(), "DAMAGED_FILE"),
        "not-a-request-inside": (
            request_armour(base64.b64decode("////")),
            "DAMAGED_FILE",
        ),
        "version-2-header": (
            text.replace("Version: 1", "Version: 2").encode(),
            "UNSUPPORTED_FILE_VERSION",
        ),
        "version-2-inside": (request_armour(future), "UNSUPPORTED_FILE_VERSION"),
        "too-large": (b"A" * (MAX_FILE_BYTES + 1), "FILE_TOO_LARGE"),
        "crlf-line-ends-are-fine": (text.replace("\n", "\r\n").encode(), ""),
    }


async def test_junk_request_and_response_files_are_refused_with_a_reason(
    site: Site, internet: pb_grpc.AdministratorServiceStub, subtests: pytest.Subtests
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    exported = await site.administrator.ExportRequest(
        export_activation(site, entitlement.lines[0].activation_id, 1, "air-junk")
    )
    good_response = (
        await internet.SubmitRequest(pb.SubmitRequestRequest(request_file=exported.request_file))
    ).response_file
    audit, journal = await vendor_audit(site), await journal_rows(site)

    for case, (data, reason) in junk_files(exported.request_file, good_response).items():
        with subtests.test(case):
            call = internet.SubmitRequest(pb.SubmitRequestRequest(request_file=data))
            if not reason:
                await call
                continue
            error = await refused(call, Code.INVALID_ARGUMENT, reason)
            info = error_info(error)
            assert info is not None and info.metadata["field"] == "request_file"
            assert error.details().startswith("request_file: ")

    with subtests.test("a-request-file-to-import"):
        await refused(
            site.administrator.ImportResponse(
                pb.ImportResponseRequest(
                    license_server=site.license_address, response_file=exported.request_file
                )
            ),
            Code.INVALID_ARGUMENT,
            "WRONG_FILE_TYPE",
        )
    with subtests.test("junk-to-import"):
        await refused(
            site.administrator.ImportResponse(
                pb.ImportResponseRequest(
                    license_server=site.license_address, response_file=b"\x00\x01junk"
                )
            ),
            Code.INVALID_ARGUMENT,
            "NOT_A_TESSERA_FILE",
        )
    with subtests.test("bad-address-first"):
        await refused(
            site.administrator.ImportResponse(
                pb.ImportResponseRequest(license_server="@", response_file=good_response)
            ),
            Code.INVALID_ARGUMENT,
            "INVALID_LICENSE_SERVER_ADDRESS",
        )
    # Junk reached nobody: the vendor decided nothing new, the journal is as it was.
    assert await vendor_audit(site) == audit
    assert await journal_rows(site) == journal
    assert await information(site) == []


EXPORT_CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    "no-kind": ({"kind": pb.OPERATION_KIND_UNSPECIFIED}, "INVALID_INPUT", "kind"),
    "move": ({"kind": pb.OPERATION_KIND_MOVE}, "INVALID_INPUT", "kind"),
    "local": ({"kind": pb.OPERATION_KIND_ACTIVATE_LOCAL}, "INVALID_INPUT", "kind"),
    "unknown-kind": ({"kind": 42}, "INVALID_INPUT", "kind"),
    "bad-address": (
        {"license_server": "27000@"},
        "INVALID_LICENSE_SERVER_ADDRESS",
        "license_server",
    ),
    "no-seats": ({"count": 0}, "INVALID_INPUT", "count"),
    "certificate-on-activation": ({"certificate_id": "c-1"}, "INVALID_INPUT", "certificate_id"),
    "force-on-activation": ({"force": True}, "INVALID_INPUT", "force"),
    "activation-typo": ({"activation_id": "ACT-0000-0000-0001"}, "INVALID_INPUT", "activation_id"),
    "bad-operation-id": ({"operation_id": "a b"}, "INVALID_INPUT", "operation_id"),
    "return-without-certificate": (
        {"kind": pb.OPERATION_KIND_RETURN, "activation_id": "", "count": 0},
        "INVALID_INPUT",
        "certificate_id",
    ),
    "repair-with-seats": (
        {"kind": pb.OPERATION_KIND_REPAIR, "activation_id": ""},
        "INVALID_INPUT",
        "count",
    ),
}


async def test_export_refuses_bad_input_before_anything_happens(
    site: Site, subtests: pytest.Subtests
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    base = {
        "kind": pb.OPERATION_KIND_ACTIVATE,
        "license_server": site.license_address,
        "activation_id": entitlement.lines[0].activation_id,
        "count": 1,
    }
    for case, (changes, reason, field) in EXPORT_CASES.items():
        with subtests.test(case):
            error = await refused(
                site.administrator.ExportRequest(pb.ExportRequestRequest(**{**base, **changes})),
                Code.INVALID_ARGUMENT,
                reason,
            )
            info = error_info(error)
            assert info is not None and info.metadata.get("field", "") == field
    assert await journal_rows(site) == 0
    assert await count_rows(site.license.store.engine, ls_tables.pending_requests) == 0


# ---------------------------------------------------------------------------------------
# Forged answers: refused by the License Server, and nothing of them is kept
# ---------------------------------------------------------------------------------------


async def journaled_row(site: Site, operation_id: str) -> dict[str, Any]:
    """Every column of the operation's journal row, as stored."""
    operations = admin_tables.operations
    async with site.admin.journal.engine.connect() as connection:
        row = (
            (
                await connection.execute(
                    select(operations).where(operations.c.operation_id == operation_id)
                )
            )
            .mappings()
            .one()
        )
    return dict(row)


def rewrapped(file: pb.ResponseFile) -> bytes:
    """A response file around ``file``, with a checksum that matches what is inside."""
    return armour(RESPONSE, file.SerializeToString(), [("Operation", file.operation_id)])


def forged_payload(response_file: bytes) -> bytes:
    """The answer file with one byte of its signed answer changed (the answer still
    parses and names the same request and host), its checksum recomputed."""
    file = read_response_file(response_file)
    genuine = apb.VendorActivationResponse.FromString(file.response.payload)
    payload = bytearray(file.response.payload)
    for at in range(len(payload) - 1, -1, -1):
        forged = bytearray(payload)
        forged[at] ^= 0x01
        try:
            answer = apb.VendorActivationResponse.FromString(bytes(forged))
        except DecodeError:
            continue
        if (answer.request_id, answer.host_id) == (genuine.request_id, genuine.host_id):
            file.response.payload = bytes(forged)
            return rewrapped(file)
    raise AssertionError("no byte of the answer can change and still parse")


def forged_signature(response_file: bytes) -> bytes:
    file = read_response_file(response_file)
    signature = bytearray(file.response.signature)
    signature[0] ^= 0x01
    file.response.signature = bytes(signature)
    return rewrapped(file)


FORGERIES = {"payload-byte": forged_payload, "signature-byte": forged_signature}


@pytest.mark.parametrize("forgery", list(FORGERIES))
async def test_a_forged_answer_file_changes_nothing_and_the_genuine_one_completes(
    site: Site, internet: pb_grpc.AdministratorServiceStub, forgery: str
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    exported = await site.administrator.ExportRequest(
        export_activation(site, entitlement.lines[0].activation_id, 2, "air-forged")
    )
    genuine = (
        await internet.SubmitRequest(pb.SubmitRequestRequest(request_file=exported.request_file))
    ).response_file
    forged = FORGERIES[forgery](genuine)
    assert read_response_file(forged)  # the file itself is intact: only the answer lies
    before = await journaled_row(site, "air-forged")

    for _ in range(2):
        await refused(
            site.administrator.ImportResponse(
                pb.ImportResponseRequest(license_server=site.license_address, response_file=forged)
            ),
            Code.PERMISSION_DENIED,
            "BAD_SIGNATURE",
        )
        # Nothing of the forged answer is kept: not as the answer, not as an error.
        assert await journaled_row(site, "air-forged") == before
        assert await information(site) == []

    # A fresh answer (submitting again) is the genuine one, and it completes.
    again = (
        await internet.SubmitRequest(pb.SubmitRequestRequest(request_file=exported.request_file))
    ).response_file
    assert again == genuine
    imported = await site.administrator.ImportResponse(
        pb.ImportResponseRequest(license_server=site.license_address, response_file=again)
    )
    assert imported.operation.state == pb.OPERATION_STATE_COMPLETED
    assert await information(site) == [("client.station", 2, 2)]
    assert (await journaled_row(site, "air-forged"))["response_envelope"] == (
        read_response_file(genuine).response.SerializeToString()
    )
    assert await line_left(site, entitlement.entitlement_id) == (2, 3)


async def test_an_answer_rewritten_to_another_operation_changes_nothing(
    site: Site, internet: pb_grpc.AdministratorServiceStub
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    activation_id = entitlement.lines[0].activation_id
    first = await site.administrator.ExportRequest(
        export_activation(site, activation_id, 1, "air-first")
    )
    second = await site.administrator.ExportRequest(
        export_activation(site, activation_id, 2, "air-second")
    )
    answers = {
        exported.operation.operation_id: (
            await internet.SubmitRequest(
                pb.SubmitRequestRequest(request_file=exported.request_file)
            )
        ).response_file
        for exported in (first, second)
    }
    before = {op: await journaled_row(site, op) for op in answers}

    # The first answer, its file and its signed request id rewritten to the second
    # operation: it now names the second operation's request, but the vendor signed it
    # for the first.
    file = read_response_file(answers["air-first"])
    answer = apb.VendorActivationResponse.FromString(file.response.payload)
    answer.request_id = second.operation.request_id
    file.response.payload = answer.SerializeToString()
    file.operation_id = "air-second"
    await refused(
        site.administrator.ImportResponse(
            pb.ImportResponseRequest(
                license_server=site.license_address, response_file=rewrapped(file)
            )
        ),
        Code.PERMISSION_DENIED,
        "BAD_SIGNATURE",
    )
    # Only the file's operation id rewritten: it answers another request than it names.
    file = read_response_file(answers["air-first"])
    file.operation_id = "air-second"
    await refused(
        site.administrator.ImportResponse(
            pb.ImportResponseRequest(
                license_server=site.license_address, response_file=rewrapped(file)
            )
        ),
        Code.INVALID_ARGUMENT,
        "RESPONSE_MISMATCH",
    )
    assert {op: await journaled_row(site, op) for op in answers} == before
    assert await information(site) == []

    # Each genuine answer then completes its own operation.
    for operation_id, response_file in answers.items():
        imported = await site.administrator.ImportResponse(
            pb.ImportResponseRequest(
                license_server=site.license_address, response_file=response_file
            )
        )
        assert imported.operation.operation_id == operation_id
        assert imported.operation.state == pb.OPERATION_STATE_COMPLETED
    assert await information(site) == [("client.station", 3, 3)]


async def test_an_installed_answer_never_completes_on_another_license_server(
    site: Site, internet: pb_grpc.AdministratorServiceStub, host_b: ls_server.LicenseServer
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    exported = await site.administrator.ExportRequest(
        export_activation(site, entitlement.lines[0].activation_id, 2, "air-elsewhere")
    )
    submitted = await internet.SubmitRequest(
        pb.SubmitRequestRequest(request_file=exported.request_file)
    )
    imported = await site.administrator.ImportResponse(
        pb.ImportResponseRequest(
            license_server=site.license_address, response_file=submitted.response_file
        )
    )
    assert imported.operation.state == pb.OPERATION_STATE_COMPLETED
    done = await journaled_row(site, "air-elsewhere")

    address_b = f"{host_b.port}@127.0.0.1"
    error = await refused(
        site.administrator.ImportResponse(
            pb.ImportResponseRequest(
                license_server=address_b, response_file=submitted.response_file
            )
        ),
        Code.PERMISSION_DENIED,
        "CERTIFICATE_FOR_ANOTHER_HOST",
    )
    assert host_b.identity.host_id in error.details()
    assert site.license.identity.host_id in error.details()
    storage_b = lpb_grpc.TrustedStorageServiceStub(site.channel(host_b.port))
    assert not (await storage_b.ListCertificates(lpb.ListCertificatesRequest())).certificates
    assert await journaled_row(site, "air-elsewhere") == done
    # On its own License Server it still tells the same result.
    again = await site.administrator.ImportResponse(
        pb.ImportResponseRequest(
            license_server=site.license_address, response_file=submitted.response_file
        )
    )
    assert again == imported


async def test_an_answer_imported_through_another_administrator_says_where_it_belongs(
    site: Site, internet: pb_grpc.AdministratorServiceStub
) -> None:
    entitlement = await site.create_entitlement([("client.station", 5)])
    exported = await site.administrator.ExportRequest(
        export_activation(site, entitlement.lines[0].activation_id, 2, "air-where")
    )
    submitted = await internet.SubmitRequest(
        pb.SubmitRequestRequest(request_file=exported.request_file)
    )
    before = await journaled_row(site, "air-where")

    # The Administrator that submitted it has no such operation in its journal.
    error = await refused(
        internet.ImportResponse(
            pb.ImportResponseRequest(
                license_server=site.license_address, response_file=submitted.response_file
            )
        ),
        Code.NOT_FOUND,
        "OPERATION_NOT_FOUND",
    )
    assert "the Administrator that exported its request" in error.details()
    assert site.license.identity.host_id in error.details()
    info = error_info(error)
    assert info is not None and info.metadata["operation_id"] == "air-where"
    assert await information(site) == []
    assert await journaled_row(site, "air-where") == before

    # Through the one that exported it, it completes.
    imported = await site.administrator.ImportResponse(
        pb.ImportResponseRequest(
            license_server=site.license_address, response_file=submitted.response_file
        )
    )
    assert imported.operation.state == pb.OPERATION_STATE_COMPLETED
