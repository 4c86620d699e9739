"""Plain records of the Activation Server's domain; nothing here lazy-loads."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum


class LicenseKind(StrEnum):
    NETWORK = "network"
    LOCAL = "local"


@dataclass(frozen=True)
class NewLine:
    """A line of an order being created."""

    feature: str
    count: int
    kind: LicenseKind
    expires_at: dt.datetime | None


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

    @property
    def available(self) -> int:
        return self.count - self.activated


@dataclass(frozen=True)
class Entitlement:
    """An order: who bought it and its lines."""

    entitlement_id: str
    customer_organization: str
    contact: str
    created_at: dt.datetime
    lines: tuple[EntitlementLine, ...]


@dataclass(frozen=True)
class ActivationRecord:
    """Seats of one line activated onto one host by one signed request."""

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
