"""What every gRPC call leaves behind: a request id, a latency observation, a debug line.

``CallObserver`` is the outermost handler wrapper of every service. For each call it
takes the caller's ``x-request-id`` metadata (or makes one), puts it in the context
variable that log records read (``tessera.server.logs``), and echoes it in the trailing
metadata of every answer (errors included, see ``tessera.server.handlers.abort``) and,
for response streams, in the initial metadata as well, so a stream's holder knows it
from the start. When the call ends it observes the whole call's duration, streams
included, in ``tessera_rpc_duration_seconds`` by service, method and status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Histogram

from tessera.server.handlers import HandlerWrapper, behaviour_of, rebuilt
from tessera.server.logs import request_id_var, stamp_request_ids

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Accepted from callers as it is; anything else is replaced by an id of our own, so what
# reaches the logs is never a caller's arbitrary text.
_ACCEPTABLE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# From a fast unary call to a lease stream held for hours.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    14400.0,
    86400.0,
)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]


# Ids made here: 32 hex digits, random per process, then counting (every call without
# one of its own gets one, so they cost a counter step rather than a random draw each).
_OUR_IDS = itertools.count(secrets.randbits(64) << 64)


def request_id_of(context: Context) -> str:
    """The caller's request id if it sent an acceptable one, else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _ACCEPTABLE_ID.fullmatch(value):
            return value
    return f"{next(_OUR_IDS):032x}"


class _MethodObserver:
    """The latency children of one method, by status code (labels() looked up once)."""

    def __init__(self, histogram: Histogram, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.full_method = full_method
        self._histogram = histogram
        self._labels = (service, method)
        self._children: dict[grpc.StatusCode, Histogram] = {}

    def begin(self, context: Context) -> str:
        request_id = request_id_of(context)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        return request_id

    def end(self, code: grpc.StatusCode, started: float) -> None:
        elapsed = time.perf_counter() - started
        child = self._children.get(code)
        if child is None:
            child = self._histogram.labels(*self._labels, code.name)
            self._children[code] = child
        child.observe(elapsed)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s in %.1f ms", self.full_method, code.name, elapsed * 1000)


def _code_after(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The status the call ended with, as grpc.aio will send it."""
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code: grpc.StatusCode | None = context.code()
    if code is not None:
        return code
    if error is None:
        return grpc.StatusCode.OK
    return grpc.StatusCode.UNKNOWN


class CallObserver(HandlerWrapper):
    """Request ids, latency histograms and debug lines for every call of a server."""

    def __init__(self, registry: CollectorRegistry) -> None:
        stamp_request_ids()
        self.duration = Histogram(
            "tessera_rpc_duration_seconds",
            "Duration of gRPC calls handled, whole streams included, by method and status",
            ["grpc_service", "grpc_method", "grpc_code"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )

    def wrap(self, method: str, handler: Handler) -> Handler:
        return _wrap(handler, _MethodObserver(self.duration, method))


def _wrap(handler: Handler, observer: _MethodObserver) -> Handler:
    behaviour = behaviour_of(handler)
    if handler.response_streaming:
        return rebuilt(handler, _observed_stream(behaviour, observer))
    return rebuilt(handler, _observed_unary(behaviour, observer))


def _observed_unary(behaviour: Any, observer: _MethodObserver) -> Any:
    """A unary-response behaviour (a coroutine function on grpc.aio), observed."""
    if not inspect.iscoroutinefunction(behaviour):
        return behaviour  # a synchronous behaviour runs in a thread: left as it is

    async def observed(request: Any, context: Context) -> Any:
        started = time.perf_counter()
        token = request_id_var.set(observer.begin(context))
        error: BaseException | None = None
        try:
            return await behaviour(request, context)
        except BaseException as raised:
            error = raised
            raise
        finally:
            observer.end(_code_after(context, error), started)
            request_id_var.reset(token)

    return observed


def _observed_stream(behaviour: Any, observer: _MethodObserver) -> Any:
    """A response-streaming behaviour, observed over the whole stream: an async generator
    or a coroutine that writes with ``context.write`` (both are allowed on grpc.aio)."""
    if inspect.isasyncgenfunction(behaviour):

        async def observed_generator(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            request_id = observer.begin(context)
            token = request_id_var.set(request_id)
            error: BaseException | None = None
            try:
                await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
                async for response in behaviour(request, context):
                    yield response
            except BaseException as raised:
                error = raised
                raise
            finally:
                observer.end(_code_after(context, error), started)
                # A generator closed by the garbage collector runs in another context.
                with contextlib.suppress(ValueError):
                    request_id_var.reset(token)

        return observed_generator
    if inspect.iscoroutinefunction(behaviour):

        async def observed_writer(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            request_id = observer.begin(context)
            token = request_id_var.set(request_id)
            error: BaseException | None = None
            try:
                await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
                return await behaviour(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                observer.end(_code_after(context, error), started)
                request_id_var.reset(token)

        return observed_writer
    return behaviour  # pragma: no cover  (synchronous generators: not on our servers)
