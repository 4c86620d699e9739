"""What the License Server refuses, and why. Status codes are in ``../errors.py``."""

from __future__ import annotations

from tessera.errors import DomainError


class FeatureNotLicensed(DomainError):
    """No seats of the feature are activated on this License Server."""

    reason = "FEATURE_NOT_LICENSED"


class NoSeatAvailable(DomainError):
    """Every seat of the feature is in use right now."""

    reason = "NO_SEAT_AVAILABLE"


class CountAboveActivated(DomainError):
    """More seats asked for than are activated at all; waiting will not help."""

    reason = "COUNT_ABOVE_ACTIVATED"


class LeaseNotFound(DomainError):
    """No lease with this id and secret (a wrong secret looks the same: no oracle)."""

    reason = "LEASE_NOT_FOUND"


class LeaseExpired(DomainError):
    """The lease was not heartbeaten within its TTL and its seats were freed."""

    reason = "LEASE_EXPIRED"


class LeaseReleased(DomainError):
    """The lease was checked in already."""

    reason = "LEASE_RELEASED"


class StaleLeaseEpoch(DomainError):
    """The lease was resumed by a newer stream; this one may no longer act on it."""

    reason = "LEASE_RESUMED_ELSEWHERE"


class LeaseProtocolViolation(DomainError):
    """Messages on a lease stream came in an order the protocol does not allow."""

    reason = "LEASE_PROTOCOL_VIOLATION"


class ServerShuttingDown(DomainError):
    """The License Server is stopping; resume the lease after restart or elsewhere."""

    reason = "SERVER_SHUTTING_DOWN"


class RequestNotPreparedHere(DomainError):
    """A vendor answer to a request this License Server never prepared."""

    reason = "REQUEST_NOT_PREPARED_HERE"


class CertificateForAnotherHost(DomainError):
    """A certificate or answer addressed to another License Server."""

    reason = "CERTIFICATE_FOR_ANOTHER_HOST"


class CertificateMismatch(DomainError):
    """The certificate does not match the request it claims to answer."""

    reason = "CERTIFICATE_MISMATCH"


class RequestIdReused(DomainError):
    reason = "REQUEST_ID_REUSED"


class RepairFromAnotherHost(DomainError):
    """A repair of certificates sealed by another host key: only the key they were
    activated with may repair them (the vendor's rule, told before asking it)."""

    reason = "REPAIR_FROM_ANOTHER_HOST"


class QueueTimeout(DomainError):
    """The client waited in the queue as long as it asked and no seat freed."""

    reason = "QUEUE_TIMEOUT"


class LeaseRevoked(DomainError):
    """The lease ended without its holder asking; ``reason`` says why (e.g.
    REVOKED_BY_OPERATOR, LEASE_EXPIRED, LICENSE_EXPIRED, LEASE_RESUMED_ELSEWHERE)."""

    def __init__(self, reason: str, message: str, lease_id: str) -> None:
        super().__init__(message, metadata={"lease_id": lease_id})
        self.reason = reason


class SeatsInUse(DomainError):
    """Leases hold seats that a return would take away; force revokes them."""

    reason = "SEATS_IN_USE"


class CertificateNotFound(DomainError):
    reason = "CERTIFICATE_NOT_FOUND"


class CertificateReturned(DomainError):
    """The certificate was returned to the vendor already."""

    reason = "CERTIFICATE_RETURNED"


class ReturnInProgress(DomainError):
    """Another return of the certificate is under way; complete it first."""

    reason = "RETURN_IN_PROGRESS"


class PartialReturnNotAllowed(DomainError):
    """The certificate returns as a whole (what one activation brought goes together)."""

    reason = "PARTIAL_RETURN_NOT_ALLOWED"


class TrustedStorageBroken(DomainError):
    """Trusted storage belongs to another host or machine, or was tampered with: repair
    it before anything else changes."""

    reason = "TRUSTED_STORAGE_BROKEN"


class NothingToRepair(DomainError):
    """Trusted storage is healthy: a repair would change nothing here but would use one of
    the repairs the vendor allows a year, so it runs only when forced."""

    reason = "NOTHING_TO_REPAIR"


class WithdrawnByCheckIn(DomainError):
    """The feature's seats do not serve because of a check-in with the vendor:
    CERTIFICATE_SUPERSEDED (re-bound to another host by a repair there), LICENSE_NOT_HELD
    (returned or force-returned at the vendor) or CHECK_IN_OVERDUE (no check-in within
    the license's policy; ``tessera check-in`` puts it right)."""

    def __init__(self, reason: str, message: str, feature: str) -> None:
        super().__init__(message, metadata={"feature": feature})
        self.reason = reason


class AnswerDoesNotMatch(DomainError):
    """A vendor answer does not fit the request it claims to answer."""

    reason = "ANSWER_DOES_NOT_MATCH_REQUEST"


class TooManyStreams(DomainError):
    """The client's host has as many lease streams open as one host may
    (``--max-streams-per-host``); close one, or ask again later."""

    reason = "TOO_MANY_STREAMS"


class AcquireRateExceeded(DomainError):
    """The client's host asked for seats faster than one host may (``--acquire-rate``);
    ``retry_after`` says when the next acquire fits."""

    reason = "ACQUIRE_RATE_EXCEEDED"

    def __init__(self, message: str, retry_after: float, host: str) -> None:
        super().__init__(
            message, metadata={"client_address": host, "retry_after_seconds": f"{retry_after:.3f}"}
        )
        self.retry_after = retry_after


class LeaseStreamIdle(DomainError):
    """A lease stream sent no acquire or resume within ``--stream-idle-seconds`` of
    opening; it is closed so that it holds nothing."""

    reason = "LEASE_STREAM_IDLE"
