"""End to end: the three services as real processes, the thin path over real gRPC.

Runs once on SQLite and once on PostgreSQL. Each service is started with
``python -m services.<name>`` exactly as an operator would, on free loopback ports.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2, license_pb2_grpc
from tessera.rpc import reason_of
from tests.support.databases import DatabaseFactory
from tests.support.processes import Processes, credentialed_channel, free_port
from tests.support.tokens import VENDOR_TOKEN

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    processes: Processes
    activation_port: int
    license_port: int
    admin_port: int


@pytest.fixture
async def stack(
    tmp_path: Path, databases: DatabaseFactory, processes: Processes
) -> AsyncIterator[Stack]:
    ports = Stack(processes, free_port(), free_port(), free_port())
    processes.start(
        "activation_server", "services.activation_server",
        "--listen", f"127.0.0.1:{ports.activation_port}",
        "--data-dir", str(tmp_path / "as"),
        "--database-url", await databases.new("activation"),
        "--vendor-token", VENDOR_TOKEN,
    )  # fmt: skip
    await processes.wait_serving("activation_server", ports.activation_port)
    processes.start(
        "license_server", "services.license_server",
        "--listen", f"127.0.0.1:{ports.license_port}",
        "--data-dir", str(tmp_path / "ls"),
        "--database-url", await databases.new("license"),
        "--vendor-keys", str(tmp_path / "as" / "vendor-keys.pub"),
        "--lease-ttl", "2",
        "--sweep-interval", "0.2",
    )  # fmt: skip
    processes.start(
        "administrator", "services.administrator",
        "--listen", f"127.0.0.1:{ports.admin_port}",
        "--data-dir", str(tmp_path / "admin"),
        "--database-url", await databases.new("admin"),
        "--activation-server", f"127.0.0.1:{ports.activation_port}",
    )  # fmt: skip
    await processes.wait_serving("license_server", ports.license_port)
    await processes.wait_serving("administrator", ports.admin_port)
    yield ports
    for name in list(processes.running):
        assert processes.stop(name) == 0, processes.log(name)


async def used_seats(leases: license_pb2_grpc.LeaseServiceStub) -> int:
    info = await leases.GetLicenseInformation(
        license_pb2.GetLicenseInformationRequest(feature="client.station")
    )
    return info.features[0].used


async def test_thin_path_through_three_real_processes(stack: Stack) -> None:
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{stack.activation_port}") as vendor_channel,
        credentialed_channel(f"127.0.0.1:{stack.admin_port}") as admin_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{stack.license_port}") as license_channel,
    ):
        vendor = apb_grpc.VendorServiceStub(vendor_channel)
        admin = admin_pb2_grpc.AdministratorServiceStub(admin_channel)
        leases = license_pb2_grpc.LeaseServiceStub(license_channel)

        # 1. The vendor sells 5 WorkStation seats.
        created = await vendor.CreateEntitlement(
            apb.CreateEntitlementRequest(
                customer_organization="Harbour Tower",
                contact="bms@harbour.example",
                lines=[
                    apb.NewEntitlementLine(
                        feature="client.station",
                        count=5,
                        kind=LicenseKind.LICENSE_KIND_NETWORK,
                    )
                ],
            ),
            metadata=bearer_metadata(VENDOR_TOKEN),
        )
        entitlement_id = created.entitlement.entitlement_id

        # 2. The operator looks the order up through the Administrator.
        order = await admin.GetOrder(admin_pb2.GetOrderRequest(entitlement_id=entitlement_id))
        [line] = order.entitlement.lines
        assert (line.feature, line.available) == ("client.station", 5)

        # 3. ... and activates 2 seats onto the License Server.
        activated = await admin.Activate(
            admin_pb2.ActivateRequest(
                license_server=f"{stack.license_port}@127.0.0.1",
                activation_id=line.activation_id,
                count=2,
            )
        )
        assert activated.operation.state == admin_pb2.OPERATION_STATE_COMPLETED
        assert activated.certificate.certificate.count == 2
        order = await admin.GetOrder(admin_pb2.GetOrderRequest(entitlement_id=entitlement_id))
        assert order.entitlement.lines[0].available == 3

        # 4. WorkStations lease seats over streams; the third is refused.
        first = leases.Lease()
        await first.write(
            license_pb2.LeaseRequest(
                acquire=license_pb2.LeaseAcquire(feature="client.station", count=1)
            )
        )
        granted = await first.read()
        assert isinstance(granted, license_pb2.LeaseResponse) and granted.HasField("granted")
        await first.write(license_pb2.LeaseRequest(heartbeat=license_pb2.LeaseHeartbeat()))
        ack = await first.read()
        assert isinstance(ack, license_pb2.LeaseResponse) and ack.HasField("heartbeat_ack")

        second = leases.Lease()
        await second.write(
            license_pb2.LeaseRequest(
                acquire=license_pb2.LeaseAcquire(feature="client.station", count=1)
            )
        )
        assert isinstance(await second.read(), license_pb2.LeaseResponse)

        third = leases.Lease()
        await third.write(
            license_pb2.LeaseRequest(
                acquire=license_pb2.LeaseAcquire(feature="client.station", count=1)
            )
        )
        denied = await third.read()
        assert isinstance(denied, license_pb2.LeaseResponse)
        assert denied.denied.reason == "NO_SEAT_AVAILABLE"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await third.read()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(refused.value) == "NO_SEAT_AVAILABLE"

        # 5. License Information: Activated / Used / Available.
        info = await leases.GetLicenseInformation(license_pb2.GetLicenseInformationRequest())
        [station] = info.features
        assert (station.activated, station.used, station.available) == (2, 2, 0)

        # The first checks in; the second dies without checking in and loses its seat
        # only after the 2 s TTL, freed by the server's own sweeper.
        await first.write(license_pb2.LeaseRequest(release=license_pb2.LeaseRelease()))
        released = await first.read()
        assert isinstance(released, license_pb2.LeaseResponse) and released.HasField("released")
        second.cancel()
        assert await used_seats(leases) == 1
        for _ in range(100):
            if await used_seats(leases) == 0:
                break
            await asyncio.sleep(0.1)
        assert await used_seats(leases) == 0


async def test_sigterm_tells_open_lease_streams_and_exits_cleanly(stack: Stack) -> None:
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{stack.activation_port}") as vendor_channel,
        credentialed_channel(f"127.0.0.1:{stack.admin_port}") as admin_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{stack.license_port}") as license_channel,
    ):
        created = await apb_grpc.VendorServiceStub(vendor_channel).CreateEntitlement(
            apb.CreateEntitlementRequest(
                customer_organization="Harbour Tower",
                lines=[
                    apb.NewEntitlementLine(
                        feature="client.station", count=1, kind=LicenseKind.LICENSE_KIND_NETWORK
                    )
                ],
            ),
            metadata=bearer_metadata(VENDOR_TOKEN),
        )
        await admin_pb2_grpc.AdministratorServiceStub(admin_channel).Activate(
            admin_pb2.ActivateRequest(
                license_server=f"{stack.license_port}@127.0.0.1",
                activation_id=created.entitlement.lines[0].activation_id,
                count=1,
            )
        )
        stream = license_pb2_grpc.LeaseServiceStub(license_channel).Lease()
        await stream.write(
            license_pb2.LeaseRequest(
                acquire=license_pb2.LeaseAcquire(feature="client.station", count=1)
            )
        )
        assert isinstance(await stream.read(), license_pb2.LeaseResponse)

        stack.processes.running["license_server"].send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as told:
            await stream.read()
        assert told.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason_of(told.value) == "SERVER_SHUTTING_DOWN"
        assert stack.processes.running.pop("license_server").wait(timeout=30) == 0


async def test_services_start_healthy_without_peers_and_answer_unavailable(
    tmp_path: Path, processes: Processes
) -> None:
    admin_port, dead_port = free_port(), free_port()
    processes.start(
        "administrator", "services.administrator",
        "--listen", f"127.0.0.1:{admin_port}",
        "--data-dir", str(tmp_path / "admin"),
        "--activation-server", f"127.0.0.1:{dead_port}",
    )  # fmt: skip
    await processes.wait_serving("administrator", admin_port)
    async with credentialed_channel(f"127.0.0.1:{admin_port}") as channel:
        admin = admin_pb2_grpc.AdministratorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as order_error:
            await admin.GetOrder(admin_pb2.GetOrderRequest(entitlement_id="ENT-0000-0000-0000"))
        assert order_error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason_of(order_error.value) == "PEER_UNAVAILABLE"
        with pytest.raises(grpc.aio.AioRpcError) as activate_error:
            await admin.ListLicenses(
                admin_pb2.ListLicensesRequest(license_server=f"{dead_port}@127.0.0.1")
            )
        assert activate_error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert processes.stop("administrator") == 0
