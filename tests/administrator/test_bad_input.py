"""Bad input to every Administrator RPC gets a clear status code and reason, and changes
nothing, including what the Administrator passes on from the vendor.

Servicer-level tests over real gRPC in process, on SQLite and PostgreSQL. Each refusal is
checked for its canonical status code and its google.rpc.ErrorInfo reason, and a snapshot
of what the three services hold is compared before and after (tests/support/snapshots.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from services.administrator import config as admin_config
from services.administrator import server as admin_server
from services.license_server import server as ls_server
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.ids import new_id
from tessera.rpc import error_info
from tests.support.bad_input import (
    Code,
    activate,
    entitlement,
    expect,
    field_of,
)
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import Site
from tests.support.processes import free_port
from tests.support.snapshots import (
    changed,
    snapshot,
)
from tests.support.tokens import ADMINISTRATOR_FLAGS

# ---------------------------------------------------------------------------------------
# Administrator
# ---------------------------------------------------------------------------------------

BAD_ADDRESSES = [
    "",
    "   ",
    ";",
    "localhost",
    "27000",
    "99999@host",
    "0@host",
    "-1@host",
    "27000@",
    "abc@localhost",
    "@bad host",
    "@-host",
    "27000@[not-ipv6]",
    "@localhost;localhost",
]


async def test_administrator_refuses_an_invalid_license_server_address(
    site: Site, subtests: pytest.Subtests
) -> None:
    order = await entitlement(site)
    for address in BAD_ADDRESSES:
        with subtests.test(repr(address)):
            before = await snapshot(site)
            activate_request = admin_pb2.ActivateRequest(
                license_server=address, activation_id=order.lines[0].activation_id, count=1
            )
            await expect(
                site.administrator.Activate(activate_request),
                Code.INVALID_ARGUMENT,
                "INVALID_LICENSE_SERVER_ADDRESS",
            )
            await expect(
                site.administrator.ListLicenses(
                    admin_pb2.ListLicensesRequest(license_server=address)
                ),
                Code.INVALID_ARGUMENT,
                "INVALID_LICENSE_SERVER_ADDRESS",
            )
            assert await snapshot(site) == before


async def test_every_administrator_call_refuses_an_empty_license_server_address(
    site: Site, subtests: pytest.Subtests
) -> None:
    """An empty address (an unset variable) is never "the default server": each field
    of each Administrator request that names a License Server, found in the service's
    descriptor so a new call is covered too, is refused INVALID_ARGUMENT /
    INVALID_LICENSE_SERVER_ADDRESS naming that field, and nothing changes."""
    order = await entitlement(site)
    valid = {
        "activation_id": order.lines[0].activation_id,
        "count": 1,
        "certificate_id": "c-1",
        "response_file": b"Tessera response",
        "kind": admin_pb2.OPERATION_KIND_ACTIVATE,
    }
    service = admin_pb2.DESCRIPTOR.services_by_name["AdministratorService"]
    checked = []
    for method in service.methods:
        message_class = getattr(admin_pb2, method.input_type.name)
        address_fields = [
            field.name
            for field in method.input_type.fields
            if field.name.endswith("license_server") and field.type == field.TYPE_STRING
        ]
        for empty in address_fields:
            with subtests.test(f"{method.name}.{empty}"):
                request = message_class(
                    **{
                        name: value
                        for name, value in valid.items()
                        if name in method.input_type.fields_by_name
                    },
                    **{field: site.license_address for field in address_fields if field != empty},
                )
                setattr(request, empty, "")
                before = await snapshot(site)
                error = await expect(
                    getattr(site.administrator, method.name)(request),
                    Code.INVALID_ARGUMENT,
                    "INVALID_LICENSE_SERVER_ADDRESS",
                )
                assert field_of(error) == empty
                assert "empty" in (error.details() or "")
                assert await snapshot(site) == before
                checked.append(f"{method.name}.{empty}")
    assert len(checked) >= 8, checked  # Activate … ImportResponse, both ends of Move


# changed fields -> the field named in the refusal
ADMIN_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "zero-count": ({"count": 0}, "count"),
    "negative-count": ({"count": -1}, "count"),
    "count-above-maximum": ({"count": 100_001}, "count"),
    "operation-id-with-spaces": ({"operation_id": "my operation"}, "operation_id"),
    "operation-id-too-long": ({"operation_id": "o" * 129}, "operation_id"),
}


async def test_administrator_activate_refuses_bad_fields(
    site: Site, subtests: pytest.Subtests
) -> None:
    order = await entitlement(site)
    for case, (changes, field) in ADMIN_FIELDS.items():
        with subtests.test(case):
            before = await snapshot(site)
            request = admin_pb2.ActivateRequest(
                **{
                    "license_server": site.license_address,
                    "activation_id": order.lines[0].activation_id,
                    "count": 1,
                    **changes,
                }
            )
            error = await expect(
                site.administrator.Activate(request), Code.INVALID_ARGUMENT, "INVALID_INPUT"
            )
            assert field_of(error) == field
            assert await snapshot(site) == before


async def test_administrator_against_a_license_server_that_is_not_there(site: Site) -> None:
    order = await entitlement(site)
    address = f"{free_port()}@127.0.0.1;{free_port()}@127.0.0.1"
    before = await snapshot(site)

    refusals = [
        await expect(
            site.administrator.Activate(
                admin_pb2.ActivateRequest(
                    license_server=address, activation_id=order.lines[0].activation_id, count=1
                )
            ),
            Code.UNAVAILABLE,
            "PEER_UNAVAILABLE",
        ),
        await expect(
            site.administrator.ListLicenses(admin_pb2.ListLicensesRequest(license_server=address)),
            Code.UNAVAILABLE,
            "PEER_UNAVAILABLE",
        ),
    ]
    for error in refusals:
        info = error_info(error)
        assert info is not None and info.metadata["peer"] == "License Server"
    assert await snapshot(site) == before


async def test_administrator_passes_vendor_refusals_through(site: Site) -> None:
    order = await activate(site, seats=3, sold=5)
    activation_id = order.lines[0].activation_id
    before = await snapshot(site)

    for activation, count, code, reason in (
        (activation_id, 3, Code.RESOURCE_EXHAUSTED, "NOT_ENOUGH_SEATS_LEFT"),
        (new_id("ACT"), 1, Code.NOT_FOUND, "ACTIVATION_ID_NOT_FOUND"),
    ):
        error = await expect(
            site.administrator.Activate(
                admin_pb2.ActivateRequest(
                    license_server=site.license_address, activation_id=activation, count=count
                )
            ),
            code,
            reason,
        )
        info = error_info(error)
        assert info is not None and info.metadata["peer"] == "Activation Server"

    after = await snapshot(site)
    # The attempts stay journaled (Administrator, License Server) so they can be resumed;
    # no seat moved and nothing was installed.
    assert changed(before, after) <= {"admin.operations", "ls.pending"}
    assert after["vendor.orders"][order.entitlement_id][0][2:] == (3, 2)
    assert after["ls.information"] == [("client.station", 3, 0, 3)]


async def test_administrator_refuses_an_operation_id_reused_with_other_parameters(
    site: Site, host_b: ls_server.LicenseServer, subtests: pytest.Subtests
) -> None:
    order = await entitlement(site, sold=5)
    other_line = (await entitlement(site)).lines[0].activation_id
    first = {
        "license_server": site.license_address,
        "activation_id": order.lines[0].activation_id,
        "count": 1,
        "operation_id": "op-1",
    }
    await site.administrator.Activate(admin_pb2.ActivateRequest(**first))

    for case, changes in {
        "count": {"count": 2},
        "line": {"activation_id": other_line},
        "license-server": {"license_server": f"{host_b.port}@127.0.0.1"},
    }.items():
        with subtests.test(case):
            before = await snapshot(site, host_b)
            error = await expect(
                site.administrator.Activate(admin_pb2.ActivateRequest(**{**first, **changes})),
                Code.ALREADY_EXISTS,
                "OPERATION_ID_REUSED",
            )
            info = error_info(error)
            assert info is not None and info.metadata["operation_id"] == "op-1"
            assert await snapshot(site, host_b) == before


async def test_administrator_without_the_activation_server(
    site: Site, databases: DatabaseFactory
) -> None:
    lonely = await admin_server.build(
        admin_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(site.tmp_path / "administrator_lonely"),
                "--database-url", await databases.new("admin_lonely"),
                "--activation-server", f"127.0.0.1:{free_port()}",
                *ADMINISTRATOR_FLAGS,
            ],
            environ={},
        )
    )  # fmt: skip
    try:
        stub = admin_pb2_grpc.AdministratorServiceStub(site.channel(lonely.port))
        order = await entitlement(site)
        before = await snapshot(site)
        refusals = [
            await expect(
                stub.GetOrder(admin_pb2.GetOrderRequest(entitlement_id=order.entitlement_id)),
                Code.UNAVAILABLE,
                "PEER_UNAVAILABLE",
            ),
            await expect(
                stub.Activate(
                    admin_pb2.ActivateRequest(
                        license_server=site.license_address,
                        activation_id=order.lines[0].activation_id,
                        count=1,
                    )
                ),
                Code.UNAVAILABLE,
                "PEER_UNAVAILABLE",
            ),
        ]
        for error in refusals:
            info = error_info(error)
            assert info is not None and info.metadata["peer"] == "Activation Server"
        after = await snapshot(site)
        assert changed(before, after) <= {"ls.pending"}  # prepared, to be resumed later
        assert after["ls.certificates"] == []
    finally:
        await lonely.stop(0)
