"""The License Server's one error table: domain error -> gRPC status code."""

from __future__ import annotations

import grpc

from services.license_server.domain import errors
from tessera import errors as shared
from tessera.server.error_table import ErrorTable

Code = grpc.StatusCode

ERRORS = ErrorTable(
    domain="tessera.license",
    table={
        # Credentials and roles (tessera.server.auth), the same in every service.
        shared.CredentialMissing: Code.UNAUTHENTICATED,
        shared.CredentialInvalid: Code.UNAUTHENTICATED,
        shared.RoleNotAllowed: Code.PERMISSION_DENIED,
        errors.FeatureNotLicensed: Code.NOT_FOUND,
        errors.NoSeatAvailable: Code.RESOURCE_EXHAUSTED,
        errors.CountAboveActivated: Code.FAILED_PRECONDITION,
        errors.LeaseNotFound: Code.NOT_FOUND,
        errors.LeaseExpired: Code.FAILED_PRECONDITION,
        errors.LeaseReleased: Code.FAILED_PRECONDITION,
        errors.StaleLeaseEpoch: Code.FAILED_PRECONDITION,
        errors.LeaseProtocolViolation: Code.FAILED_PRECONDITION,
        errors.ServerShuttingDown: Code.UNAVAILABLE,
        errors.QueueTimeout: Code.RESOURCE_EXHAUSTED,
        errors.LeaseRevoked: Code.FAILED_PRECONDITION,
        errors.RequestNotPreparedHere: Code.NOT_FOUND,
        errors.CertificateForAnotherHost: Code.PERMISSION_DENIED,
        errors.CertificateMismatch: Code.INVALID_ARGUMENT,
        errors.RequestIdReused: Code.ALREADY_EXISTS,
        errors.RepairFromAnotherHost: Code.PERMISSION_DENIED,
        errors.SeatsInUse: Code.FAILED_PRECONDITION,
        errors.CertificateNotFound: Code.NOT_FOUND,
        errors.CertificateReturned: Code.FAILED_PRECONDITION,
        errors.ReturnInProgress: Code.FAILED_PRECONDITION,
        errors.PartialReturnNotAllowed: Code.FAILED_PRECONDITION,
        errors.TrustedStorageBroken: Code.FAILED_PRECONDITION,
        errors.NothingToRepair: Code.FAILED_PRECONDITION,
        errors.AnswerDoesNotMatch: Code.INVALID_ARGUMENT,
        errors.WithdrawnByCheckIn: Code.FAILED_PRECONDITION,
        errors.TooManyStreams: Code.RESOURCE_EXHAUSTED,
        errors.AcquireRateExceeded: Code.RESOURCE_EXHAUSTED,
        errors.LeaseStreamIdle: Code.DEADLINE_EXCEEDED,
    },
)
