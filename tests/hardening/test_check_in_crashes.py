"""A check-in cut short by a crash loses nothing and stores nothing half-way.

Real processes (``python -m services.<name>``, SQLite and PostgreSQL): a vendor, an
Administrator, a License Server, and a copy of its data directory and database started on
another machine id and repaired there. The original then checks in with
``TESSERA_FAILPOINTS`` armed and SIGKILLs itself right after it signed the check-in, or
right after it installed the vendor's answer. Restarted, it has the answer or not — never
half of it — and the next check-in completes: the original stops serving, the copy
serves, never more seats than were sold.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import delete, insert, select

from services.license_server import server as ls_server
from services.license_server.store.tables import metadata as license_tables
from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.admin.v1 import admin_pb2 as adpb
from tessera.admin.v1 import admin_pb2_grpc as adpb_grpc
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.server.failpoints import ENVIRONMENT_VARIABLE as FAILPOINTS
from tessera.storage import create_engine, migrate
from tests.support.databases import DatabaseFactory
from tests.support.processes import Processes, credentialed_channel, free_port
from tests.support.tokens import ADMINISTRATOR_TOKEN, OPERATOR_TOKEN, VENDOR_TOKEN

pytestmark = pytest.mark.e2e

VENDOR = bearer_metadata(VENDOR_TOKEN)
RPC_TIMEOUT = 30.0
AS, ADMIN, LS, COPY = "activation_server", "administrator", "license_server", "copy"
MODULES = {
    AS: "services.activation_server",
    ADMIN: "services.administrator",
    LS: "services.license_server",
    COPY: "services.license_server",
}
MACHINES = {LS: "crash-machine-a", COPY: "crash-machine-b"}
STATION = "client.station"
SOLD = 3


class CrashSite:
    """The four processes, their ports, databases and channels."""

    def __init__(self, tmp_path: Path, processes: Processes, databases: DatabaseFactory) -> None:
        self.tmp_path = tmp_path
        self.processes = processes
        self.databases = databases
        self.ports = {name: free_port() for name in MODULES}
        self.urls: dict[str, str] = {}
        self.channels: dict[str, grpc.aio.Channel] = {}

    def launch(self, name: str, failpoint: str = "") -> None:
        arguments = [
            "--listen", f"127.0.0.1:{self.ports[name]}",
            "--data-dir", str(self.tmp_path / name),
            "--database-url", self.urls[name],
        ]  # fmt: skip
        if name == AS:
            arguments += ["--vendor-token", VENDOR_TOKEN]
        elif name == ADMIN:
            # Only on demand here: the test says when a check-in happens.
            arguments += ["--activation-server", f"127.0.0.1:{self.ports[AS]}",
                          "--check-in-poll", "0"]  # fmt: skip
        else:
            arguments += [
                "--vendor-keys", str(self.tmp_path / AS / "vendor-keys.pub"),
                "--machine-id", MACHINES[name],
            ]  # fmt: skip
        self.processes.start(name, MODULES[name], *arguments, env={FAILPOINTS: failpoint})

    async def start(self, *names: str, failpoint: str = "") -> None:
        """Start the processes together (a License Server needs no vendor to start) and
        wait until each serves; ``failpoint`` is armed in each."""
        for name in names:
            await self.forget_channel(name)
            self.launch(name, failpoint)
        await asyncio.gather(
            *(self.processes.wait_serving(name, self.ports[name]) for name in names)
        )

    async def stop(self, name: str) -> None:
        await self.forget_channel(name)
        assert await asyncio.to_thread(self.processes.stop, name) == 0, self.processes.log(name)

    async def forget_channel(self, name: str) -> None:
        channel = self.channels.pop(name, None)
        if channel is not None:
            await channel.close()

    def channel(self, name: str) -> grpc.aio.Channel:
        if name not in self.channels:
            token = OPERATOR_TOKEN if name == ADMIN else ADMINISTRATOR_TOKEN
            self.channels[name] = credentialed_channel(f"127.0.0.1:{self.ports[name]}", token)
        return self.channels[name]

    def address(self, name: str) -> str:
        return f"{self.ports[name]}@127.0.0.1"

    @property
    def admin(self) -> adpb_grpc.AdministratorServiceStub:
        return adpb_grpc.AdministratorServiceStub(self.channel(ADMIN))

    @property
    def vendor(self) -> apb_grpc.VendorServiceStub:
        return apb_grpc.VendorServiceStub(self.channel(AS))

    def storage(self, name: str) -> lpb_grpc.TrustedStorageServiceStub:
        return lpb_grpc.TrustedStorageServiceStub(self.channel(name))

    async def health(self, name: str) -> lpb.TrustHealth:
        reply = await self.storage(name).GetTrustHealth(
            lpb.GetTrustHealthRequest(), timeout=RPC_TIMEOUT
        )
        return reply.health

    async def serving(self, name: str) -> int:
        await self.health(name)  # re-judged now
        info = await lpb_grpc.LeaseServiceStub(self.channel(name)).GetLicenseInformation(
            lpb.GetLicenseInformationRequest(), timeout=RPC_TIMEOUT
        )
        return sum(f.activated for f in info.features if f.feature == STATION)

    async def check_in(self, name: str) -> adpb.CheckInResponse:
        return await self.admin.CheckIn(
            adpb.CheckInRequest(license_server=self.address(name)), timeout=RPC_TIMEOUT
        )

    async def close(self) -> None:
        for name in list(self.channels):
            await self.forget_channel(name)


@pytest.fixture
async def crash_site(
    tmp_path: Path, databases: DatabaseFactory, processes: Processes
) -> AsyncIterator[CrashSite]:
    crash_site = CrashSite(tmp_path, processes, databases)
    for name in (AS, ADMIN, LS):
        crash_site.urls[name] = await databases.new(name)
    await crash_site.start(AS, ADMIN, LS)
    yield crash_site
    await crash_site.close()


async def copy_and_repair(crash_site: CrashSite, failpoint: str) -> None:
    """Activate the order onto the original, copy its data directory and database whole
    (stopped, as a disk copy is), start the copy on another machine and repair it; the
    original starts again meanwhile with ``failpoint`` armed."""
    line = apb.NewEntitlementLine(
        feature=STATION,
        count=SOLD,
        kind=LicenseKind.LICENSE_KIND_NETWORK,
        check_in_interval=Duration(seconds=7 * 86400),
        check_in_grace=Duration(seconds=86400),
    )
    order = await crash_site.vendor.CreateEntitlement(
        apb.CreateEntitlementRequest(customer_organization="Harbour Tower", lines=[line]),
        metadata=VENDOR,
        timeout=RPC_TIMEOUT,
    )
    activated = await crash_site.admin.Activate(
        adpb.ActivateRequest(
            license_server=crash_site.address(LS),
            activation_id=order.entitlement.lines[0].activation_id,
            count=SOLD,
        ),
        timeout=RPC_TIMEOUT,
    )
    assert activated.operation.state == adpb.OPERATION_STATE_COMPLETED
    await crash_site.stop(LS)
    shutil.copytree(crash_site.tmp_path / LS, crash_site.tmp_path / COPY)
    crash_site.urls[COPY] = await crash_site.databases.new(COPY)
    source, target = create_engine(crash_site.urls[LS]), create_engine(crash_site.urls[COPY])
    try:
        await migrate(target, ls_server.MIGRATIONS)
        async with source.connect() as reading, target.begin() as writing:
            for table in reversed(license_tables.sorted_tables):
                await writing.execute(delete(table))
            for table in license_tables.sorted_tables:
                rows = [dict(row) for row in (await reading.execute(select(table))).mappings()]
                if rows:
                    await writing.execute(insert(table), rows)
    finally:
        await source.dispose()
        await target.dispose()
    await crash_site.start(COPY)
    crash_site.launch(LS, failpoint)
    repaired = await crash_site.admin.Repair(
        adpb.RepairRequest(license_server=crash_site.address(COPY)), timeout=RPC_TIMEOUT
    )
    assert repaired.operation.state == adpb.OPERATION_STATE_COMPLETED
    await crash_site.processes.wait_serving(LS, crash_site.ports[LS])


@pytest.mark.parametrize(
    "failpoint",
    ["license_server.check_in.after_prepare", "license_server.check_in.after_install"],
)
async def test_a_check_in_cut_short_by_a_crash_completes_on_the_next(
    crash_site: CrashSite, failpoint: str
) -> None:
    await copy_and_repair(crash_site, failpoint)
    assert await crash_site.serving(LS) == SOLD  # not told yet: the hole check-in closes

    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await crash_site.check_in(LS)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value
    assert await crash_site.processes.wait_exit(LS) == -9, crash_site.processes.log(LS)
    await crash_site.start(LS)

    health = await crash_site.health(LS)
    if failpoint.endswith("after_install"):
        # The answer was installed before the crash: durable, whole.
        assert health.check_in.superseded and health.check_in.withdrawn_seats == SOLD
        assert await crash_site.serving(LS) == 0
    else:
        # Only the signed request existed: nothing was decided here, nothing changed.
        assert not health.check_in.superseded and health.check_in.withdrawn_seats == 0
        assert await crash_site.serving(LS) == SOLD

    told = await crash_site.check_in(LS)
    copy_host = (await crash_site.health(COPY)).host_id
    assert told.status.superseded and told.status.superseded_by_host_id == copy_host
    assert (await crash_site.check_in(COPY)).status.withdrawn_seats == 0
    served = (await crash_site.serving(LS), await crash_site.serving(COPY))
    assert served == (0, SOLD) and sum(served) <= SOLD

    page = await crash_site.vendor.GetAuditLog(
        apb.GetAuditLogRequest(page_size=1000), metadata=VENDOR, timeout=RPC_TIMEOUT
    )
    flagged = [e for e in page.entries if e.action == "checkin.superseded"]
    # The crash after install lost nothing at the vendor either: both check-ins counted.
    assert len(flagged) == (2 if failpoint.endswith("after_install") else 1)
    verified = await crash_site.vendor.VerifyAuditLog(
        apb.VerifyAuditLogRequest(), metadata=VENDOR, timeout=RPC_TIMEOUT
    )
    assert verified.intact
