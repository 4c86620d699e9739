"""What the Administrator refuses, and why. Status codes are in ``../errors.py``."""

from __future__ import annotations

from collections.abc import Mapping

from tessera.errors import DomainError, PeerRefused


class OperationIdReused(DomainError):
    """An operation id came back with different parameters: not a retry, a conflict."""

    reason = "OPERATION_ID_REUSED"


class OperationHostChanged(DomainError):
    """The address of a journaled operation now answers with another License Server."""

    reason = "OPERATION_HOST_CHANGED"


class OperationNotFound(DomainError):
    """No journaled operation has this id."""

    reason = "OPERATION_NOT_FOUND"


class CertificateNotFound(DomainError):
    """The License Server holds no certificate with this id."""

    reason = "CERTIFICATE_NOT_FOUND"


class SameLicenseServer(DomainError):
    """A move whose source and target are the same License Server."""

    reason = "SAME_LICENSE_SERVER"


class ResponseForAnotherHost(DomainError):
    """A response file answers a request of another License Server than this one."""

    reason = "CERTIFICATE_FOR_ANOTHER_HOST"


class ResponseMismatch(DomainError):
    """A response file does not answer the journaled operation it names."""

    reason = "RESPONSE_MISMATCH"


class VendorRefused(PeerRefused):
    """The vendor's earlier decision against a journaled operation, told again when the
    operation is run again: its own status code, reason and message."""

    status_name = "FAILED_PRECONDITION"

    def __init__(self, status_name: str, reason: str, message: str, operation_id: str) -> None:
        DomainError.__init__(
            self, message, metadata={"peer": "Activation Server", "operation_id": operation_id}
        )
        self.status_name = status_name
        self.reason = reason


class ReturnRefused(DomainError):
    """The vendor's signed receipt refused a return (e.g. PARTIAL_RETURN_NOT_ALLOWED,
    CERTIFICATE_NOT_HELD, STALE_REVISION); the withheld seats serve again."""

    reason = "RETURN_REFUSED"

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str]) -> None:
        super().__init__(message, metadata=metadata)
        if reason:
            self.reason = reason


class ReturnLimitReached(ReturnRefused):
    """The vendor refused a return because the certificate was returned too often."""

    reason = "RETURN_LIMIT_REACHED"


class FileRefused(DomainError):
    """A request or response file that cannot be used; the message says why."""

    reason = "INVALID_FILE"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", metadata={"field": field})
        self.field = field


class NotATesseraFile(FileRefused):
    """Not a Tessera file at all: no armour, or not text."""

    reason = "NOT_A_TESSERA_FILE"


class WrongFileType(FileRefused):
    """A response file where a request file belongs, or the other way round."""

    reason = "WRONG_FILE_TYPE"


class DamagedFile(FileRefused):
    """The armour is there but its content was cut, altered or does not parse."""

    reason = "DAMAGED_FILE"


class UnsupportedFileVersion(FileRefused):
    """A file written in a layout this Administrator does not know."""

    reason = "UNSUPPORTED_FILE_VERSION"


class FileTooLarge(FileRefused):
    """Far larger than any request or response file; refused before reading."""

    reason = "FILE_TOO_LARGE"
