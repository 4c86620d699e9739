"""The Activation Server's one error table: domain error -> gRPC status code."""

from __future__ import annotations

import grpc

from services.activation_server.domain import errors
from tessera import errors as shared
from tessera.server.error_table import ErrorTable

Code = grpc.StatusCode

ERRORS = ErrorTable(
    domain="tessera.activation",
    table={
        # Credentials and roles (tessera.server.auth), the same in every service.
        shared.CredentialMissing: Code.UNAUTHENTICATED,
        shared.CredentialInvalid: Code.UNAUTHENTICATED,
        shared.RoleNotAllowed: Code.PERMISSION_DENIED,
        errors.HostKeyMismatch: Code.PERMISSION_DENIED,
        errors.UnknownFeature: Code.INVALID_ARGUMENT,
        errors.EntitlementNotFound: Code.NOT_FOUND,
        errors.ActivationIdNotFound: Code.NOT_FOUND,
        errors.NotEnoughSeatsLeft: Code.RESOURCE_EXHAUSTED,
        errors.ActivationLimitReached: Code.RESOURCE_EXHAUSTED,
        errors.LineExpired: Code.FAILED_PRECONDITION,
        errors.LocalLineNotActivatable: Code.FAILED_PRECONDITION,
        errors.NetworkLineNotLocal: Code.FAILED_PRECONDITION,
        errors.RequestIdReused: Code.ALREADY_EXISTS,
        errors.CertificateNotFound: Code.NOT_FOUND,
        errors.CertificateNotHeld: Code.FAILED_PRECONDITION,
        errors.ReturnFromAnotherHost: Code.PERMISSION_DENIED,
        errors.LocalLicenseNotReturnable: Code.FAILED_PRECONDITION,
        errors.LocalLicenseNotRepairable: Code.FAILED_PRECONDITION,
        errors.RepairFromAnotherHost: Code.PERMISSION_DENIED,
        errors.RepairLimitReached: Code.RESOURCE_EXHAUSTED,
    },
)
