"""Serving plumbing shared by the three services: health, reflection, graceful stop,
request ids, metrics.

Every service serves ``grpc.health.v1`` and server reflection (``grpc.reflection.v1`` and
``v1alpha``), so grpcurl, ``buf curl`` and Kubernetes gRPC probes work without our stubs.
Every call is observed (request id, latency histogram; ``tessera.server.call_observer``) and,
with ``--metrics-listen``, the service's registry is served at ``GET /metrics`` on a
port of its own. SIGTERM and SIGINT stop the service gracefully: health turns
NOT_SERVING, new calls are refused, in-flight calls get a grace period, then the
service's own cleanup (streams told, database closed) runs. A service serves TLS (or
mutual TLS) when configured, and plaintext only on loopback unless explicitly allowed
(``tessera.server.tls``); a refused configuration or a private key file others can read stops
it before it serves.

A service never shares its port: gRPC's default SO_REUSEPORT is turned off, so a second
License Server on the same port is refused instead of splitting the clients with the
first, and a port something else holds ends start-up with one line naming the port.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from tessera.keys import InsecureKeyFile, UnreadableKeyFile
from tessera.server import logs
from tessera.server.call_observer import CallObserver
from tessera.server.config import CommonSettings
from tessera.server.deadlines import CallDeadline
from tessera.server.handlers import (
    HandlerWrapper,
    MalformedRequestGuard,
    ServiceRegistrar,
    ServicerT,
)
from tessera.server.metrics import MetricsServer, split_listen
from tessera.server.tls import PlaintextRefused, ServerTls, check_plaintext
from tessera.storage.errors import database_unavailable
from tessera.storage.sqlite_connection import UnsupportedSQLite
from tessera.tls import ClientTls, TlsConfigurationError, open_channel

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Server reflection's stable name. grpcio-reflection ships only v1alpha, whose messages
# are the same on the wire: the same servicer answers both (``_add_reflection_v1``).
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


class Endpoint:
    """A grpc.aio server with health and reflection for the given service names, its
    calls observed into ``registry`` (default: a new one of its own).

    A request larger than ``max_message_bytes`` is refused by grpc itself, before any
    Tessera code runs, with RESOURCE_EXHAUSTED ("received message larger than max");
    a unary call running longer than ``max_call_seconds`` (0: no limit) is cancelled
    with DEADLINE_EXCEEDED / CALL_DEADLINE_EXCEEDED (``tessera.server.deadlines``).

    Every call goes through the handler wrappers
    (``tessera.server.handlers.HandlerWrapper``) in this order, the first outermost: the
    call observer, then the service's ``wrappers`` (its access control, then the
    translation of its error table), then the call deadline and the malformed-request
    guard, then the servicer.
    """

    def __init__(
        self,
        service_names: Iterable[str],
        error_domain: str,
        wrappers: Sequence[HandlerWrapper] = (),
        registry: CollectorRegistry | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_call_seconds: float = 0,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = MetricsServer(self.registry)
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # HTTP/2 bandwidth-delay probing sizes flow-control windows for bulk
                # transfers with PINGs as data arrives. Our messages are small, and on
                # connections carrying thousands of lease streams the probing cost CPU on
                # both ends (docs/performance.md).
                ("grpc.http2.bdp_probe", 0),
                # gRPC sets SO_REUSEPORT by default: a second server on the same port then
                # starts silently and the kernel splits the clients between the two (two
                # trusted storages answering one address). Off, the second bind fails.
                ("grpc.so_reuseport", 0),
            ],
        )
        # Servicers are added with ``add_servicer``, not to the server itself, so every
        # method's handler is wrapped once. The observer goes first, so it sees every call
        # as its caller does (refused credentials and translated errors included). The
        # deadline's and the guard's refusals are aborts, which the error translation
        # outside them passes as they are.
        self._registrar = ServiceRegistrar(
            self._server,
            [
                CallObserver(self.registry),
                *wrappers,
                CallDeadline(max_call_seconds, error_domain),
                MalformedRequestGuard(error_domain),
            ],
        )
        self.health = health.aio.HealthServicer()
        self.service_names = list(service_names)
        self.add_servicer(health_pb2_grpc.add_HealthServicer_to_server, self.health)
        _describe_reflection_v1()
        reflecting = reflection.aio.ReflectionServicer(
            [
                *self.service_names,
                health.SERVICE_NAME,
                REFLECTION_V1_SERVICE,
                reflection.SERVICE_NAME,
            ]
        )
        self.add_servicer(reflection_pb2_grpc.add_ServerReflectionServicer_to_server, reflecting)
        self.add_servicer(_add_reflection_v1, reflecting)

    def add_servicer(
        self, add_to_server: Callable[[ServicerT, grpc.aio.Server], None], servicer: ServicerT
    ) -> None:
        """Serve ``servicer`` (``add_to_server``: its generated ``add_*Servicer_to_server``),
        every method's handler wrapped."""
        self._registrar.add_servicer(add_to_server, servicer)

    def bind(self, listen: str, tls: ServerTls | None = None, allow_plaintext: bool = False) -> int:
        """Listen on ``host:port``, with ``tls`` or else plaintext; returns the bound port
        (useful with port 0). Plaintext off loopback raises PlaintextRefused unless
        ``allow_plaintext``; a port in use (or an address not this host's) raises
        ListenRefused."""
        check_plaintext(listen, tls, allow_plaintext)
        try:
            if tls is not None:
                port: int = self._server.add_secure_port(listen, tls.credentials())
            else:
                port = self._server.add_insecure_port(listen)
        except RuntimeError:  # grpc says only "Failed to bind"; the probe says why
            port = 0
        if port == 0:
            check_listen(listen, "--listen")
            raise ListenRefused(f"cannot listen on {listen}; choose --listen")
        return port

    async def start(self, metrics_listen: str = "") -> None:
        """Serve gRPC and, when ``metrics_listen`` is set, GET /metrics there."""
        if metrics_listen:
            try:
                await self.metrics.start(metrics_listen)
            except OSError as error:
                check_listen(metrics_listen, "--metrics-listen", METRICS_HOLDER)
                raise ListenRefused(
                    f"cannot listen on {metrics_listen}: {error.strerror}; choose --metrics-listen"
                ) from error
        await self._server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    @property
    def metrics_port(self) -> int | None:
        """The port GET /metrics is served on, or None when it is not served."""
        return self.metrics.port

    async def stop(
        self, grace: float, before_grace: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Refuse new work, let in-flight calls finish within ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        if before_grace is not None:
            await before_grace()
        await self._server.stop(grace)
        await self.metrics.stop()


def _add_reflection_v1(
    servicer: reflection.aio.ReflectionServicer, server: grpc.aio.Server
) -> None:
    """Register ``servicer`` as ``grpc.reflection.v1.ServerReflection``, the way generated
    ``add_*Servicer_to_server`` code registers a service (so it is wrapped like the rest)."""
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE, handlers),)
    )
    server.add_registered_method_handlers(REFLECTION_V1_SERVICE, handlers)


def _describe_reflection_v1() -> None:
    """Put ``grpc/reflection/v1/reflection.proto`` in the default descriptor pool, made
    from v1alpha's (same messages, other package), so a client that lists the services
    can also describe v1 reflection itself (``grpcurl describe`` asks for every one)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1_SERVICE)
        return  # already there (a grpcio-reflection that ships v1, or a second Endpoint)
    except KeyError:
        pass
    alpha = reflection_pb2.DESCRIPTOR
    v1 = descriptor_pb2.FileDescriptorProto()
    alpha.CopyToProto(v1)
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = "grpc.reflection.v1"
    v1.ClearField("options")
    old, new = f".{alpha.package}.", ".grpc.reflection.v1."
    for message in v1.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name.removeprefix(old)
    for service in v1.service:
        for method in service.method:
            method.input_type = new + method.input_type.removeprefix(old)
            method.output_type = new + method.output_type.removeprefix(old)
    pool.AddSerializedFile(v1.SerializeToString())


class ListenRefused(Exception):
    """A port this service cannot listen on: another program holds it (no sharing), or
    the address is not this host's."""


# Who may hold a service's port, for the refusal that names it.
PORT_HOLDERS = {
    "license_server": "another License Server or FlexNet's lmgrd?",
    "administrator": "another Administrator?",
    "activation_server": "another Activation Server?",
}
METRICS_HOLDER = "another service or exporter?"
PORT_IN_USE = "in use"


def listen_problem(listen: str) -> str:
    """Why ``listen`` (``host:port``) cannot be listened on: PORT_IN_USE when a socket
    already listens there (whatever its options: this probe asks for no port sharing),
    the system's reason when no address of the host is this machine's, or '' when it
    can (port 0, any free port, always can). ValueError when it is not HOST:PORT."""
    host, port = split_listen(listen)
    if port == 0:
        return ""
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        return str(error.strerror)
    bound, failure = False, "no address"
    for family, kind, protocol, _, address in addresses:
        try:
            with socket.socket(family, kind, protocol) as probe:
                # As gRPC and asyncio do: a port whose old connections linger in
                # TIME_WAIT (a service just restarted) is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return PORT_IN_USE
            failure = str(error.strerror)
        else:
            bound = True
    # One address is enough, as for gRPC: localhost binds 127.0.0.1 with IPv6 off.
    return "" if bound else failure


def check_listen(listen: str, flag: str, holder: str = "another program?") -> None:
    """Raise ListenRefused, naming the port and ``flag`` (the way out), when ``listen``
    cannot be listened on (``listen_problem``)."""
    try:
        problem = listen_problem(listen)
    except ValueError:
        raise ListenRefused(f"{flag} {listen!r} is not HOST:PORT") from None
    if problem == PORT_IN_USE:
        raise ListenRefused(f"port {split_listen(listen)[1]} is in use ({holder}); choose {flag}")
    if problem:
        raise ListenRefused(f"cannot listen on {listen}: {problem}; choose {flag}")


def check_ports(common: CommonSettings) -> None:
    """Before anything is built (keys made, database migrated): refuse a ``--listen`` or
    ``--metrics-listen`` port that is in use (``check_listen``). The bind itself refuses
    too, should something take the port meanwhile."""
    check_listen(common.listen, "--listen", PORT_HOLDERS.get(common.service, "another program?"))
    if common.metrics_listen:
        check_listen(common.metrics_listen, "--metrics-listen", METRICS_HOLDER)


async def wait_for_stop_signal() -> None:
    """Return when the process gets SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    log.info("stop signal received; stopping gracefully")


def configure_logging(level: str, log_format: str = "text", service: str = "") -> None:
    """Timestamped log lines on stderr, as text or JSON (``tessera.server.logs``)."""
    logs.configure_logging(level, log_format, service)


async def is_serving(target: str, deadline: float = 1.0, tls: ClientTls | None = None) -> bool:
    """Whether the service at ``target`` answers grpc.health.v1 Check with SERVING
    (dialled with ``tls``, else plaintext)."""
    async with open_channel(target, tls) as channel:
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


# Net allocations between two collections of the youngest generation (CPython's default
# is 700). A server allocates a few dozen objects per call, and a License Server holding
# 20,000 leases has a million long-lived objects that each older-generation collection
# walks: at the default, collection took a sixth of the heartbeat CPU and put 1.5 s
# pauses into the p99 (docs/performance.md). Garbage in cycles waits a little longer.
YOUNG_COLLECTION_THRESHOLD = 20_000


def tune_garbage_collection() -> None:
    """Once a service is built: move what start-up made (modules, tables, handlers) out
    of the collector's sight for good, and collect the youngest generation less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


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
    """A service's ``__main__``: settings -> logging -> build -> serve until SIGTERM. A
    configuration it refuses (a port in use, a key file others can read or that holds no
    key, plaintext off loopback, an unreadable TLS file, an SQLite library too old or too
    limited for its SQL) ends it with status 2 and one line saying why, without a
    traceback."""

    async def main() -> int:
        settings = load_settings()
        common = settings.common
        configure_logging(common.log_level, common.log_format, common.service)
        try:
            check_ports(common)
            if common.tls is not None:
                common.tls.check()
            service = await build(settings)
        except REFUSALS as refusal:
            log.error("refusing to start: %s", refusal)
            return 2
        except Exception as error:
            failure = start_up_failure(error)
            if failure is None:
                raise  # a bug: its traceback is what helps
            log.error("cannot start: %s", failure)
            return 2
        tune_garbage_collection()
        await wait_for_stop_signal()
        await service.stop(settings.common.shutdown_grace)
        return 0

    sys.exit(asyncio.run(main()))


def start_up_failure(error: Exception) -> str | None:
    """What kept a service from starting, in one line with the way out, when it is the
    machine's or the configuration's doing (a database that cannot be reached, a data
    directory that cannot be made); None for anything else."""
    if isinstance(error, OSError):
        if error.filename:
            return (
                f"{error.filename}: {error.strerror}; check --data-dir (and the other paths "
                "given) and who may write there"
            )
        if not isinstance(error, ConnectionError | socket.gaierror | TimeoutError):
            return None  # not the database connecting: no guess
    unavailable = database_unavailable(error)
    if unavailable is not None:
        return f"{unavailable}; check --database-url and that the database server runs"
    return None


# What stops a service from starting with a message rather than a traceback.
REFUSALS = (
    ListenRefused,
    InsecureKeyFile,
    UnreadableKeyFile,
    PlaintextRefused,
    TlsConfigurationError,
    UnsupportedSQLite,
)
