"""Plain records of the Administrator's domain: journaled operations and registration."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypeVar

T = TypeVar("T")


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
    # A move's second half (its activation on the target), journaled with the move but
    # prepared only once the first half's seats are credited back.
    PLANNED = "planned"
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
    """One journaled activation, return, repair or move, and how far it got.

    A move is a parent of two child operations, a return on the source and an
    activation on the target (``parent_operation_id`` names the move); the children are
    the move's steps, not operations of their own: they are not listed or resumed
    apart from it.
    """

    operation_id: str
    kind: OperationKind
    state: OperationState
    license_server: str
    host_id: str
    activation_id: str
    count: int
    # The request the License Server signed and the vendor's answer (a move signs
    # nothing itself: its request id is its return's, its halves hold the envelopes).
    request_id: str
    request_envelope: bytes
    response_envelope: bytes | None
    created_at: dt.datetime
    updated_at: dt.datetime
    certificate_id: str = ""
    offline: bool = False
    force: bool = False
    # A move's half: the move it is a step of.
    parent_operation_id: str = ""
    # A move: the License Server the seats go to (read from its activation half).
    target_license_server: str = ""
    target_host_id: str = ""
    # Leases the License Server revoked to free seats being returned (forced return).
    revoked_leases: int = 0
    # The License Server's answer to the install step, serialized, so that running the
    # operation again returns exactly what the first run returned.
    result: bytes | None = None
    # The last refusal or failure as "REASON: message", and its gRPC status name.
    last_error: str = ""
    last_error_code: str = ""

    @property
    def flow(self) -> OperationKind:
        """The flow this operation is a step of: its own kind, or a move for its halves
        (the crash suite's failpoints are named after it)."""
        return OperationKind.MOVE if self.parent_operation_id else self.kind

    @property
    def intent(self) -> Intent:
        """What was asked for."""
        return Intent(
            kind=self.kind,
            license_server=self.license_server,
            activation_id=self.activation_id,
            count=self.count,
            certificate_id=self.certificate_id,
            force=self.force,
            target_license_server=self.target_license_server,
            offline=self.offline,
        )

    def matches(self, intent: Intent) -> bool:
        """Whether ``intent`` asks for this very operation (a retry) rather than another."""
        mine = self.intent
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


@dataclass(frozen=True)
class OperationUpdate:
    """One step of a journaled operation: the state it moves on to, and what the step
    learned (None: as journaled). Unfinished states clear the last error."""

    state: OperationState
    updated_at: dt.datetime
    last_error: str = ""
    last_error_code: str = ""
    # Preparing a planned operation: the request the License Server signed.
    request_id: str | None = None
    request_envelope: bytes | None = None
    revoked_leases: int | None = None
    # Installing: the vendor's answer and what the License Server said.
    response_envelope: bytes | None = None
    result: bytes | None = None

    def learned(self) -> dict[str, object]:
        """The fields this step sets, by name."""
        values: dict[str, object] = {
            "state": self.state,
            "updated_at": self.updated_at,
            "last_error": self.last_error,
            "last_error_code": self.last_error_code,
        }
        optional = {
            "request_id": self.request_id,
            "request_envelope": self.request_envelope,
            "revoked_leases": self.revoked_leases,
            "response_envelope": self.response_envelope,
            "result": self.result,
        }
        values.update({name: value for name, value in optional.items() if value is not None})
        return values

    def applied_to(self, operation: Operation) -> Operation:
        """``operation`` as the journal has it after this step."""
        return replace(
            operation,
            state=self.state,
            updated_at=self.updated_at,
            last_error=self.last_error,
            last_error_code=self.last_error_code,
            request_id=_learned(self.request_id, operation.request_id),
            request_envelope=_learned(self.request_envelope, operation.request_envelope),
            revoked_leases=_learned(self.revoked_leases, operation.revoked_leases),
            response_envelope=_learned(self.response_envelope, operation.response_envelope),
            result=_learned(self.result, operation.result),
        )


def _learned(value: T | None, journaled: T) -> T:
    return journaled if value is None else value
