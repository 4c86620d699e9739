"""The handler wrappers every call of a Tessera server goes through, and the registrar that
applies them (``HandlerWrapper`` says why they replace grpc.aio interceptors).

Each wrapper is one concern (the call observer, access control, the error table, the
call deadline, the malformed-request guard); ``rebuilt`` is the one place a wrapper
builds a handler, so every wrapper keeps the handler's kind and (de)serializers alike.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import grpc

from tessera.errors import MalformedRequest
from tessera.rpc import rich_status

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]


ServicerT = TypeVar("ServicerT")


async def abort(context: Context, status: grpc.Status) -> NoReturn:
    """End the call with ``status``, keeping the trailing metadata set earlier in the call
    (the request id): grpc.aio's own ``abort_with_status`` would replace it."""
    earlier = tuple(context.trailing_metadata() or ())
    await context.abort(status.code, status.details, (*earlier, *status.trailing_metadata))
    raise AssertionError("abort returned")  # pragma: no cover


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
TESSERA_METHODS = "/tessera."


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
            if not method.startswith(TESSERA_METHODS):
                stream = _answering_malformed(stream, malformed)
            return rebuilt(
                handler,
                stream,
                request_deserializer=_parsing(handler.request_deserializer, _refuse_stream_message),
            )
        return handler
