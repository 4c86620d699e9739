"""Which License Server processes are alive, so a dead one's queued clients do not block
the queue.

A queued client is served by the replica that holds its stream. When that process dies
(SIGKILL, a crash, its host lost), its clients' streams break and they queue again
elsewhere, but their old places in line would stand until their alive time ran out,
and meanwhile nobody behind them, and no acquire, could take a free seat. So each
replica keeps a row with a beat it raises every ``beat_seconds``, and watches the
others' beats: a beat that stands still for ``timeout_seconds`` of the watcher's own
monotonic time (no wall clocks compared, so no clock skew between hosts matters) is a
dead replica. The watcher deletes its row, only if the beat is still the one it saw,
and in the same transaction its queued clients, then announces the features they
waited for so the next in line is served at once.

A replica that was only stopped (SIGSTOP, a long pause) and comes back finds its row
gone at its next beat, or when it next queues a client: it registers under a new id and
its streams' waiters, whose rows are gone, queue again at the back (``Leasing``). Their
old places cannot be granted: a grant deletes the waiter's live row in the transaction
that takes the seats, and a dropped row is not there to delete.

On a database only one process serves (SQLite), the process drops every other
replica's row and queued clients at start: they belong to a process that is gone. It
does not beat: nobody else watches (and the file is not written four times a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter

from services.license_server.domain.events import LeaseBus
from services.license_server.domain.model import SeatsFreed
from services.license_server.domain.ports import LicenseStore
from tessera.clock import Clock

log = logging.getLogger(__name__)


class ReplicaRoster:
    """This process's row among the replicas, and the watch on the others'."""

    def __init__(
        self,
        store: LicenseStore,
        bus: LeaseBus,
        clock: Clock,
        timeout_seconds: float = 1.0,
        sole_process: bool = False,
    ) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self.timeout_seconds = timeout_seconds
        # A few beats per timeout: one late beat does not make a replica dead.
        self.beat_seconds = timeout_seconds / 4
        self.sole_process = sole_process
        # The id this process's waiters are queued under ("" until registered).
        self.replica_id = ""
        self._registering = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # replica id -> (its beat, when this process first saw that beat: loop time)
        self._seen: dict[str, tuple[int, float]] = {}
        self._last_look = 0.0
        # Replicas this process declared dead (a figure for tests and logs).
        self.dropped = 0

    async def start(self) -> None:
        """Register; then drop the dead process's waiters when this is the sole process,
        or else beat until stopped."""
        await self.renew("")
        if not self.sole_process:
            self._task = asyncio.create_task(self._beat_forever(), name="tessera replica beat")
            return
        async with self.store.transaction() as repo:
            features = await repo.drop_other_replicas(self.replica_id)
        if features:
            log.warning(
                "dropped %d queued client(s) of a License Server process that is gone",
                len(features),
            )

    async def stop(self) -> None:
        """Stop beating and leave: this replica's row and any waiter left go now, and
        the features they waited for are announced (a graceful stop)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not self.replica_id:
            return
        with contextlib.suppress(Exception):
            async with self.store.transaction() as repo:
                features = await repo.drop_replica(self.replica_id) or []
                await repo.announce_all([SeatsFreed(f) for f in sorted(set(features))])

    async def renew(self, lapsed_id: str) -> str:
        """Register under a new id when ``lapsed_id`` is still this process's id (its row
        is gone, or it never registered: ""); the id to queue under now. Its queued
        streams are woken: their places were lost, and they queue again."""
        async with self._registering:
            if self.replica_id != lapsed_id:
                return self.replica_id  # another caller renewed it already
            replica_id = uuid.uuid4().hex
            async with self.store.transaction() as repo:
                await repo.register_replica(replica_id, self.clock.now())
            self.replica_id = replica_id
        if lapsed_id:
            log.warning(
                "this replica was declared dead by another (no beat for %g s); "
                "registered anew as %s, its queued clients queue again",
                self.timeout_seconds,
                replica_id,
            )
            self.bus.wake_queued()
        return replica_id

    async def _beat_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.beat_seconds)
            try:
                await self.beat()
            except Exception as error:  # the database is away: judge nobody meanwhile
                self._seen.clear()
                if not failing:  # once, not four times a second
                    log.warning("replica beat failed: %s; retrying", error)
                failing = True
                continue
            if failing:
                log.warning("replica beat works again")
                failing = False

    async def beat(self) -> None:
        """Raise this replica's beat, read the others', and declare dead those whose beat
        stood still for the timeout."""
        replica_id = self.replica_id
        async with self.store.transaction() as repo:
            alive = await repo.beat_replica(replica_id)
            beats = await repo.replica_beats()
        if not alive:
            await self.renew(replica_id)
        now = asyncio.get_running_loop().time()
        if now - self._last_look > self.timeout_seconds:
            # This process looked too long ago (it was paused, or the database was away):
            # a beat that seems to stand still may just not have been seen to move.
            self._seen.clear()
        self._last_look = now
        dead: list[tuple[str, int]] = []
        for other, other_beat in beats.items():
            if other == self.replica_id:
                continue
            seen = self._seen.get(other)
            if seen is None or seen[0] != other_beat:
                self._seen[other] = (other_beat, now)
            elif now - seen[1] >= self.timeout_seconds:
                dead.append((other, other_beat))
        for gone in set(self._seen) - set(beats):
            del self._seen[gone]
        for other, other_beat in dead:
            await self._drop(other, other_beat)

    async def _drop(self, replica_id: str, beat: int) -> None:
        async with self.store.transaction() as repo:
            features = await repo.drop_replica(replica_id, beat)
            if features is None:
                return  # it beat again meanwhile, or another replica dropped it first
            freed = [SeatsFreed(feature) for feature in sorted(set(features))]
            await repo.announce_all(freed)
        self._seen.pop(replica_id, None)
        self.dropped += 1
        log.warning(
            "replica %s has not beaten for %g s: declared dead, %s",
            replica_id,
            self.timeout_seconds,
            _waiters(Counter(features)),
        )
        for event in freed:
            self.bus.publish(event)


def _waiters(features: Counter[str]) -> str:
    if not features:
        return "no queued clients"
    return "dropped its queued clients: " + ", ".join(
        f"{count} for {feature}" for feature, count in sorted(features.items())
    )
