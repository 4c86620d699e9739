"""In-process Tessera services on loopback for servicer and domain tests.

``Site`` starts a real Activation Server, License Server and Administrator (grpc.aio on
127.0.0.1:0, real databases, real keys) in the test's event loop and hands out stubs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from services.activation_server import config as as_config
from services.activation_server import server as as_server
from services.administrator import config as admin_config
from services.administrator import server as admin_server
from services.license_server import config as ls_config
from services.license_server import server as ls_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.admin.v1 import admin_pb2_grpc
from tessera.auth import BearerCredentials, bearer_metadata
from tessera.clock import Clock
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2_grpc
from tests.support.databases import DatabaseFactory
from tests.support.tokens import (
    ADMINISTRATOR_FLAGS,
    LICENSE_SERVER_FLAGS,
    OPERATOR_TOKEN,
    VENDOR_TOKEN,
)


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

    def channel(self, port: int, token: str = OPERATOR_TOKEN) -> grpc.aio.Channel:
        """A channel to ``port`` whose calls present ``token`` (default: the operator's,
        which the License Server and the Administrator admit) unless they carry their
        own credential; ``token=""`` presents none."""
        interceptors = [BearerCredentials(lambda: token)] if token else None
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors)
        self.channels.append(channel)
        return channel

    @property
    def vendor(self) -> apb_grpc.VendorServiceStub:
        return apb_grpc.VendorServiceStub(self.channel(self.activation.port, token=""))

    @property
    def activation_service(self) -> apb_grpc.ActivationServiceStub:
        return apb_grpc.ActivationServiceStub(self.channel(self.activation.port, token=""))

    @property
    def leases(self) -> license_pb2_grpc.LeaseServiceStub:
        return license_pb2_grpc.LeaseServiceStub(self.channel(self.license.port))

    @property
    def lease_admin(self) -> license_pb2_grpc.LeaseAdminServiceStub:
        # No default credential: the operator RPCs' tests present theirs.
        return license_pb2_grpc.LeaseAdminServiceStub(self.channel(self.license.port, token=""))

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
    activation_clock: Clock | None = None,
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
        ),
        clock=activation_clock,
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
                *LICENSE_SERVER_FLAGS,
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
                *ADMINISTRATOR_FLAGS,
            ],
            environ={},
        )
    )  # fmt: skip
    return Site(activation, license_server, admin, [], tmp_path, license_settings, license_clock)


# Restarting services of a Site in place (same data directory, same database).


def _url_of(engine: AsyncEngine) -> str:
    return str(engine.url.render_as_string(hide_password=False))


async def restart_administrator(site: Site, activation_server: str | None = None) -> None:
    """Stop the Administrator and start it again over the same journal, optionally
    pointed at another Activation Server target (e.g. one nobody listens on)."""
    url = _url_of(site.admin.journal.engine)
    await site.admin.stop(0)
    site.admin = await admin_server.build(
        admin_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(site.tmp_path / "administrator"),
                "--database-url", url,
                "--activation-server",
                activation_server or f"127.0.0.1:{site.activation.port}",
                *ADMINISTRATOR_FLAGS,
            ],
            environ={},
        )
    )  # fmt: skip


async def restart_activation_server(site: Site, *extra: str) -> None:
    """Stop the Activation Server and start it again with ``extra`` flags (e.g.
    ``--max-returns-per-entitlement 0``); the Administrator follows it to its new port."""
    url = _url_of(site.activation.store.engine)
    await site.activation.stop(0)
    site.activation = await as_server.build(
        as_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(site.tmp_path / "activation_server"),
                "--database-url", url,
                "--vendor-token", VENDOR_TOKEN,
                *extra,
            ],
            environ={},
        )
    )  # fmt: skip
    await restart_administrator(site)


async def restart_license_server(site: Site, machine_id: str) -> None:
    """Stop the License Server and start it again on the same port, data directory and
    database, as if on the machine ``machine_id`` (its host id changes with it)."""
    settings = site.license_settings
    common = replace(settings.common, listen=f"127.0.0.1:{site.license.port}")
    await site.license.stop(0)
    site.license_settings = replace(settings, common=common, machine_id=machine_id)
    site.license = await ls_server.build(site.license_settings, clock=site.license_clock)


async def start_another_license_server(
    site: Site, databases: DatabaseFactory, name: str, machine_id: str
) -> ls_server.LicenseServer:
    """A second License Server on another machine, trusting the same vendor; the caller
    stops it."""
    return await ls_server.build(
        ls_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(site.tmp_path / name),
                "--database-url", await databases.new(name),
                "--vendor-keys", str(site.tmp_path / "activation_server" / "vendor-keys.pub"),
                "--machine-id", machine_id,
                "--sweep-interval", "3600",
                *LICENSE_SERVER_FLAGS,
            ],
            environ={},
        ),
        clock=site.license_clock,
    )  # fmt: skip
