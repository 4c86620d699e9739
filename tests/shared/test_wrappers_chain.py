"""The handler wrappers as a chain: one helper rebuilds a handler of any kind, and the
error table is one of the wrappers, inside the call observer (whose histogram then counts
the status the caller gets) and inside access control (whose refusals keep their own)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import CollectorRegistry

from services.license_server import errors as license_errors
from services.license_server.domain.errors import LeaseNotFound, LeaseProtocolViolation
from tessera.auth import bearer_metadata
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc
from tessera.rpc import reason_of
from tessera.server.auth import AccessControl, Credentials, Role
from tessera.server.call_observer import CallObserver
from tessera.server.error_table import ErrorTranslation
from tessera.server.handlers import HandlerWrapper, ServiceRegistrar, behaviour_of, rebuilt

OPERATOR_TOKEN = "operator-token-for-the-chain"


def serialize(message: Any) -> bytes:
    return bytes(message)


def deserialize(data: bytes) -> Any:
    return data


async def behaviour(request: Any, context: Any) -> Any:
    return request


@pytest.mark.parametrize(
    "make",
    [
        grpc.unary_unary_rpc_method_handler,
        grpc.unary_stream_rpc_method_handler,
        grpc.stream_unary_rpc_method_handler,
        grpc.stream_stream_rpc_method_handler,
    ],
)
def test_a_rebuilt_handler_keeps_its_kind_and_serializers(make: Any) -> None:
    handler = make(behaviour, request_deserializer=deserialize, response_serializer=serialize)

    async def other(request: Any, context: Any) -> Any:
        return None

    new = rebuilt(handler, other)
    assert (new.request_streaming, new.response_streaming) == (
        handler.request_streaming,
        handler.response_streaming,
    )
    assert behaviour_of(handler) is behaviour and behaviour_of(new) is other
    assert new.request_deserializer is deserialize
    assert new.response_serializer is serialize
    assert rebuilt(handler, other, request_deserializer=None).request_deserializer is None


def test_a_wrapper_leaves_a_handler_alone_unless_it_says_otherwise() -> None:
    handler = grpc.unary_unary_rpc_method_handler(behaviour)
    assert HandlerWrapper().wrap("/tessera.x.v1.S/M", handler) is handler


def test_only_tesseras_own_services_are_translated() -> None:
    translation = ErrorTranslation(license_errors.ERRORS)
    handler = grpc.unary_unary_rpc_method_handler(behaviour)
    assert translation.wrap("/grpc.health.v1.Health/Check", handler) is handler
    assert (
        translation.wrap("/tessera.license.v1.LeaseAdminService/ListLeases", handler) is not handler
    )


class LeaseAdmin(pb_grpc.LeaseAdminServiceServicer):
    async def ListLeases(
        self, request: pb.ListLeasesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListLeasesResponse:
        if request.feature == "unexpected":
            raise RuntimeError("a bug, with internals in its message")
        raise LeaseNotFound("no lease with this id and secret")


class LeaseStream(pb_grpc.LeaseServiceServicer):
    async def Lease(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.LeaseRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        async for _ in request_iterator:
            raise LeaseProtocolViolation("a first message must acquire a lease")


@pytest.fixture
async def chain() -> AsyncIterator[tuple[int, CollectorRegistry]]:
    registry = CollectorRegistry()
    credentials = Credentials().with_token(OPERATOR_TOKEN, Role.OPERATOR, "operator")
    server = grpc.aio.server()
    registrar = ServiceRegistrar(
        server,
        [
            CallObserver(registry),
            AccessControl(credentials, license_errors.ERRORS),
            ErrorTranslation(license_errors.ERRORS),
        ],
    )
    registrar.add_servicer(pb_grpc.add_LeaseAdminServiceServicer_to_server, LeaseAdmin())
    registrar.add_servicer(pb_grpc.add_LeaseServiceServicer_to_server, LeaseStream())
    registrar.add_servicer(
        health_pb2_grpc.add_HealthServicer_to_server, health.aio.HealthServicer()
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port, registry
    await server.stop(0)


def observed(registry: CollectorRegistry, method: str, code: str) -> float:
    value = registry.get_sample_value(
        "tessera_rpc_duration_seconds_count",
        {"grpc_service": method.rpartition("/")[0], "grpc_method": method.rpartition("/")[2],
         "grpc_code": code},
    )  # fmt: skip
    return value or 0.0


async def test_errors_are_translated_inside_the_observer_and_access_control(
    chain: tuple[int, CollectorRegistry],
) -> None:
    port, registry = chain
    method = "tessera.license.v1.LeaseAdminService/ListLeases"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.LeaseAdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListLeases(pb.ListLeasesRequest())
        # Access control's refusal, not the servicer's error: it never ran.
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(refused.value) == "CREDENTIAL_MISSING"

        operator = bearer_metadata(OPERATOR_TOKEN)
        with pytest.raises(grpc.aio.AioRpcError) as not_found:
            await stub.ListLeases(pb.ListLeasesRequest(), metadata=operator)
        assert not_found.value.code() is grpc.StatusCode.NOT_FOUND
        assert reason_of(not_found.value) == "LEASE_NOT_FOUND"

        with pytest.raises(grpc.aio.AioRpcError) as internal:
            await stub.ListLeases(pb.ListLeasesRequest(feature="unexpected"), metadata=operator)
        assert internal.value.code() is grpc.StatusCode.INTERNAL
        assert internal.value.details() == "internal error"

        stream = pb_grpc.LeaseServiceStub(channel).Lease()
        await stream.write(pb.LeaseRequest())
        with pytest.raises(grpc.aio.AioRpcError) as violated:
            await stream.read()
        assert violated.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(violated.value) == "LEASE_PROTOCOL_VIOLATION"

    assert observed(registry, method, "UNAUTHENTICATED") == 1
    assert observed(registry, method, "NOT_FOUND") == 1
    assert observed(registry, method, "INTERNAL") == 1
    assert observed(registry, "tessera.license.v1.LeaseService/Lease", "FAILED_PRECONDITION") == 1
    assert observed(registry, method, "UNKNOWN") == 0
