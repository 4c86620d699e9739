"""The Administrator's one error table: domain error -> gRPC status code.

Refusals by the Activation Server or a License Server pass through with their own
status code and reason (tessera.errors.PeerRefused).
"""

from __future__ import annotations

import grpc

from services.administrator.domain import errors
from tessera.rpc import ErrorTable

Code = grpc.StatusCode

ERRORS = ErrorTable(
    domain="tessera.admin",
    table={
        errors.OperationIdReused: Code.ALREADY_EXISTS,
        errors.OperationHostChanged: Code.FAILED_PRECONDITION,
    },
)
