"""Plain records of the Administrator's domain: journaled operations and registration."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from enum import StrEnum


class OperationKind(StrEnum):
    """What a journaled operation does."""

    ACTIVATE = "activate"
    # A client host's local license, brought to the vendor and back; no License Server.
    ACTIVATE_LOCAL = "activate-local"
    RETURN = "return"
    REPAIR = "repair"
    # Return a whole certificate from one License Server, activate it on another.
    MOVE = "move"


class OperationState(StrEnum):
    # The License Server signed the request; the vendor has not answered yet.
    PREPARED = "prepared"
    # A move between its halves: the source installed the return's receipt, the target
    # has not installed its certificate yet. Other kinds go from PREPARED straight to
    # COMPLETED or REFUSED (an answer is journaled only once installed); older
    # Administrators journaled the vendor's answer here before installing it.
    ANSWERED = "answered"
    COMPLETED = "completed"
    # The vendor refused; nothing changed in the end (withheld seats serve again).
    REFUSED = "refused"

    @property
    def finished(self) -> bool:
        return self in (OperationState.COMPLETED, OperationState.REFUSED)


@dataclass(frozen=True)
class Intent:
    """What the operator asked for: an operation id retried with another intent is not a
    retry but a conflict."""

    kind: OperationKind
    license_server: str = ""
    activation_id: str = ""
    # Seats; for a return 0 means the whole certificate.
    count: int = 0
    certificate_id: str = ""
    force: bool = False
    target_license_server: str = ""
    # The request travels by file (ExportRequest / ImportResponse).
    offline: bool = False


@dataclass(frozen=True)
class Operation:
    """One journaled activation, return, repair or move, and how far it got."""

    operation_id: str
    kind: OperationKind
    state: OperationState
    license_server: str
    host_id: str
    activation_id: str
    count: int
    # The request the License Server signed (a move: its return) and the vendor's answer.
    request_id: str
    request_envelope: bytes
    response_envelope: bytes | None
    created_at: dt.datetime
    updated_at: dt.datetime
    certificate_id: str = ""
    offline: bool = False
    force: bool = False
    # Move only: the License Server the seats go to, and its activation request/answer.
    target_license_server: str = ""
    target_host_id: str = ""
    target_request_id: str = ""
    target_request_envelope: bytes | None = None
    target_response_envelope: bytes | None = None
    # Leases the License Server revoked to free seats being returned (forced return).
    revoked_leases: int = 0
    # The License Server's answer to the install step, serialized, so that running the
    # operation again returns exactly what the first run returned.
    result: bytes | None = None
    # The last refusal or failure as "REASON: message", and its gRPC status name.
    last_error: str = ""
    last_error_code: str = ""

    def matches(self, intent: Intent) -> bool:
        """Whether ``intent`` asks for this very operation (a retry) rather than another."""
        mine = Intent(
            kind=self.kind,
            license_server=self.license_server,
            activation_id=self.activation_id,
            count=self.count,
            certificate_id=self.certificate_id,
            force=self.force,
            target_license_server=self.target_license_server,
            offline=self.offline,
        )
        if self.kind is OperationKind.MOVE:
            # A move learns its line and seats from the certificate; the operator names
            # only the certificate and the two License Servers.
            intent = replace(intent, activation_id=self.activation_id, count=self.count)
        return mine == intent


@dataclass(frozen=True)
class Registration:
    """The operator's details, sent to the vendor with every activation."""

    organization: str = ""
    contact_name: str = ""
    email: str = ""
    phone: str = ""
    # Where the License Server runs, e.g. "Building 4, plant room".
    site: str = ""
