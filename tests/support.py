"""In-process Tessera services on loopback for servicer and domain tests.

``Site`` starts a real Activation Server, License Server and Administrator (grpc.aio on
127.0.0.1:0, real databases, real keys) in the test's event loop and hands out stubs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.activation_server import config as as_config
from services.activation_server import server as as_server
from services.administrator import config as admin_config
from services.administrator import server as admin_server
from services.license_server import config as ls_config
from services.license_server import server as ls_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.admin.v1 import admin_pb2_grpc
from tessera.auth import bearer_metadata
from tessera.clock import Clock
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2_grpc
from tests.conftest import DatabaseFactory

VENDOR_TOKEN = "test-vendor-token"
OPERATOR_TOKEN = "test-operator-token"


@dataclass
class Site:
    """A vendor, one License Server and an Administrator, all in this process."""

    activation: as_server.ActivationServer
    license: ls_server.LicenseServer
    admin: admin_server.Administrator
    channels: list[grpc.aio.Channel]
    tmp_path: Path
    license_settings: ls_config.Settings
    license_clock: Clock | None = None
    replicas: list[ls_server.LicenseServer] = field(default_factory=list)

    async def start_replica(self) -> ls_server.LicenseServer:
        """Another License Server process over the same database and host key."""
        replica = await ls_server.build(self.license_settings, clock=self.license_clock)
        self.replicas.append(replica)
        return replica

    @property
    def license_address(self) -> str:
        return f"{self.license.port}@127.0.0.1"

    def channel(self, port: int) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return channel

    @property
    def vendor(self) -> apb_grpc.VendorServiceStub:
        return apb_grpc.VendorServiceStub(self.channel(self.activation.port))

    @property
    def activation_service(self) -> apb_grpc.ActivationServiceStub:
        return apb_grpc.ActivationServiceStub(self.channel(self.activation.port))

    @property
    def leases(self) -> license_pb2_grpc.LeaseServiceStub:
        return license_pb2_grpc.LeaseServiceStub(self.channel(self.license.port))

    @property
    def lease_admin(self) -> license_pb2_grpc.LeaseAdminServiceStub:
        return license_pb2_grpc.LeaseAdminServiceStub(self.channel(self.license.port))

    @property
    def trusted_storage(self) -> license_pb2_grpc.TrustedStorageServiceStub:
        return license_pb2_grpc.TrustedStorageServiceStub(self.channel(self.license.port))

    @property
    def administrator(self) -> admin_pb2_grpc.AdministratorServiceStub:
        return admin_pb2_grpc.AdministratorServiceStub(self.channel(self.admin.port))

    async def create_entitlement(
        self, lines: list[tuple[str, int]], kind: int = LicenseKind.LICENSE_KIND_NETWORK
    ) -> apb.Entitlement:
        reply = await self.vendor.CreateEntitlement(
            apb.CreateEntitlementRequest(
                customer_organization="Test Building Owner",
                contact="ops@example.com",
                lines=[
                    apb.NewEntitlementLine(feature=feature, count=count, kind=kind)
                    for feature, count in lines
                ],
            ),
            metadata=bearer_metadata(VENDOR_TOKEN),
        )
        return reply.entitlement

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        await self.admin.stop(0)
        for replica in self.replicas:
            await replica.stop(0)
        await self.license.stop(0)
        await self.activation.stop(0)


async def start_site(
    tmp_path: Path,
    databases: DatabaseFactory,
    license_clock: Clock | None = None,
    lease_ttl: int = 90,
    machine_id: str = "test-machine",
) -> Site:
    activation = await as_server.build(
        as_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "activation_server"),
                "--database-url", await databases.new("activation"),
                "--vendor-token", VENDOR_TOKEN,
            ],
            environ={},
        )
    )  # fmt: skip
    license_settings = ls_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "license_server"),
                "--database-url", await databases.new("license"),
                "--vendor-keys", str(tmp_path / "activation_server" / "vendor-keys.pub"),
                "--machine-id", machine_id,
                "--lease-ttl", str(lease_ttl),
                "--sweep-interval", "3600",
                "--operator-token", OPERATOR_TOKEN,
            ],
            environ={},
    )  # fmt: skip
    license_server = await ls_server.build(license_settings, clock=license_clock)
    admin = await admin_server.build(
        admin_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "administrator"),
                "--database-url", await databases.new("admin"),
                "--activation-server", f"127.0.0.1:{activation.port}",
            ],
            environ={},
        )
    )  # fmt: skip
    return Site(activation, license_server, admin, [], tmp_path, license_settings, license_clock)
