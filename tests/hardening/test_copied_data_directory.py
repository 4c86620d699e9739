"""A copied License Server data directory must not double the seats unnoticed (issue 16,
item 6), and check-in stays off unless the vendor's policy asks for it.

The whole site runs in process over real gRPC (Activation Server, Administrator, License
Servers; real databases on SQLite and PostgreSQL, real keys): the original License
Server's data directory (host.key, trust-anchor) and database are copied to a second
License Server on another machine id, the copy is repaired through the Administrator,
and both check in through the Administrator. A client holds the original's seats
throughout, as an Enterprise Server would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import delete, insert, select

from services.activation_server.store.tables import check_ins
from services.administrator import config as admin_config
from services.administrator import server as admin_server
from services.license_server import config as ls_config
from services.license_server import server as ls_server
from services.license_server.store.tables import metadata as license_tables
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2 as adpb
from tessera.auth import bearer_metadata
from tessera.clock import from_timestamp
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import reason_of
from tessera.storage import create_engine, migrate
from tessera_cli.app import App
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import Site, start_site
from tests.support.tokens import (
    ADMINISTRATOR_FLAGS,
    LICENSE_SERVER_FLAGS,
    OPERATOR_TOKEN,
    VENDOR_TOKEN,
)

STATION = "client.station"
DAY = 86400
State = lpb.CertificateState
Code = grpc.StatusCode


@pytest.fixture
def shared_clock() -> FakeClock:
    """One clock for the vendor and the License Servers (check-in deadlines run from the
    vendor's time), starting now so that certificates and clocks agree."""
    return FakeClock(dt.datetime.now(dt.UTC).replace(microsecond=0))


@pytest.fixture
async def shared_clock_site(
    tmp_path: Path, databases: DatabaseFactory, shared_clock: FakeClock
) -> AsyncIterator[Site]:
    shared_clock_site = await start_site(
        tmp_path,
        databases,
        license_clock=shared_clock,
        activation_clock=shared_clock,
        machine_id="machine-a",
    )
    yield shared_clock_site
    await shared_clock_site.close()


async def order(
    shared_clock_site: Site, count: int, interval_days: int = 0, grace_days: int = 0
) -> str:
    """A one-line order of ``count`` seats with a check-in policy (0: none); its
    activation id."""
    line = apb.NewEntitlementLine(
        feature=STATION, count=count, kind=LicenseKind.LICENSE_KIND_NETWORK
    )
    if interval_days:
        line.check_in_interval.CopyFrom(Duration(seconds=interval_days * DAY))
        line.check_in_grace.CopyFrom(Duration(seconds=grace_days * DAY))
    reply = await shared_clock_site.vendor.CreateEntitlement(
        apb.CreateEntitlementRequest(customer_organization="Harbour Tower", lines=[line]),
        metadata=bearer_metadata(VENDOR_TOKEN),
    )
    return reply.entitlement.lines[0].activation_id


async def activate(shared_clock_site: Site, activation_id: str, count: int) -> None:
    done = await shared_clock_site.administrator.Activate(
        adpb.ActivateRequest(
            license_server=shared_clock_site.license_address,
            activation_id=activation_id,
            count=count,
        )
    )
    assert done.operation.state == adpb.OPERATION_STATE_COMPLETED


async def copy_license_server(
    shared_clock_site: Site, databases: DatabaseFactory, machine_id: str
) -> ls_server.LicenseServer:
    """The original's data directory and database copied whole, started on another
    machine: what an operator (or an attacker) gets by copying the disk."""
    source_dir = shared_clock_site.license_settings.common.data_dir
    copy_dir = shared_clock_site.tmp_path / "copied_license_server"
    shutil.copytree(source_dir, copy_dir)
    url = await databases.new("copied_license")
    engine = create_engine(url)
    try:
        await migrate(engine, ls_server.MIGRATIONS)
        async with (
            shared_clock_site.license.store.engine.connect() as source,
            engine.begin() as target,
        ):
            for table in reversed(license_tables.sorted_tables):
                await target.execute(delete(table))
            for table in license_tables.sorted_tables:
                rows = [dict(row) for row in (await source.execute(select(table))).mappings()]
                if rows:
                    await target.execute(insert(table), rows)
    finally:
        await engine.dispose()
    settings = ls_config.load_settings(
        [
            "--listen", "127.0.0.1:0",
            "--data-dir", str(copy_dir),
            "--database-url", url,
            "--vendor-keys",
            str(shared_clock_site.tmp_path / "activation_server" / "vendor-keys.pub"),
            "--machine-id", machine_id,
            "--sweep-interval", "3600",
            *LICENSE_SERVER_FLAGS,
        ],
        environ={},
    )  # fmt: skip
    return await ls_server.build(settings, clock=shared_clock_site.license_clock)


def storage_of(
    shared_clock_site: Site, server: ls_server.LicenseServer
) -> lpb_grpc.TrustedStorageServiceStub:
    return lpb_grpc.TrustedStorageServiceStub(shared_clock_site.channel(server.port))


def leases_of(
    shared_clock_site: Site, server: ls_server.LicenseServer
) -> lpb_grpc.LeaseServiceStub:
    return lpb_grpc.LeaseServiceStub(shared_clock_site.channel(server.port))


async def serving(shared_clock_site: Site, server: ls_server.LicenseServer) -> int:
    """Seats of client.station the License Server serves now (re-judged first)."""
    await storage_of(shared_clock_site, server).GetTrustHealth(lpb.GetTrustHealthRequest())
    info = await leases_of(shared_clock_site, server).GetLicenseInformation(
        lpb.GetLicenseInformationRequest()
    )
    return sum(f.activated for f in info.features if f.feature == STATION)


async def check_in(
    shared_clock_site: Site, server: ls_server.LicenseServer
) -> adpb.CheckInResponse:
    return await shared_clock_site.administrator.CheckIn(
        adpb.CheckInRequest(license_server=f"{server.port}@127.0.0.1")
    )


async def vendor_audit(shared_clock_site: Site, action: str) -> list[apb.AuditEntry]:
    page = await shared_clock_site.vendor.GetAuditLog(
        apb.GetAuditLogRequest(page_size=1000), metadata=bearer_metadata(VENDOR_TOKEN)
    )
    return [entry for entry in page.entries if entry.action == action]


async def test_a_copied_data_directory_repaired_elsewhere_supersedes_the_original(
    shared_clock_site: Site, databases: DatabaseFactory
) -> None:
    sold = 2
    await activate(
        shared_clock_site, await order(shared_clock_site, sold, interval_days=7, grace_days=1), sold
    )
    original = shared_clock_site.license
    holder = leases_of(shared_clock_site, original).Lease()
    await holder.write(lpb.LeaseRequest(acquire=lpb.LeaseAcquire(feature=STATION, count=2)))
    assert (await holder.read()).HasField("granted")

    copy = await copy_license_server(shared_clock_site, databases, machine_id="machine-b")
    try:
        health = (
            await storage_of(shared_clock_site, copy).GetTrustHealth(lpb.GetTrustHealthRequest())
        ).health
        assert {c.cause for c in health.certificates} == {"MACHINE_CHANGED"}
        repaired = await shared_clock_site.administrator.Repair(
            adpb.RepairRequest(license_server=f"{copy.port}@127.0.0.1")
        )
        assert repaired.operation.state == adpb.OPERATION_STATE_COMPLETED
        assert repaired.health.healthy
        # The hole: until the original checks in, both serve what was sold once.
        assert (
            await serving(shared_clock_site, original),
            await serving(shared_clock_site, copy),
        ) == (2, 2)

        told = await check_in(shared_clock_site, original)
        assert told.status.superseded
        assert told.status.superseded_by_host_id == copy.identity.host_id
        assert told.status.withdrawn_seats == 2
        revoked = await holder.read()
        assert revoked.HasField("revoked") and revoked.revoked.reason == "CERTIFICATE_SUPERSEDED"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await leases_of(shared_clock_site, original).Checkout(
                lpb.CheckoutRequest(acquire=lpb.LeaseAcquire(feature=STATION, count=1))
            )
        assert (refused.value.code(), reason_of(refused.value)) == (
            Code.FAILED_PRECONDITION,
            "CERTIFICATE_SUPERSEDED",
        )
        health = (
            await storage_of(shared_clock_site, original).GetTrustHealth(
                lpb.GetTrustHealthRequest()
            )
        ).health
        assert not health.healthy and health.check_in.superseded
        assert {c.state for c in health.certificates} == {State.CERTIFICATE_STATE_SUPERSEDED}
        [info] = (
            await leases_of(shared_clock_site, original).GetLicenseInformation(
                lpb.GetLicenseInformationRequest(feature=STATION)
            )
        ).features
        assert (info.activated, info.withdrawn, info.withdrawn_reason) == (
            0,
            2,
            "CERTIFICATE_SUPERSEDED",
        )

        current = await check_in(shared_clock_site, copy)
        assert not current.status.superseded and current.status.withdrawn_seats == 0
        served = (
            await serving(shared_clock_site, original),
            await serving(shared_clock_site, copy),
        )
        assert served == (0, 2) and sum(served) <= sold
        granted = await leases_of(shared_clock_site, copy).Checkout(
            lpb.CheckoutRequest(acquire=lpb.LeaseAcquire(feature=STATION, count=2))
        )
        assert granted.granted.count == 2

        # The vendor's audit shows the re-binding and flags the superseded host that
        # keeps checking in.
        [rebound] = await vendor_audit(shared_clock_site, "repair.rebound")
        assert (rebound.subject, rebound.actor) == (
            original.identity.host_id,
            copy.identity.host_id,
        )
        assert json.loads(rebound.detail_json)["generation"] == 1
        await check_in(shared_clock_site, original)
        flagged = await vendor_audit(shared_clock_site, "checkin.superseded")
        assert [e.subject for e in flagged] == [original.identity.host_id] * 2
        assert [json.loads(e.detail_json)["check_ins_since_superseded"] for e in flagged] == [
            1,
            2,
        ]
        verified = await shared_clock_site.vendor.VerifyAuditLog(
            apb.VerifyAuditLogRequest(), metadata=bearer_metadata(VENDOR_TOKEN)
        )
        assert verified.intact
    finally:
        await copy.stop(0)


async def test_a_site_that_never_checks_in_keeps_working_when_no_policy_asks(
    shared_clock_site: Site, shared_clock: FakeClock
) -> None:
    await activate(shared_clock_site, await order(shared_clock_site, 2), 2)
    shared_clock.advance(400 * DAY)  # more than a year with the Internet cut
    assert await shared_clock_site.admin.operations.check_ins.check_in_due() == []
    granted = await shared_clock_site.leases.Checkout(
        lpb.CheckoutRequest(acquire=lpb.LeaseAcquire(feature=STATION, count=2))
    )
    assert granted.granted.count == 2
    assert (
        await shared_clock_site.trusted_storage.GetTrustHealth(lpb.GetTrustHealthRequest())
    ).health.healthy
    assert await vendor_audit(shared_clock_site, "checkin.superseded") == []
    async with shared_clock_site.activation.store.engine.connect() as connection:
        assert (await connection.execute(select(check_ins))).all() == []  # never asked


async def test_the_administrator_checks_in_when_the_policy_makes_it_due(
    shared_clock_site: Site, shared_clock: FakeClock
) -> None:
    await activate(
        shared_clock_site, await order(shared_clock_site, 1, interval_days=7, grace_days=1), 1
    )
    activated_at = shared_clock.now()
    shared_clock.advance(6 * DAY)
    assert await shared_clock_site.admin.operations.check_ins.check_in_due() == []  # not due yet

    shared_clock.advance(DAY + 60)
    [checked] = await shared_clock_site.admin.operations.check_ins.check_in_due()
    assert checked.host_id == shared_clock_site.license.identity.host_id
    assert from_timestamp(checked.status.last_checked_at) == shared_clock.now()
    assert from_timestamp(checked.status.deadline) == shared_clock.now() + dt.timedelta(days=8)
    assert (
        await shared_clock_site.admin.operations.check_ins.check_in_due() == []
    )  # done until next week

    # The Internet is cut: past due plus grace, the seat stops, with the reason.
    shared_clock.advance(8 * DAY + 60)
    assert await serving(shared_clock_site, shared_clock_site.license) == 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shared_clock_site.leases.Checkout(
            lpb.CheckoutRequest(acquire=lpb.LeaseAcquire(feature=STATION, count=1))
        )
    assert reason_of(refused.value) == "CHECK_IN_OVERDUE"
    # Back online, the next pass checks in and the seat serves again.
    [again] = await shared_clock_site.admin.operations.check_ins.check_in_due()
    assert again.status.withdrawn_seats == 0
    assert await serving(shared_clock_site, shared_clock_site.license) == 1
    assert shared_clock.now() > activated_at + dt.timedelta(days=15)


async def tessera(shared_clock_site: Site, *argv: str) -> tuple[int, str]:
    """``tessera`` pointed at the site, as an operator runs it; exit code and stdout."""
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = shared_clock_site.tmp_path / "operator"
    cwd.mkdir(exist_ok=True)
    app = App(
        environ={
            "TESSERA_ADMINISTRATOR": f"127.0.0.1:{shared_clock_site.admin.port}",
            "TESSERA_LICENSE_SERVER": shared_clock_site.license_address,
            "TESSERA_ACTIVATION_SERVER": f"127.0.0.1:{shared_clock_site.activation.port}",
            "TESSERA_ADMINISTRATOR_TOKEN": OPERATOR_TOKEN,
            "TESSERA_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "TESSERA_VENDOR_TOKEN": VENDOR_TOKEN,
            "XDG_CONFIG_HOME": str(shared_clock_site.tmp_path / "no-config"),
        },
        cwd=cwd,
        stdout=stdout,
        stderr=stderr,
        home=cwd,
    )
    code = await app.run(list(argv))
    return code, stdout.getvalue() or stderr.getvalue()


async def test_the_cli_sets_the_policy_checks_in_and_shows_a_superseded_server(
    shared_clock_site: Site, databases: DatabaseFactory
) -> None:
    code, out = await tessera(
        shared_clock_site, "vendor", "entitlements", "create", "--customer", "Harbour Tower",
        "--line", "client.station=2,check-in=7d,grace=12h", "--json",
    )  # fmt: skip
    assert code == 0, out
    [line] = json.loads(out)["entitlement"]["lines"]
    assert (line["check_in_interval_seconds"], line["check_in_grace_seconds"]) == (
        7 * DAY,
        12 * 3600,
    )
    code, out = await tessera(
        shared_clock_site, "vendor", "entitlements", "create", "--customer", "X",
        "--line", "client.station=2,grace=soon",
    )  # fmt: skip
    assert code == 2 and "grace=soon" in out
    code, out = await tessera(shared_clock_site, "activate", line["activation_id"], "--count", "2")
    assert code == 0, out

    code, out = await tessera(shared_clock_site, "check-in", "--json")
    assert code == 0, out
    status = json.loads(out)["check_in"]
    assert status["required"] and not status["superseded"] and status["deadline"]
    code, out = await tessera(shared_clock_site, "trust")
    assert code == 0 and "Check-in with the vendor: last check-in" in out

    copy = await copy_license_server(shared_clock_site, databases, machine_id="machine-b")
    try:
        code, out = await tessera(
            shared_clock_site, "repair", "--license-server", f"{copy.port}@127.0.0.1"
        )
        assert code == 0, out
        code, out = await tessera(shared_clock_site, "check-in")
        assert code == 5 and "Superseded" in out and copy.identity.host_id in out, out
        code, out = await tessera(shared_clock_site, "trust", "--json")
        assert code == 5, out
        health = json.loads(out)["health"]
        assert health["check_in"]["superseded"] is True
        assert {c["state"] for c in health["certificates"]} == {"superseded"}
        code, out = await tessera(shared_clock_site, "licenses", "--json")
        [feature] = json.loads(out)["features"]
        assert (feature["withdrawn"], feature["withdrawn_reason"]) == (2, "CERTIFICATE_SUPERSEDED")
        code, out = await tessera(shared_clock_site, "trust")
        assert "SUPERSEDED" in out and "repair does not bring them back" in out
        assert "Run `tessera repair`" not in out
    finally:
        await copy.stop(0)


async def test_the_administrator_checks_in_by_itself_every_poll(
    shared_clock_site: Site, shared_clock: FakeClock
) -> None:
    await activate(
        shared_clock_site, await order(shared_clock_site, 1, interval_days=7, grace_days=1), 1
    )
    shared_clock.advance(7 * DAY + 60)  # due
    # Another Administrator over the same journal, polling every 50 ms.
    polling = await admin_server.build(
        admin_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(shared_clock_site.tmp_path / "polling_administrator"),
                "--database-url",
                shared_clock_site.admin.journal.engine.url.render_as_string(hide_password=False),
                "--activation-server", f"127.0.0.1:{shared_clock_site.activation.port}",
                "--check-in-poll", "0.05",
                *ADMINISTRATOR_FLAGS,
            ],
            environ={},
        )
    )  # fmt: skip
    try:
        status = lpb.CheckInStatus()
        for _ in range(200):  # bounded: at most 10 s of polls
            status = (
                await shared_clock_site.trusted_storage.GetTrustHealth(lpb.GetTrustHealthRequest())
            ).health.check_in
            if status.HasField("last_checked_at"):
                break
            await asyncio.sleep(0.05)
        assert from_timestamp(status.last_checked_at) == shared_clock.now()
        assert from_timestamp(status.due_at) == shared_clock.now() + dt.timedelta(days=7)
    finally:
        await polling.stop(0)
