"""What can go wrong for a licensed client, as exceptions, mapped from gRPC in one place.

Every failure the client library raises is a :class:`LicenseError`. It carries the
License Server's machine-readable ``reason`` (the ``google.rpc.ErrorInfo`` reason, e.g.
``NO_SEAT_AVAILABLE``), its ``message``, the gRPC status ``code`` and the ``server``
(``host:port``) that said so. The functions at the end, over the one REASONS table, are
the only places that turn statuses and pushed messages into these classes::

    LicenseError
    ├── InvalidLicenseServerConfiguration   unparsable or empty address (before any call)
    ├── LicenseServerUnreachable            no License Server of the address answers
    ├── LicenseRefused                      a License Server answered no
    │   ├── NoSeatAvailable                 every seat is in use
    │   │   └── QueueTimeout                waited in the queue, no seat freed in time
    │   ├── FeatureNotLicensed              no seats of the feature are activated there
    │   ├── CountAboveActivated             more seats asked for than are activated at all
    │   ├── TrustedStorageBroken            trusted storage needs a repair first
    │   ├── LicenseWithdrawn                a check-in with the vendor withdrew the seats
    │   ├── InvalidLicenseRequest           a field of the request is malformed
    │   ├── LicensePermissionDenied         the call needs a credential
    │   └── LicenseServerBusy               a per-client limit: ask again after a pause
    ├── LicenseLost                         a license the client held is gone
    │   ├── LeaseRevoked                    taken away (operator, return, expiry of the
    │   │                                   license, trust broken, resumed elsewhere)
    │   ├── LeaseExpired                    no heartbeat got through within the TTL
    │   └── LocalLicenseExpired             a node-locked license ran out
    └── NoLicense                           start-up rule: neither local nor network license
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

from tessera.errors import InvalidLicenseServerAddress
from tessera.rpc import error_info


class LicenseError(Exception):
    """A license could not be had or kept. ``reason`` is the License Server's
    machine-readable reason ('' when it gave none), ``code`` the gRPC status (None when
    the failure was found on this side), ``server`` the ``host:port`` that answered."""

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        code: grpc.StatusCode | None = None,
        server: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.code = code
        self.server = server
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        where = f" ({self.server})" if self.server else ""
        why = f"{self.reason}: " if self.reason else ""
        return f"{why}{self.message}{where}"


class InvalidLicenseServerConfiguration(LicenseError, InvalidLicenseServerAddress):
    """EBO's alarm "Invalid license server configuration": the address is empty or
    cannot be parsed. Raised by the client's constructor, before any network call."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=InvalidLicenseServerAddress.reason)

    def __str__(self) -> str:
        return self.message


class LicenseServerUnreachable(LicenseError):
    """No License Server of the address answered (down, wrong port, shutting down, or
    not answering within the timeout). ``attempts`` says what each target answered."""

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        code: grpc.StatusCode | None = grpc.StatusCode.UNAVAILABLE,
        server: str = "",
        metadata: Mapping[str, str] | None = None,
        attempts: Sequence[str] = (),
    ) -> None:
        super().__init__(message, reason=reason, code=code, server=server, metadata=metadata)
        self.attempts = tuple(attempts)


class LicenseRefused(LicenseError):
    """A License Server answered and refused; asking again later may or may not help
    (see the subclass)."""


class NoSeatAvailable(LicenseRefused):
    """Every seat of the feature is in use (RESOURCE_EXHAUSTED / NO_SEAT_AVAILABLE)."""


class QueueTimeout(NoSeatAvailable):
    """The client waited in the feature's queue as long as it asked; no seat freed."""


class FeatureNotLicensed(LicenseRefused):
    """No seats of the feature are activated on the License Server (NOT_FOUND)."""


class CountAboveActivated(LicenseRefused):
    """More seats asked for than are activated at all; waiting will not help."""


class TrustedStorageBroken(LicenseRefused):
    """The License Server's trusted storage broke (copied database, restored backup,
    clock set back, changed machine): its operator must repair it."""


class LicenseWithdrawn(LicenseRefused):
    """A check-in with the vendor withdrew the feature's seats (FAILED_PRECONDITION):
    ``CERTIFICATE_SUPERSEDED`` (the vendor re-bound them to another License Server) or
    ``CHECK_IN_OVERDUE`` (no check-in within the license's policy): the operator checks
    in (``tessera check-in``) or calls the vendor; a repair does not help."""


class InvalidLicenseRequest(LicenseRefused):
    """A field of the request is missing or malformed (INVALID_ARGUMENT)."""


class LicensePermissionDenied(LicenseRefused):
    """The call needs a credential the client did not give (operator RPCs)."""


class LicenseServerBusy(LicenseRefused):
    """The License Server protected itself from this client host for now (too many lease
    streams open, acquires too fast, a call that ran too long): nothing changed, and
    asking again after a pause works. ``retry_after`` is the server's hint in seconds
    (None when it gave none: back off as for an unreachable server)."""

    @property
    def retry_after(self) -> float | None:
        try:
            return float(self.metadata["retry_after_seconds"])
        except (KeyError, ValueError):
            return None


class LicenseLost(LicenseError):
    """A license the client held is gone: its seats are no longer the client's."""


class LeaseRevoked(LicenseLost):
    """The License Server took the lease away; ``reason`` says why: REVOKED_BY_OPERATOR,
    LICENSE_RETURNED, LICENSE_EXPIRED, TRUSTED_STORAGE_BROKEN, LICENSE_NOT_HELD,
    LEASE_RESUMED_ELSEWHERE, or, found when resuming, LEASE_RELEASED / LEASE_NOT_FOUND."""


class LeaseExpired(LicenseLost):
    """The lease's TTL ran out before a heartbeat or a resume got through."""


class LocalLicenseExpired(LicenseLost):
    """The node-locked local license reached its expiry date."""


class NoLicense(LicenseError):
    """The start-up rule found neither a valid local license nor a network lease: the
    application should not start. ``local_problems`` says why no local license served;
    ``network_error`` is why no lease was granted. ``reason`` and ``code`` are the
    network error's."""

    def __init__(
        self, feature: str, local_problems: Sequence[str], network_error: LicenseError
    ) -> None:
        parts = [f"local: {problem}" for problem in local_problems]
        parts.append(f"network: {network_error}")
        super().__init__(
            f"no {feature} license: " + "; ".join(parts),
            reason=network_error.reason,
            code=network_error.code,
            server=network_error.server,
            metadata=network_error.metadata,
        )
        self.feature = feature
        self.local_problems = tuple(local_problems)
        self.network_error = network_error

    def __str__(self) -> str:
        return self.message


# The one table: a License Server's reason -> the exception a client sees.
REASONS: dict[str, type[LicenseError]] = {
    "NO_SEAT_AVAILABLE": NoSeatAvailable,
    "QUEUE_TIMEOUT": QueueTimeout,
    "FEATURE_NOT_LICENSED": FeatureNotLicensed,
    "COUNT_ABOVE_ACTIVATED": CountAboveActivated,
    "TRUSTED_STORAGE_BROKEN": TrustedStorageBroken,
    "CERTIFICATE_SUPERSEDED": LicenseWithdrawn,
    "CHECK_IN_OVERDUE": LicenseWithdrawn,
    "INVALID_INPUT": InvalidLicenseRequest,
    "MALFORMED_REQUEST": InvalidLicenseRequest,
    "LEASE_PROTOCOL_VIOLATION": InvalidLicenseRequest,
    "INVALID_LICENSE_SERVER_ADDRESS": InvalidLicenseRequest,
    "SERVER_SHUTTING_DOWN": LicenseServerUnreachable,
    "PEER_UNAVAILABLE": LicenseServerUnreachable,
    "LEASE_EXPIRED": LeaseExpired,
    "LEASE_RELEASED": LeaseRevoked,
    "LEASE_NOT_FOUND": LeaseRevoked,
    "LEASE_RESUMED_ELSEWHERE": LeaseRevoked,
    "REVOKED_BY_OPERATOR": LeaseRevoked,
    "LICENSE_EXPIRED": LeaseRevoked,
    "LICENSE_RETURNED": LeaseRevoked,
    "LICENSE_NOT_HELD": LeaseRevoked,
    "TOO_MANY_STREAMS": LicenseServerBusy,
    "ACQUIRE_RATE_EXCEEDED": LicenseServerBusy,
    "CALL_DEADLINE_EXCEEDED": LicenseServerBusy,
    "LEASE_STREAM_IDLE": LicenseServerBusy,
}

# When the server gave no reason this table knows: by status code alone.
CODES: dict[grpc.StatusCode, type[LicenseError]] = {
    grpc.StatusCode.UNAVAILABLE: LicenseServerUnreachable,
    grpc.StatusCode.DEADLINE_EXCEEDED: LicenseServerUnreachable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NoSeatAvailable,
    grpc.StatusCode.NOT_FOUND: FeatureNotLicensed,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidLicenseRequest,
    grpc.StatusCode.PERMISSION_DENIED: LicensePermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: LicensePermissionDenied,
}


def error_from_status(
    code: grpc.StatusCode,
    reason: str,
    message: str,
    server: str = "",
    metadata: Mapping[str, str] | None = None,
) -> LicenseError:
    """The exception for a status ``code`` with an ErrorInfo ``reason``."""
    cls = REASONS.get(reason) or CODES.get(code, LicenseError)
    return cls(message, reason=reason, code=code, server=server, metadata=metadata)


def error_from_rpc(error: grpc.aio.AioRpcError, server: str = "") -> LicenseError:
    """The exception for a failed call (status code + ErrorInfo from its trailers)."""
    info = error_info(error)
    reason = info.reason if info is not None else ""
    metadata = dict(info.metadata) if info is not None else {}
    message = error.details() or error.code().name
    return error_from_status(error.code(), reason, message, server, metadata)


def error_from_denial(reason: str, message: str, server: str = "") -> LicenseError:
    """The exception for a ``denied`` on a lease stream whose status never came."""
    cls = REASONS.get(reason, LicenseRefused)
    return cls(message or reason, reason=reason, server=server)


def error_from_revocation(reason: str, message: str, server: str = "") -> LicenseLost:
    """The exception for a ``revoked`` pushed on a lease stream: LeaseExpired when the
    TTL ran out, LeaseRevoked (with the server's reason) for everything else."""
    cls = LeaseExpired if reason == "LEASE_EXPIRED" else LeaseRevoked
    return cls(message or reason, reason=reason, code=None, server=server)
