"""The in-process bus of lease events: what streams must hear at once, on this replica
and the others. The events themselves are records in ``domain/model.py``.

A lease that ends without its holder asking (revoked, expired, its license gone) or that
is resumed elsewhere, and seats that free up, are published on the in-process bus and
announced through the store inside the transaction that caused them (over PostgreSQL
with NOTIFY, store/notifications.py), so every replica's streams hear it when it
commits. Handlers are idempotent: an event may arrive twice or for a stream that has
already moved on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from services.license_server.domain.model import LeaseEvent, SeatsFreed

Listener = Callable[[LeaseEvent], None]


class LeaseBus:
    """In-process fan-out of lease events to the streams that watch them.

    Seats freed of a feature wake its watchers, and of this process's clients queued for
    it only the first in line (the lowest ticket): only the queue's head can be granted,
    and it is the head of its own replica's part of the queue, so each replica tries
    once per event instead of once per waiter. A waiter that is granted and leaves seats
    free passes the event on (``Leasing.try_dequeue``).
    """

    def __init__(self) -> None:
        self._by_lease: defaultdict[str, set[Listener]] = defaultdict(set)
        self._by_feature: defaultdict[str, set[Listener]] = defaultdict(set)
        # feature -> ticket -> the queued stream's listener
        self._queues: defaultdict[str, dict[int, Listener]] = defaultdict(dict)

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

    def watch_queue(self, feature: str, ticket: int, listener: Listener) -> None:
        """Wake ``listener`` when seats of ``feature`` free up and it is this process's
        first in line."""
        self._queues[feature][ticket] = listener

    def unwatch_queue(self, feature: str, ticket: int) -> None:
        waiting = self._queues.get(feature)
        if waiting is not None:
            waiting.pop(ticket, None)
            if not waiting:
                del self._queues[feature]

    def wake_queued(self) -> None:
        """Wake every queued stream of this process (its places in line were lost)."""
        for feature, waiting in list(self._queues.items()):
            for ticket in sorted(waiting):  # in their old order, as far as it goes
                waiting[ticket](SeatsFreed(feature))

    def publish(self, event: LeaseEvent) -> None:
        if isinstance(event, SeatsFreed):
            listeners = list(self._by_feature.get(event.feature, ()))
            waiting = self._queues.get(event.feature)
            if waiting:
                listeners.append(waiting[min(waiting)])
        else:
            listeners = list(self._by_lease.get(event.lease_id, ()))
        for listener in listeners:
            listener(event)
