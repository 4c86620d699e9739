"""Bad input to every RPC gets a clear status code and reason, and changes nothing.

Servicer-level tests over real gRPC in process, on SQLite and PostgreSQL. Each refusal is
checked for its canonical status code and its google.rpc.ErrorInfo reason, and a snapshot
of what the three services hold (orders, activations and audit log on the vendor side;
License Information, certificates, pending requests and leases on the License Server;
the Administrator's journal) is compared before and after.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from nacl.signing import SigningKey
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.activation_server.store import tables as vendor_tables
from services.administrator import config as admin_config
from services.administrator import server as admin_server
from services.administrator.store import tables as admin_tables
from services.license_server import config as ls_config
from services.license_server import server as ls_server
from services.license_server.store import tables as ls_tables
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.auth import bearer_metadata
from tessera.clock import to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, LicenseKind, SignedEnvelope
from tessera.envelope import seal
from tessera.ids import ALPHABET, ENTITLEMENT_PREFIX, new_id
from tessera.keys import HostIdentity, machine_binding
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import error_info, reason_of
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import Site
from tests.support.tokens import ADMINISTRATOR_FLAGS, LICENSE_SERVER_FLAGS, VENDOR_TOKEN

Code = grpc.StatusCode
NETWORK = LicenseKind.LICENSE_KIND_NETWORK
LOCAL = LicenseKind.LICENSE_KIND_LOCAL
VENDOR = bearer_metadata(VENDOR_TOKEN)


# ---------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture
async def host_b(
    site: Site, databases: DatabaseFactory, clock: FakeClock
) -> AsyncIterator[ls_server.LicenseServer]:
    """A second License Server on another machine, trusting the same vendor."""
    server = await ls_server.build(
        ls_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(site.tmp_path / "license_server_b"),
                "--database-url", await databases.new("license_b"),
                "--vendor-keys", str(site.tmp_path / "activation_server" / "vendor-keys.pub"),
                "--machine-id", "other-machine",
                "--sweep-interval", "3600",
                *LICENSE_SERVER_FLAGS,
            ],
            environ={},
        ),
        clock=clock,
    )  # fmt: skip
    yield server
    await server.stop(0)


def free_port() -> int:
    """A loopback port where nothing listens (closed again before it is used)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def storage_of(site: Site, server: ls_server.LicenseServer) -> lpb_grpc.TrustedStorageServiceStub:
    return lpb_grpc.TrustedStorageServiceStub(site.channel(server.port))


def leases_of(site: Site, server: ls_server.LicenseServer) -> lpb_grpc.LeaseServiceStub:
    return lpb_grpc.LeaseServiceStub(site.channel(server.port))


async def expect(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    """Await ``call``; it must fail with ``code`` and an ErrorInfo of ``reason``."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert (error.code(), reason_of(error)) == (code, reason), error.details()
    assert error.details(), "a refusal must say in words what is wrong"
    return error


async def expect_bad_input(call: Awaitable[Any], field: str) -> None:
    """Await ``call``; it must be INVALID_ARGUMENT / INVALID_INPUT naming ``field``."""
    error = await expect(call, Code.INVALID_ARGUMENT, "INVALID_INPUT")
    assert field_of(error) == field


def field_of(error: grpc.aio.AioRpcError) -> str:
    """The ``field`` an INVALID_INPUT refusal names."""
    info = error_info(error)
    assert info is not None
    return info.metadata.get("field", "")


async def count_rows(engine: AsyncEngine, table: Table) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(table)) or 0)


async def count_decisions(engine: AsyncEngine) -> int:
    """Audited vendor decisions other than refusals."""
    audit = vendor_tables.audit_log
    async with engine.connect() as connection:
        query = select(func.count()).where(audit.c.action.not_like("%.refused"))
        return int(await connection.scalar(query.select_from(audit)) or 0)


async def license_state(site: Site, server: ls_server.LicenseServer, name: str) -> dict[str, Any]:
    information = await leases_of(site, server).GetLicenseInformation(
        lpb.GetLicenseInformationRequest()
    )
    certificates = await storage_of(site, server).ListCertificates(lpb.ListCertificatesRequest())
    engine = server.store.engine
    return {
        f"{name}.information": [
            (f.feature, f.activated, f.used, f.available) for f in information.features
        ],
        f"{name}.certificates": [c.certificate.certificate_id for c in certificates.certificates],
        f"{name}.pending": await count_rows(engine, ls_tables.pending_requests),
        f"{name}.leases": await count_rows(engine, ls_tables.leases),
    }


async def snapshot(site: Site, *others: ls_server.LicenseServer) -> dict[str, Any]:
    """Everything the services hold that a refused call must not change."""
    vendor_engine = site.activation.store.engine
    async with vendor_engine.connect() as connection:
        entitlement_ids = sorted(
            (await connection.execute(select(vendor_tables.entitlements.c.entitlement_id)))
            .scalars()
            .all()
        )
    orders = {}
    for entitlement_id in entitlement_ids:
        order = await site.activation_service.GetOrder(
            apb.GetOrderRequest(entitlement_id=entitlement_id)
        )
        orders[entitlement_id] = [
            (line.activation_id, line.count, line.activated, line.available)
            for line in order.entitlement.lines
        ]
    activations = await site.vendor.ListActivations(apb.ListActivationsRequest(), metadata=VENDOR)
    state: dict[str, Any] = {
        "vendor.orders": orders,
        "vendor.activations": [
            (a.request_id, a.activation_id, a.count, a.host_id) for a in activations.activations
        ],
        # A refusal is itself a vendor decision and is audited; nothing else may be.
        "vendor.audit": await count_decisions(vendor_engine),
        "admin.operations": await count_rows(site.admin.journal.engine, admin_tables.operations),
        **await license_state(site, site.license, "ls"),
    }
    for index, other in enumerate(others):
        state.update(await license_state(site, other, f"ls{index + 2}"))
    return state


def changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {key for key in before if before[key] != after[key]}


def typo(identifier: str) -> str:
    """``identifier`` with one character of its body mistyped."""
    position = 5  # "ENT-7K3M-…": the second character of the first group
    wrong = ALPHABET[(ALPHABET.index(identifier[position]) + 1) % len(ALPHABET)]
    return identifier[:position] + wrong + identifier[position + 1 :]


def swapped(identifier: str) -> str:
    """``identifier`` with two different neighbouring characters swapped."""
    for position in range(4, len(identifier) - 1):
        a, b = identifier[position], identifier[position + 1]
        if "-" not in (a, b) and a != b:
            return identifier[:position] + b + a + identifier[position + 2 :]
    raise AssertionError(f"no swappable neighbours in {identifier}")


# Ways a person gets an ID wrong: (real ID, an ID of the other kind) -> what they typed.
BAD_IDS: dict[str, Callable[[str, str], str]] = {
    "empty": lambda real, other: "",
    "blank": lambda real, other: "   ",
    "prefix-only": lambda real, other: real[:4],
    "too-short": lambda real, other: real[:-5],
    "too-long": lambda real, other: real + "-7K3M",
    "letter-outside-alphabet": lambda real, other: real[:-1] + "U",
    "wrong-prefix": lambda real, other: other,
    "sql": lambda real, other: "'; DROP TABLE entitlements; --",
    "typo": lambda real, other: typo(real),
    "swapped-neighbours": lambda real, other: swapped(real),
}


def flip(data: bytes, index: int = 0) -> bytes:
    """``data`` with one bit of byte ``index`` flipped."""
    changed_bytes = bytearray(data)
    changed_bytes[index] ^= 0x01
    return bytes(changed_bytes)


def with_changes(envelope: SignedEnvelope, **changes: Any) -> SignedEnvelope:
    copy = SignedEnvelope()
    copy.CopyFrom(envelope)
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy


def reserialized(
    envelope: SignedEnvelope, document_type: type[Any], **changes: Any
) -> SignedEnvelope:
    """The envelope's document with ``changes``, keeping the old signature (a forgery)."""
    document = document_type.FromString(envelope.payload)
    for name, value in changes.items():
        setattr(document, name, value)
    return with_changes(envelope, payload=document.SerializeToString(deterministic=True))


def host_request(identity: HostIdentity, **fields: Any) -> SignedEnvelope:
    """A HostActivationRequest signed by ``identity`` (a host that did not ask its License
    Server: a script, a restored backup, an attacker with its own key)."""
    document = apb.HostActivationRequest(
        request_id=fields.pop("request_id", new_id("REQ")),
        host_id=identity.host_id,
        host_public_key=identity.public_key,
        machine_binding=identity.machine_binding,
        created_at=to_timestamp(dt.datetime.now(dt.UTC)),
    )
    for name, value in fields.items():
        setattr(document, name, value)
    return seal(document, identity.host_id, identity.signing_key)


def stranger() -> HostIdentity:
    """A well-formed host identity no License Server of the site has."""
    return HostIdentity(SigningKey.generate(), machine_binding("stranger-machine"))


async def entitlement(
    site: Site, sold: int = 5, feature: str = "client.station", kind: int = NETWORK
) -> apb.Entitlement:
    return await site.create_entitlement([(feature, sold)], kind=kind)


async def prepare(
    storage: lpb_grpc.TrustedStorageServiceStub,
    activation_id: str,
    count: int,
    request_id: str = "",
) -> SignedEnvelope:
    reply = await storage.PrepareActivation(
        lpb.PrepareActivationRequest(
            activation_id=activation_id, count=count, request_id=request_id
        )
    )
    return reply.request


async def vendor_answer(site: Site, request: SignedEnvelope) -> SignedEnvelope:
    reply = await site.activation_service.Activate(apb.ActivateRequest(request=request))
    return reply.response


async def activate(site: Site, seats: int, sold: int = 5) -> apb.Entitlement:
    """Sell ``sold`` seats of client.station and activate ``seats`` onto the License Server."""
    order = await entitlement(site, sold)
    await site.administrator.Activate(
        admin_pb2.ActivateRequest(
            license_server=site.license_address,
            activation_id=order.lines[0].activation_id,
            count=seats,
        )
    )
    return order


def acquire(feature: str = "client.station", count: int = 1, **fields: Any) -> lpb.LeaseAcquire:
    return lpb.LeaseAcquire(**{"client_host": "ws-01", **fields}, feature=feature, count=count)


async def checkout(site: Site, count: int = 1) -> lpb.LeaseGranted:
    reply = await site.leases.Checkout(lpb.CheckoutRequest(acquire=acquire(count=count)))
    return reply.granted


def line(feature: str = "client.station", count: int = 5, **fields: Any) -> Any:
    return apb.NewEntitlementLine(feature=feature, count=count, kind=NETWORK, **fields)


# Tables of bad input below are run case by case as subtests on one site per database:
# every case is refused, so none may change what the next one sees.

# ---------------------------------------------------------------------------------------
# Activation Server: IDs, credentials, orders
# ---------------------------------------------------------------------------------------


async def test_bad_entitlement_id_is_invalid_argument_everywhere(
    site: Site, subtests: pytest.Subtests
) -> None:
    order = await activate(site, seats=1)
    for case, mangle in BAD_IDS.items():
        with subtests.test(case):
            text = mangle(order.entitlement_id, order.lines[0].activation_id)
            before = await snapshot(site)
            await expect_bad_input(
                site.activation_service.GetOrder(apb.GetOrderRequest(entitlement_id=text)),
                "entitlement_id",
            )
            await expect_bad_input(
                site.administrator.GetOrder(admin_pb2.GetOrderRequest(entitlement_id=text)),
                "entitlement_id",
            )
            if text.strip():  # an empty ListActivations filter means "all", not a bad ID
                await expect_bad_input(
                    site.vendor.ListActivations(
                        apb.ListActivationsRequest(entitlement_id=text), metadata=VENDOR
                    ),
                    "entitlement_id",
                )
            assert await snapshot(site) == before


async def test_unknown_entitlement_id_is_not_found(site: Site) -> None:
    await activate(site, seats=1)
    unknown = new_id(ENTITLEMENT_PREFIX)
    before = await snapshot(site)

    await expect(
        site.activation_service.GetOrder(apb.GetOrderRequest(entitlement_id=unknown)),
        Code.NOT_FOUND,
        "ENTITLEMENT_NOT_FOUND",
    )
    error = await expect(
        site.administrator.GetOrder(admin_pb2.GetOrderRequest(entitlement_id=unknown)),
        Code.NOT_FOUND,
        "ENTITLEMENT_NOT_FOUND",
    )
    info = error_info(error)
    assert info is not None and info.metadata["peer"] == "Activation Server"
    # As a ListActivations filter, an unknown (well-formed) ID simply matches nothing.
    listed = await site.vendor.ListActivations(
        apb.ListActivationsRequest(entitlement_id=unknown), metadata=VENDOR
    )
    assert list(listed.activations) == []

    assert await snapshot(site) == before


# metadata sent -> reason of the UNAUTHENTICATED refusal
CREDENTIALS: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "none": ((), "CREDENTIAL_MISSING"),
    "wrong-token": ((("authorization", "Bearer not-the-token"),), "CREDENTIAL_INVALID"),
    "token-without-scheme": ((("authorization", VENDOR_TOKEN),), "CREDENTIAL_MISSING"),
    "basic-scheme": ((("authorization", f"Basic {VENDOR_TOKEN}"),), "CREDENTIAL_MISSING"),
    "bearer-without-token": ((("authorization", "Bearer "),), "CREDENTIAL_MISSING"),
}


async def test_vendor_service_needs_the_vendor_credential(
    site: Site, subtests: pytest.Subtests
) -> None:
    await activate(site, seats=1)
    for case, (metadata, reason) in CREDENTIALS.items():
        with subtests.test(case):
            before = await snapshot(site)
            await expect(
                site.vendor.CreateEntitlement(
                    apb.CreateEntitlementRequest(
                        customer_organization="Intruder Ltd", lines=[line(count=99)]
                    ),
                    metadata=metadata,
                ),
                Code.UNAUTHENTICATED,
                reason,
            )
            await expect(
                site.vendor.ListActivations(apb.ListActivationsRequest(), metadata=metadata),
                Code.UNAUTHENTICATED,
                reason,
            )
            assert await snapshot(site) == before


PAST = Timestamp(seconds=946684800)  # 2000-01-01

# request -> code, reason, the field named in the ErrorInfo ("" when none)
BAD_ORDERS: dict[str, tuple[apb.CreateEntitlementRequest, Code, str, str]] = {
    "no-customer": (
        apb.CreateEntitlementRequest(lines=[line()]),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "customer_organization",
    ),
    "blank-customer": (
        apb.CreateEntitlementRequest(customer_organization="  \t", lines=[line()]),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "customer_organization",
    ),
    "customer-too-long": (
        apb.CreateEntitlementRequest(customer_organization="A" * 257, lines=[line()]),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "customer_organization",
    ),
    "no-lines": (
        apb.CreateEntitlementRequest(customer_organization="ACME"),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "lines",
    ),
    "too-many-lines": (
        apb.CreateEntitlementRequest(customer_organization="ACME", lines=[line()] * 101),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "lines",
    ),
    "kind-unspecified": (
        apb.CreateEntitlementRequest(
            customer_organization="ACME",
            lines=[apb.NewEntitlementLine(feature="client.station", count=1)],
        ),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "lines[0].kind",
    ),
    "kind-out-of-range": (
        apb.CreateEntitlementRequest(
            customer_organization="ACME",
            lines=[apb.NewEntitlementLine(feature="client.station", count=1, kind=7)],
        ),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "lines[0].kind",
    ),
    "no-feature": (
        apb.CreateEntitlementRequest(customer_organization="ACME", lines=[line(feature="")]),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "lines[0].feature",
    ),
    "zero-count": (
        apb.CreateEntitlementRequest(customer_organization="ACME", lines=[line(count=0)]),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "lines[0].count",
    ),
    "count-above-maximum": (
        apb.CreateEntitlementRequest(customer_organization="ACME", lines=[line(count=1_000_001)]),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "lines[0].count",
    ),
    "negative-count-on-second-line": (
        apb.CreateEntitlementRequest(customer_organization="ACME", lines=[line(), line(count=-3)]),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "lines[1].count",
    ),
    "expired-line": (
        apb.CreateEntitlementRequest(customer_organization="ACME", lines=[line(expires_at=PAST)]),
        Code.INVALID_ARGUMENT, "INVALID_INPUT", "lines[0].expires_at",
    ),
    "unknown-feature": (
        apb.CreateEntitlementRequest(
            customer_organization="ACME", lines=[line(feature="client.teleporter")]
        ),
        Code.INVALID_ARGUMENT, "UNKNOWN_FEATURE", "",
    ),
    "unknown-feature-beside-a-good-line": (
        apb.CreateEntitlementRequest(
            customer_organization="ACME", lines=[line(), line(feature="Client.Station")]
        ),
        Code.INVALID_ARGUMENT, "UNKNOWN_FEATURE", "",
    ),
}  # fmt: skip


async def test_create_entitlement_refuses_a_bad_order(
    site: Site, subtests: pytest.Subtests
) -> None:
    await activate(site, seats=1)
    for case, (request, code, reason, field) in BAD_ORDERS.items():
        with subtests.test(case):
            before = await snapshot(site)
            error = await expect(
                site.vendor.CreateEntitlement(request, metadata=VENDOR), code, reason
            )
            if field:
                assert field_of(error) == field
            assert await snapshot(site) == before


async def test_create_entitlement_names_the_field_that_is_too_long(site: Site) -> None:
    before = await snapshot(site)
    error = await expect(
        site.vendor.CreateEntitlement(
            apb.CreateEntitlementRequest(
                customer_organization="ACME", contact="x" * 257, lines=[line()]
            ),
            metadata=VENDOR,
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    assert field_of(error) == "contact", error.details()
    assert await snapshot(site) == before


IMPOSSIBLE_EXPIRIES = {
    "beyond-year-9999": Timestamp(seconds=2**40),
    "before-year-1": Timestamp(seconds=-(2**40)),
    "negative-nanos": Timestamp(seconds=2_000_000_000, nanos=-1),
}


async def test_create_entitlement_refuses_an_impossible_expiry(
    site: Site, subtests: pytest.Subtests
) -> None:
    """A Timestamp outside what google.protobuf.Timestamp allows is bad input, not an
    INTERNAL error."""
    for case, expires_at in IMPOSSIBLE_EXPIRIES.items():
        with subtests.test(case):
            before = await snapshot(site)
            error = await expect(
                site.vendor.CreateEntitlement(
                    apb.CreateEntitlementRequest(
                        customer_organization="ACME", lines=[line(expires_at=expires_at)]
                    ),
                    metadata=VENDOR,
                ),
                Code.INVALID_ARGUMENT,
                "INVALID_INPUT",
            )
            assert field_of(error) == "lines[0].expires_at"
            assert await snapshot(site) == before


# ---------------------------------------------------------------------------------------
# Activation Server: Activate
# ---------------------------------------------------------------------------------------


def _forged_by_stranger(request: SignedEnvelope) -> SignedEnvelope:
    """Someone else's key, claiming the real host's id."""
    document = apb.HostActivationRequest.FromString(request.payload)
    intruder = SigningKey.generate()
    document.host_public_key = bytes(intruder.verify_key)
    return seal(document, document.host_id, intruder)


# a real signed request -> what arrives instead, code, reason
TAMPERED_REQUESTS: dict[str, tuple[Callable[[SignedEnvelope], SignedEnvelope], Code, str]] = {
    "signature-bit-flipped": (
        lambda e: with_changes(e, signature=flip(e.signature, 10)),
        Code.PERMISSION_DENIED, "BAD_SIGNATURE",
    ),
    "signature-missing": (
        lambda e: with_changes(e, signature=b""),
        Code.PERMISSION_DENIED, "BAD_SIGNATURE",
    ),
    "payload-bit-flipped": (
        lambda e: with_changes(e, payload=flip(e.payload, e.payload.index(b"ACT-"))),
        Code.PERMISSION_DENIED, "BAD_SIGNATURE",
    ),
    "count-raised": (
        lambda e: reserialized(e, apb.HostActivationRequest, count=5),
        Code.PERMISSION_DENIED, "BAD_SIGNATURE",
    ),
    "key-id-of-another-host": (
        lambda e: with_changes(e, key_id="0000-0000-0000-0000"),
        Code.PERMISSION_DENIED, "HOST_KEY_MISMATCH",
    ),
    "signed-by-another-key": (
        _forged_by_stranger, Code.PERMISSION_DENIED, "HOST_KEY_MISMATCH",
    ),
    "payload-type-of-a-certificate": (
        lambda e: with_changes(e, payload_type=LicenseCertificate.DESCRIPTOR.full_name),
        Code.INVALID_ARGUMENT, "WRONG_PAYLOAD_TYPE",
    ),
    "payload-type-missing": (
        lambda e: with_changes(e, payload_type=""),
        Code.INVALID_ARGUMENT, "WRONG_PAYLOAD_TYPE",
    ),
    "payload-garbage": (
        lambda e: with_changes(e, payload=b"\xff\xff\xff"),
        Code.INVALID_ARGUMENT, "MALFORMED_PAYLOAD",
    ),
    "empty-envelope": (
        lambda e: SignedEnvelope(), Code.INVALID_ARGUMENT, "WRONG_PAYLOAD_TYPE",
    ),
}  # fmt: skip


async def test_activate_refuses_a_tampered_request(site: Site, subtests: pytest.Subtests) -> None:
    order = await entitlement(site, sold=5)
    request = await prepare(site.trusted_storage, order.lines[0].activation_id, 2)
    for case, (tamper, code, reason) in TAMPERED_REQUESTS.items():
        with subtests.test(case):
            before = await snapshot(site)
            await expect(
                site.activation_service.Activate(apb.ActivateRequest(request=tamper(request))),
                code,
                reason,
            )
            assert await snapshot(site) == before

    # The refusals burned nothing: the genuine request is still granted, as asked.
    await vendor_answer(site, request)
    line_after = (await snapshot(site))["vendor.orders"][order.entitlement_id][0]
    assert line_after[2:] == (2, 3)


async def test_activate_without_a_request_is_invalid_argument(site: Site) -> None:
    before = await snapshot(site)
    error = await expect(
        site.activation_service.Activate(apb.ActivateRequest()),
        Code.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    assert field_of(error) == "request"
    assert await snapshot(site) == before


# changed fields of a correctly signed request -> the field named in the refusal
HOST_SIGNED_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "zero-count": ({"count": 0}, "count"),
    "negative-count": ({"count": -1}, "count"),
    "most-negative-count": ({"count": -(2**31)}, "count"),
    "count-above-maximum": ({"count": 100_001}, "count"),
    "no-request-id": ({"request_id": ""}, "request_id"),
    "request-id-with-spaces": ({"request_id": "my request"}, "request_id"),
    "request-id-too-long": ({"request_id": "r" * 129}, "request_id"),
}


async def test_activate_refuses_bad_fields_in_a_correctly_signed_request(
    site: Site, subtests: pytest.Subtests
) -> None:
    order = await entitlement(site)
    for case, (changes, field) in HOST_SIGNED_FIELDS.items():
        with subtests.test(case):
            fields = {"activation_id": order.lines[0].activation_id, "count": 1, **changes}
            before = await snapshot(site)
            error = await expect(
                site.activation_service.Activate(
                    apb.ActivateRequest(request=host_request(stranger(), **fields))
                ),
                Code.INVALID_ARGUMENT,
                "INVALID_INPUT",
            )
            assert field_of(error) == field
            assert await snapshot(site) == before


async def test_activate_refuses_unknown_activation_id(site: Site) -> None:
    await entitlement(site)
    unknown = new_id("ACT")
    request = await prepare(site.trusted_storage, unknown, 1)
    before = await snapshot(site)

    error = await expect(
        site.activation_service.Activate(apb.ActivateRequest(request=request)),
        Code.NOT_FOUND,
        "ACTIVATION_ID_NOT_FOUND",
    )
    info = error_info(error)
    assert info is not None and info.metadata["activation_id"] == unknown
    assert await snapshot(site) == before


async def test_activate_refuses_more_seats_than_are_left(site: Site) -> None:
    order = await activate(site, seats=3, sold=5)
    activation_id = order.lines[0].activation_id
    before = await snapshot(site)

    for count in (3, 6, 100_000):
        request = await prepare(site.trusted_storage, activation_id, count)
        error = await expect(
            site.activation_service.Activate(apb.ActivateRequest(request=request)),
            Code.RESOURCE_EXHAUSTED,
            "NOT_ENOUGH_SEATS_LEFT",
        )
        info = error_info(error)
        assert info is not None and info.metadata["available"] == "2"

    after = await snapshot(site)
    assert changed(before, after) == {"ls.pending"}  # the License Server journaled its asks
    assert after["vendor.orders"][order.entitlement_id][0][2:] == (3, 2)


async def test_activate_refuses_a_count_near_the_integer_limit(site: Site) -> None:
    """A host-signed request may carry any int32; with seats already activated the seat
    arithmetic must not overflow (PostgreSQL's integer would): it is bad input."""
    order = await activate(site, seats=1, sold=5)
    before = await snapshot(site)
    request = host_request(stranger(), activation_id=order.lines[0].activation_id, count=2**31 - 1)
    error = await expect(
        site.activation_service.Activate(apb.ActivateRequest(request=request)),
        Code.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    assert field_of(error) == "count"
    assert await snapshot(site) == before


async def test_activate_refuses_a_local_line(site: Site) -> None:
    order = await entitlement(site, kind=LOCAL)
    request = await prepare(site.trusted_storage, order.lines[0].activation_id, 1)
    before = await snapshot(site)
    await expect(
        site.activation_service.Activate(apb.ActivateRequest(request=request)),
        Code.FAILED_PRECONDITION,
        "LOCAL_LINE_NOT_FOR_LICENSE_SERVER",
    )
    assert await snapshot(site) == before


async def test_activate_refuses_a_request_id_reused_with_other_content(
    site: Site, subtests: pytest.Subtests
) -> None:
    order = await entitlement(site, sold=5)
    other_line = (await entitlement(site)).lines[0].activation_id
    activation_id = order.lines[0].activation_id
    host = stranger()
    first = host_request(host, request_id="req-1", activation_id=activation_id, count=1)
    answer = await vendor_answer(site, first)

    for case, changes in {"count": {"count": 2}, "line": {"activation_id": other_line}}.items():
        with subtests.test(case):
            before = await snapshot(site)
            fields = {"request_id": "req-1", "activation_id": activation_id, "count": 1, **changes}
            error = await expect(
                site.activation_service.Activate(
                    apb.ActivateRequest(request=host_request(host, **fields))
                ),
                Code.ALREADY_EXISTS,
                "REQUEST_ID_REUSED",
            )
            info = error_info(error)
            assert info is not None and info.metadata["request_id"] == "req-1"
            assert await snapshot(site) == before

    # A true retry (same content) is answered again with the very same bytes.
    assert await vendor_answer(site, first) == answer


async def test_same_request_id_from_another_host_is_not_a_reuse(
    site: Site, host_b: ls_server.LicenseServer
) -> None:
    """Request ids are chosen per License Server (the Administrator passes operator-chosen
    operation ids through as request ids), so two sites that both pick "op-1" must not
    collide at the vendor: the idempotency key is (host, request id), not the id alone."""
    order = await entitlement(site, sold=5)
    activation_id = order.lines[0].activation_id
    await vendor_answer(site, await prepare(site.trusted_storage, activation_id, 1, "op-1"))

    request_b = await prepare(storage_of(site, host_b), activation_id, 1, "op-1")
    answer_b = await vendor_answer(site, request_b)
    installed = await storage_of(site, host_b).InstallActivation(
        lpb.InstallActivationRequest(response=answer_b)
    )
    assert installed.certificate.certificate.host_id == host_b.identity.host_id


# ---------------------------------------------------------------------------------------
# License Server: trusted storage
# ---------------------------------------------------------------------------------------


async def test_bad_activation_id_is_invalid_argument_everywhere(
    site: Site, subtests: pytest.Subtests
) -> None:
    order = await activate(site, seats=1)
    for case, mangle in BAD_IDS.items():
        with subtests.test(case):
            text = mangle(order.lines[0].activation_id, order.entitlement_id)
            before = await snapshot(site)
            await expect_bad_input(
                site.trusted_storage.PrepareActivation(
                    lpb.PrepareActivationRequest(activation_id=text, count=1)
                ),
                "activation_id",
            )
            await expect_bad_input(
                site.administrator.Activate(
                    admin_pb2.ActivateRequest(
                        license_server=site.license_address, activation_id=text, count=1
                    )
                ),
                "activation_id",
            )
            await expect_bad_input(
                site.activation_service.Activate(
                    apb.ActivateRequest(
                        request=host_request(stranger(), activation_id=text, count=1)
                    )
                ),
                "activation_id",
            )
            assert await snapshot(site) == before


# changed fields -> the field named in the refusal
PREPARE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "zero-count": ({"count": 0}, "count"),
    "negative-count": ({"count": -1}, "count"),
    "count-above-maximum": ({"count": 100_001}, "count"),
    "request-id-with-spaces": ({"request_id": "my request"}, "request_id"),
    "request-id-with-slash": ({"request_id": "../../etc/passwd"}, "request_id"),
    "request-id-too-long": ({"request_id": "r" * 129}, "request_id"),
}


async def test_prepare_activation_refuses_bad_fields(site: Site, subtests: pytest.Subtests) -> None:
    order = await entitlement(site)
    for case, (changes, field) in PREPARE_CASES.items():
        with subtests.test(case):
            before = await snapshot(site)
            request = lpb.PrepareActivationRequest(
                **{"activation_id": order.lines[0].activation_id, "count": 1, **changes}
            )
            error = await expect(
                site.trusted_storage.PrepareActivation(request),
                Code.INVALID_ARGUMENT,
                "INVALID_INPUT",
            )
            assert field_of(error) == field
            assert await snapshot(site) == before


async def test_prepare_activation_refuses_a_request_id_reused_with_other_content(
    site: Site,
) -> None:
    order = await entitlement(site)
    other = await entitlement(site)
    activation_id = order.lines[0].activation_id
    first = await prepare(site.trusted_storage, activation_id, 2, "req-1")
    before = await snapshot(site)

    for activation, count in ((activation_id, 3), (other.lines[0].activation_id, 2)):
        await expect(
            prepare(site.trusted_storage, activation, count, "req-1"),
            Code.ALREADY_EXISTS,
            "REQUEST_ID_REUSED",
        )
    assert await snapshot(site) == before
    # A true retry returns the very same signed bytes.
    assert await prepare(site.trusted_storage, activation_id, 2, "req-1") == first


def _resealed(
    site: Site,
    answer: SignedEnvelope,
    response_changes: dict[str, Any] | None = None,
    certificate_changes: dict[str, Any] | None = None,
    certificate_envelope: Callable[[SignedEnvelope], SignedEnvelope] | None = None,
) -> SignedEnvelope:
    """The vendor answer altered and signed again with the real vendor key: a vendor-side
    mistake (or a stolen vendor key) the License Server must still catch."""
    vendor_key = site.activation.vendor_key
    response = apb.VendorActivationResponse.FromString(answer.payload)
    certificate = LicenseCertificate.FromString(response.certificate.payload)
    for name, value in (certificate_changes or {}).items():
        setattr(certificate, name, value)
    inner = vendor_key.seal(certificate)
    if certificate_envelope is not None:
        inner = certificate_envelope(inner)
    response.certificate.CopyFrom(inner)
    for name, value in (response_changes or {}).items():
        setattr(response, name, value)
    return vendor_key.seal(response)


ANOTHER_HOST = "0000-0000-0000-0000"

# (site, the real vendor answer) -> what arrives instead, code, reason
TAMPERED_ANSWERS: dict[str, tuple[Callable[[Site, SignedEnvelope], SignedEnvelope], Code, str]] = {
    "signature-bit-flipped": (
        lambda s, e: with_changes(e, signature=flip(e.signature, 0)),
        Code.PERMISSION_DENIED, "BAD_SIGNATURE",
    ),
    "payload-bit-flipped": (
        lambda s, e: with_changes(e, payload=flip(e.payload, len(e.payload) // 2)),
        Code.PERMISSION_DENIED, "BAD_SIGNATURE",
    ),
    "last-payload-byte-flipped": (
        lambda s, e: with_changes(e, payload=flip(e.payload, len(e.payload) - 1)),
        Code.PERMISSION_DENIED, "BAD_SIGNATURE",
    ),
    "unknown-vendor-key-id": (
        lambda s, e: with_changes(e, key_id="VK-0000-0000"),
        Code.PERMISSION_DENIED, "UNKNOWN_SIGNING_KEY",
    ),
    "signed-by-an-unknown-vendor-key": (
        lambda s, e: seal(
            apb.VendorActivationResponse.FromString(e.payload), e.key_id, SigningKey.generate()
        ),
        Code.PERMISSION_DENIED, "BAD_SIGNATURE",
    ),
    "payload-type-of-a-request": (
        lambda s, e: with_changes(e, payload_type=apb.HostActivationRequest.DESCRIPTOR.full_name),
        Code.INVALID_ARGUMENT, "WRONG_PAYLOAD_TYPE",
    ),
    "empty-envelope": (
        lambda s, e: SignedEnvelope(), Code.INVALID_ARGUMENT, "WRONG_PAYLOAD_TYPE",
    ),
    "certificate-signature-flipped": (
        lambda s, e: _resealed(
            s, e, certificate_envelope=lambda c: with_changes(c, signature=flip(c.signature))
        ),
        Code.PERMISSION_DENIED, "BAD_SIGNATURE",
    ),
    "certificate-unknown-key-id": (
        lambda s, e: _resealed(
            s, e, certificate_envelope=lambda c: with_changes(c, key_id="VK-0000-0000")
        ),
        Code.PERMISSION_DENIED, "UNKNOWN_SIGNING_KEY",
    ),
    "certificate-missing": (
        lambda s, e: _resealed(s, e, certificate_envelope=lambda c: SignedEnvelope()),
        Code.INVALID_ARGUMENT, "WRONG_PAYLOAD_TYPE",
    ),
    "answer-addressed-to-another-host": (
        lambda s, e: _resealed(s, e, response_changes={"host_id": ANOTHER_HOST}),
        Code.PERMISSION_DENIED, "CERTIFICATE_FOR_ANOTHER_HOST",
    ),
    "certificate-bound-to-another-host": (
        lambda s, e: _resealed(s, e, certificate_changes={"host_id": ANOTHER_HOST}),
        Code.PERMISSION_DENIED, "CERTIFICATE_FOR_ANOTHER_HOST",
    ),
    "certificate-count-differs": (
        lambda s, e: _resealed(s, e, certificate_changes={"count": 5}),
        Code.INVALID_ARGUMENT, "CERTIFICATE_MISMATCH",
    ),
    "certificate-for-another-line": (
        lambda s, e: _resealed(s, e, certificate_changes={"activation_id": new_id("ACT")}),
        Code.INVALID_ARGUMENT, "CERTIFICATE_MISMATCH",
    ),
    "certificate-for-another-request": (
        lambda s, e: _resealed(s, e, certificate_changes={"request_id": "someone-else"}),
        Code.INVALID_ARGUMENT, "CERTIFICATE_MISMATCH",
    ),
    "local-certificate": (
        lambda s, e: _resealed(s, e, certificate_changes={"kind": LOCAL}),
        Code.INVALID_ARGUMENT, "CERTIFICATE_MISMATCH",
    ),
    "answer-to-a-request-never-prepared": (
        lambda s, e: _resealed(
            s, e, {"request_id": "never"}, certificate_changes={"request_id": "never"}
        ),
        Code.NOT_FOUND, "REQUEST_NOT_PREPARED_HERE",
    ),
}  # fmt: skip


async def test_install_activation_refuses_a_tampered_or_mismatched_answer(
    site: Site, subtests: pytest.Subtests
) -> None:
    order = await entitlement(site, sold=5)
    answer = await vendor_answer(
        site, await prepare(site.trusted_storage, order.lines[0].activation_id, 2)
    )
    for case, (tamper, code, reason) in TAMPERED_ANSWERS.items():
        with subtests.test(case):
            before = await snapshot(site)
            await expect(
                site.trusted_storage.InstallActivation(
                    lpb.InstallActivationRequest(response=tamper(site, answer))
                ),
                code,
                reason,
            )
            after = await snapshot(site)
            assert after == before
            assert after["ls.certificates"] == []

    # The genuine answer still installs.
    installed = await site.trusted_storage.InstallActivation(
        lpb.InstallActivationRequest(response=answer)
    )
    assert not installed.already_installed


async def test_install_activation_without_an_answer_is_invalid_argument(site: Site) -> None:
    before = await snapshot(site)
    error = await expect(
        site.trusted_storage.InstallActivation(lpb.InstallActivationRequest()),
        Code.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    assert field_of(error) == "response"
    assert await snapshot(site) == before


async def test_install_activation_refuses_an_answer_for_another_host(
    site: Site, host_b: ls_server.LicenseServer
) -> None:
    order = await entitlement(site, sold=5)
    storage_b = storage_of(site, host_b)
    answer_b = await vendor_answer(site, await prepare(storage_b, order.lines[0].activation_id, 2))
    before = await snapshot(site, host_b)

    error = await expect(
        site.trusted_storage.InstallActivation(lpb.InstallActivationRequest(response=answer_b)),
        Code.PERMISSION_DENIED,
        "CERTIFICATE_FOR_ANOTHER_HOST",
    )
    assert host_b.identity.host_id in error.details()
    after = await snapshot(site, host_b)
    assert after == before
    assert after["ls.certificates"] == [] and after["ls.information"] == []

    # Host B, which asked, installs it.
    await storage_b.InstallActivation(lpb.InstallActivationRequest(response=answer_b))
    assert (await snapshot(site, host_b))["ls2.information"] == [("client.station", 2, 0, 2)]


async def test_install_activation_refuses_an_answer_to_a_request_never_prepared(
    site: Site,
) -> None:
    """Signed with this host's own key (a script, or a backup restored over newer state),
    but never journaled by this License Server: it must not install."""
    order = await entitlement(site, sold=5)
    request = host_request(
        site.license.identity, activation_id=order.lines[0].activation_id, count=2
    )
    answer = await vendor_answer(site, request)
    before = await snapshot(site)

    await expect(
        site.trusted_storage.InstallActivation(lpb.InstallActivationRequest(response=answer)),
        Code.NOT_FOUND,
        "REQUEST_NOT_PREPARED_HERE",
    )
    assert await snapshot(site) == before


async def _raw_unary(site: Site, method: str, body: bytes, port: int | None = None) -> Any:
    """Call ``method`` with raw request bytes, as a client with another .proto might."""
    call = site.channel(port or site.license.port).unary_unary(
        method, request_serializer=None, response_deserializer=None
    )
    return await call(body)


FIELDLESS_METHODS = {
    "GetHostIdentity": lpb.GetHostIdentityResponse,
    "ListCertificates": lpb.ListCertificatesResponse,
}


async def test_requests_without_fields_ignore_unknown_fields(
    site: Site, subtests: pytest.Subtests
) -> None:
    """GetHostIdentity and ListCertificates take no input; a newer client's unknown fields
    are ignored (proto3) and change nothing."""
    await activate(site, seats=1)
    unknown_fields = bytes([0x0A, 0x03]) + b"abc" + bytes([0x10, 0x07])  # field 1 "abc", 2 = 7
    for name, response_type in FIELDLESS_METHODS.items():
        with subtests.test(name):
            method = f"/tessera.license.v1.TrustedStorageService/{name}"
            before = await snapshot(site)
            expected = response_type.FromString(await _raw_unary(site, method, b""))
            answer = response_type.FromString(await _raw_unary(site, method, unknown_fields))
            assert answer == expected
            assert await snapshot(site) == before


# ---------------------------------------------------------------------------------------
# License Server: leasing
# ---------------------------------------------------------------------------------------


def _lease(**kind: Any) -> lpb.LeaseRequest:
    return lpb.LeaseRequest(**kind)


ACQUIRE = _lease(acquire=acquire())
HEARTBEAT = _lease(heartbeat=lpb.LeaseHeartbeat())
RELEASE = _lease(release=lpb.LeaseRelease())
RESUME_UNKNOWN = _lease(resume=lpb.LeaseResume(lease_id="no-such-lease", lease_secret="s"))
VIOLATION = (Code.FAILED_PRECONDITION, "LEASE_PROTOCOL_VIOLATION")

# messages sent on one stream (the last one is refused) -> code, reason
STREAM_CASES: dict[str, tuple[list[lpb.LeaseRequest], tuple[Code, str]]] = {
    "heartbeat-before-acquire": ([HEARTBEAT], VIOLATION),
    "release-before-acquire": ([RELEASE], VIOLATION),
    "empty-request": ([lpb.LeaseRequest()], VIOLATION),
    "second-acquire": ([ACQUIRE, ACQUIRE], VIOLATION),
    "resume-while-holding": ([ACQUIRE, RESUME_UNKNOWN], VIOLATION),
    "empty-request-while-holding": ([ACQUIRE, lpb.LeaseRequest()], VIOLATION),
    "acquire-zero-seats": (
        [_lease(acquire=acquire(count=0))], (Code.INVALID_ARGUMENT, "INVALID_INPUT"),
    ),
    "acquire-negative-seats": (
        [_lease(acquire=acquire(count=-1))], (Code.INVALID_ARGUMENT, "INVALID_INPUT"),
    ),
    "acquire-no-feature": (
        [_lease(acquire=acquire(feature=""))], (Code.INVALID_ARGUMENT, "INVALID_INPUT"),
    ),
    "acquire-unknown-feature": (
        [_lease(acquire=acquire(feature="client.teleporter"))],
        (Code.NOT_FOUND, "FEATURE_NOT_LICENSED"),
    ),
    "acquire-more-than-activated": (
        [_lease(acquire=acquire(count=3))], (Code.FAILED_PRECONDITION, "COUNT_ABOVE_ACTIVATED"),
    ),
    "resume-unknown-lease": ([RESUME_UNKNOWN], (Code.NOT_FOUND, "LEASE_NOT_FOUND")),
    "resume-without-credentials": (
        [_lease(resume=lpb.LeaseResume())], (Code.INVALID_ARGUMENT, "INVALID_INPUT"),
    ),
}  # fmt: skip


async def test_lease_stream_refuses_bad_messages(site: Site, subtests: pytest.Subtests) -> None:
    await activate(site, seats=2)
    for case, (messages, (code, reason)) in STREAM_CASES.items():
        with subtests.test(case):
            before = await snapshot(site)
            stream = site.leases.Lease()
            grants = []
            for message in messages[:-1]:
                await stream.write(message)
                grants.append((await stream.read()).granted)
            await stream.write(messages[-1])
            if messages[-1].HasField("acquire") and not grants:
                # A refused acquire is told as `denied` first, then the stream's status.
                denied = await stream.read()
                assert denied.denied.reason == reason, denied
            await expect(stream.read(), code, reason)

            # A lease granted before the refusal is kept (it may be resumed); nothing else.
            after = await snapshot(site)
            held = len(grants)
            assert after["ls.information"] == [("client.station", 2, held, 2 - held)]
            assert after["ls.leases"] == before["ls.leases"] + held
            assert changed(before, after) <= {"ls.information", "ls.leases"}
            for grant in grants:
                await site.leases.Checkin(
                    lpb.CheckinRequest(lease_id=grant.lease_id, lease_secret=grant.lease_secret)
                )


async def test_lease_stream_refuses_bytes_that_do_not_parse(
    site: Site, subtests: pytest.Subtests
) -> None:
    """Bytes that are not a LeaseRequest, first or after a grant, end the stream with
    INVALID_ARGUMENT / MALFORMED_REQUEST (not grpc's UNKNOWN); a lease granted before is
    kept, as with any other refusal."""
    await activate(site, seats=2)
    garbage = b"\xff\xff\xff\xff"  # a field with an invalid wire type
    for case, first in (("first message", None), ("after a grant", acquire())):
        with subtests.test(case):
            stream = site.channel(site.license.port).stream_stream(
                "/tessera.license.v1.LeaseService/Lease",
                request_serializer=None,
                response_deserializer=lpb.LeaseResponse.FromString,
            )()
            if first is not None:
                await stream.write(lpb.LeaseRequest(acquire=first).SerializeToString())
                granted = (await stream.read()).granted
                assert granted.lease_id
            await stream.write(garbage)
            await expect(stream.read(), Code.INVALID_ARGUMENT, "MALFORMED_REQUEST")
            if first is not None:
                assert await site.leases.Checkin(
                    lpb.CheckinRequest(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
                )


async def test_reflection_refuses_bytes_that_do_not_parse(site: Site) -> None:
    """Server reflection (grpc's servicer, no error table of ours) answers an unparsable
    message INVALID_ARGUMENT / MALFORMED_REQUEST too, not UNKNOWN with an exception name."""
    stream = site.channel(site.license.port).stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=None,
        response_deserializer=None,
    )()
    await stream.write(b"\xff\xff\xff\xff")
    await expect(stream.read(), Code.INVALID_ARGUMENT, "MALFORMED_REQUEST")


# request -> code, reason (2 seats of client.station are activated)
CHECKOUT_CASES: dict[str, tuple[lpb.CheckoutRequest, Code, str]] = {
    "no-acquire": (lpb.CheckoutRequest(), Code.INVALID_ARGUMENT, "INVALID_INPUT"),
    "no-feature": (
        lpb.CheckoutRequest(acquire=acquire(feature="")), Code.INVALID_ARGUMENT, "INVALID_INPUT",
    ),
    "feature-too-long": (
        lpb.CheckoutRequest(acquire=acquire(feature="f" * 65)),
        Code.INVALID_ARGUMENT, "INVALID_INPUT",
    ),
    "zero-seats": (
        lpb.CheckoutRequest(acquire=acquire(count=0)), Code.INVALID_ARGUMENT, "INVALID_INPUT",
    ),
    "negative-seats": (
        lpb.CheckoutRequest(acquire=acquire(count=-2)), Code.INVALID_ARGUMENT, "INVALID_INPUT",
    ),
    "seats-above-maximum": (
        lpb.CheckoutRequest(acquire=acquire(count=10_001)), Code.INVALID_ARGUMENT, "INVALID_INPUT",
    ),
    "client-host-too-long": (
        lpb.CheckoutRequest(acquire=acquire(client_host="h" * 257)),
        Code.INVALID_ARGUMENT, "INVALID_INPUT",
    ),
    "user-too-long": (
        lpb.CheckoutRequest(acquire=acquire(user="u" * 257)),
        Code.INVALID_ARGUMENT, "INVALID_INPUT",
    ),
    "unknown-feature": (
        lpb.CheckoutRequest(acquire=acquire(feature="client.teleporter")),
        Code.NOT_FOUND, "FEATURE_NOT_LICENSED",
    ),
    "feature-differs-in-case": (
        lpb.CheckoutRequest(acquire=acquire(feature="Client.Station")),
        Code.NOT_FOUND, "FEATURE_NOT_LICENSED",
    ),
    "more-than-activated": (
        lpb.CheckoutRequest(acquire=acquire(count=3)),
        Code.FAILED_PRECONDITION, "COUNT_ABOVE_ACTIVATED",
    ),
}  # fmt: skip


async def test_checkout_refuses_bad_input(site: Site, subtests: pytest.Subtests) -> None:
    await activate(site, seats=2)
    for case, (request, code, reason) in CHECKOUT_CASES.items():
        with subtests.test(case):
            before = await snapshot(site)
            await expect(site.leases.Checkout(request), code, reason)
            assert await snapshot(site) == before


async def test_checkout_with_every_seat_in_use_is_resource_exhausted(site: Site) -> None:
    await activate(site, seats=2)
    await checkout(site)
    before = await snapshot(site)
    error = await expect(
        site.leases.Checkout(lpb.CheckoutRequest(acquire=acquire(count=2))),
        Code.RESOURCE_EXHAUSTED,
        "NO_SEAT_AVAILABLE",
    )
    info = error_info(error)
    assert info is not None and info.metadata["available"] == "1"
    assert await snapshot(site) == before


IMPOSSIBLE_TTLS = {
    "negative": Duration(seconds=-5),
    "zero": Duration(seconds=0),
    "negative-nanos": Duration(seconds=0, nanos=-1),
}


async def test_checkout_refuses_an_impossible_ttl(site: Site, subtests: pytest.Subtests) -> None:
    """The client may only shorten the TTL: a negative or zero one is bad input, neither
    silently the server's default nor an INTERNAL error."""
    await activate(site, seats=2)
    for case, ttl in IMPOSSIBLE_TTLS.items():
        with subtests.test(case):
            before = await snapshot(site)
            await expect(
                site.leases.Checkout(lpb.CheckoutRequest(acquire=acquire(ttl=ttl))),
                Code.INVALID_ARGUMENT,
                "INVALID_INPUT",
            )
            assert await snapshot(site) == before


# (a lease, another lease) -> the (lease id, secret) presented
Credentials = Callable[[lpb.LeaseGranted, lpb.LeaseGranted], tuple[str, str]]
LEASE_CREDENTIALS: dict[str, tuple[Credentials, Code, str]] = {
    "no-lease-id": (lambda g, o: ("", g.lease_secret), Code.INVALID_ARGUMENT, "INVALID_INPUT"),
    "no-secret": (lambda g, o: (g.lease_id, ""), Code.INVALID_ARGUMENT, "INVALID_INPUT"),
    "unknown-lease": (
        lambda g, o: ("00000000-0000-0000-0000-000000000000", g.lease_secret),
        Code.NOT_FOUND, "LEASE_NOT_FOUND",
    ),
    "wrong-secret": (
        lambda g, o: (g.lease_id, g.lease_secret + "x"), Code.NOT_FOUND, "LEASE_NOT_FOUND",
    ),
    "secret-of-another-lease": (
        lambda g, o: (g.lease_id, o.lease_secret), Code.NOT_FOUND, "LEASE_NOT_FOUND",
    ),
    "malformed-lease-id": (
        lambda g, o: ("x" * 1000, g.lease_secret), Code.INVALID_ARGUMENT, "INVALID_INPUT",
    ),
}  # fmt: skip


async def test_heartbeat_and_checkin_refuse_bad_lease_credentials(
    site: Site, clock: FakeClock, subtests: pytest.Subtests
) -> None:
    await activate(site, seats=2)
    granted, other = await checkout(site), await checkout(site)
    for case, (credentials, code, reason) in LEASE_CREDENTIALS.items():
        lease_id, secret = credentials(granted, other)
        for rpc in ("Heartbeat", "Checkin"):
            with subtests.test(f"{rpc}-{case}"):
                before = await snapshot(site)
                if rpc == "Heartbeat":
                    call = site.leases.Heartbeat(
                        lpb.HeartbeatRequest(lease_id=lease_id, lease_secret=secret)
                    )
                else:
                    call = site.leases.Checkin(
                        lpb.CheckinRequest(lease_id=lease_id, lease_secret=secret)
                    )
                await expect(call, code, reason)
                assert await snapshot(site) == before

    # Both leases are untouched: each still heartbeats with its own secret.
    clock.advance(1)
    for lease in (granted, other):
        await site.leases.Heartbeat(
            lpb.HeartbeatRequest(lease_id=lease.lease_id, lease_secret=lease.lease_secret)
        )


async def test_checkin_twice_is_not_an_error_and_heartbeat_after_it_is_refused(
    site: Site,
) -> None:
    await activate(site, seats=2)
    granted = await checkout(site)
    checkin = lpb.CheckinRequest(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
    assert (await site.leases.Checkin(checkin)).released is True
    before = await snapshot(site)

    assert (await site.leases.Checkin(checkin)).released is False
    await expect(
        site.leases.Heartbeat(
            lpb.HeartbeatRequest(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
        ),
        Code.FAILED_PRECONDITION,
        "LEASE_RELEASED",
    )
    after = await snapshot(site)
    assert after == before
    assert after["ls.information"] == [("client.station", 2, 0, 2)]


UNLICENSED_FEATURES = {
    "unknown": "client.teleporter",
    "in-catalog-but-not-activated": "server.enterprise.base",
    "differs-in-case": "Client.Station",
}


async def test_license_information_of_an_unlicensed_feature_is_not_found(
    site: Site, subtests: pytest.Subtests
) -> None:
    await activate(site, seats=2)
    for case, feature in UNLICENSED_FEATURES.items():
        with subtests.test(case):
            before = await snapshot(site)
            error = await expect(
                site.leases.GetLicenseInformation(
                    lpb.GetLicenseInformationRequest(feature=feature)
                ),
                Code.NOT_FOUND,
                "FEATURE_NOT_LICENSED",
            )
            info = error_info(error)
            assert info is not None and info.metadata["feature"] == feature
            assert await snapshot(site) == before


async def test_license_information_of_an_overlong_feature_is_invalid_argument(
    site: Site,
) -> None:
    await expect(
        site.leases.GetLicenseInformation(lpb.GetLicenseInformationRequest(feature="x" * 500)),
        Code.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )


async def test_checkout_asking_for_a_longer_ttl_than_the_server_allows_gets_the_servers(
    site: Site,
) -> None:
    await activate(site, seats=3)
    for seconds, nanos, granted in ((10**15, 0, 90), (30, 0, 30), (0, 500_000_000, 1)):
        reply = await site.leases.Checkout(
            lpb.CheckoutRequest(acquire=acquire(ttl=Duration(seconds=seconds, nanos=nanos)))
        )
        assert reply.granted.ttl.seconds == granted


# ---------------------------------------------------------------------------------------
# Administrator
# ---------------------------------------------------------------------------------------

BAD_ADDRESSES = [
    "",
    "   ",
    ";",
    "localhost",
    "27000",
    "99999@host",
    "0@host",
    "-1@host",
    "27000@",
    "abc@localhost",
    "@bad host",
    "@-host",
    "27000@[not-ipv6]",
    "@localhost;localhost",
]


async def test_administrator_refuses_an_invalid_license_server_address(
    site: Site, subtests: pytest.Subtests
) -> None:
    order = await entitlement(site)
    for address in BAD_ADDRESSES:
        with subtests.test(repr(address)):
            before = await snapshot(site)
            activate_request = admin_pb2.ActivateRequest(
                license_server=address, activation_id=order.lines[0].activation_id, count=1
            )
            await expect(
                site.administrator.Activate(activate_request),
                Code.INVALID_ARGUMENT,
                "INVALID_LICENSE_SERVER_ADDRESS",
            )
            await expect(
                site.administrator.ListLicenses(
                    admin_pb2.ListLicensesRequest(license_server=address)
                ),
                Code.INVALID_ARGUMENT,
                "INVALID_LICENSE_SERVER_ADDRESS",
            )
            assert await snapshot(site) == before


async def test_every_administrator_call_refuses_an_empty_license_server_address(
    site: Site, subtests: pytest.Subtests
) -> None:
    """An empty address (an unset variable) is never "the default server": each field
    of each Administrator request that names a License Server, found in the service's
    descriptor so a new call is covered too, is refused INVALID_ARGUMENT /
    INVALID_LICENSE_SERVER_ADDRESS naming that field, and nothing changes."""
    order = await entitlement(site)
    valid = {
        "activation_id": order.lines[0].activation_id,
        "count": 1,
        "certificate_id": "c-1",
        "response_file": b"Tessera response",
        "kind": admin_pb2.OPERATION_KIND_ACTIVATE,
    }
    service = admin_pb2.DESCRIPTOR.services_by_name["AdministratorService"]
    checked = []
    for method in service.methods:
        message_class = getattr(admin_pb2, method.input_type.name)
        address_fields = [
            field.name
            for field in method.input_type.fields
            if field.name.endswith("license_server") and field.type == field.TYPE_STRING
        ]
        for empty in address_fields:
            with subtests.test(f"{method.name}.{empty}"):
                request = message_class(
                    **{
                        name: value
                        for name, value in valid.items()
                        if name in method.input_type.fields_by_name
                    },
                    **{field: site.license_address for field in address_fields if field != empty},
                )
                setattr(request, empty, "")
                before = await snapshot(site)
                error = await expect(
                    getattr(site.administrator, method.name)(request),
                    Code.INVALID_ARGUMENT,
                    "INVALID_LICENSE_SERVER_ADDRESS",
                )
                assert field_of(error) == empty
                assert "empty" in (error.details() or "")
                assert await snapshot(site) == before
                checked.append(f"{method.name}.{empty}")
    assert len(checked) >= 8, checked  # Activate … ImportResponse, both ends of Move


# changed fields -> the field named in the refusal
ADMIN_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "zero-count": ({"count": 0}, "count"),
    "negative-count": ({"count": -1}, "count"),
    "count-above-maximum": ({"count": 100_001}, "count"),
    "operation-id-with-spaces": ({"operation_id": "my operation"}, "operation_id"),
    "operation-id-too-long": ({"operation_id": "o" * 129}, "operation_id"),
}


async def test_administrator_activate_refuses_bad_fields(
    site: Site, subtests: pytest.Subtests
) -> None:
    order = await entitlement(site)
    for case, (changes, field) in ADMIN_FIELDS.items():
        with subtests.test(case):
            before = await snapshot(site)
            request = admin_pb2.ActivateRequest(
                **{
                    "license_server": site.license_address,
                    "activation_id": order.lines[0].activation_id,
                    "count": 1,
                    **changes,
                }
            )
            error = await expect(
                site.administrator.Activate(request), Code.INVALID_ARGUMENT, "INVALID_INPUT"
            )
            assert field_of(error) == field
            assert await snapshot(site) == before


async def test_administrator_against_a_license_server_that_is_not_there(site: Site) -> None:
    order = await entitlement(site)
    address = f"{free_port()}@127.0.0.1;{free_port()}@127.0.0.1"
    before = await snapshot(site)

    refusals = [
        await expect(
            site.administrator.Activate(
                admin_pb2.ActivateRequest(
                    license_server=address, activation_id=order.lines[0].activation_id, count=1
                )
            ),
            Code.UNAVAILABLE,
            "PEER_UNAVAILABLE",
        ),
        await expect(
            site.administrator.ListLicenses(admin_pb2.ListLicensesRequest(license_server=address)),
            Code.UNAVAILABLE,
            "PEER_UNAVAILABLE",
        ),
    ]
    for error in refusals:
        info = error_info(error)
        assert info is not None and info.metadata["peer"] == "License Server"
    assert await snapshot(site) == before


async def test_administrator_passes_vendor_refusals_through(site: Site) -> None:
    order = await activate(site, seats=3, sold=5)
    activation_id = order.lines[0].activation_id
    before = await snapshot(site)

    for activation, count, code, reason in (
        (activation_id, 3, Code.RESOURCE_EXHAUSTED, "NOT_ENOUGH_SEATS_LEFT"),
        (new_id("ACT"), 1, Code.NOT_FOUND, "ACTIVATION_ID_NOT_FOUND"),
    ):
        error = await expect(
            site.administrator.Activate(
                admin_pb2.ActivateRequest(
                    license_server=site.license_address, activation_id=activation, count=count
                )
            ),
            code,
            reason,
        )
        info = error_info(error)
        assert info is not None and info.metadata["peer"] == "Activation Server"

    after = await snapshot(site)
    # The attempts stay journaled (Administrator, License Server) so they can be resumed;
    # no seat moved and nothing was installed.
    assert changed(before, after) <= {"admin.operations", "ls.pending"}
    assert after["vendor.orders"][order.entitlement_id][0][2:] == (3, 2)
    assert after["ls.information"] == [("client.station", 3, 0, 3)]


async def test_administrator_refuses_an_operation_id_reused_with_other_parameters(
    site: Site, host_b: ls_server.LicenseServer, subtests: pytest.Subtests
) -> None:
    order = await entitlement(site, sold=5)
    other_line = (await entitlement(site)).lines[0].activation_id
    first = {
        "license_server": site.license_address,
        "activation_id": order.lines[0].activation_id,
        "count": 1,
        "operation_id": "op-1",
    }
    await site.administrator.Activate(admin_pb2.ActivateRequest(**first))

    for case, changes in {
        "count": {"count": 2},
        "line": {"activation_id": other_line},
        "license-server": {"license_server": f"{host_b.port}@127.0.0.1"},
    }.items():
        with subtests.test(case):
            before = await snapshot(site, host_b)
            error = await expect(
                site.administrator.Activate(admin_pb2.ActivateRequest(**{**first, **changes})),
                Code.ALREADY_EXISTS,
                "OPERATION_ID_REUSED",
            )
            info = error_info(error)
            assert info is not None and info.metadata["operation_id"] == "op-1"
            assert await snapshot(site, host_b) == before


async def test_administrator_without_the_activation_server(
    site: Site, databases: DatabaseFactory
) -> None:
    lonely = await admin_server.build(
        admin_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(site.tmp_path / "administrator_lonely"),
                "--database-url", await databases.new("admin_lonely"),
                "--activation-server", f"127.0.0.1:{free_port()}",
                *ADMINISTRATOR_FLAGS,
            ],
            environ={},
        )
    )  # fmt: skip
    try:
        stub = admin_pb2_grpc.AdministratorServiceStub(site.channel(lonely.port))
        order = await entitlement(site)
        before = await snapshot(site)
        refusals = [
            await expect(
                stub.GetOrder(admin_pb2.GetOrderRequest(entitlement_id=order.entitlement_id)),
                Code.UNAVAILABLE,
                "PEER_UNAVAILABLE",
            ),
            await expect(
                stub.Activate(
                    admin_pb2.ActivateRequest(
                        license_server=site.license_address,
                        activation_id=order.lines[0].activation_id,
                        count=1,
                    )
                ),
                Code.UNAVAILABLE,
                "PEER_UNAVAILABLE",
            ),
        ]
        for error in refusals:
            info = error_info(error)
            assert info is not None and info.metadata["peer"] == "Activation Server"
        after = await snapshot(site)
        assert changed(before, after) <= {"ls.pending"}  # prepared, to be resumed later
        assert after["ls.certificates"] == []
    finally:
        await lonely.stop(0)


# ---------------------------------------------------------------------------------------
# Text the databases cannot store
# ---------------------------------------------------------------------------------------


async def test_nul_characters_in_stored_text_are_invalid_argument(
    site: Site, subtests: pytest.Subtests
) -> None:
    """PostgreSQL cannot store NUL in text; a NUL must be refused as bad input on every
    database, not stored on one and an INTERNAL error on the other."""
    await activate(site, seats=5)
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "customer_organization": lambda: site.vendor.CreateEntitlement(
            apb.CreateEntitlementRequest(customer_organization="ACME\x00", lines=[line()]),
            metadata=VENDOR,
        ),
        "contact": lambda: site.vendor.CreateEntitlement(
            apb.CreateEntitlementRequest(
                customer_organization="ACME", contact="ops\x00", lines=[line()]
            ),
            metadata=VENDOR,
        ),
        "client_host": lambda: site.leases.Checkout(
            lpb.CheckoutRequest(acquire=acquire(client_host="ws\x00"))
        ),
        "user": lambda: site.leases.Checkout(lpb.CheckoutRequest(acquire=acquire(user="bob\x00"))),
        "display_name": lambda: site.leases.Checkout(
            lpb.CheckoutRequest(acquire=acquire(display_name="WS\x00"))
        ),
    }
    for field, call in calls.items():
        with subtests.test(field):
            before = await snapshot(site)
            error = await expect(call(), Code.INVALID_ARGUMENT, "INVALID_INPUT")
            assert field_of(error) == field
            assert await snapshot(site) == before


async def test_nul_characters_in_lookups_are_a_clear_refusal(
    site: Site, subtests: pytest.Subtests
) -> None:
    """Looking something up by a name with a NUL finds nothing (or is bad input); it is
    never an INTERNAL error."""
    await activate(site, seats=2)
    granted = await checkout(site)
    secret = granted.lease_secret
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "Checkout.feature": lambda: site.leases.Checkout(
            lpb.CheckoutRequest(acquire=acquire(feature="client\x00station"))
        ),
        "GetLicenseInformation.feature": lambda: site.leases.GetLicenseInformation(
            lpb.GetLicenseInformationRequest(feature="client\x00station")
        ),
        "Heartbeat.lease_id": lambda: site.leases.Heartbeat(
            lpb.HeartbeatRequest(lease_id=granted.lease_id + "\x00", lease_secret=secret)
        ),
        "Checkin.lease_id": lambda: site.leases.Checkin(
            lpb.CheckinRequest(lease_id=granted.lease_id + "\x00", lease_secret=secret)
        ),
        "ListActivations.host_id": lambda: site.vendor.ListActivations(
            apb.ListActivationsRequest(host_id="host\x00"), metadata=VENDOR
        ),
    }
    for name, call in calls.items():
        with subtests.test(name):
            before = await snapshot(site)
            try:
                await call()
            except grpc.aio.AioRpcError as error:
                assert error.code() in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), error.details()
                assert reason_of(error) not in ("", "INTERNAL")
            assert await snapshot(site) == before


# ---------------------------------------------------------------------------------------
# Requests that are not protobuf at all
# ---------------------------------------------------------------------------------------


async def test_undecodable_request_is_invalid_argument(
    site: Site, subtests: pytest.Subtests
) -> None:
    """Bytes that do not parse as the request message (a client built from another .proto,
    a hand-made grpcurl call) are bad input: INVALID_ARGUMENT with a reason, not UNKNOWN
    with a Python exception name."""
    await activate(site, seats=1)
    methods = {
        "/tessera.activation.v1.ActivationService/GetOrder": site.activation.port,
        "/tessera.license.v1.LeaseService/Checkout": site.license.port,
        "/tessera.license.v1.TrustedStorageService/GetHostIdentity": site.license.port,
        "/tessera.admin.v1.AdministratorService/GetOrder": site.admin.port,
    }
    for method, port in methods.items():
        with subtests.test(method.rsplit(".", 1)[-1]):
            before = await snapshot(site)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _raw_unary(site, method, b"\xff\xff\xff", port)
            error = caught.value
            assert error.code() == Code.INVALID_ARGUMENT, (error.code(), error.details())
            assert reason_of(error)
            assert await snapshot(site) == before
