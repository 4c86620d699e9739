"""Bad input to every Activation Server RPC gets a clear status code and reason, and
changes nothing: IDs, credentials, orders, Activate.

Servicer-level tests over real gRPC in process, on SQLite and PostgreSQL. Each refusal is
checked for its canonical status code and its google.rpc.ErrorInfo reason, and a snapshot
of what the three services hold is compared before and after (tests/support/snapshots.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nacl.signing import SigningKey

from services.license_server import server as ls_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.envelope import seal
from tessera.ids import ENTITLEMENT_PREFIX, new_id
from tessera.license.v1 import license_pb2 as lpb
from tessera.rpc import error_info
from tests.support.bad_input import (
    BAD_IDS,
    LOCAL,
    VENDOR,
    Code,
    activate,
    entitlement,
    expect,
    expect_bad_input,
    field_of,
    flip,
    host_request,
    line,
    prepare,
    reserialized,
    stranger,
    vendor_answer,
    with_changes,
)
from tests.support.in_process_site import Site
from tests.support.snapshots import (
    changed,
    snapshot,
    storage_of,
)
from tests.support.tokens import VENDOR_TOKEN

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
