"""Domain errors shared by every service.

A domain error says which rule refused a request. Its ``reason`` is a stable,
machine-readable UPPER_SNAKE code that travels to the caller as a ``google.rpc.ErrorInfo``;
each service's ``errors.py`` maps error classes to gRPC status codes in one table.
"""

from __future__ import annotations

from collections.abc import Mapping


class DomainError(Exception):
    """A rule of the domain refused the request; nothing was changed."""

    reason: str = "DOMAIN_ERROR"
    # Seconds after which asking again may succeed (a limit refills); travels to the
    # caller as a google.rpc.RetryInfo.
    retry_after: float | None = None

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidInput(DomainError):
    """A field of the request is missing or malformed."""

    reason = "INVALID_INPUT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", metadata={"field": field})
        self.field = field


class MalformedRequest(DomainError):
    """The request bytes do not parse as the method's request message."""

    reason = "MALFORMED_REQUEST"


class EnvelopeRejected(DomainError):
    """A signed envelope failed verification (bad signature, unknown key, wrong type)."""

    reason = "ENVELOPE_REJECTED"


class UnknownSigningKey(EnvelopeRejected):
    """The envelope names a key id this party does not trust."""

    reason = "UNKNOWN_SIGNING_KEY"


class BadSignature(EnvelopeRejected):
    """The signature does not match the payload: the envelope was altered or forged."""

    reason = "BAD_SIGNATURE"


class WrongPayloadType(EnvelopeRejected):
    """The envelope carries another kind of document than the one expected here."""

    reason = "WRONG_PAYLOAD_TYPE"


class MalformedPayload(EnvelopeRejected):
    """The signature is good but the payload does not parse as the declared document."""

    reason = "MALFORMED_PAYLOAD"


class InvalidLicenseServerAddress(DomainError):
    """EBO's "Invalid license server configuration": the address cannot be parsed."""

    reason = "INVALID_LICENSE_SERVER_ADDRESS"


class CredentialMissing(DomainError):
    """The call needs a credential (bearer token or client certificate) and has none."""

    reason = "CREDENTIAL_MISSING"


class CredentialInvalid(DomainError):
    """The call's credential is not one this service was given."""

    reason = "CREDENTIAL_INVALID"


class RoleNotAllowed(DomainError):
    """The credential is valid, but its role may not call this method."""

    reason = "ROLE_NOT_ALLOWED"


class PeerUnavailable(DomainError):
    """A service this call needs (Activation Server, License Server) cannot be reached."""

    reason = "PEER_UNAVAILABLE"

    def __init__(self, peer: str, address: str, detail: str) -> None:
        super().__init__(
            f"the {peer} at {address} is unavailable: {detail}",
            metadata={"peer": peer, "address": address},
        )


class PeerRefused(DomainError):
    """A peer service refused a call; its status and reason are passed on unchanged."""

    def __init__(
        self, peer: str, status_name: str, reason: str, message: str, metadata: Mapping[str, str]
    ) -> None:
        super().__init__(f"the {peer} refused: {message}", metadata={**metadata, "peer": peer})
        self.status_name = status_name
        self.reason = reason


class CallDeadlineExceeded(DomainError):
    """The call ran longer than the service allows one call (``--max-call-seconds``); it
    was cancelled and its transaction rolled back."""

    reason = "CALL_DEADLINE_EXCEEDED"
