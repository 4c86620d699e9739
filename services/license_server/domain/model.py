"""Plain records of the License Server's domain."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class PoolInformation:
    """EBO's License Information for one feature."""

    feature: str
    activated: int
    used: int

    queued: int = 0
    required: int = 0
    # Seats a check-in with the vendor withdrew, and why (vendor_standing.py).
    withdrawn: int = 0
    withdrawn_reason: str = ""

    @property
    def available(self) -> int:
        return max(self.activated - self.used, 0)

    @property
    def violation(self) -> bool:
        """EBO's license violation: fewer seats activated than clients require."""
        return self.required > self.activated


@dataclass(frozen=True)
class NewLease:
    """What a client asks for when it acquires seats."""

    feature: str
    count: int
    client_host: str
    user: str
    display_name: str


@dataclass(frozen=True)
class Lease:
    """A held (or released) lease as stored."""

    lease_id: str
    feature: str
    count: int
    client_host: str
    user: str
    display_name: str
    ttl_seconds: int
    epoch: int
    granted_at: dt.datetime
    last_heartbeat_at: dt.datetime
    expires_at: dt.datetime
    released_at: dt.datetime | None
    release_reason: str | None = None


@dataclass(frozen=True)
class Grant:
    """A lease handed to a client: the only time its secret is known in clear."""

    lease: Lease
    secret: str
    heartbeat_interval_seconds: float
    resumed: bool


class RequestKind(StrEnum):
    ACTIVATE = "activate"
    RETURN = "return"
    REPAIR = "repair"


@dataclass(frozen=True)
class PendingRequest:
    """A request this host signed, and when the vendor's answer to it was installed."""

    request_id: str
    activation_id: str
    count: int
    request_envelope: bytes
    installed_at: dt.datetime | None
    kind: RequestKind = RequestKind.ACTIVATE
    certificate_id: str | None = None


@dataclass(frozen=True)
class StoredCertificate:
    """A vendor-signed certificate in trusted storage and where it stands."""

    certificate_id: str
    request_id: str
    feature: str
    count: int
    envelope: bytes
    installed_at: dt.datetime
    expires_at: dt.datetime | None = None
    revision: int = 0
    # Seats withheld by a return in progress, and that return's request id.
    returning: int = 0
    return_request_id: str | None = None
    returned_at: dt.datetime | None = None
    retired_at: dt.datetime | None = None
    broken_cause: str | None = None
    broken_detail: str | None = None


@dataclass(frozen=True)
class CheckInRow:
    """A check-in this host signed and, once installed, the vendor's verified result."""

    request_id: str
    host_id: str
    request_envelope: bytes
    prepared_at: dt.datetime
    result_envelope: bytes | None = None
    checked_at: dt.datetime | None = None
    installed_at: dt.datetime | None = None
    # The result takes a certificate away: it is kept for good.
    withdraws: bool = False


@dataclass(frozen=True)
class Waiter:
    """A client in a feature's queue, waiting for seats."""

    waiter_id: str
    request: NewLease
    enqueued_at: dt.datetime
    # Place in line, handed out by the database (0 until enqueued).
    ticket: int = 0
    # The replica whose stream serves the waiter: it is live while that replica is.
    replica_id: str = ""


# Lease events: what streams must hear at once, on this replica and the others
# (domain/events.py publishes them; the store announces them to the other replicas).


@dataclass(frozen=True)
class LeaseEnded:
    """A lease was released by someone other than its holder."""

    lease_id: str
    reason: str
    message: str


@dataclass(frozen=True)
class LeaseResumed:
    """A lease was resumed with a new epoch; streams on older epochs are fenced out."""

    lease_id: str
    epoch: int


@dataclass(frozen=True)
class SeatsFreed:
    """Seats of a feature became free (check-in, expiry, revocation, new activation)."""

    feature: str


LeaseEvent = LeaseEnded | LeaseResumed | SeatsFreed


# The trusted storage ledger's rows (domain/ledger.py hashes and signs them).


@dataclass(frozen=True)
class LedgerEntry:
    """One hash-chained change to trusted storage: a certificate's whole state after it."""

    sequence: int
    at: dt.datetime
    action: str
    certificate_id: str | None
    state: str
    previous_hash: bytes
    hash: bytes


@dataclass(frozen=True)
class Seal:
    """Which host and machine trusted storage belongs to, its head and clock high-water."""

    host_id: str
    host_public_key: bytes
    machine_binding: bytes
    head_sequence: int
    head_hash: bytes
    clock_high_water: dt.datetime
    clock_set_back_at: dt.datetime | None
    signature: bytes
