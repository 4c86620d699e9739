"""The error table: domain errors become canonical gRPC codes with a google.rpc.ErrorInfo.

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
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from tessera import errors
from tessera.errors import DomainError, MalformedRequest, PeerRefused
from tessera.rpc import rich_status
from tessera.server.handlers import TESSERA_METHODS, HandlerWrapper, abort, behaviour_of, rebuilt
from tessera.storage.errors import database_unavailable

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]


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
        elif (why := database_unavailable(error)) is not None:
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
        if not method.startswith(TESSERA_METHODS):
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
