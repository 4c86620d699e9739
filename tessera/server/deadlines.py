"""The longest one unary call may run on a service (``--max-call-seconds``).

A call that runs longer is cancelled where it stands: the cancellation unwinds its
``async with`` transaction, which rolls back, so the call changes nothing, and the caller
gets DEADLINE_EXCEEDED / CALL_DEADLINE_EXCEEDED. A caller's own, shorter deadline is
honoured by grpc as always. Streams are left alone: a lease stream lives as long as its
lease, and guards itself against idling (the License Server's ``--stream-idle-seconds``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from tessera.errors import CallDeadlineExceeded
from tessera.rpc import rich_status
from tessera.server.handlers import HandlerWrapper, abort, rebuilt

log = logging.getLogger(__name__)


class CallDeadline(HandlerWrapper):
    """Cancels a unary call after ``seconds`` (0: never)."""

    def __init__(self, seconds: float, domain: str) -> None:
        self.seconds = seconds
        self.domain = domain

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is None or self.seconds <= 0:
            return handler
        unary: Any = handler.unary_unary  # an async behaviour on grpc.aio servers
        seconds = self.seconds
        exceeded = rich_status(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the call ran longer than this service allows one call ({seconds:g} s) and was "
            "cancelled; nothing was changed",
            CallDeadlineExceeded.reason,
            self.domain,
            {"max_call_seconds": f"{seconds:g}"},
        )

        async def bounded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            limit = asyncio.timeout(seconds)
            try:
                async with limit:
                    return await unary(request, context)
            except TimeoutError:
                if not limit.expired():
                    raise
                log.warning("%s ran longer than %g s and was cancelled", method, seconds)
                await abort(context, exceeded)

        return rebuilt(handler, bounded)
