"""gRPC status translation: domain errors become canonical codes with a google.rpc.ErrorInfo,
and the handler wrappers every call of a Tessera server goes through.

Each service builds one ``ErrorTable`` from its ``errors.py`` and serves its servicers
through an ``ErrorTranslation`` of it, one of its handler wrappers. A DomainError becomes
its mapped status code with the error's reason; a database that cannot serve now
(read-only, full, restarting) becomes UNAVAILABLE with the reason DATABASE_UNAVAILABLE;
anything else unexpected becomes INTERNAL with a generic message while the traceback goes
to the log, so internals never leak to callers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tessera import errors
from tessera.errors import DomainError, MalformedRequest, PeerRefused

log = logging.getLogger(__name__)

ServicerT = TypeVar("ServicerT")

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    domain: str,
    metadata: Mapping[str, str],
    retry_after: float | None = None,
) -> grpc.Status:
    """A status carrying a google.rpc.ErrorInfo in ``grpc-status-details-bin``, and a
    google.rpc.RetryInfo when ``retry_after`` (seconds) is given."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=dict(metadata))
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, round(retry_after * 1e9)))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    proto = status_pb2.Status(code=code.value[0], message=message, details=details)
    status: grpc.Status = rpc_status.to_status(proto)
    return status


async def abort(context: Context, status: grpc.Status) -> NoReturn:
    """End the call with ``status``, keeping the trailing metadata set earlier in the call
    (the request id): grpc.aio's own ``abort_with_status`` would replace it."""
    earlier = tuple(context.trailing_metadata() or ())
    await context.abort(status.code, status.details, (*earlier, *status.trailing_metadata))
    raise AssertionError("abort returned")  # pragma: no cover


def _database_unavailable(error: Exception) -> str | None:
    # Imported on use: tessera.rpc ships in the client package, which has no database
    # (and no SQLAlchemy); only a server gets here with a database error.
    from tessera.database_errors import database_unavailable

    return database_unavailable(error)


DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"


class ErrorTable:
    """One service's map from domain errors to status codes, applied to its servicers by
    an ``ErrorTranslation`` among its handler wrappers.

    The shared errors every service can meet (bad input, rejected envelopes, malformed
    requests) come first; a service's own table adds its rules' errors.
    """

    def __init__(self, domain: str, table: Mapping[type[DomainError], grpc.StatusCode]) -> None:
        self.domain = domain
        self.table: dict[type[DomainError], grpc.StatusCode] = {
            errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
            MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
            errors.WrongPayloadType: grpc.StatusCode.INVALID_ARGUMENT,
            errors.MalformedPayload: grpc.StatusCode.INVALID_ARGUMENT,
            errors.EnvelopeRejected: grpc.StatusCode.PERMISSION_DENIED,
            errors.BadSignature: grpc.StatusCode.PERMISSION_DENIED,
            errors.UnknownSigningKey: grpc.StatusCode.PERMISSION_DENIED,
            errors.InvalidLicenseServerAddress: grpc.StatusCode.INVALID_ARGUMENT,
            errors.PeerUnavailable: grpc.StatusCode.UNAVAILABLE,
            errors.CallDeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
            **table,
        }

    def code_for(self, error: DomainError) -> grpc.StatusCode:
        """The status code of ``error``: its own class or its nearest mapped base class."""
        return self._mapped_code(error) or grpc.StatusCode.INTERNAL

    def _mapped_code(self, error: DomainError) -> grpc.StatusCode | None:
        if isinstance(error, PeerRefused):
            return grpc.StatusCode[error.status_name]  # the peer's own code, INTERNAL too
        for cls in type(error).__mro__:
            code = self.table.get(cls)
            if code is not None:
                return code
        return None

    async def abort(self, context: Context, error: Exception) -> NoReturn:
        """End the call with the status that ``error`` deserves."""
        if isinstance(error, DomainError):
            code = self._mapped_code(error)
            if code is None:
                log.error("domain error %s has no status code in the table", type(error).__name__)
                code = grpc.StatusCode.INTERNAL
            status = rich_status(
                code, error.message, error.reason, self.domain, error.metadata, error.retry_after
            )
        elif (why := _database_unavailable(error)) is not None:
            log.warning("database unavailable: %s (%s)", why, type(error).__name__)
            status = rich_status(
                grpc.StatusCode.UNAVAILABLE,
                f"the service's database is unavailable: {why}; try again later",
                DATABASE_UNAVAILABLE,
                self.domain,
                {},
            )
        else:
            log.error("unexpected error", exc_info=error)
            status = rich_status(
                grpc.StatusCode.INTERNAL, "internal error", "INTERNAL", self.domain, {}
            )
        await abort(context, status)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo a server attached to a failed call, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The seconds a server's google.rpc.RetryInfo asks the caller to wait, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The machine-readable reason of a failed call, or '' when the server gave none."""
    info = error_info(error)
    return info.reason if info is not None else ""


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _parsing(
    deserializer: Callable[[bytes], Any] | None, unparsable: Callable[[Exception], Any]
) -> Callable[[bytes], Any] | None:
    """``deserializer``, with bytes that do not parse handed to ``unparsable`` (which
    returns a stand-in or raises)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:
            return unparsable(error)

    return deserialize


def _refuse_stream_message(error: Exception) -> Any:
    raise MalformedRequest(
        "a message on the stream does not parse as the request message"
    ) from error


def _answering_malformed(stream: Any, malformed: grpc.Status) -> Any:
    """A stream behaviour that answers MalformedRequest from its reads with ``malformed``."""

    async def answered(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        try:
            async for response in stream(requests, context):
                yield response
        except MalformedRequest:
            await abort(context, malformed)

    return answered


class HandlerWrapper:
    """One concern every call of a server goes through (the call observer, access
    control, the error table, the call deadline, the malformed-request guard), applied by
    wrapping each method's handler once, when its service is registered with a
    ``ServiceRegistrar``.

    This replaces grpc.aio server interceptors. grpc.aio runs every interceptor's
    ``intercept_service`` coroutine on every call, one after the other, only to find the
    call's handler; an interceptor that acts on the call then builds a new handler for
    it, per call; and with any interceptor installed grpc.aio gives up its
    registered-method fast path. A wrapper settles what it needs per method (its access
    rule, its metric labels, its refusal statuses) and builds the wrapped handler once,
    before the first call; a call goes straight to it. Moving our four interceptors to
    wrappers took the cycles phase of ``python -m bench`` from 0.55 to 0.65 x echo on
    SQLite (docs/performance.md, "Handler wrappers instead of server interceptors").

    A subclass overrides ``wrap``: it returns the handler as it is, or
    ``rebuilt(handler, behaviour)`` with a behaviour that calls the handler's own
    (``behaviour_of``), so every wrapper keeps the handler's kind and (de)serializers the
    same way.
    """

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler that serves ``/package.Service/Method`` through this wrapper;
        by default ``handler`` itself."""
        return handler


# grpc's four handler kinds, by (request streaming, response streaming).
_HANDLER_KINDS: Mapping[tuple[bool, bool], Callable[..., Handler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
_SAME_DESERIALIZER: Any = object()


def behaviour_of(handler: Handler) -> Any:
    """The function that serves ``handler``'s calls, whichever of the four kinds it is:
    on grpc.aio a coroutine function or an async generator function (a synchronous one
    for a method a servicer leaves unimplemented)."""
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary


def rebuilt(
    handler: Handler, behaviour: Any, request_deserializer: Any = _SAME_DESERIALIZER
) -> Handler:
    """A handler of ``handler``'s kind and response serializer, its calls served by
    ``behaviour``; its request deserializer too, unless ``request_deserializer`` is
    given. The one place a wrapper builds a handler."""
    make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    if request_deserializer is _SAME_DESERIALIZER:
        request_deserializer = handler.request_deserializer
    return make(
        behaviour,
        request_deserializer=request_deserializer,
        response_serializer=handler.response_serializer,
    )


# Tessera's own services, as opposed to those a server also serves (health, reflection).
_OWN_METHODS = "/tessera."


class ServiceRegistrar:
    """What a generated ``add_*Servicer_to_server`` registers a servicer with: it wraps
    every method's handler with ``wrappers`` (the first outermost) and registers the
    wrapped handlers with ``server``, in place of server interceptors (``HandlerWrapper``
    says why).
    """

    def __init__(self, server: grpc.aio.Server, wrappers: Sequence[HandlerWrapper]) -> None:
        self.server = server
        self.wrappers = list(wrappers)
        # Services of the servicer being added that came only as a generic handler.
        self._unwrapped: list[str] = []

    def add_servicer(
        self, add_to_server: Callable[[ServicerT, grpc.aio.Server], None], servicer: ServicerT
    ) -> None:
        """Serve ``servicer`` through its generated ``add_*Servicer_to_server``, which only
        registers handlers with the server it is given: here, with this registrar."""
        self._unwrapped = []
        add_to_server(servicer, cast(grpc.aio.Server, self))
        if self._unwrapped:
            # Served unwrapped, a service would skip access control: refuse to serve it.
            raise TypeError(
                f"{', '.join(self._unwrapped)} registered only a generic handler; its "
                "methods cannot be wrapped (regenerate its code with grpcio-tools >= 1.62)"
            )

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[Any]) -> None:
        """Generated code registers each service twice, as a generic handler and by its
        methods (``add_registered_method_handlers``): the second is wrapped and serves.
        A service that comes only this way is refused (``add_servicer``)."""
        for handler in generic_rpc_handlers:
            name = handler.service_name() if hasattr(handler, "service_name") else None
            self._unwrapped.append(str(name or handler))

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        if service_name in self._unwrapped:
            self._unwrapped.remove(service_name)
        wrapped = {
            name: self.wrapped(f"/{service_name}/{name}", handler)
            for name, handler in method_handlers.items()
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service_name, wrapped),)
        )
        self.server.add_registered_method_handlers(service_name, wrapped)

    def wrapped(self, method: str, handler: Handler) -> Handler:
        """``handler`` of ``/package.Service/Method`` inside every wrapper."""
        for wrapper in reversed(self.wrappers):
            handler = wrapper.wrap(method, handler)
        return handler


class ErrorTranslation(HandlerWrapper):
    """A service's error table applied to its methods: an exception a method raises ends
    the call with the status the table gives it (``ErrorTable.abort``); an abort (a
    refusal already given its status) passes as it is.

    Only Tessera's own services are translated: health and reflection keep grpc's
    answers. Its place among the wrappers: inside the call observer, whose latency
    histogram then counts the code the caller gets; inside access control, whose
    refusals carry statuses of their own.
    """

    def __init__(self, table: ErrorTable) -> None:
        self.table = table

    def wrap(self, method: str, handler: Handler) -> Handler:
        if not method.startswith(_OWN_METHODS):
            return handler
        behaviour = behaviour_of(handler)
        table = self.table
        if inspect.isasyncgenfunction(behaviour):

            async def translated_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                try:
                    async for response in behaviour(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await table.abort(context, error)

            return rebuilt(handler, translated_stream)
        if not inspect.iscoroutinefunction(behaviour):
            # Synchronous: a method the servicer leaves unimplemented answers UNIMPLEMENTED.
            return handler

        # A unary method, or a streaming one that writes its answers (context.write)
        # and returns once, at the end (the License Server's Lease).
        async def translated(request: Any, context: Context) -> Any:
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await table.abort(context, error)

        return rebuilt(handler, translated)


class MalformedRequestGuard(HandlerWrapper):
    """Turns request bytes that do not parse into INVALID_ARGUMENT / MALFORMED_REQUEST.

    Left alone, grpcio answers UNKNOWN with a Python exception name. The guard wraps each
    method's deserializer once (cached per method): a unary request that does not parse
    reaches the handler as a marker, and the call ends with a clear status before any
    servicer code runs; a stream message that does not parse raises MalformedRequest
    where the handler reads it, for the service's ``ErrorTranslation`` to answer.
    """

    def __init__(self, domain: str) -> None:
        self.domain = domain

    def wrap(self, method: str, handler: Handler) -> Handler:
        malformed = rich_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the request does not parse as the method's request message",
            MalformedRequest.reason,
            self.domain,
            {},
        )
        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary  # an async behaviour on grpc.aio servers

            async def guarded_unary(request: Any, context: Context) -> Any:
                if isinstance(request, _Undecodable):
                    await abort(context, malformed)
                return await unary(request, context)

            return rebuilt(
                handler,
                guarded_unary,
                request_deserializer=_parsing(handler.request_deserializer, _Undecodable),
            )
        if handler.stream_stream is not None:
            # On a stream the deserializer runs inside the handler's own read of the next
            # message, so it can raise the refusal there: our services' error translation
            # turns it into the status, with no wrapper between each message and the
            # handler. Others' streams (server reflection) have none: a wrapper answers.
            stream: Any = handler.stream_stream
            if not method.startswith(_OWN_METHODS):
                stream = _answering_malformed(stream, malformed)
            return rebuilt(
                handler,
                stream,
                request_deserializer=_parsing(handler.request_deserializer, _refuse_stream_message),
            )
        return handler
