"""The client half of credentials: how a caller presents a bearer token.

A call proves its role with ``authorization: Bearer <token>`` metadata
(``bearer_metadata``), or, for every call of a channel, through ``BearerCredentials``.
How servers check credentials is ``tessera.server.auth``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

AUTHORIZATION = "authorization"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


class BearerCredentials(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """A client channel interceptor presenting ``token()`` on every call it makes that
    carries no credential of its own (the token is read per call, so a rotated token
    file is picked up)."""

    def __init__(self, token: Callable[[], str | None]) -> None:
        self._token = token

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = list(details.metadata or ())
        if any(key == AUTHORIZATION for key, _ in metadata):
            return details
        token = self._token()
        if not token:
            return details
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*metadata, *bearer_metadata(token)),
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._with_token(client_call_details), request)

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)
