"""Bearer credentials for vendor-staff and operator RPCs.

A protected method needs ``authorization: Bearer <token>`` metadata. Tokens are compared
as SHA-256 digests in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from tessera.keys import read_private_file
from tessera.rpc import abort, rich_status


def load_or_create_token(path: Path) -> tuple[str, bool]:
    """The token stored at ``path`` (mode 0600), created when missing. An existing file
    that group or others can read is refused (InsecureKeyFile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_private_file(path, "token").decode().strip(), False
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token, True


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the protected services unless they carry the right bearer token."""

    def __init__(self, token: str, protected_services: Iterable[str], domain: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()
        self._prefixes = tuple(f"/{name}/" for name in protected_services)
        self._domain = domain

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        if not method.startswith(self._prefixes):
            return await continuation(handler_call_details)
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                presented = value
        scheme, _, token = presented.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return self._refuse("CREDENTIAL_MISSING", "this call needs a bearer credential")
        if not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._digest):
            return self._refuse("CREDENTIAL_INVALID", "the bearer credential is not valid")
        return await continuation(handler_call_details)

    def _refuse(self, reason: str, message: str) -> grpc.RpcMethodHandler[Any, None]:
        status = rich_status(grpc.StatusCode.UNAUTHENTICATED, message, reason, self._domain, {})

        async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await abort(context, status)

        return grpc.unary_unary_rpc_method_handler(refuse)
