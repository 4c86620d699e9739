"""The client's tables: License Server addresses, status -> exception, resume backoff.

The exception table is checked against real statuses: each (code, ErrorInfo reason) is
sent by a real gRPC server on loopback, exactly as the services' error tables send it,
and the client's one mapping turns it into its class.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from clients import (
    Backoff,
    CountAboveActivated,
    FeatureNotLicensed,
    InvalidLicenseRequest,
    InvalidLicenseServerConfiguration,
    LeaseExpired,
    LeaseRevoked,
    LicenseClient,
    LicenseError,
    LicenseLost,
    LicensePermissionDenied,
    LicenseRefused,
    LicenseServerBusy,
    LicenseServerUnreachable,
    LicenseWithdrawn,
    NoSeatAvailable,
    QueueTimeout,
    SyncLicenseClient,
    TrustedStorageBroken,
)
from clients.errors import error_from_revocation, error_from_rpc
from tessera.address import DEFAULT_PORTS
from tessera.errors import InvalidLicenseServerAddress
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc
from tessera.rpc import rich_status

Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("address", "targets"),
    [
        ("@localhost", [f"localhost:{port}" for port in DEFAULT_PORTS]),
        ("27000@localhost", ["localhost:27000"]),
        ("19650@localhost", ["localhost:19650"]),
        ("14650@192.0.2.2", ["192.0.2.2:14650"]),
        ("27000@[::1]", ["[::1]:27000"]),
        ("27001@es-1.example.com", ["es-1.example.com:27001"]),
        ("19650@es1;14650@192.0.2.2", ["es1:19650", "192.0.2.2:14650"]),
        (" 27000@a ; 27001@b ;", ["a:27000", "b:27001"]),
        ("@a;27005@b", [*(f"a:{port}" for port in DEFAULT_PORTS), "b:27005"]),
    ],
)
def test_addresses_as_ebo_and_flexnet_write_them(address: str, targets: list[str]) -> None:
    client = LicenseClient(address)
    assert client.settings.targets == targets
    assert client.address == address


@pytest.mark.parametrize(
    "address",
    [
        "",
        "   ",
        ";",
        " ; ; ",
        "localhost",
        "27000",
        "27000:localhost",
        "localhost:27000",
        "@",
        "27000@",
        "abc@localhost",
        "0@localhost",
        "65536@localhost",
        "-1@localhost",
        "\uff12\uff17\uff10\uff10\uff10@localhost",  # full-width digits
        "@bad host",
        "@-leading-dash",
        "@host;nonsense",
        "27000@localhost@other",
    ],
)
def test_an_invalid_address_is_refused_before_any_network_call(address: str) -> None:
    # The constructor refuses it: there is no loop, no channel, nothing to connect yet.
    with pytest.raises(InvalidLicenseServerConfiguration) as refused:
        LicenseClient(address)
    assert str(refused.value).startswith("Invalid license server configuration")
    assert refused.value.reason == "INVALID_LICENSE_SERVER_ADDRESS"
    assert isinstance(refused.value, LicenseError)
    assert isinstance(refused.value, InvalidLicenseServerAddress)
    with pytest.raises(InvalidLicenseServerConfiguration):
        SyncLicenseClient(address)  # no thread started either


STATUSES: list[tuple[Code, str, type[LicenseError]]] = [
    (Code.RESOURCE_EXHAUSTED, "NO_SEAT_AVAILABLE", NoSeatAvailable),
    (Code.RESOURCE_EXHAUSTED, "QUEUE_TIMEOUT", QueueTimeout),
    (Code.NOT_FOUND, "FEATURE_NOT_LICENSED", FeatureNotLicensed),
    (Code.FAILED_PRECONDITION, "COUNT_ABOVE_ACTIVATED", CountAboveActivated),
    (Code.FAILED_PRECONDITION, "TRUSTED_STORAGE_BROKEN", TrustedStorageBroken),
    (Code.FAILED_PRECONDITION, "CERTIFICATE_SUPERSEDED", LicenseWithdrawn),
    (Code.FAILED_PRECONDITION, "CHECK_IN_OVERDUE", LicenseWithdrawn),
    (Code.INVALID_ARGUMENT, "INVALID_INPUT", InvalidLicenseRequest),
    (Code.INVALID_ARGUMENT, "MALFORMED_REQUEST", InvalidLicenseRequest),
    (Code.FAILED_PRECONDITION, "LEASE_PROTOCOL_VIOLATION", InvalidLicenseRequest),
    (Code.UNAVAILABLE, "SERVER_SHUTTING_DOWN", LicenseServerUnreachable),
    (Code.UNAVAILABLE, "PEER_UNAVAILABLE", LicenseServerUnreachable),
    (Code.FAILED_PRECONDITION, "LEASE_EXPIRED", LeaseExpired),
    (Code.FAILED_PRECONDITION, "LEASE_RELEASED", LeaseRevoked),
    (Code.NOT_FOUND, "LEASE_NOT_FOUND", LeaseRevoked),
    (Code.FAILED_PRECONDITION, "LEASE_RESUMED_ELSEWHERE", LeaseRevoked),
    (Code.FAILED_PRECONDITION, "REVOKED_BY_OPERATOR", LeaseRevoked),
    (Code.FAILED_PRECONDITION, "LICENSE_EXPIRED", LeaseRevoked),
    (Code.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS", LicenseServerBusy),
    (Code.RESOURCE_EXHAUSTED, "ACQUIRE_RATE_EXCEEDED", LicenseServerBusy),
    (Code.DEADLINE_EXCEEDED, "CALL_DEADLINE_EXCEEDED", LicenseServerBusy),
    (Code.DEADLINE_EXCEEDED, "LEASE_STREAM_IDLE", LicenseServerBusy),
    # No reason the client knows: the status code decides.
    (Code.RESOURCE_EXHAUSTED, "", NoSeatAvailable),
    (Code.UNAVAILABLE, "", LicenseServerUnreachable),
    (Code.DEADLINE_EXCEEDED, "", LicenseServerUnreachable),
    (Code.UNAUTHENTICATED, "MISSING_CREDENTIAL", LicensePermissionDenied),
    (Code.PERMISSION_DENIED, "", LicensePermissionDenied),
    (Code.INVALID_ARGUMENT, "SOMETHING_NEW", InvalidLicenseRequest),
    (Code.INTERNAL, "INTERNAL", LicenseError),
]


class AnsweringLeaseService(pb_grpc.LeaseServiceServicer):
    """Answers GetLicenseInformation with the status named by its ``feature`` field."""

    async def GetLicenseInformation(
        self, request: pb.GetLicenseInformationRequest, context: Any
    ) -> pb.GetLicenseInformationResponse:
        code_name, _, reason = request.feature.partition("/")
        await context.abort_with_status(
            rich_status(
                Code[code_name], f"said with {reason or 'no reason'}", reason, "test", {"k": "v"}
            )
        )
        raise AssertionError("unreachable")


@pytest.fixture
async def answering() -> AsyncIterator[int]:
    server = grpc.aio.server()
    pb_grpc.add_LeaseServiceServicer_to_server(AnsweringLeaseService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(0)


async def test_each_status_maps_to_its_exception_once(answering: int) -> None:
    target = f"127.0.0.1:{answering}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LeaseServiceStub(channel)
        for code, reason, cls in STATUSES:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.GetLicenseInformation(
                    pb.GetLicenseInformationRequest(feature=f"{code.name}/{reason}")
                )
            error = error_from_rpc(failed.value, target)
            assert type(error) is cls, (code, reason)
            assert (error.code, error.reason, error.server) == (code, reason, target)
            assert error.message == f"said with {reason or 'no reason'}"
            assert error.metadata == {"k": "v"}
            assert reason in str(error) and target in str(error)


async def test_the_client_raises_the_mapped_exception(answering: int) -> None:
    # The client's own unary path goes through the same table.
    client = LicenseClient(f"{answering}@127.0.0.1")
    with pytest.raises(TrustedStorageBroken) as broken:
        await client.license_information("FAILED_PRECONDITION/TRUSTED_STORAGE_BROKEN")
    assert broken.value.code is Code.FAILED_PRECONDITION


def test_the_hierarchy_says_what_to_do() -> None:
    for cls in (NoSeatAvailable, FeatureNotLicensed, CountAboveActivated, TrustedStorageBroken):
        assert issubclass(cls, LicenseRefused)
    assert issubclass(QueueTimeout, NoSeatAvailable)
    assert issubclass(LeaseRevoked, LicenseLost) and issubclass(LeaseExpired, LicenseLost)


@pytest.mark.parametrize(
    ("reason", "cls"),
    [
        ("REVOKED_BY_OPERATOR", LeaseRevoked),
        ("LICENSE_RETURNED", LeaseRevoked),
        ("LICENSE_EXPIRED", LeaseRevoked),
        ("TRUSTED_STORAGE_BROKEN", LeaseRevoked),
        ("LEASE_RESUMED_ELSEWHERE", LeaseRevoked),
        ("LEASE_EXPIRED", LeaseExpired),
        ("SOMETHING_NEW", LeaseRevoked),
    ],
)
def test_a_pushed_revocation_is_a_loss_with_the_servers_reason(
    reason: str, cls: type[LicenseLost]
) -> None:
    error = error_from_revocation(reason, "told on the stream", "127.0.0.1:27000")
    assert type(error) is cls
    assert (error.reason, error.message, error.code) == (reason, "told on the stream", None)


def test_resume_backoff_is_jittered_from_the_first_attempt_and_capped() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0)
    assert [backoff.ceiling(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    rng = random.Random(7)
    for attempt in range(8):
        delays = {backoff.delay(attempt, rng) for _ in range(200)}
        assert all(0 <= delay <= backoff.ceiling(attempt) for delay in delays)
        assert len(delays) == 200  # spread out, not one instant for every client
    first = [backoff.delay(0, rng) for _ in range(1000)]
    assert min(first) < 0.05 and max(first) > 0.45  # even the first resume waits at random
    with pytest.raises(ValueError):
        Backoff(initial=0)
