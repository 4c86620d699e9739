"""Stream heartbeats, coalesced: one UPDATE per flush instead of one per heartbeat.

A stream knows its lease, its epoch and when it expires, so a heartbeat that arrives in
time is acknowledged at once and recorded in memory; every ``flush_interval`` the
recorded leases are extended in the database in one statement per TTL. A lease that is
no longer held when its heartbeat is flushed (revoked, expired, resumed elsewhere) is
told to its stream as a lease event.

What this trades: the database's expiry of a lease can trail its last heartbeat by up
to one flush interval, and a crash loses at most that much. With clients heartbeating
every TTL/3, a lease is only ever that close to expiry after two missed heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import defaultdict

from services.license_server.domain.events import LeaseBus, LeaseEnded, LeaseResumed
from services.license_server.domain.model import Lease
from services.license_server.store.repository import LicenseStore
from tessera.clock import Clock

log = logging.getLogger(__name__)

# Leases one UPDATE extends at most, one bound parameter each: SQLite allows 32,766 per
# statement by default since 3.32 (an engine refuses one that allows fewer, see
# tessera.sqlite_connection), asyncpg 32,767. At 20,000 leases beating every 10 s a flush
# holds 2,000; one statement for them costs SQLite about 40 % less CPU per lease than four
# of 500 (docs/performance.md).
FLUSH_BATCH = 5000
LEASE_NOT_HELD = "LEASE_NOT_HELD"


class HeartbeatBatcher:
    """Coalesces the heartbeats of this process's lease streams."""

    def __init__(
        self, store: LicenseStore, bus: LeaseBus, clock: Clock, flush_interval: float = 1.0
    ) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self.flush_interval = flush_interval
        # lease id -> (ttl seconds, epoch) of the streams that beat since the last flush
        # (the oldest epoch, when two streams of one lease beat: the older is fenced out)
        self._pending: dict[str, tuple[int, int]] = {}
        self._task: asyncio.Task[None] | None = None

    def beat(self, lease: Lease, now: dt.datetime) -> dt.datetime:
        """Record a heartbeat at ``now`` for a lease the caller holds; returns the new
        expiry."""
        before = self._pending.get(lease.lease_id)
        epoch = lease.epoch if before is None else min(before[1], lease.epoch)
        self._pending[lease.lease_id] = (lease.ttl_seconds, epoch)
        return now + dt.timedelta(seconds=lease.ttl_seconds)

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever())

    async def stop(self) -> None:
        """Stop the timer and write what is pending (a graceful stop loses nothing)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def flush(self) -> int:
        """Extend every lease that beat since the last flush; returns how many."""
        pending, self._pending = self._pending, {}
        if not pending:
            return 0
        by_ttl: defaultdict[int, list[str]] = defaultdict(list)
        for lease_id, (ttl, _epoch) in pending.items():
            by_ttl[ttl].append(lease_id)
        now = self.clock.now()
        extended: dict[str, int] = {}
        for ttl, lease_ids in by_ttl.items():
            for start in range(0, len(lease_ids), FLUSH_BATCH):
                chunk = lease_ids[start : start + FLUSH_BATCH]
                async with self.store.transaction() as repo:
                    extended |= await repo.extend_leases(chunk, now, ttl)
        for lease_id, (_ttl, epoch) in pending.items():
            held_epoch = extended.get(lease_id)
            if held_epoch is None:
                self.bus.publish(
                    LeaseEnded(lease_id, LEASE_NOT_HELD, "the lease is no longer held here")
                )
            elif held_epoch > epoch:
                # A stream beat for an epoch a resume has since fenced out (the resume's own
                # event may have gone out before that stream listened): tell it again.
                self.bus.publish(LeaseResumed(lease_id, held_epoch))
        return len(extended)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except Exception:
                log.exception("flushing heartbeats failed; retrying next interval")
