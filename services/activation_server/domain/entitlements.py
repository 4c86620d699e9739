"""Orders: creating entitlements and looking them up."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from services.activation_server.domain.audit import VENDOR_ACTOR
from services.activation_server.domain.errors import EntitlementNotFound, UnknownFeature
from services.activation_server.domain.model import Entitlement, NewLine
from services.activation_server.domain.ports import VendorStore
from tessera.clock import Clock
from tessera.errors import InvalidInput
from tessera.ids import ACTIVATION_PREFIX, ENTITLEMENT_PREFIX, new_id, parse_id
from tessera.validation import checked_text

MAX_LINES = 100
MAX_SEATS_PER_LINE = 1_000_000
MAX_TEXT = 256
MIN_DURATION = dt.timedelta(seconds=1)
MAX_DURATION = dt.timedelta(days=100 * 365)
MIN_CHECK_IN_INTERVAL = dt.timedelta(minutes=1)
MAX_CHECK_IN = dt.timedelta(days=365)


class Entitlements:
    """Vendor-side orders and what is left of them."""

    def __init__(self, store: VendorStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    async def create(
        self, customer_organization: str, contact: str, lines: Sequence[NewLine]
    ) -> Entitlement:
        """Record an order and issue its Entitlement ID and one activation ID per line."""
        customer_organization = checked_text(
            "customer_organization", customer_organization, MAX_TEXT, required=True
        )
        contact = checked_text("contact", contact, MAX_TEXT)
        if not lines:
            raise InvalidInput("lines", "an entitlement needs at least one line")
        if len(lines) > MAX_LINES:
            raise InvalidInput("lines", f"at most {MAX_LINES} lines")
        now = self.clock.now()
        for index, line in enumerate(lines):
            if not 1 <= line.count <= MAX_SEATS_PER_LINE:
                raise InvalidInput(
                    f"lines[{index}].count",
                    f"must be between 1 and {MAX_SEATS_PER_LINE}, not {line.count}",
                )
            if line.expires_at is not None and line.expires_at <= now:
                raise InvalidInput(f"lines[{index}].expires_at", "is in the past")
            if line.duration is not None and not MIN_DURATION <= line.duration <= MAX_DURATION:
                raise InvalidInput(
                    f"lines[{index}].duration",
                    f"must be between 1 second and {MAX_DURATION.days} days",
                )
            if line.check_in is not None:
                _check_policy(index, line)
        entitlement_id = new_id(ENTITLEMENT_PREFIX)
        issued = [(new_id(ACTIVATION_PREFIX), line) for line in lines]
        async with self.store.transaction() as repo:
            known = await repo.known_features(line.feature for line in lines)
            unknown = sorted({line.feature for line in lines} - known)
            if unknown:
                raise UnknownFeature(
                    f"unknown feature {unknown[0]!r}; the catalog has e.g. client.station, "
                    "server.enterprise.base",
                    metadata={"feature": unknown[0]},
                )
            await repo.insert_entitlement(
                entitlement_id,
                customer_organization,
                contact,
                now,
                issued,
            )
            await repo.audit.append(
                now,
                "entitlement.created",
                entitlement_id,
                VENDOR_ACTOR,
                {
                    "customer_organization": customer_organization,
                    "lines": [_line_detail(activation_id, line) for activation_id, line in issued],
                },
            )
            entitlement = await repo.get_entitlement(entitlement_id)
        assert entitlement is not None
        return entitlement

    async def get_order(self, entitlement_id: str) -> Entitlement:
        """Every line of an order with what is left of it."""
        entitlement_id = parse_id(ENTITLEMENT_PREFIX, entitlement_id, "entitlement_id")
        async with self.store.transaction() as repo:
            entitlement = await repo.get_entitlement(entitlement_id)
        if entitlement is None:
            raise EntitlementNotFound(
                f"no entitlement {entitlement_id}", metadata={"entitlement_id": entitlement_id}
            )
        return entitlement


def _check_policy(index: int, line: NewLine) -> None:
    assert line.check_in is not None
    if not MIN_CHECK_IN_INTERVAL <= line.check_in.interval <= MAX_CHECK_IN:
        raise InvalidInput(
            f"lines[{index}].check_in_interval",
            f"must be between 1 minute and {MAX_CHECK_IN.days} days",
        )
    if not dt.timedelta(0) <= line.check_in.grace <= MAX_CHECK_IN:
        raise InvalidInput(
            f"lines[{index}].check_in_grace", f"must be between 0 and {MAX_CHECK_IN.days} days"
        )


def _line_detail(activation_id: str, line: NewLine) -> dict[str, object]:
    return {
        "activation_id": activation_id,
        "feature": line.feature,
        "count": line.count,
        "kind": line.kind.value,
        "expires_at": None if line.expires_at is None else line.expires_at.isoformat(),
        "duration_seconds": None if line.duration is None else int(line.duration.total_seconds()),
        "maintenance_ends_at": None
        if line.maintenance_ends_at is None
        else line.maintenance_ends_at.isoformat(),
        "partial_return_allowed": line.partial_return_allowed,
        **(
            {}
            if line.check_in is None
            else {
                "check_in_interval_seconds": int(line.check_in.interval.total_seconds()),
                "check_in_grace_seconds": int(line.check_in.grace.total_seconds()),
            }
        ),
    }
