"""License Server leasing over real migrated databases (SQLite and PostgreSQL).

Pools are seeded straight through the repository (a StoredCertificate inside a
transaction), so these tests exercise seat counting, not signatures.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.license_server.domain.errors import (
    CountAboveActivated,
    FeatureNotLicensed,
    LeaseExpired,
    LeaseNotFound,
    LeaseReleased,
    NoSeatAvailable,
    StaleLeaseEpoch,
)
from services.license_server.domain.group_commit import GATHER_AFTER
from services.license_server.domain.leasing import CLOCK_STEP_TOLERANCE, LeasePolicy, Leasing
from services.license_server.domain.model import Grant, PoolInformation
from services.license_server.server import MIGRATIONS
from services.license_server.store.database import SqlLicenseStore
from services.license_server.store.leases import SqlLeaseQueries
from services.license_server.store.tables import leases
from tessera.storage import create_engine, migrate
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.license_pools import new_lease, seed

FEATURE = "client.station"
TTL = 90

Replicas = Callable[[int], Awaitable[list[Leasing]]]


@pytest.fixture
async def replicas(databases: DatabaseFactory, clock: FakeClock) -> AsyncIterator[Replicas]:
    """``await replicas(n)``: n License Server replicas (own engine each) over one database."""
    url = await databases.new("license")
    engines = []

    async def make(count: int) -> list[Leasing]:
        made = []
        for _ in range(count):
            engine = create_engine(url)
            engines.append(engine)
            await migrate(engine, MIGRATIONS)
            made.append(Leasing(SqlLicenseStore(engine), LeasePolicy(ttl_seconds=TTL), clock))
        return made

    yield make
    for engine in engines:
        await engine.dispose()


@pytest.fixture
async def leasing(replicas: Replicas) -> Leasing:
    [one] = await replicas(1)
    return one


async def pool(leasing: Leasing, feature: str = FEATURE) -> PoolInformation:
    [info] = await leasing.information(feature)
    return info


async def held_seats(leasing: Leasing, feature: str = FEATURE) -> int:
    """Seats of the held leases in the leases table (what ``used`` must always equal)."""
    async with leasing.store.engine.connect() as connection:
        total = await connection.scalar(
            select(func.coalesce(func.sum(leases.c.count), 0)).where(
                leases.c.feature == feature, leases.c.released_at.is_(None)
            )
        )
    return int(total or 0)


async def test_counted_checkout_is_all_or_nothing(leasing: Leasing) -> None:
    await seed(leasing, 3)
    await leasing.acquire(new_lease())
    with pytest.raises(NoSeatAvailable) as refused:
        await leasing.acquire(new_lease(count=3))
    assert refused.value.metadata["available"] == "2"
    info = await pool(leasing)
    assert (info.activated, info.used, info.available) == (3, 1, 2)
    assert await held_seats(leasing) == 1
    grant = await leasing.acquire(new_lease(count=2))
    assert grant.lease.count == 2
    assert (await pool(leasing)).used == 3


async def test_more_than_activated_and_unlicensed_features_are_refused(leasing: Leasing) -> None:
    await seed(leasing, 2)
    with pytest.raises(CountAboveActivated):
        await leasing.acquire(new_lease(count=3))
    with pytest.raises(FeatureNotLicensed):
        await leasing.acquire(new_lease(feature="client.script"))
    assert (await pool(leasing)).used == 0
    assert await held_seats(leasing) == 0


async def test_seats_of_two_certificates_add_up(leasing: Leasing) -> None:
    await seed(leasing, 2)
    await seed(leasing, 3)
    assert (await pool(leasing)).activated == 5
    await leasing.acquire(new_lease(count=5))
    assert (await pool(leasing)).available == 0


async def test_resume_bumps_the_epoch_and_keeps_the_same_seats(
    leasing: Leasing, clock: FakeClock
) -> None:
    await seed(leasing, 2)
    grant = await leasing.acquire(new_lease(count=2))
    assert grant.lease.epoch == 1
    clock.advance(30)
    resumed = await leasing.resume(grant.lease.lease_id, grant.secret)
    assert resumed.resumed
    assert resumed.lease.lease_id == grant.lease.lease_id
    assert resumed.lease.epoch == 2
    assert resumed.lease.count == 2
    assert resumed.lease.expires_at == clock.now() + dt.timedelta(seconds=TTL)
    assert (await pool(leasing)).used == 2  # no second seat for the same client
    assert await held_seats(leasing) == 2

    with pytest.raises(StaleLeaseEpoch):
        await leasing.heartbeat(grant.lease.lease_id, grant.secret, epoch=1)
    with pytest.raises(StaleLeaseEpoch):
        await leasing.release(grant.lease.lease_id, grant.secret, epoch=1)
    assert (await pool(leasing)).used == 2
    clock.advance(10)
    expires = await leasing.heartbeat(grant.lease.lease_id, grant.secret, epoch=2)
    assert expires == clock.now() + dt.timedelta(seconds=TTL)
    again = await leasing.resume(grant.lease.lease_id, grant.secret)
    assert again.lease.epoch == 3


async def test_resume_after_expiry_is_refused(leasing: Leasing, clock: FakeClock) -> None:
    await seed(leasing, 1)
    grant = await leasing.acquire(new_lease())
    clock.advance(TTL)  # exactly at expiry: expired
    with pytest.raises(LeaseExpired):
        await leasing.resume(grant.lease.lease_id, grant.secret)
    with pytest.raises(LeaseExpired):
        await leasing.heartbeat(grant.lease.lease_id, grant.secret)
    assert await leasing.release_expired() == 1
    with pytest.raises(LeaseExpired):
        await leasing.resume(grant.lease.lease_id, grant.secret)
    assert (await pool(leasing)).used == 0


async def test_wrong_secret_looks_like_no_lease(leasing: Leasing) -> None:
    await seed(leasing, 1)
    grant = await leasing.acquire(new_lease())
    with pytest.raises(LeaseNotFound):
        await leasing.resume(grant.lease.lease_id, grant.secret + "x")
    with pytest.raises(LeaseNotFound):
        await leasing.heartbeat(grant.lease.lease_id, "wrong")
    with pytest.raises(LeaseNotFound):
        await leasing.release(grant.lease.lease_id, "wrong")
    assert (await pool(leasing)).used == 1


async def test_release_is_idempotent(leasing: Leasing) -> None:
    await seed(leasing, 2)
    grant = await leasing.acquire(new_lease(count=2))
    assert await leasing.release(grant.lease.lease_id, grant.secret) is True
    assert await leasing.release(grant.lease.lease_id, grant.secret) is False
    assert await leasing.release(grant.lease.lease_id, grant.secret, epoch=1) is False
    info = await pool(leasing)
    assert (info.used, info.available) == (0, 2)
    assert await held_seats(leasing) == 0
    with pytest.raises(LeaseReleased):
        await leasing.heartbeat(grant.lease.lease_id, grant.secret)


async def test_release_expired_frees_exactly_the_expired_leases(
    leasing: Leasing, clock: FakeClock
) -> None:
    await seed(leasing, 10)
    short = [
        await leasing.acquire(new_lease(client=f"short-{i}"), ttl_seconds=30) for i in range(3)
    ]
    long = [await leasing.acquire(new_lease(count=2, client=f"long-{i}")) for i in range(2)]
    kept_alive = await leasing.acquire(new_lease(client="kept"), ttl_seconds=30)
    assert (await pool(leasing)).used == 8

    clock.advance(20)
    await leasing.heartbeat(kept_alive.lease.lease_id, kept_alive.secret)
    clock.advance(10)  # the short leases expire now, exactly at their TTL
    assert await leasing.release_expired() == 3
    assert await leasing.release_expired() == 0  # idempotent
    assert (await pool(leasing)).used == 5
    assert await held_seats(leasing) == 5
    for grant in short:
        with pytest.raises(LeaseExpired):
            await leasing.heartbeat(grant.lease.lease_id, grant.secret)
        assert await leasing.release(grant.lease.lease_id, grant.secret) is False
    for grant in [*long, kept_alive]:
        await leasing.heartbeat(grant.lease.lease_id, grant.secret)

    clock.advance(TTL + 1)
    assert await leasing.release_expired() == 3
    assert await leasing.release_expired() == 0
    assert (await pool(leasing)).used == 0


async def test_release_expired_works_in_batches(replicas: Replicas, clock: FakeClock) -> None:
    [leasing] = await replicas(1)
    leasing.policy = LeasePolicy(ttl_seconds=TTL, sweep_batch=2)
    await seed(leasing, 7)
    for i in range(7):
        await leasing.acquire(new_lease(client=f"ws-{i}"))
    clock.advance(TTL)
    assert await leasing.release_expired() == 7
    assert (await pool(leasing)).used == 0


async def test_replicas_never_over_allocate(replicas: Replicas, clock: FakeClock) -> None:
    """THE invariant: 60 clients on 3 replicas contend for 10 seats; exactly 10 win."""
    servers = await replicas(3)
    await seed(servers[0], 10)

    results = await asyncio.gather(
        *(servers[i % 3].acquire(new_lease(client=f"ws-{i:02}")) for i in range(60)),
        return_exceptions=True,
    )
    granted = [r for r in results if isinstance(r, Grant)]
    refused = [r for r in results if isinstance(r, NoSeatAvailable)]
    unexpected = [r for r in results if not isinstance(r, Grant | NoSeatAvailable)]
    assert unexpected == []
    assert len(granted) == 10
    assert len(refused) == 50
    assert len({grant.lease.lease_id for grant in granted}) == 10
    for server in servers:
        info = await pool(server)
        assert (info.activated, info.used, info.available) == (10, 10, 0)
    assert await held_seats(servers[0]) == 10

    # Half check in (some twice, on different replicas) while every replica sweeps
    # the rest, which have expired meanwhile: each seat comes back exactly once.
    clock.advance(TTL + 1)
    checkins = [
        servers[(i + k) % 3].release(grant.lease.lease_id, grant.secret)
        for i, grant in enumerate(granted[:5])
        for k in range(2)
    ]
    sweeps = [server.release_expired() for server in servers for _ in range(3)]
    outcomes = await asyncio.gather(*checkins, *sweeps, return_exceptions=True)
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    released_by_checkin = sum(1 for o in outcomes[: len(checkins)] if o is True)
    freed_by_sweeps = sum(outcomes[len(checkins) :])  # type: ignore[arg-type]
    assert released_by_checkin + freed_by_sweeps == 10
    assert released_by_checkin <= 5
    for server in servers:
        info = await pool(server)
        assert (info.used, info.available) == (0, 10)
    assert await held_seats(servers[0]) == 0
    assert await servers[1].release_expired() == 0


async def test_concurrent_acquire_and_release_keep_used_equal_to_held(
    replicas: Replicas,
) -> None:
    servers = await replicas(3)
    await seed(servers[0], 4)

    @dataclass
    class Tally:
        granted: int = 0
        refused: int = 0

    tally = Tally()

    async def client(index: int) -> None:
        server = servers[index % 3]
        for _ in range(5):
            try:
                grant = await server.acquire(new_lease(client=f"ws-{index}"))
            except NoSeatAvailable:
                tally.refused += 1
                continue
            tally.granted += 1
            assert await servers[(index + 1) % 3].release(grant.lease.lease_id, grant.secret)

    await asyncio.gather(*(client(i) for i in range(12)))
    assert tally.granted + tally.refused == 60
    assert tally.granted >= 4
    info = await pool(servers[2])
    assert (info.used, info.available) == (0, 4)
    assert await held_seats(servers[0]) == 0


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE pools SET used = activated + 1",
        "UPDATE pools SET used = -1",
        "UPDATE pools SET activated = used - 1",
    ],
)
async def test_database_refuses_used_outside_zero_to_activated(
    leasing: Leasing, statement: str
) -> None:
    await seed(leasing, 3)
    await leasing.acquire(new_lease())
    with pytest.raises(IntegrityError):
        async with leasing.store.engine.begin() as connection:
            await connection.execute(text(statement))
    info = await pool(leasing)
    assert (info.activated, info.used) == (3, 1)


# The group commit of checkouts and check-ins (domain/group_commit.py): calls that arrive
# together share one transaction, and each still gets the answer it would have got alone,
# in arrival order. ``asyncio.gather`` starts every call before the first batch begins, so
# the calls of one gather land in one batch; the tests assert that too, so they cannot
# pass by accident with one transaction per call.


async def test_one_batch_judges_checkouts_in_arrival_order_all_or_nothing(
    leasing: Leasing,
) -> None:
    await seed(leasing, 10)
    counts = [4, 4, 4, 2, 1]
    results = await asyncio.gather(
        *(leasing.acquire(new_lease(count, client=f"es-{i}")) for i, count in enumerate(counts)),
        return_exceptions=True,
    )
    assert leasing.group_commit.transactions == 1
    assert leasing.group_commit.calls == len(counts)
    # One at a time: 4 (6 left), 4 (2 left), 4 refused, 2 (0 left), 1 refused.
    assert [type(r) for r in results] == [Grant, Grant, NoSeatAvailable, Grant, NoSeatAvailable]
    granted = [r for r in results if isinstance(r, Grant)]
    assert [g.lease.count for g in granted] == [4, 4, 2]
    assert len({g.lease.lease_id for g in granted}) == 3
    info = await pool(leasing)
    assert (info.activated, info.used) == (10, 10)
    assert await held_seats(leasing) == 10


async def test_check_ins_free_seats_for_the_checkouts_of_the_same_batch(leasing: Leasing) -> None:
    await seed(leasing, 2)
    first = await leasing.acquire(new_lease(client="ws-1"))
    second = await leasing.acquire(new_lease(client="ws-2"))
    before = leasing.group_commit.transactions
    results = await asyncio.gather(
        leasing.acquire(new_lease(2, client="es-1")),
        leasing.release(first.lease.lease_id, first.secret),
        leasing.release(second.lease.lease_id, second.secret),
    )
    assert leasing.group_commit.transactions == before + 1
    grant, released_first, released_second = results
    assert isinstance(grant, Grant) and grant.lease.count == 2
    assert (released_first, released_second) == (True, True)
    assert (await pool(leasing)).used == 2
    assert await held_seats(leasing) == 2


async def test_each_check_in_of_a_batch_gets_its_own_answer(leasing: Leasing) -> None:
    """A wrong secret beside the right one for the same lease, and a repeat: the right one
    releases, the repeat hears 'already released', the wrong one hears 'no such lease'."""
    await seed(leasing, 3)
    grant = await leasing.acquire(new_lease())
    lease_id = grant.lease.lease_id
    results = await asyncio.gather(
        leasing.release(lease_id, "not-the-secret"),
        leasing.release(lease_id, grant.secret),
        leasing.release(lease_id, grant.secret),
        leasing.release("no-such-lease", grant.secret),
        return_exceptions=True,
    )
    assert isinstance(results[0], LeaseNotFound)
    assert list(results[1:3]) == [True, False]
    assert isinstance(results[3], LeaseNotFound)
    assert (await pool(leasing)).used == 0
    assert await held_seats(leasing) == 0


async def test_crossed_ids_and_secrets_in_one_batch_release_nothing(leasing: Leasing) -> None:
    """Each of two holders checks in the other's lease id with its own secret: both ids and
    both secrets are in the batch, yet neither pair is, so nothing is released."""
    await seed(leasing, 2)
    a = await leasing.acquire(new_lease(client="ws-a"))
    b = await leasing.acquire(new_lease(client="ws-b"))
    results = await asyncio.gather(
        leasing.release(b.lease.lease_id, a.secret),
        leasing.release(a.lease.lease_id, b.secret),
        return_exceptions=True,
    )
    assert all(isinstance(r, LeaseNotFound) for r in results), results
    assert (await pool(leasing)).used == 2
    assert await held_seats(leasing) == 2
    assert await leasing.heartbeat(a.lease.lease_id, a.secret)
    assert await leasing.release(b.lease.lease_id, b.secret) is True


async def test_resumes_of_one_batch_fence_each_lease_as_single_resumes_would(
    leasing: Leasing, clock: FakeClock
) -> None:
    """Three leases resumed at once, one of them twice, plus a wrong secret and an expired
    lease: one transaction; each resume raises its own lease's epoch (the repeat twice:
    the earlier of the two is answered as fenced out, since its stream could not yet
    listen for the repeat's event), and the refused ones are told why."""
    await seed(leasing, 5)
    grants = [await leasing.acquire(new_lease(client=f"ws-{i}")) for i in range(3)]
    stale = await leasing.acquire(new_lease(client="ws-stale"), ttl_seconds=5)
    clock.advance(10)  # the stale lease's TTL ran out (not yet swept); the others' did not
    before = leasing.group_commit.transactions
    results = await asyncio.gather(
        *(leasing.resume(g.lease.lease_id, g.secret) for g in grants),
        leasing.resume(grants[0].lease.lease_id, grants[0].secret),
        leasing.resume(grants[1].lease.lease_id, "not-the-secret"),
        leasing.resume(stale.lease.lease_id, stale.secret),
        return_exceptions=True,
    )
    assert leasing.group_commit.transactions == before + 1
    assert isinstance(results[0], StaleLeaseEpoch)
    resumed = [r for r in results[1:4] if isinstance(r, Grant)]
    assert len(resumed) == 3 and all(g.resumed for g in resumed)
    assert [g.lease.epoch for g in resumed] == [2, 2, 3]
    assert all(g.lease.expires_at == clock.now() + dt.timedelta(seconds=TTL) for g in resumed)
    assert isinstance(results[4], LeaseNotFound)
    assert isinstance(results[5], LeaseExpired)
    # The fence holds: the first resume of lease 0 was overtaken by the repeat.
    with pytest.raises(StaleLeaseEpoch):
        await leasing.heartbeat(grants[0].lease.lease_id, grants[0].secret, epoch=2)
    assert await leasing.heartbeat(grants[0].lease.lease_id, grants[0].secret, epoch=3)
    assert (await pool(leasing)).used == 4
    assert await held_seats(leasing) == 4


async def test_a_heartbeat_flush_fences_a_stream_that_missed_its_resume_event(
    leasing: Leasing,
) -> None:
    """Two streams beat for one lease in one flush: the current holder (epoch 2) and a
    stale stream still at epoch 1, its resume's event having gone out before it listened.
    The flush extends the lease once; only the holder is acknowledged, with the expiry
    written; the stale stream's heartbeat is refused as resumed elsewhere."""
    await seed(leasing, 1)
    stale = await leasing.acquire(new_lease())
    current = await leasing.resume(stale.lease.lease_id, stale.secret)  # epoch 2, elsewhere
    known = leasing.clock.now() + dt.timedelta(seconds=TTL)
    beats = [asyncio.create_task(leasing.keep_alive(g, known)) for g in (stale, current)]
    await asyncio.sleep(0)  # one turn of the loop: each task runs to its wait for a flush
    assert leasing.heartbeats.waiting == 2
    assert not any(beat.done() for beat in beats)
    assert await leasing.heartbeats.flush() == 1
    with pytest.raises(StaleLeaseEpoch):
        await beats[0]
    assert await beats[1] == leasing.clock.now() + dt.timedelta(seconds=TTL)


async def lease_expiry(leasing: Leasing, lease_id: str) -> dt.datetime:
    async with leasing.store.engine.connect() as connection:
        row = (
            await connection.execute(
                select(leases.c.expires_at).where(leases.c.lease_id == lease_id)
            )
        ).one()
    expires_at: dt.datetime = row[0]
    return expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=dt.UTC)


async def test_a_clock_set_back_while_running_cuts_leases_to_one_ttl(
    leasing: Leasing, clock: FakeClock
) -> None:
    """Leases granted and heartbeaten while the clock was a day ahead: once the sweeper
    sees the clock a day back, each expires one TTL (its own) from the corrected now, and
    with no heartbeat is freed then, not a day later. A lease granted after the step is
    left alone."""
    await seed(leasing, 3)
    assert await leasing.notice_clock_step() == 0  # the first look: nothing to compare
    ahead = await leasing.acquire(new_lease(client="ws-ahead"))
    short = await leasing.acquire(new_lease(client="ws-short"), ttl_seconds=10)
    clock.advance(-86_400)
    after = await leasing.acquire(new_lease(client="ws-after"))
    assert await leasing.notice_clock_step() == 2
    now = clock.now()
    assert await lease_expiry(leasing, ahead.lease.lease_id) == now + dt.timedelta(seconds=TTL)
    assert await lease_expiry(leasing, short.lease.lease_id) == now + dt.timedelta(seconds=10)
    assert await lease_expiry(leasing, after.lease.lease_id) == now + dt.timedelta(seconds=TTL)
    assert await leasing.notice_clock_step() == 0  # noticed once
    clock.advance(10)
    assert await leasing.release_expired() == 1  # the 10 s lease
    clock.advance(TTL - 10)
    assert await leasing.release_expired() == 2
    assert (await pool(leasing)).used == 0


async def test_a_clock_step_within_the_tolerance_is_not_a_set_back(
    leasing: Leasing, clock: FakeClock
) -> None:
    await seed(leasing, 1)
    await leasing.notice_clock_step()
    grant = await leasing.acquire(new_lease())
    clock.advance(-CLOCK_STEP_TOLERANCE.total_seconds())
    assert await leasing.notice_clock_step() == 0
    assert await lease_expiry(leasing, grant.lease.lease_id) == grant.lease.expires_at


async def test_at_start_leases_from_a_clock_that_was_ahead_get_one_ttl(
    replicas: Replicas, clock: FakeClock
) -> None:
    """A License Server that ran a day ahead stops; one starts with the clock put right
    (a fresh process: it never saw the wrong time). Before serving it cuts the leases
    the other one granted to one TTL from now; the ones within one TTL stay as they are."""
    first, second = await replicas(2)
    await seed(first, 2)
    clock.advance(86_400)
    stretched = await first.acquire(new_lease(client="ws-ahead"))
    clock.advance(-86_400)
    normal = await first.acquire(new_lease(client="ws-now"))
    clock.advance(30)
    assert await second.shorten_stretched_leases() == 1
    now = clock.now()
    assert await lease_expiry(second, stretched.lease.lease_id) == now + dt.timedelta(seconds=TTL)
    assert await lease_expiry(second, normal.lease.lease_id) == normal.lease.expires_at
    # The client of the stretched lease may still resume it within that TTL, as any lease.
    resumed = await second.resume(stretched.lease.lease_id, stretched.secret)
    assert resumed.lease.expires_at == now + dt.timedelta(seconds=TTL)


async def test_check_ins_do_not_wait_behind_a_backlog_of_checkouts(leasing: Leasing) -> None:
    """With more checkouts pending than a batch takes, a check-in still joins the next
    batch instead of waiting until the checkouts are through."""
    await seed(leasing, 10)
    held = await leasing.acquire(new_lease(client="ws-held"))
    leasing.group_commit.max_batch = 2
    finished: list[str] = []

    async def track(name: str, call: Awaitable[object]) -> None:
        await call
        finished.append(name)

    await asyncio.gather(
        *(track(f"checkout-{i}", leasing.acquire(new_lease(client=f"ws-{i}"))) for i in range(6)),
        track("check-in", leasing.release(held.lease.lease_id, held.secret)),
    )
    # Batches: checkouts 0-1 with the check-in, then 2-3, then 4-5.
    assert finished.index("check-in") < finished.index("checkout-2")
    assert (await pool(leasing)).used == 6


def gathering(leasing: Leasing, seconds: float) -> Leasing:
    """Another Leasing over the same store whose group commit gathers for ``seconds``."""
    policy = LeasePolicy(ttl_seconds=TTL, group_commit_delay_seconds=seconds)
    return Leasing(leasing.store, policy, leasing.clock)


async def behind_a_batch(server: Leasing, calls: int) -> tuple[asyncio.Task[Grant], list[Any]]:
    """A checkout whose batch is held up in its transaction (the pool locked), and then
    ``calls`` more checkouts waiting behind it; the batch goes on when this returns."""
    async with server.store.transaction() as repo:
        await repo.lock_pool(FEATURE)  # PostgreSQL: the row; SQLite: the one connection
        first = asyncio.create_task(server.acquire(new_lease(client="ws-first")))
        # Yield (no timed wait) until the committer has the first call in its batch, and
        # then until the others wait behind it.
        while not server.group_commit.calls_in_flight:  # noqa: ASYNC110
            await asyncio.sleep(0)
        behind = [
            asyncio.create_task(server.acquire(new_lease(client=f"ws-behind-{i}")))
            for i in range(calls)
        ]
        while server.group_commit.waiting < calls:  # noqa: ASYNC110
            await asyncio.sleep(0)
    return first, behind


async def gathering_behind_a_batch(leasing: Leasing, seconds: float) -> tuple[Leasing, list[Any]]:
    """A server that gathers for ``seconds``, once one batch of one call committed with
    GATHER_AFTER checkouts waiting behind it (the committer gathers now)."""
    await seed(leasing, 20)
    server = gathering(leasing, seconds)
    first, behind = await behind_a_batch(server, GATHER_AFTER)
    await first
    return server, behind


async def test_under_load_the_next_batch_gathers_the_calls_that_come_while_it_waits(
    leasing: Leasing,
) -> None:
    server, behind = await gathering_behind_a_batch(leasing, 0.5)
    late = [asyncio.create_task(server.acquire(new_lease(client=f"ws-late-{i}"))) for i in range(4)]
    grants = await asyncio.wait_for(asyncio.gather(*behind, *late), 30)
    assert all(isinstance(grant, Grant) for grant in grants)
    # The first batch, then one for the 8 behind it and the 4 late calls together.
    assert (server.group_commit.transactions, server.group_commit.calls) == (2, 13)
    assert (await pool(leasing)).used == await held_seats(leasing) == 13


async def test_a_gathering_batch_starts_once_the_callers_just_answered_are_back(
    leasing: Leasing,
) -> None:
    """The committer stops gathering as soon as as many calls joined as its last batch
    answered (here one), not when the delay (far longer than the test may take) ends."""
    server, behind = await gathering_behind_a_batch(leasing, 3600)  # for one more call
    while server.group_commit._gathering is None:  # noqa: ASYNC110
        await asyncio.sleep(0)
    again = asyncio.create_task(server.acquire(new_lease(client="ws-first")))
    grants = await asyncio.wait_for(asyncio.gather(*behind, again), 30)
    assert all(isinstance(grant, Grant) for grant in grants)
    assert (server.group_commit.transactions, server.group_commit.calls) == (2, 2 + GATHER_AFTER)
    assert (await pool(leasing)).used == await held_seats(leasing) == 2 + GATHER_AFTER


async def test_a_gather_nobody_joins_ends_after_the_delay(leasing: Leasing) -> None:
    server, behind = await gathering_behind_a_batch(leasing, 0.05)
    grants = await asyncio.wait_for(asyncio.gather(*behind), 30)
    assert all(isinstance(grant, Grant) for grant in grants)
    assert (server.group_commit.transactions, server.group_commit.calls) == (2, 1 + GATHER_AFTER)


async def test_a_lightly_loaded_server_does_not_gather(leasing: Leasing) -> None:
    """A call with nothing ahead, and a few calls behind a batch, start at once: the
    delay (here far longer than the test may take) is only for a backlog."""
    await seed(leasing, 20)
    server = gathering(leasing, 3600)
    for n in range(3):  # one after another, each alone
        await asyncio.wait_for(server.acquire(new_lease(client=f"ws-alone-{n}")), 30)
    first, behind = await behind_a_batch(server, GATHER_AFTER - 1)
    await asyncio.wait_for(asyncio.gather(first, *behind), 30)
    assert (server.group_commit.transactions, server.group_commit.calls) == (5, 3 + GATHER_AFTER)
    assert (await pool(leasing)).used == 3 + GATHER_AFTER


async def test_a_checkout_given_up_while_its_batch_waits_takes_nothing(leasing: Leasing) -> None:
    """The caller of a checkout goes away (a deadline, a cancelled RPC) while its batch
    waits for the pool: the batch gives its seats back and writes no lease."""
    await seed(leasing, 3)
    async with leasing.store.transaction() as repo:
        await repo.lock_pool(FEATURE)  # PostgreSQL: the row; SQLite: the one connection
        caller = asyncio.create_task(leasing.acquire(new_lease(client="ws-gone")))
        # Yield (no timed wait) until the committer has taken the call into its batch.
        while not leasing.group_commit.calls_in_flight:  # noqa: ASYNC110
            await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
    kept = await leasing.acquire(new_lease(client="ws-kept"))  # after that batch
    assert (await pool(leasing)).used == 1
    assert await held_seats(leasing) == 1
    async with leasing.store.engine.connect() as connection:
        rows = await connection.scalar(select(func.count()).select_from(leases))
    assert rows == 1
    assert await leasing.release(kept.lease.lease_id, kept.secret) is True


async def test_a_committer_stopped_mid_batch_leaves_no_caller_waiting(leasing: Leasing) -> None:
    """The event loop cancels the committer (the server stops) while a batch waits for
    the pool: its callers and those queued behind it are cancelled, not left hanging."""
    await seed(leasing, 3)
    async with leasing.store.transaction() as repo:
        await repo.lock_pool(FEATURE)
        first = asyncio.create_task(leasing.acquire(new_lease(client="ws-1")))
        # Yield (no timed wait) until the committer has taken the call into its batch.
        while not leasing.group_commit.calls_in_flight:  # noqa: ASYNC110
            await asyncio.sleep(0)
        behind = asyncio.create_task(leasing.acquire(new_lease(client="ws-2")))
        await asyncio.sleep(0)  # queued behind the batch in flight
        committer = leasing.group_commit._committer
        assert committer is not None
        committer.cancel()
        for caller in (first, behind):
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(caller, 10)
    assert (await pool(leasing)).used == 0
    assert isinstance(await leasing.acquire(new_lease()), Grant)  # a new committer starts


async def test_a_committer_stopped_while_it_gathers_leaves_no_caller_waiting(
    leasing: Leasing,
) -> None:
    server, behind = await gathering_behind_a_batch(leasing, 3600)
    committer = server.group_commit._committer
    assert committer is not None
    committer.cancel()
    for caller in behind:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 10)
    assert (await pool(leasing)).used == await held_seats(leasing) == 1


async def test_batches_on_two_replicas_never_deadlock_over_two_pools(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each replica's batch asks for two features' seats, the calls arriving in opposite
    orders; each batch pauses after its first pool row (for at most 2 s) so the two
    overlap. Pool rows are taken in one order, so neither waits on the other in a cycle,
    and every call is granted."""
    one, two = await replicas(2)
    await seed(one, 5, "feat.x")
    await seed(one, 5, "feat.y")
    take_seats = SqlLeaseQueries.take_seats
    both_hold_one = asyncio.Barrier(2)
    taken: dict[int, int] = {}

    async def take_then_meet(
        self: SqlLeaseQueries, feature: str, count: int, now: dt.datetime, ticket: int | None = None
    ) -> bool:
        took = await take_seats(self, feature, count, now, ticket)
        taken[id(self)] = taken.get(id(self), 0) + 1
        if taken[id(self)] == 1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(both_hold_one.wait(), 2)
        return took

    monkeypatch.setattr(SqlLeaseQueries, "take_seats", take_then_meet)
    results = await asyncio.gather(
        one.acquire(new_lease(feature="feat.x", client="a1")),
        one.acquire(new_lease(feature="feat.y", client="a2")),
        two.acquire(new_lease(feature="feat.y", client="b1")),
        two.acquire(new_lease(feature="feat.x", client="b2")),
        return_exceptions=True,
    )
    assert all(isinstance(r, Grant) for r in results), results
    assert (await pool(one, "feat.x")).used == 2
    assert (await pool(one, "feat.y")).used == 2


async def read_only(engine: AsyncEngine, on: bool) -> None:
    """Make the License Server's database refuse writes (or take them again)."""
    if engine.dialect.name == "sqlite":  # the pool's one connection, outside a transaction
        async with engine.connect() as connection:
            raw = await connection.get_raw_connection()
            assert raw.driver_connection is not None
            await raw.driver_connection.execute(f"PRAGMA query_only = {int(on)}")
        return
    # A connection of its own that may write, whatever the database's default says.
    admin = create_async_engine(
        engine.url, connect_args={"server_settings": {"default_transaction_read_only": "off"}}
    )
    async with admin.begin() as connection:
        database = await connection.scalar(text("SELECT current_database()"))
        setting = "on" if on else "off"
        await connection.execute(
            text(f'ALTER DATABASE "{database}" SET default_transaction_read_only = {setting}')
        )
    await admin.dispose()
    await engine.dispose()  # new connections read the setting


async def test_a_batch_that_fails_answers_every_caller_and_writes_nothing(
    leasing: Leasing,
) -> None:
    """The database refuses the batch's writes: every caller in it gets the error, no seat
    is taken or given back, and the next batch (writable again) works."""
    await seed(leasing, 5)
    held = await leasing.acquire(new_lease(client="ws-held"))
    engine = leasing.store.engine
    await read_only(engine, True)
    results = await asyncio.gather(
        leasing.acquire(new_lease(client="ws-1")),
        leasing.acquire(new_lease(2, client="es-1")),
        leasing.release(held.lease.lease_id, held.secret),
        return_exceptions=True,
    )
    assert all(isinstance(r, Exception) for r in results), results
    assert not any(isinstance(r, Grant | bool) for r in results)

    await read_only(engine, False)
    info = await pool(leasing)
    assert (info.activated, info.used) == (5, 1)
    assert await held_seats(leasing) == 1
    assert await leasing.release(held.lease.lease_id, held.secret) is True
    assert isinstance(await leasing.acquire(new_lease(5)), Grant)


async def test_batches_on_replicas_never_over_allocate(replicas: Replicas) -> None:
    """Batches of mixed counts on two replicas race for one pool's seats: whatever each
    batch's conditional UPDATE loses is retried call by call, never over the pool."""
    servers = await replicas(2)
    await seed(servers[0], 12)
    results = await asyncio.gather(
        *(servers[i % 2].acquire(new_lease(1 + i % 3, client=f"c-{i}")) for i in range(40)),
        return_exceptions=True,
    )
    granted = [r for r in results if isinstance(r, Grant)]
    assert all(isinstance(r, Grant | NoSeatAvailable) for r in results), results
    taken = sum(g.lease.count for g in granted)
    assert taken <= 12
    assert (await pool(servers[1])).used == taken == await held_seats(servers[0])
    # Nothing is given back here, so free seats only shrank: every refusal asked for
    # more than is free now.
    refused = [1 + i % 3 for i, r in enumerate(results) if isinstance(r, NoSeatAvailable)]
    assert all(count > 12 - taken for count in refused)
