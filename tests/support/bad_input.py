"""Making bad input and checking its refusal, for the tests/*/test_bad_input.py suites.

Each refusal is checked for its canonical status code and its google.rpc.ErrorInfo reason
(``expect``, ``expect_bad_input``); the tables of bad input are run case by case as
subtests on one site per database, so every case must be refused and change nothing the
next one sees (tests/support/snapshots.py). The rest makes wrong input from right input:
typed-wrong IDs, flipped bytes, re-sealed envelopes, a stranger's host identity.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from nacl.signing import SigningKey

from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.auth import bearer_metadata
from tessera.clock import to_timestamp
from tessera.common.v1.common_pb2 import LicenseKind, SignedEnvelope
from tessera.envelope import seal
from tessera.ids import ALPHABET, new_id
from tessera.keys import HostIdentity, machine_binding
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import error_info, reason_of
from tests.support.in_process_site import Site
from tests.support.tokens import VENDOR_TOKEN

Code = grpc.StatusCode
NETWORK = LicenseKind.LICENSE_KIND_NETWORK
LOCAL = LicenseKind.LICENSE_KIND_LOCAL
VENDOR = bearer_metadata(VENDOR_TOKEN)


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


async def raw_unary(site: Site, method: str, body: bytes, port: int | None = None) -> Any:
    """Call ``method`` with raw request bytes, as a client with another .proto might."""
    call = site.channel(port or site.license.port).unary_unary(
        method, request_serializer=None, response_deserializer=None
    )
    return await call(body)
