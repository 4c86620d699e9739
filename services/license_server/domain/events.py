"""Lease events: what streams must hear at once, on this replica and the others.

A lease that ends without its holder asking (revoked, expired, its license gone) or that
is resumed elsewhere, and seats that free up, are published on the in-process bus and,
over PostgreSQL, announced with NOTIFY inside the transaction that caused them, so every
replica's streams hear it when it commits. Handlers are idempotent: an event may arrive
twice or for a stream that has already moved on.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

NOTIFY_CHANNEL = "tessera_lease_events"


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
Listener = Callable[[LeaseEvent], None]


def encode_event(event: LeaseEvent, origin: str = "") -> str:
    if isinstance(event, LeaseEnded):
        body = {"k": "ended", "l": event.lease_id, "r": event.reason, "m": event.message}
    elif isinstance(event, LeaseResumed):
        body = {"k": "resumed", "l": event.lease_id, "e": str(event.epoch)}
    else:
        body = {"k": "freed", "f": event.feature}
    return json.dumps({**body, "o": origin}, separators=(",", ":"))


def decode_event(payload: str) -> tuple[str, LeaseEvent]:
    """(origin, event) from a NOTIFY payload; ValueError when it is not one of ours."""
    body = json.loads(payload)
    kind = body.get("k")
    origin = str(body.get("o", ""))
    if kind == "ended":
        return origin, LeaseEnded(str(body["l"]), str(body["r"]), str(body["m"]))
    if kind == "resumed":
        return origin, LeaseResumed(str(body["l"]), int(body["e"]))
    if kind == "freed":
        return origin, SeatsFreed(str(body["f"]))
    raise ValueError(f"not a lease event: {payload[:80]!r}")


class LeaseBus:
    """In-process fan-out of lease events to the streams that watch them."""

    def __init__(self) -> None:
        self._by_lease: defaultdict[str, set[Listener]] = defaultdict(set)
        self._by_feature: defaultdict[str, set[Listener]] = defaultdict(set)

    def watch_lease(self, lease_id: str, listener: Listener) -> None:
        self._by_lease[lease_id].add(listener)

    def unwatch_lease(self, lease_id: str, listener: Listener) -> None:
        listeners = self._by_lease.get(lease_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._by_lease[lease_id]

    def watch_feature(self, feature: str, listener: Listener) -> None:
        self._by_feature[feature].add(listener)

    def unwatch_feature(self, feature: str, listener: Listener) -> None:
        listeners = self._by_feature.get(feature)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._by_feature[feature]

    def publish(self, event: LeaseEvent) -> None:
        if isinstance(event, SeatsFreed):
            listeners = self._by_feature.get(event.feature, ())
        else:
            listeners = self._by_lease.get(event.lease_id, ())
        for listener in list(listeners):
            listener(event)
