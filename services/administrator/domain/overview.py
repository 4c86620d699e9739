"""Looking things up: an order at the vendor, and what a License Server holds."""

from __future__ import annotations

from dataclasses import dataclass

from services.administrator.domain import inputs
from services.administrator.domain.ports import LicenseServerDirectory, Vendor
from tessera.activation.v1 import activation_pb2 as activation_pb
from tessera.ids import ENTITLEMENT_PREFIX, parse_id
from tessera.license.v1 import license_pb2 as license_pb


@dataclass(frozen=True)
class LicenseOverview:
    host_id: str
    features: list[license_pb.FeatureInformation]
    certificates: list[license_pb.InstalledCertificate]


class Overview:
    def __init__(self, activation_server: Vendor, license_servers: LicenseServerDirectory) -> None:
        self.activation_server = activation_server
        self.license_servers = license_servers

    async def get_order(self, entitlement_id: str) -> activation_pb.Entitlement:
        entitlement_id = parse_id(ENTITLEMENT_PREFIX, entitlement_id, "entitlement_id")
        return await self.activation_server.get_order(entitlement_id)

    async def list_licenses(self, license_server: str) -> LicenseOverview:
        async with self.license_servers.connected(inputs.license_server(license_server)) as server:
            certificates = await server.list_certificates()
            features = await server.license_information()
        return LicenseOverview(server.host_id, features, certificates)
