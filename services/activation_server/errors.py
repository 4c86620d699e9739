"""The Activation Server's one error table: domain error -> gRPC status code."""

from __future__ import annotations

import grpc

from services.activation_server.domain import errors
from tessera import errors as shared
from tessera.rpc import ErrorTable, MalformedRequest

Code = grpc.StatusCode

ERRORS = ErrorTable(
    domain="tessera.activation",
    table={
        shared.InvalidInput: Code.INVALID_ARGUMENT,
        MalformedRequest: Code.INVALID_ARGUMENT,
        shared.WrongPayloadType: Code.INVALID_ARGUMENT,
        shared.MalformedPayload: Code.INVALID_ARGUMENT,
        shared.BadSignature: Code.PERMISSION_DENIED,
        shared.UnknownSigningKey: Code.PERMISSION_DENIED,
        errors.HostKeyMismatch: Code.PERMISSION_DENIED,
        errors.UnknownFeature: Code.INVALID_ARGUMENT,
        errors.EntitlementNotFound: Code.NOT_FOUND,
        errors.ActivationIdNotFound: Code.NOT_FOUND,
        errors.NotEnoughSeatsLeft: Code.RESOURCE_EXHAUSTED,
        errors.LineExpired: Code.FAILED_PRECONDITION,
        errors.LocalLineNotActivatable: Code.FAILED_PRECONDITION,
        errors.RequestIdReused: Code.ALREADY_EXISTS,
    },
)
