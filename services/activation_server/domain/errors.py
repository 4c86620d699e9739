"""What the Activation Server refuses, and why. Status codes are in ``../errors.py``."""

from __future__ import annotations

from tessera.errors import DomainError


class EntitlementNotFound(DomainError):
    reason = "ENTITLEMENT_NOT_FOUND"


class ActivationIdNotFound(DomainError):
    reason = "ACTIVATION_ID_NOT_FOUND"


class UnknownFeature(DomainError):
    reason = "UNKNOWN_FEATURE"


class NotEnoughSeatsLeft(DomainError):
    """The entitlement line has fewer seats left than asked for."""

    reason = "NOT_ENOUGH_SEATS_LEFT"


class ActivationLimitReached(DomainError):
    """The order had as many network activations in the rolling window as one order may
    (``--max-activations-per-entitlement``); metadata says when the next fits
    (``next_allowed_at``)."""

    reason = "ACTIVATION_LIMIT_REACHED"


class LineExpired(DomainError):
    reason = "LINE_EXPIRED"


class LocalLineNotActivatable(DomainError):
    """Local (node-locked) lines are issued to client hosts, not License Servers."""

    reason = "LOCAL_LINE_NOT_FOR_LICENSE_SERVER"


class NetworkLineNotLocal(DomainError):
    """Network lines are activated onto License Servers, not issued to client hosts."""

    reason = "NETWORK_LINE_NOT_FOR_CLIENT_HOST"


class RequestIdReused(DomainError):
    """A request id came back with different content: not a retry, a conflict."""

    reason = "REQUEST_ID_REUSED"


class HostKeyMismatch(DomainError):
    """The request's host id does not match the key and machine binding that signed it."""

    reason = "HOST_KEY_MISMATCH"


class CertificateNotFound(DomainError):
    """No activation has a certificate with this id."""

    reason = "CERTIFICATE_NOT_FOUND"


class CertificateNotHeld(DomainError):
    """The certificate's seats were already returned (or force-returned)."""

    reason = "CERTIFICATE_NOT_HELD"


class ReturnFromAnotherHost(DomainError):
    """A return must be signed by the host that holds the certificate, with the key that
    activated it."""

    reason = "RETURN_FROM_ANOTHER_HOST"


class LocalLicenseNotReturnable(DomainError):
    """Local (node-locked) licenses cannot be returned."""

    reason = "LOCAL_LICENSE_NOT_RETURNABLE"


class LocalLicenseNotRepairable(DomainError):
    """Local (node-locked) licenses cannot be repaired."""

    reason = "LOCAL_LICENSE_NOT_REPAIRABLE"


class RepairFromAnotherHost(DomainError):
    """A repair must be signed by the key that activated the host's licenses."""

    reason = "REPAIR_FROM_ANOTHER_HOST"


class RepairLimitReached(DomainError):
    """The host used up its repairs for the rolling year; metadata says when it may
    repair again (``next_allowed_at``)."""

    reason = "REPAIR_LIMIT_REACHED"
