"""Who in the queue is woken, and which waiter may be granted, on SQLite and PostgreSQL.

A freed seat wakes only each replica's first in line (docs/performance.md, "Queue
hand-over"), so whoever leaves the line or leaves seats over must pass the turn on; a
waiter whose replica was declared dead has lost its place and cannot be granted in it.
Streams poll their place every 5 s (``waiter_refresh_seconds``): the waits below are
shorter, so a lost wake-up fails them instead of being covered by that poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from services.license_server.domain.leasing import LeasePolicy, Leasing, QueuePlace
from services.license_server.domain.model import Grant
from services.license_server.server import MIGRATIONS
from services.license_server.store.database import SqlLicenseStore
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import reason_of
from tessera.storage import create_engine, migrate
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import Site
from tests.support.lease_stream import (
    Stream,
    acquire,
    activate,
    hold,
    information,
    receive,
    release,
)
from tests.support.license_pools import new_lease, seed

# Shorter than a stream's 5 s poll of its place.
PROMPTLY = 2.0


async def granted_within(stream: Stream, within: float) -> lpb.LeaseGranted:
    async with asyncio.timeout(within):
        while True:
            response = await receive(stream)
            if response.HasField("granted"):
                return response.granted
            assert response.HasField("queued"), response


async def test_seats_freed_together_reach_every_waiter_they_fit(real_clock_site: Site) -> None:
    await activate(real_clock_site, seats=2)
    holder, _ = await hold(real_clock_site.leases, count=2)
    first, second = real_clock_site.leases.Lease(), real_clock_site.leases.Lease()
    await first.write(acquire(wait=30, host="first"))
    assert (await receive(first)).queued.position == 1
    await second.write(acquire(wait=30, host="second"))
    assert (await receive(second)).queued.position == 2
    await release(holder)
    # Only the first is woken; granted with a seat left over, it passes the turn on.
    await granted_within(first, PROMPTLY)
    await granted_within(second, PROMPTLY)
    info = await information(real_clock_site)
    assert (info.used, info.queued) == (2, 0)


@pytest.mark.parametrize("databases", ["postgres"], indirect=True)
async def test_a_waiter_leaving_the_head_of_the_line_passes_the_turn_to_another_replica(
    real_clock_site: Site,
) -> None:
    await activate(real_clock_site, seats=2)
    replica = await real_clock_site.start_replica()
    holder, _ = await hold(real_clock_site.leases)
    # First in line wants both seats (one is free), and gives up soon.
    head = real_clock_site.leases.Lease()
    await head.write(acquire(count=2, wait=0.5, host="head"))
    assert (await receive(head)).queued.position == 1
    behind = lpb_grpc.LeaseServiceStub(real_clock_site.channel(replica.port)).Lease()
    await behind.write(acquire(wait=30, host="behind"))
    assert (await receive(behind)).queued.position == 2
    assert (await receive(head)).denied.reason == "QUEUE_TIMEOUT"
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await head.read()
    assert reason_of(ended.value) == "QUEUE_TIMEOUT"
    # The free seat goes to the one behind, on the other replica, without waiting for
    # its poll.
    await granted_within(behind, PROMPTLY)
    info = await information(real_clock_site)
    assert (info.used, info.queued) == (2, 0)
    await release(holder)


# Two replicas' domains over one database, as two License Server processes have them.

Replicas = Callable[[int], Awaitable[list[Leasing]]]
TIMEOUT = 0.2  # --replica-timeout here


@pytest.fixture
async def replicas(databases: DatabaseFactory, clock: FakeClock) -> AsyncIterator[Replicas]:
    url = await databases.new("license")
    engines = []

    async def make(count: int) -> list[Leasing]:
        made = []
        for _ in range(count):
            engine = create_engine(url)
            engines.append(engine)
            await migrate(engine, MIGRATIONS)
            policy = LeasePolicy(replica_timeout_seconds=TIMEOUT)
            made.append(Leasing(SqlLicenseStore(engine), policy, clock))
        return made

    yield make
    for engine in engines:
        await engine.dispose()


async def test_a_dropped_waiter_is_not_granted_and_queues_again_behind_later_ones(
    replicas: Replicas,
) -> None:
    a, b = await replicas(2)
    await seed(a, 1)
    holder = await a.acquire(new_lease(client="holder"))
    dropped = await a.enqueue(new_lease(client="on-a"))
    # Replica b declares replica a dead (its beat stood still): a's waiter is gone.
    async with b.store.transaction() as repo:
        assert await repo.drop_replica(a.replicas.replica_id) == ["client.station"]
    later = await b.enqueue(new_lease(client="on-b"))
    assert (await b.try_dequeue(later, None)) == QueuePlace(later, 1)

    assert await a.release(holder.lease.lease_id, holder.secret)
    # Replica a, back, asks for its waiter: a seat is free and nobody live is ahead of
    # the old ticket, but the place is gone; it queues again, behind the later one.
    outcome = await a.try_dequeue(dropped, None)
    assert isinstance(outcome, QueuePlace), outcome
    assert outcome.waiter.ticket > later.ticket and outcome.position == 2
    assert outcome.waiter.replica_id == a.replicas.replica_id != dropped.replica_id
    granted = await b.try_dequeue(later, None)
    assert isinstance(granted, Grant) and granted.lease.client_host == "on-b"
    [info] = await a.information("client.station")
    assert (info.activated, info.used, info.queued) == (1, 1, 1)


async def until(condition: Callable[[], Awaitable[bool]], within: float) -> None:
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < within, "not in time"
        await asyncio.sleep(0.02)


async def test_a_replica_whose_beat_stands_still_is_declared_dead_and_registers_anew(
    replicas: Replicas,
) -> None:
    a, b = await replicas(2)
    await seed(a, 1)
    await a.acquire(new_lease(client="holder"))
    waiter = await a.enqueue(new_lease(client="on-a"))
    await b.replicas.renew("")
    # Both beating: nobody is declared dead, however long.
    started = time.monotonic()
    while time.monotonic() - started < 3 * TIMEOUT:
        await a.replicas.beat()
        last_beat = time.monotonic()
        await b.replicas.beat()
        await asyncio.sleep(TIMEOUT / 4)
    assert (a.replicas.dropped, b.replicas.dropped) == (0, 0)
    assert (await a.try_dequeue(waiter, None)) == QueuePlace(waiter, 1)

    # Replica a falls silent: b declares it dead once a's beat stood still for the timeout.
    async def a_dropped() -> bool:
        await b.replicas.beat()
        return b.replicas.dropped == 1

    await until(a_dropped, within=10 * TIMEOUT)
    assert time.monotonic() - last_beat >= TIMEOUT
    [info] = await b.information("client.station")
    assert info.queued == 0
    # Its next beat tells a it was declared dead: it registers under a new id.
    old_id = a.replicas.replica_id
    await a.replicas.beat()
    assert a.replicas.replica_id != old_id
    async with a.store.transaction() as repo:
        assert set(await repo.replica_beats()) == {a.replicas.replica_id, b.replicas.replica_id}
