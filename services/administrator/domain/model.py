"""Plain records of the Administrator's domain."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum


class OperationState(StrEnum):
    # The License Server signed the request; the vendor has not answered yet.
    PREPARED = "prepared"
    # The vendor answered; the License Server has not installed the answer yet.
    ANSWERED = "answered"
    COMPLETED = "completed"


@dataclass(frozen=True)
class Operation:
    """One journaled activation and how far it got."""

    operation_id: str
    kind: str
    state: OperationState
    license_server: str
    host_id: str
    activation_id: str
    count: int
    request_id: str
    request_envelope: bytes
    response_envelope: bytes | None
    created_at: dt.datetime
    updated_at: dt.datetime
