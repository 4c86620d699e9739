"""A vendor in this process for License Servers that run as real processes.

``ActivatingVendor`` is an Activation Server and an Administrator (grpc.aio on loopback,
real databases) that creates an entitlement and activates its seats on a License Server
given by address; ``license_server_args`` are the flags such a License Server process
starts with (the vendor's keys, many clients from one loopback address).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from services.activation_server import config as as_config
from services.activation_server import server as as_server
from services.administrator import config as admin_config
from services.administrator import server as admin_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tests.support.databases import DatabaseFactory
from tests.support.processes import CREDENTIALS_ENV, credentialed_channel
from tests.support.tokens import VENDOR_TOKEN


@dataclass
class ActivatingVendor:
    """An Activation Server and an Administrator in this process, to activate seats on
    License Servers that run as real processes."""

    activation: as_server.ActivationServer
    admin: admin_server.Administrator

    async def activate(self, license_server: str, feature: str, seats: int) -> None:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{self.activation.port}") as vendor_channel,
            credentialed_channel(f"127.0.0.1:{self.admin.port}") as admin_channel,
        ):
            created = await apb_grpc.VendorServiceStub(vendor_channel).CreateEntitlement(
                apb.CreateEntitlementRequest(
                    customer_organization="Resilience",
                    lines=[
                        apb.NewEntitlementLine(
                            feature=feature, count=seats, kind=LicenseKind.LICENSE_KIND_NETWORK
                        )
                    ],
                ),
                metadata=bearer_metadata(VENDOR_TOKEN),
            )
            await admin_pb2_grpc.AdministratorServiceStub(admin_channel).Activate(
                admin_pb2.ActivateRequest(
                    license_server=license_server,
                    activation_id=created.entitlement.lines[0].activation_id,
                    count=seats,
                )
            )

    async def stop(self) -> None:
        await self.admin.stop(0)
        await self.activation.stop(0)


async def start_activating_vendor(tmp_path: Path, databases: DatabaseFactory) -> ActivatingVendor:
    """Start both services on fresh databases; the vendor keys land in ``tmp_path/as``."""
    activation = await as_server.build(
        as_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "as"),
                "--database-url", await databases.new("activation"),
                "--vendor-token", VENDOR_TOKEN,
            ],
            environ={},
        )
    )  # fmt: skip
    admin = await admin_server.build(
        admin_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "admin"),
                "--database-url", await databases.new("admin"),
                "--activation-server", f"127.0.0.1:{activation.port}",
            ],
            environ=CREDENTIALS_ENV,
        )
    )  # fmt: skip
    return ActivatingVendor(activation, admin)


def license_server_args(tmp_path: Path, port: int, database_url: str, ttl: int) -> list[str]:
    return [
        "--listen", f"127.0.0.1:{port}",
        "--data-dir", str(tmp_path / "ls"),
        "--database-url", database_url,
        "--vendor-keys", str(tmp_path / "as" / "vendor-keys.pub"),
        "--machine-id", "resilience-machine",
        "--lease-ttl", str(ttl),
        "--sweep-interval", "0.2",
        # Hundreds of clients from one loopback address stand in for hundreds of hosts.
        "--max-streams-per-host", "0",
        "--acquire-rate", "0",
    ]  # fmt: skip
