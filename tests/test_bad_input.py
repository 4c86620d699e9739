"""Bad input that reaches every service alike gets a clear status code and reason, and
changes nothing: text the databases cannot store, requests that are not protobuf.

Servicer-level tests over real gRPC in process, on SQLite and PostgreSQL. Each refusal is
checked for its canonical status code and its google.rpc.ErrorInfo reason, and a snapshot
of what the three services hold is compared before and after (tests/support/snapshots.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from tessera.activation.v1 import activation_pb2 as apb
from tessera.license.v1 import license_pb2 as lpb
from tessera.rpc import reason_of
from tests.support.bad_input import (
    VENDOR,
    Code,
    acquire,
    activate,
    checkout,
    expect,
    field_of,
    line,
    raw_unary,
)
from tests.support.in_process_site import Site
from tests.support.snapshots import (
    snapshot,
)

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
                await raw_unary(site, method, b"\xff\xff\xff", port)
            error = caught.value
            assert error.code() == Code.INVALID_ARGUMENT, (error.code(), error.details())
            assert reason_of(error)
            assert await snapshot(site) == before
