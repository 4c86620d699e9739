"""The vendor's Activation Server alone, in process, for the tests/activation_server suites.

``ActivationServerUnderTest`` is a real Activation Server (grpc.aio on 127.0.0.1:0, a real
migrated database, real key files, a fake clock) with its stubs. ``Host`` is a License
Server's host identity that signs activation, return and repair requests as a License
Server would.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from nacl.signing import SigningKey, VerifyKey
from sqlalchemy.ext.asyncio import AsyncEngine

from services.activation_server import config as as_config
from services.activation_server import server as as_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.auth import bearer_metadata
from tessera.clock import to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, LicenseKind, SignedEnvelope
from tessera.envelope import open_envelope, seal
from tessera.keys import HostIdentity, machine_binding, read_vendor_public_keys
from tessera.rpc import reason_of
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.tokens import VENDOR_TOKEN

STAFF = bearer_metadata(VENDOR_TOKEN)
NETWORK = LicenseKind.LICENSE_KIND_NETWORK
LOCAL = LicenseKind.LICENSE_KIND_LOCAL

M = TypeVar("M", bound=Message)


@dataclass
class ActivationServerUnderTest:
    """One Activation Server and a channel to it."""

    server: as_server.ActivationServer
    data_dir: Path
    database_url: str
    clock: FakeClock
    channel: grpc.aio.Channel
    # activation id -> the Entitlement ID of its order
    orders: dict[str, str] = field(default_factory=dict)
    # Where the vendor publishes its public keys, when not in the data directory (they
    # lie beside the first signing key).
    keys_dir: Path | None = None

    @property
    def published_keys_file(self) -> Path:
        return (self.keys_dir or self.data_dir) / "vendor-keys.pub"

    @property
    def activation(self) -> apb_grpc.ActivationServiceStub:
        return apb_grpc.ActivationServiceStub(self.channel)

    @property
    def staff(self) -> apb_grpc.VendorServiceStub:
        return apb_grpc.VendorServiceStub(self.channel)

    @property
    def engine(self) -> AsyncEngine:
        return self.server.store.engine

    def trusted(self) -> dict[str, VerifyKey]:
        """The vendor keys a License Server trusts: those in the published file."""
        return read_vendor_public_keys([self.published_keys_file])

    def open(self, envelope: SignedEnvelope, document_type: type[M]) -> M:
        """Verify a vendor-signed envelope with the published keys and parse it."""
        return open_envelope(envelope, document_type, self.trusted())

    async def close(self) -> None:
        await self.channel.close()
        await self.server.stop(0)

    async def order(self, *lines: apb.NewEntitlementLine) -> apb.Entitlement:
        reply = await self.staff.CreateEntitlement(
            apb.CreateEntitlementRequest(
                customer_organization="Test Building Owner",
                contact="ops@example.com",
                lines=list(lines),
            ),
            metadata=STAFF,
        )
        for line in reply.entitlement.lines:
            self.orders[line.activation_id] = reply.entitlement.entitlement_id
        return reply.entitlement

    async def line(self, count: int = 5, **fields: Any) -> apb.EntitlementLine:
        """A new order of one network line of client.station; returns the line."""
        fields.setdefault("feature", "client.station")
        fields.setdefault("kind", NETWORK)
        order = await self.order(apb.NewEntitlementLine(count=count, **fields))
        return order.lines[0]

    async def line_now(self, line: apb.EntitlementLine) -> apb.EntitlementLine:
        reply = await self.activation.GetOrder(
            apb.GetOrderRequest(entitlement_id=self.orders[line.activation_id])
        )
        [now] = [x for x in reply.entitlement.lines if x.activation_id == line.activation_id]
        return now

    async def activation_of(self, certificate_id: str) -> apb.Activation:
        reply = await self.staff.ListActivations(apb.ListActivationsRequest(), metadata=STAFF)
        [found] = [a for a in reply.activations if a.certificate_id == certificate_id]
        return found

    async def audit(self, action: str = "") -> list[apb.AuditEntry]:
        """Every audit entry (optionally of one action), oldest first."""
        entries: list[apb.AuditEntry] = []
        after = 0
        while True:
            page = await self.staff.GetAuditLog(
                apb.GetAuditLogRequest(after_sequence=after, page_size=1000), metadata=STAFF
            )
            entries.extend(page.entries)
            if not page.next_after_sequence:
                break
            after = page.next_after_sequence
        return [entry for entry in entries if not action or entry.action == action]


async def start_vendor(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock, *extra: str
) -> ActivationServerUnderTest:
    """An Activation Server with ``extra`` flags (e.g. ``--max-repairs-per-year 2``)."""
    return await start_vendor_at(
        tmp_path / "activation_server", await databases.new("activation"), clock, *extra
    )


async def restart_vendor(
    vendor: ActivationServerUnderTest, *extra: str
) -> ActivationServerUnderTest:
    """The same Activation Server (data directory, database) stopped and started again."""
    await vendor.close()
    again = await start_vendor_at(vendor.data_dir, vendor.database_url, vendor.clock, *extra)
    again.orders.update(vendor.orders)
    return again


async def start_vendor_at(
    data_dir: Path, url: str, clock: FakeClock, *extra: str
) -> ActivationServerUnderTest:
    """An Activation Server over ``data_dir`` and the database at ``url`` (another replica,
    when one already runs there)."""
    server = await as_server.build(
        as_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(data_dir),
                "--database-url", url,
                "--vendor-token", VENDOR_TOKEN,
                *extra,
            ],
            environ={},
        ),
        clock=clock,
    )  # fmt: skip
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return ActivationServerUnderTest(server, data_dir, url, clock, channel)


@dataclass(frozen=True)
class Host:
    """A License Server's host identity: its key, bound to the machine it runs on."""

    identity: HostIdentity

    @classmethod
    def new(cls, machine: str = "machine-a") -> Host:
        return cls(HostIdentity(SigningKey.generate(), machine_binding(machine)))

    def on(self, machine: str) -> Host:
        """The same host key on another machine (a hardware change): another host id."""
        return Host(HostIdentity(self.identity.signing_key, machine_binding(machine)))

    @property
    def host_id(self) -> str:
        return self.identity.host_id

    def sign(self, document: Message) -> SignedEnvelope:
        return seal(document, self.host_id, self.identity.signing_key)

    def _identity_fields(self) -> dict[str, Any]:
        return {
            "host_id": self.host_id,
            "host_public_key": self.identity.public_key,
            "machine_binding": self.identity.machine_binding,
            "created_at": to_timestamp(dt.datetime.now(dt.UTC)),
        }

    def activation(
        self, activation_id: str, count: int, request_id: str = "", kind: int = NETWORK
    ) -> SignedEnvelope:
        return self.sign(
            apb.HostActivationRequest(
                request_id=request_id or f"act-{uuid.uuid4()}",
                activation_id=activation_id,
                count=count,
                kind=kind,  # type: ignore[arg-type]
                **self._identity_fields(),
            )
        )

    def return_request(
        self, certificate_id: str, count: int, revision: int, request_id: str = ""
    ) -> SignedEnvelope:
        return self.sign(
            apb.HostReturnRequest(
                request_id=request_id or f"ret-{uuid.uuid4()}",
                certificate_id=certificate_id,
                count=count,
                revision=revision,
                **self._identity_fields(),
            )
        )

    def repair(self, request_id: str = "", previous_host_id: str = "") -> SignedEnvelope:
        return self.sign(
            apb.HostRepairRequest(
                request_id=request_id or f"rep-{uuid.uuid4()}",
                previous_host_id=previous_host_id,
                **self._identity_fields(),
            )
        )


async def activate(
    vendor: ActivationServerUnderTest,
    host: Host,
    line: apb.EntitlementLine,
    count: int,
    registration: apb.Registration | None = None,
    kind: int = NETWORK,
) -> LicenseCertificate:
    """Activate ``count`` seats of ``line`` onto ``host``; the verified certificate."""
    reply = await vendor.activation.Activate(
        apb.ActivateRequest(
            request=host.activation(line.activation_id, count, kind=kind),
            registration=registration,
        )
    )
    answer = vendor.open(reply.response, apb.VendorActivationResponse)
    return vendor.open(answer.certificate, LicenseCertificate)


async def give_back(
    vendor: ActivationServerUnderTest,
    host: Host,
    certificate: LicenseCertificate,
    count: int | None = None,
    revision: int | None = None,
    request_id: str = "",
) -> tuple[apb.VendorReturnReceipt, bytes]:
    """Return ``count`` (default: all) seats of ``certificate``; the verified receipt and
    its exact bytes."""
    request = host.return_request(
        certificate.certificate_id,
        certificate.count if count is None else count,
        certificate.revision if revision is None else revision,
        request_id,
    )
    reply = await vendor.activation.Return(apb.ReturnRequest(request=request))
    return vendor.open(reply.receipt, apb.VendorReturnReceipt), reply.receipt.SerializeToString()


async def expect(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    """Await ``call``; it must fail with ``code`` and an ErrorInfo of ``reason``."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert (error.code(), reason_of(error)) == (code, reason), error.details()
    assert error.details()
    return error
