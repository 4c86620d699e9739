"""A move journaled by an Administrator before revision 0003 (one row with five target_*
columns) is still read and resumed after the upgrade, which splits it into the move and
its two halves. On SQLite and PostgreSQL, with real services and real envelopes."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from services.administrator import server as admin_server
from services.license_server import server as ls_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2 as pb
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.storage import UTCDateTime, create_engine
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import (
    VENDOR_TOKEN,
    Site,
    restart_administrator,
    start_another_license_server,
    start_site,
)

STATION = "client.station"
MOVE_ID = "old-move"

# The operations table as revision 0002 left it.
OPERATIONS_0002 = sa.table(
    "operations",
    *(
        sa.column(name, kind)
        for name, kind in {
            "operation_id": sa.String,
            "kind": sa.String,
            "state": sa.String,
            "license_server": sa.Text,
            "host_id": sa.String,
            "activation_id": sa.String,
            "count": sa.Integer,
            "request_id": sa.String,
            "request_envelope": sa.LargeBinary,
            "response_envelope": sa.LargeBinary,
            "created_at": UTCDateTime,
            "updated_at": UTCDateTime,
            "certificate_id": sa.String,
            "force": sa.Boolean,
            "target_license_server": sa.Text,
            "target_host_id": sa.String,
            "target_request_id": sa.String,
            "target_request_envelope": sa.LargeBinary,
            "target_response_envelope": sa.LargeBinary,
        }.items()
    ),
)


@pytest.fixture
async def site(tmp_path: Path, databases: DatabaseFactory, clock: FakeClock) -> AsyncIterator[Site]:
    site = await start_site(tmp_path, databases, license_clock=clock)
    yield site
    await site.close()


@pytest.fixture
async def host_b(site: Site, databases: DatabaseFactory) -> AsyncIterator[ls_server.LicenseServer]:
    server = await start_another_license_server(site, databases, "license_b", "machine-b")
    yield server
    await server.stop(0)


async def certificate_on_source(site: Site) -> lpb.InstalledCertificate:
    created = await site.vendor.CreateEntitlement(
        apb.CreateEntitlementRequest(
            customer_organization="Harbour Tower",
            lines=[
                apb.NewEntitlementLine(
                    feature=STATION, count=5, kind=LicenseKind.LICENSE_KIND_NETWORK
                )
            ],
        ),
        metadata=bearer_metadata(VENDOR_TOKEN),
    )
    reply = await site.administrator.Activate(
        pb.ActivateRequest(
            license_server=site.license_address,
            activation_id=created.entitlement.lines[0].activation_id,
            count=3,
        )
    )
    return reply.certificate


async def seats(site: Site, port: int) -> int:
    stub = lpb_grpc.LeaseServiceStub(site.channel(port))
    info = await stub.GetLicenseInformation(lpb.GetLicenseInformationRequest())
    return sum(feature.activated for feature in info.features if feature.feature == STATION)


async def journal_an_old_move(
    site: Site, host_b: ls_server.LicenseServer, between_halves: bool
) -> None:
    """Take a move as far as an Administrator of revision 0002 would have, through the
    real peers, and journal it as that Administrator did: one row."""
    certificate = (await certificate_on_source(site)).certificate
    target = f"{host_b.port}@127.0.0.1"
    license_servers = site.admin.operations.moves.runner.license_servers
    vendor = site.admin.activation_server
    row: dict[str, object] = {}
    async with license_servers.connected(site.license_address) as source:
        returning = await source.prepare_return(
            certificate.certificate_id, 0, MOVE_ID + ".return", False
        )
        row.update(
            state="prepared",
            host_id=source.host_id,
            request_id=returning.request_id,
            request_envelope=returning.request.SerializeToString(),
            response_envelope=None,
            target_request_id="",
            target_request_envelope=None,
        )
        if between_halves:
            receipt = await vendor.return_seats(returning.request)
            await source.complete_return(receipt)
            async with license_servers.connected(target) as on_target:
                activating = await on_target.prepare_activation(
                    certificate.activation_id, certificate.count, MOVE_ID + ".activate"
                )
            row.update(
                state="answered",
                response_envelope=receipt.SerializeToString(),
                target_request_id=activating.request_id,
                target_request_envelope=activating.request.SerializeToString(),
            )
    now = dt.datetime.now(dt.UTC)
    row.update(
        operation_id=MOVE_ID,
        kind="move",
        license_server=site.license_address,
        activation_id=certificate.activation_id,
        count=certificate.count,
        created_at=now,
        updated_at=now,
        certificate_id=certificate.certificate_id,
        force=False,
        target_license_server=target,
        target_host_id=host_b.identity.host_id,
        target_response_envelope=None,
    )

    # The journal back at revision 0002 (it holds only the activation so far), then the
    # move as that revision wrote it.
    async with journal_at_0002(site) as connection:
        await connection.execute(sa.insert(OPERATIONS_0002).values(row))


@asynccontextmanager
async def journal_at_0002(site: Site) -> AsyncIterator[AsyncConnection]:
    """The Administrator's journal downgraded to revision 0002 (the Administrator is
    idle meanwhile), in a transaction."""
    engine = create_engine(str(site.admin.journal.engine.url.render_as_string(False)))
    try:
        async with engine.begin() as connection:

            def downgrade(sync_connection: Connection) -> None:
                config = Config()
                config.set_main_option("script_location", str(admin_server.MIGRATIONS))
                config.attributes["connection"] = sync_connection
                command.downgrade(config, "0002")

            await connection.run_sync(downgrade)
            yield connection
    finally:
        await engine.dispose()


@pytest.mark.parametrize("between_halves", [False, True], ids=["returning", "between-halves"])
async def test_a_move_journaled_before_the_upgrade_resumes_after_it(
    site: Site, host_b: ls_server.LicenseServer, between_halves: bool
) -> None:
    await journal_an_old_move(site, host_b, between_halves)
    assert await seats(site, site.license.port) == 0  # withheld, or returned
    assert await seats(site, host_b.port) == 0

    # Started again: the journal is upgraded, and the move read and resumed.
    await restart_administrator(site)
    report = await site.admin.resumed
    assert report.finished == [MOVE_ID], report.failed

    found = await site.administrator.GetOperation(pb.GetOperationRequest(operation_id=MOVE_ID))
    operation = found.operation
    assert (operation.kind, operation.state) == (
        pb.OPERATION_KIND_MOVE,
        pb.OPERATION_STATE_COMPLETED,
    )
    assert operation.target_license_server == f"{host_b.port}@127.0.0.1"
    assert operation.target_host_id == host_b.identity.host_id
    assert operation.request_id == MOVE_ID + ".return"
    assert await seats(site, site.license.port) == 0
    assert await seats(site, host_b.port) == 3

    listed = await site.administrator.ListOperations(pb.ListOperationsRequest())
    assert [o.kind for o in listed.operations] == [
        pb.OPERATION_KIND_MOVE,
        pb.OPERATION_KIND_ACTIVATE,
    ]

    # The operator's retry answers from the journal, with the certificate on the target.
    again = await site.administrator.Move(
        pb.MoveRequest(
            from_license_server=operation.license_server,
            to_license_server=operation.target_license_server,
            certificate_id=operation.certificate_id,
            operation_id=MOVE_ID,
        )
    )
    assert again.operation == operation
    assert again.certificate.certificate.host_id == host_b.identity.host_id
    assert again.certificate.certificate.request_id == MOVE_ID + ".activate"
    assert await seats(site, host_b.port) == 3

    # Downgraded again, the halves fold back into the move's columns, and up once more
    # the move reads the same.
    async with journal_at_0002(site) as connection:
        rows = (await connection.execute(sa.select(OPERATIONS_0002))).mappings().all()
    assert [row["operation_id"] for row in rows if row["kind"] == "move"] == [MOVE_ID]
    assert len(rows) == 2  # the move and the activation before it; no halves
    folded = next(row for row in rows if row["kind"] == "move")
    assert folded["state"] == "completed"
    assert folded["target_host_id"] == host_b.identity.host_id
    assert folded["target_request_id"] == MOVE_ID + ".activate"
    assert folded["target_request_envelope"] and folded["target_response_envelope"]
    assert folded["request_envelope"] and folded["response_envelope"]
    await restart_administrator(site)
    found = await site.administrator.GetOperation(pb.GetOperationRequest(operation_id=MOVE_ID))
    assert found.operation == operation
