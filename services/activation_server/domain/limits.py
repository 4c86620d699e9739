"""The vendor's limits on activation and return cycling and on repairs: at most N in any
rolling window."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

REPAIR_WINDOW = dt.timedelta(days=365)


@dataclass(frozen=True)
class Limits:
    """At most ``max_returns_per_entitlement`` credited returns per order in any
    ``return_window``, ``max_activations_per_entitlement`` network activations per order
    in any ``activation_window``, and ``max_repairs_per_year`` repairs per host key in any
    365 days."""

    max_returns_per_entitlement: int = 10
    return_window: dt.timedelta = dt.timedelta(days=30)
    max_repairs_per_year: int = 4
    # Bounds activate -> return -> activate loops, and an order split into many small
    # certificates; local (node-locked) issues are not counted: they cannot be returned.
    max_activations_per_entitlement: int = 100
    activation_window: dt.timedelta = dt.timedelta(days=30)


def next_allowed(recent: list[dt.datetime], limit: int, window: dt.timedelta) -> dt.datetime | None:
    """When one more fits, given the times already in the window (oldest first): None when
    one fits now, ``datetime.max`` (UTC) when the limit is 0 and none ever does."""
    if len(recent) < limit:
        return None
    if limit == 0:
        return dt.datetime.max.replace(tzinfo=dt.UTC)
    # The one that must leave the window before another fits.
    return recent[len(recent) - limit] + window


def iso_time(at: dt.datetime) -> str:
    """``at`` as ISO 8601 in UTC to the second, e.g. ``2026-12-27T12:00:00Z``."""
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
