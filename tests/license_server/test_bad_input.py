"""Bad input to every License Server RPC gets a clear status code and reason, and changes
nothing: trusted storage and leasing.

Servicer-level tests over real gRPC in process, on SQLite and PostgreSQL. Each refusal is
checked for its canonical status code and its google.rpc.ErrorInfo reason, and a snapshot
of what the three services hold is compared before and after (tests/support/snapshots.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration
from nacl.signing import SigningKey

from services.license_server import server as ls_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.envelope import seal
from tessera.ids import new_id
from tessera.license.v1 import license_pb2 as lpb
from tessera.rpc import error_info
from tests.support.bad_input import (
    BAD_IDS,
    LOCAL,
    Code,
    acquire,
    activate,
    checkout,
    entitlement,
    expect,
    expect_bad_input,
    field_of,
    flip,
    host_request,
    prepare,
    raw_unary,
    stranger,
    vendor_answer,
    with_changes,
)
from tests.support.clock import FakeClock
from tests.support.in_process_site import Site
from tests.support.snapshots import (
    changed,
    snapshot,
    storage_of,
)

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
            expected = response_type.FromString(await raw_unary(site, method, b""))
            answer = response_type.FromString(await raw_unary(site, method, unknown_fields))
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
