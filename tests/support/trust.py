"""A License Server on its own, with a vendor key in the test's hands.

The vendor's answers (activation, return receipt, repair) are signed here with a real
Ed25519 vendor key, so trusted storage can be driven through every branch, including the
ones a well-behaved Activation Server never takes, over real gRPC and real databases.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from nacl.signing import SigningKey
from sqlalchemy import delete, insert, select

from services.license_server import config as ls_config
from services.license_server import server as ls_server
from services.license_server.store.tables import metadata as license_tables
from tessera.activation.v1 import activation_pb2 as apb
from tessera.auth import BearerCredentials, bearer_metadata
from tessera.clock import Clock, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, LicenseKind, SignedEnvelope
from tessera.envelope import seal
from tessera.keys import vendor_key_id
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc
from tests.support.tokens import OPERATOR_TOKEN

OPERATOR = bearer_metadata(OPERATOR_TOKEN)


class SigningVendor:
    """Signs what an Activation Server would, with its own key."""

    def __init__(self, key: SigningKey | None = None) -> None:
        self.key = key or SigningKey.generate()
        self.key_id = vendor_key_id(self.key.verify_key)

    def publish(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(bytes(self.key.verify_key).hex() + "\n")

    def sign(self, document: object) -> SignedEnvelope:
        return seal(document, self.key_id, self.key)  # type: ignore[arg-type]

    def certificate(
        self,
        request: apb.HostActivationRequest,
        feature: str = "client.station",
        *,
        expires_at: dt.datetime | None = None,
        partial_return_allowed: bool = False,
        host_id: str | None = None,
        certificate_id: str | None = None,
        revision: int = 0,
        count: int | None = None,
    ) -> LicenseCertificate:
        return LicenseCertificate(
            certificate_id=certificate_id or str(uuid.uuid4()),
            entitlement_id="ENT-TEST",
            activation_id=request.activation_id,
            feature=feature,
            count=request.count if count is None else count,
            kind=LicenseKind.LICENSE_KIND_NETWORK,
            host_id=host_id or request.host_id,
            request_id=request.request_id,
            issued_at=to_timestamp(dt.datetime.now(dt.UTC)),
            expires_at=to_timestamp(expires_at),
            customer_organization="Test Building Owner",
            partial_return_allowed=partial_return_allowed,
            revision=revision,
        )

    def activation(self, request: apb.HostActivationRequest, **options: object) -> SignedEnvelope:
        certificate = self.certificate(request, **options)  # type: ignore[arg-type]
        return self.sign(
            apb.VendorActivationResponse(
                request_id=request.request_id,
                host_id=request.host_id,
                certificate=self.sign(certificate),
            )
        )

    def credit(
        self, request: apb.HostReturnRequest, remaining: LicenseCertificate | None = None
    ) -> SignedEnvelope:
        return self.sign(
            apb.VendorReturnReceipt(
                request_id=request.request_id,
                host_id=request.host_id,
                certificate_id=request.certificate_id,
                outcome=apb.ReturnOutcome.RETURN_OUTCOME_CREDITED,
                credited=request.count,
                remaining_certificate=self.sign(remaining) if remaining else None,
            )
        )

    def refuse(self, request: apb.HostReturnRequest, reason: str) -> SignedEnvelope:
        return self.sign(
            apb.VendorReturnReceipt(
                request_id=request.request_id,
                host_id=request.host_id,
                certificate_id=request.certificate_id,
                outcome=apb.ReturnOutcome.RETURN_OUTCOME_REFUSED,
                refusal_reason=reason,
                refusal_message="refused in a test",
            )
        )

    def repair(
        self, request: apb.HostRepairRequest, certificates: Iterable[LicenseCertificate]
    ) -> SignedEnvelope:
        return self.sign(
            apb.VendorRepairResponse(
                request_id=request.request_id,
                host_id=request.host_id,
                certificates=[self.sign(c) for c in certificates],
                repaired_at=to_timestamp(dt.datetime.now(dt.UTC)),
                repairs_left=3,
            )
        )


@dataclass
class LicenseServerUnderTest:
    """One License Server process-equivalent (in this event loop) and its stubs."""

    data_dir: Path
    database_url: str
    vendor_keys: Path
    machine_id: str
    clock: Clock | None = None
    server: ls_server.LicenseServer | None = None
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def start(self) -> LicenseServerUnderTest:
        settings = ls_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(self.data_dir),
                "--database-url", self.database_url,
                "--vendor-keys", str(self.vendor_keys),
                "--machine-id", self.machine_id,
                "--sweep-interval", "3600",
                "--trust-check-interval", "3600",
                "--operator-token", OPERATOR_TOKEN,
            ],
            environ={},
        )  # fmt: skip
        self.server = await ls_server.build(settings, clock=self.clock)
        return self

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        self.channels.clear()
        if self.server is not None:
            await self.server.stop(0)
            self.server = None

    def _channel(self) -> grpc.aio.Channel:
        assert self.server is not None
        # Calls present the operator token unless they carry their own credential.
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.server.port}",
            interceptors=[BearerCredentials(lambda: OPERATOR_TOKEN)],
        )
        self.channels.append(channel)
        return channel

    @property
    def storage(self) -> pb_grpc.TrustedStorageServiceStub:
        return pb_grpc.TrustedStorageServiceStub(self._channel())

    @property
    def leases(self) -> pb_grpc.LeaseServiceStub:
        return pb_grpc.LeaseServiceStub(self._channel())

    @property
    def host_id(self) -> str:
        assert self.server is not None
        return self.server.identity.host_id

    async def activate(
        self, vendor: SigningVendor, count: int, feature: str = "client.station", **options: object
    ) -> LicenseCertificate:
        """Prepare, have the vendor answer, install; the installed certificate."""
        prepared = await self.storage.PrepareActivation(
            pb.PrepareActivationRequest(activation_id=new_activation_id(), count=count)
        )
        request = apb.HostActivationRequest.FromString(prepared.request.payload)
        installed = await self.storage.InstallActivation(
            pb.InstallActivationRequest(
                response=vendor.activation(request, feature=feature, **options)
            )
        )
        return installed.certificate.certificate

    async def activated(self, feature: str = "client.station") -> int:
        reply = await self.leases.GetLicenseInformation(
            pb.GetLicenseInformationRequest(feature=feature)
        )
        return sum(f.activated for f in reply.features)

    async def health(self) -> pb.TrustHealth:
        return (await self.storage.GetTrustHealth(pb.GetTrustHealthRequest())).health

    async def prepare_return(
        self, certificate_id: str, count: int = 0, *, force: bool = False, request_id: str = ""
    ) -> tuple[pb.PrepareReturnResponse, apb.HostReturnRequest]:
        prepared = await self.storage.PrepareReturn(
            pb.PrepareReturnRequest(
                certificate_id=certificate_id, count=count, force=force, request_id=request_id
            )
        )
        return prepared, apb.HostReturnRequest.FromString(prepared.request.payload)


def new_activation_id() -> str:
    from tessera.ids import ACTIVATION_PREFIX, new_id

    return new_id(ACTIVATION_PREFIX)


async def snapshot(server: LicenseServerUnderTest) -> dict[str, list[dict[str, object]]]:
    """Every row of the License Server's database: a backup."""
    assert server.server is not None
    rows: dict[str, list[dict[str, object]]] = {}
    async with server.server.store.engine.connect() as connection:
        for table in license_tables.sorted_tables:
            result = await connection.execute(select(table))
            rows[table.name] = [dict(row) for row in result.mappings()]
    return rows


async def restore(server: LicenseServerUnderTest, rows: dict[str, list[dict[str, object]]]) -> None:
    """Put a backup back, as an operator restoring the database would."""
    assert server.server is not None
    async with server.server.store.engine.begin() as connection:
        for table in reversed(license_tables.sorted_tables):
            await connection.execute(delete(table))
        for table in license_tables.sorted_tables:
            if rows[table.name]:
                await connection.execute(insert(table), rows[table.name])
