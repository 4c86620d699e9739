"""Serving plumbing shared by the three services: health, reflection, graceful stop.

Every service serves ``grpc.health.v1`` and server reflection, so grpcurl, ``buf curl``
and Kubernetes gRPC probes work without our stubs. SIGTERM and SIGINT stop the service
gracefully: health turns NOT_SERVING, new calls are refused, in-flight calls get a grace
period, then the service's own cleanup (streams told, database closed) runs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tessera.config import CommonSettings
from tessera.rpc import MalformedRequestGuard

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class Endpoint:
    """A grpc.aio server with health and reflection for the given service names."""

    def __init__(
        self,
        service_names: Iterable[str],
        error_domain: str,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.server = grpc.aio.server(
            # The guard goes last: it caches per method what lies behind it.
            interceptors=[*interceptors, MalformedRequestGuard(error_domain)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.health = health.aio.HealthServicer()
        self.service_names = list(service_names)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )

    def bind(self, listen: str) -> int:
        """Listen on ``host:port`` (plaintext); returns the bound port (useful with port 0)."""
        port: int = self.server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        return port

    async def start(self) -> None:
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(
        self, grace: float, before_grace: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Refuse new work, let in-flight calls finish within ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        if before_grace is not None:
            await before_grace()
        await self.server.stop(grace)


async def wait_for_stop_signal() -> None:
    """Return when the process gets SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    log.info("stop signal received; stopping gracefully")


def configure_logging(level: str) -> None:
    """Plain, timestamped log lines on stderr."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


async def is_serving(target: str, deadline: float = 1.0) -> bool:
    """Whether the service at ``target`` answers grpc.health.v1 Check with SERVING."""
    async with grpc.aio.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            reply = await check(health_pb2.HealthCheckRequest(), timeout=deadline)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class _Settings(Protocol):
    @property
    def common(self) -> CommonSettings: ...


class _Service(Protocol):
    async def stop(self, grace: float) -> None: ...


SettingsT = TypeVar("SettingsT", bound=_Settings)


def run_service(
    load_settings: Callable[[], SettingsT],
    build: Callable[[SettingsT], Awaitable[_Service]],
) -> None:
    """A service's ``__main__``: settings -> logging -> build -> serve until SIGTERM."""

    async def main() -> None:
        settings = load_settings()
        configure_logging(settings.common.log_level)
        service = await build(settings)
        await wait_for_stop_signal()
        await service.stop(settings.common.shutdown_grace)

    asyncio.run(main())
