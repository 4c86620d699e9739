"""Stream heartbeats, coalesced: one UPDATE per flush instead of one per heartbeat.

A heartbeat that arrives in time on a stream is recorded in memory and joins the next
flush, which extends every recorded lease in the database in one statement per TTL.
The heartbeat is acknowledged only once that flush has committed, with the expiry the
flush wrote: an acknowledged expiry is always on disk, so a crash right after an
acknowledgement cannot take back what the client was told (the client counts its TTL
from the heartbeat it sent, which is no later than the flush). A flush follows the first
heartbeat recorded after the last one by ``flush_interval``, or by a quarter of the
stream's heartbeat interval when that is shorter, so an acknowledgement always comes
well within the interval the client waits for it.

A lease the flush did not extend at the stream's epoch (revoked, expired, resumed by
another stream, or its statement failed) is not acknowledged from the flush: the caller
asks the database for that one heartbeat, which extends it or says why it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass

from services.license_server.domain.model import Lease
from services.license_server.domain.ports import LicenseStore
from tessera.clock import Clock

log = logging.getLogger(__name__)

# Leases one UPDATE extends at most, one bound parameter each: SQLite allows 32,766 per
# statement by default since 3.32 (an engine refuses one that allows fewer, see
# tessera.storage.sqlite_connection), asyncpg 32,767. At 20,000 leases beating every 10 s a flush
# holds 2,000; one statement for them costs SQLite about 40 % less CPU per lease than four
# of 500 (docs/performance.md).
FLUSH_BATCH = 5000


@dataclass(frozen=True)
class Flushed:
    """What one committed flush wrote: the epoch of each lease it extended (held at the
    time) and the expiry it wrote for each TTL."""

    epochs: dict[str, int]
    expiries: dict[int, dt.datetime]

    def expiry_of(self, lease: Lease) -> dt.datetime | None:
        """The durable expiry of ``lease`` if this flush extended it at its epoch."""
        if self.epochs.get(lease.lease_id) != lease.epoch:
            return None
        return self.expiries.get(lease.ttl_seconds)


class HeartbeatBatcher:
    """Coalesces the heartbeats of this process's lease streams."""

    def __init__(self, store: LicenseStore, clock: Clock, flush_interval: float = 1.0) -> None:
        self.store = store
        self.clock = clock
        self.flush_interval = flush_interval
        # lease id -> TTL seconds of the leases that beat since the last flush
        self._pending: dict[str, int] = {}
        # Heartbeats waiting for the next flush (several streams may beat for one lease).
        self.waiting = 0
        # What the streams in _pending wait for: the next flush's outcome, None when it
        # failed as a whole.
        self._round: asyncio.Future[Flushed | None] | None = None
        self._due = 0.0  # loop time by which the pending heartbeats are flushed
        self._wake = asyncio.Event()  # a heartbeat is pending, or wants an earlier flush
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def beat(self, lease: Lease, heartbeat_interval: float) -> dt.datetime | None:
        """Record a heartbeat for a lease the caller holds and wait for the flush that
        writes it; the expiry written, or None when the flush did not extend the lease at
        its epoch (the caller asks the database why)."""
        if self._stopped:
            return None
        self._pending[lease.lease_id] = lease.ttl_seconds
        self.waiting += 1
        round_ = self._round
        delay = min(self.flush_interval, heartbeat_interval / 4)
        if round_ is None:
            loop = asyncio.get_running_loop()
            round_ = self._round = loop.create_future()
            self._due = loop.time() + delay
            self._wake.set()
        elif delay < self.flush_interval:  # a short interval: the flush may have to come sooner
            due = asyncio.get_running_loop().time() + delay
            if due < self._due:
                self._due = due
                self._wake.set()
        # Shielded: a stream that goes away while waiting must not cancel the others' wait.
        flushed = await asyncio.shield(round_)
        return None if flushed is None else flushed.expiry_of(lease)

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever())

    async def stop(self) -> None:
        """Stop the timer and write what is pending (a graceful stop loses nothing)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._stopped = True
        await self.flush()

    async def flush(self) -> int:
        """Extend every lease that beat since the last flush and answer the heartbeats
        waiting for it; returns how many leases were extended."""
        pending, self._pending = self._pending, {}
        round_, self._round = self._round, None
        self.waiting = 0
        if not pending:
            if round_ is not None and not round_.done():
                round_.set_result(Flushed({}, {}))
            return 0
        try:
            flushed = await self._write(pending)
        except BaseException:
            if round_ is not None and not round_.done():
                round_.set_result(None)
            raise
        if round_ is not None and not round_.done():
            round_.set_result(flushed)
        return len(flushed.epochs)

    async def _write(self, pending: dict[str, int]) -> Flushed:
        by_ttl: defaultdict[int, list[str]] = defaultdict(list)
        for lease_id, ttl in pending.items():
            by_ttl[ttl].append(lease_id)
        now = self.clock.now()
        epochs: dict[str, int] = {}
        expiries: dict[int, dt.datetime] = {}
        failed: Exception | None = None
        for ttl, lease_ids in by_ttl.items():
            expiries[ttl] = now + dt.timedelta(seconds=ttl)
            for start in range(0, len(lease_ids), FLUSH_BATCH):
                chunk = lease_ids[start : start + FLUSH_BATCH]
                try:
                    async with self.store.transaction() as repo:
                        epochs |= await repo.extend_leases(chunk, now, ttl)
                except Exception as error:  # that chunk's heartbeats go one by one
                    failed = error
        if failed is not None and not epochs:
            raise failed
        if failed is not None:
            log.warning("writing some heartbeats failed (%s); they are written one by one", failed)
        return Flushed(epochs, expiries)

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            delay = self._due - loop.time()
            if self._round is not None and delay > 0:
                # Until it is due, or until a heartbeat wants it sooner.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                self._wake.set()  # look again: due now, or due sooner
                continue
            if self._round is None:
                continue
            try:
                await self.flush()
            except Exception:
                log.exception("flushing heartbeats failed; they are written one by one")
