"""The License Server's one error table: domain error -> gRPC status code."""

from __future__ import annotations

import grpc

from services.license_server.domain import errors
from tessera import errors as shared
from tessera.rpc import ErrorTable, MalformedRequest

Code = grpc.StatusCode

ERRORS = ErrorTable(
    domain="tessera.license",
    table={
        shared.InvalidInput: Code.INVALID_ARGUMENT,
        MalformedRequest: Code.INVALID_ARGUMENT,
        shared.WrongPayloadType: Code.INVALID_ARGUMENT,
        shared.MalformedPayload: Code.INVALID_ARGUMENT,
        shared.BadSignature: Code.PERMISSION_DENIED,
        shared.UnknownSigningKey: Code.PERMISSION_DENIED,
        errors.FeatureNotLicensed: Code.NOT_FOUND,
        errors.NoSeatAvailable: Code.RESOURCE_EXHAUSTED,
        errors.CountAboveActivated: Code.FAILED_PRECONDITION,
        errors.LeaseNotFound: Code.NOT_FOUND,
        errors.LeaseExpired: Code.FAILED_PRECONDITION,
        errors.LeaseReleased: Code.FAILED_PRECONDITION,
        errors.StaleLeaseEpoch: Code.FAILED_PRECONDITION,
        errors.LeaseProtocolViolation: Code.FAILED_PRECONDITION,
        errors.ServerShuttingDown: Code.UNAVAILABLE,
        errors.RequestNotPreparedHere: Code.NOT_FOUND,
        errors.CertificateForAnotherHost: Code.PERMISSION_DENIED,
        errors.CertificateMismatch: Code.INVALID_ARGUMENT,
        errors.RequestIdReused: Code.ALREADY_EXISTS,
    },
)
