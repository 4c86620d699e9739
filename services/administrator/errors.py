"""The Administrator's one error table: domain error -> gRPC status code.

Refusals by the Activation Server or a License Server pass through with their own
status code and reason (tessera.errors.PeerRefused, and VendorRefused when a journaled
refusal is told again).
"""

from __future__ import annotations

import grpc

from services.administrator.domain import errors
from tessera import errors as shared
from tessera.server.error_table import ErrorTable

Code = grpc.StatusCode

ERRORS = ErrorTable(
    domain="tessera.admin",
    table={
        # Credentials and roles (tessera.server.auth), the same in every service.
        shared.CredentialMissing: Code.UNAUTHENTICATED,
        shared.CredentialInvalid: Code.UNAUTHENTICATED,
        shared.RoleNotAllowed: Code.PERMISSION_DENIED,
        errors.OperationIdReused: Code.ALREADY_EXISTS,
        errors.OperationHostChanged: Code.FAILED_PRECONDITION,
        errors.OperationNotFound: Code.NOT_FOUND,
        errors.CertificateNotFound: Code.NOT_FOUND,
        errors.SameLicenseServer: Code.INVALID_ARGUMENT,
        errors.ResponseForAnotherHost: Code.PERMISSION_DENIED,
        errors.ResponseMismatch: Code.INVALID_ARGUMENT,
        errors.ReturnRefused: Code.FAILED_PRECONDITION,
        errors.ReturnLimitReached: Code.RESOURCE_EXHAUSTED,
        errors.FileRefused: Code.INVALID_ARGUMENT,
        errors.NotATesseraFile: Code.INVALID_ARGUMENT,
        errors.WrongFileType: Code.INVALID_ARGUMENT,
        errors.DamagedFile: Code.INVALID_ARGUMENT,
        errors.UnsupportedFileVersion: Code.INVALID_ARGUMENT,
        errors.FileTooLarge: Code.INVALID_ARGUMENT,
    },
)
