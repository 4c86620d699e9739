"""Plain records of the Activation Server's domain; nothing here lazy-loads.

Also the audit chain's hash format (``entry_hash``): the store computes it when it
appends an entry and ``audit.py`` when it verifies the chain, and the store may import
from the domain only this module and ``ports.py``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from nacl.signing import SigningKey


class LicenseKind(StrEnum):
    NETWORK = "network"
    LOCAL = "local"


class ActivationState(StrEnum):
    """Whether a host still holds an activation's seats."""

    ACTIVE = "active"
    RETURNED = "returned"
    FORCE_RETURNED = "force_returned"


@dataclass(frozen=True)
class CheckInPolicy:
    """A line's check-in term: its License Servers check in with the vendor at least
    every ``interval``, or its seats stop serving ``grace`` after a check-in was due."""

    interval: dt.timedelta
    grace: dt.timedelta = dt.timedelta(0)


@dataclass(frozen=True)
class NewLine:
    """A line of an order being created."""

    feature: str
    count: int
    kind: LicenseKind
    expires_at: dt.datetime | None
    # Licenses expire this long after each activation (the earlier of this and expires_at).
    duration: dt.timedelta | None = None
    maintenance_ends_at: dt.datetime | None = None
    partial_return_allowed: bool = False
    # None: no check-in (the default).
    check_in: CheckInPolicy | None = None


@dataclass(frozen=True)
class EntitlementLine:
    """One line of an order and how much of it is activated on hosts now."""

    activation_id: str
    entitlement_id: str
    feature: str
    kind: LicenseKind
    count: int
    activated: int
    expires_at: dt.datetime | None
    duration: dt.timedelta | None
    maintenance_ends_at: dt.datetime | None
    partial_return_allowed: bool
    check_in: CheckInPolicy | None = None

    @property
    def available(self) -> int:
        return self.count - self.activated

    def expiry_for(self, activated_at: dt.datetime) -> dt.datetime | None:
        """When licenses activated at ``activated_at`` expire: the line's date, or the
        term after activation, whichever comes first; None when neither is set."""
        candidates = [self.expires_at] if self.expires_at is not None else []
        if self.duration is not None:
            candidates.append(activated_at + self.duration)
        return min(candidates, default=None)


@dataclass(frozen=True)
class Entitlement:
    """An order: who bought it and its lines."""

    entitlement_id: str
    customer_organization: str
    contact: str
    created_at: dt.datetime
    lines: tuple[EntitlementLine, ...]


@dataclass(frozen=True)
class Registration:
    """Who activated: the operator's details, recorded with the activation."""

    organization: str = ""
    contact_name: str = ""
    email: str = ""
    phone: str = ""
    site: str = ""


@dataclass(frozen=True)
class ActivationRecord:
    """Seats of one line activated onto one host by one signed request.

    ``host_id`` and ``request_id`` name the request that brought the seats and never
    change; ``holder_host_id`` is the host that holds them now (a repair after a machine
    change re-binds them). ``certificate_envelope`` is the current certificate: its id
    stays, its revision rises with each re-issue.
    """

    request_id: str
    activation_id: str
    entitlement_id: str
    feature: str
    host_id: str
    host_public_key: bytes
    count: int
    certificate_id: str
    response_envelope: bytes
    activated_at: dt.datetime
    kind: LicenseKind
    holder_host_id: str
    activated_count: int
    revision: int
    state: ActivationState
    certificate_envelope: bytes
    returned_at: dt.datetime | None
    registration: Registration | None


class ReturnOutcome(StrEnum):
    CREDITED = "credited"
    REFUSED = "refused"


@dataclass(frozen=True)
class ReturnRecord:
    """The vendor's recorded decision on one return request, with the exact receipt."""

    host_id: str
    request_id: str
    certificate_id: str
    count: int
    revision: int
    outcome: ReturnOutcome
    credited: int
    entitlement_id: str
    receipt_envelope: bytes
    decided_at: dt.datetime


@dataclass(frozen=True)
class RepairRecord:
    """The vendor's recorded answer to one repair request, with the exact response."""

    host_id: str
    request_id: str
    host_public_key: bytes
    previous_host_id: str
    response_envelope: bytes
    repaired_at: dt.datetime


@dataclass(frozen=True)
class HostGeneration:
    """One re-binding of a host key's licenses: a repair moved what ``previous_host_id``
    held to ``host_id`` (a new machine, or a copy of the License Server elsewhere), which
    becomes the key's ``generation`` and supersedes the host it came from."""

    host_public_key: bytes
    generation: int
    host_id: str
    previous_host_id: str
    request_id: str
    rebound_at: dt.datetime


class CheckInStanding(StrEnum):
    """The vendor's word on a certificate (or a host) at a check-in."""

    CURRENT = "current"
    SUPERSEDED = "superseded"
    RETURNED = "returned"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CheckInRecord:
    """The vendor's recorded answer to one check-in, with the exact signed result."""

    host_id: str
    request_id: str
    host_public_key: bytes
    standing: CheckInStanding
    result_envelope: bytes
    checked_at: dt.datetime


@dataclass(frozen=True)
class AuditEntry:
    """One decision in the hash-chained audit log."""

    sequence: int
    at: dt.datetime
    action: str
    subject: str
    actor: str
    detail: str
    previous_hash: bytes
    hash: bytes


@dataclass(frozen=True)
class AuditHead:
    """The newest entry's sequence and hash, kept in its own row so a deleted tail shows."""

    sequence: int
    hash: bytes


# The previous hash of audit entry 1.
GENESIS = bytes(32)


def canonical_json(detail: Mapping[str, object]) -> str:
    """``detail`` as canonical JSON: sorted keys, compact separators, ASCII only."""
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_time(at: dt.datetime) -> str:
    """``at`` in UTC to the microsecond, e.g. ``2026-11-27T12:00:00.000000Z``."""
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(
    previous_hash: bytes,
    sequence: int,
    at: dt.datetime,
    action: str,
    subject: str,
    actor: str,
    detail: str,
) -> bytes:
    """An audit entry's hash: SHA-256(previous hash || canonical JSON of its content)."""
    content = json.dumps(
        [sequence, canonical_time(at), action, subject, actor, detail],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(previous_hash + content.encode()).digest()


@dataclass(frozen=True)
class AuditVerdict:
    """What walking the audit chain found."""

    intact: bool
    entries_checked: int
    first_bad_sequence: int
    problem: str
    head: AuditHead


@dataclass(frozen=True)
class VendorPublicKey:
    """A vendor public key License Servers should trust."""

    key_id: str
    public_key: bytes
    active: bool
    created_at: dt.datetime


@dataclass(frozen=True)
class StoredKey:
    """One vendor signing key as kept on disk, with when it was made."""

    key_id: str
    signing_key: SigningKey
    created_at: dt.datetime


@dataclass(frozen=True)
class Keyring:
    """Every vendor key, oldest first, and the id of the one that signs."""

    keys: tuple[StoredKey, ...]
    active_key_id: str
