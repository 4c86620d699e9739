"""The License Server's seat rules, run against an in-memory store instead of a database.

The domain reaches the database only through ``domain/ports.py``, so a rule can be run
on a fake that implements the few queries it asks: the group commit's all-or-nothing
checkouts in arrival order, its retried transaction answering once, why a checkout gets
no seat, and which leases a shrinking pool revokes. The fake is plain Python; the same
rules over SQLite and PostgreSQL are in test_license_store.py and test_trusted_storage.py.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pytest

from services.license_server.domain.errors import (
    CountAboveActivated,
    FeatureNotLicensed,
    NoSeatAvailable,
    SeatsInUse,
    TrustedStorageBroken,
    WithdrawnByCheckIn,
)
from services.license_server.domain.group_commit import GroupCommit
from services.license_server.domain.metrics import LeaseMetrics
from services.license_server.domain.model import (
    Lease,
    LeaseEnded,
    LeaseEvent,
    NewLease,
    PoolInformation,
    SeatsFreed,
    StoredCertificate,
)
from services.license_server.domain.pools import LICENSE_EXPIRED, fit_pool
from services.license_server.domain.seats import refusal, secret_hash
from services.license_server.domain.vendor_standing import CHECK_IN_OVERDUE

T = TypeVar("T")
FEATURE = "cad"
NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


@dataclass
class Tables:
    """What the fake database holds."""

    pools: dict[str, PoolInformation] = field(default_factory=dict)
    leases: dict[str, tuple[Lease, bytes]] = field(default_factory=dict)
    certificates: list[StoredCertificate] = field(default_factory=list)
    queued: Counter[str] = field(default_factory=Counter)
    announced: list[LeaseEvent] = field(default_factory=list)


class MemoryQueries:
    """The queries the rules below ask, over ``Tables``, within one fake transaction."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables

    # Pools

    async def get_pool(self, feature: str) -> PoolInformation | None:
        return self.tables.pools.get(feature)

    async def lock_pool(self, feature: str) -> PoolInformation:
        return self.tables.pools.setdefault(feature, PoolInformation(feature, 0, 0))

    async def take_seats(
        self, feature: str, count: int, now: dt.datetime, ticket: int | None = None
    ) -> bool:
        pool = self.tables.pools.get(feature)
        if pool is None or count > pool.activated - pool.used or self.tables.queued[feature]:
            return False
        self.tables.pools[feature] = replace(pool, used=pool.used + count)
        return True

    async def give_back_seats(self, seats: Counter[str]) -> None:
        for feature, count in seats.items():
            pool = self.tables.pools[feature]
            self.tables.pools[feature] = replace(pool, used=pool.used - count)

    async def set_pool_activated(self, feature: str, activated: int) -> bool:
        pool = self.tables.pools[feature]
        if pool.used > activated:
            return False
        self.tables.pools[feature] = replace(pool, activated=activated)
        return True

    async def queued_per_feature(self, now: dt.datetime) -> dict[str, int]:
        return dict(self.tables.queued)

    # Leases

    async def insert_leases(self, granted: Sequence[tuple[Lease, bytes]]) -> None:
        for lease, hashed in granted:
            self.tables.leases[lease.lease_id] = (lease, hashed)

    async def get_lease(self, lease_id: str, secret_hash: bytes) -> Lease | None:
        lease, hashed = self.tables.leases.get(lease_id, (None, b""))
        return lease if hashed == secret_hash else None

    async def release_leases(
        self,
        credentials: Iterable[tuple[str, bytes]],
        now: dt.datetime,
        reason: str,
        epoch: int | None = None,
    ) -> dict[tuple[str, bytes], str]:
        released: dict[tuple[str, bytes], str] = {}
        for lease_id, hashed in set(credentials):
            lease = await self.get_lease(lease_id, hashed)
            if lease is not None and lease.released_at is None:
                await self._release(lease, now, reason)
                released[(lease_id, hashed)] = lease.feature
        return released

    async def revoke_lease(self, lease_id: str, now: dt.datetime, reason: str) -> Lease | None:
        lease, _ = self.tables.leases[lease_id]
        if lease.released_at is not None:
            return None
        await self._release(lease, now, reason)
        return lease

    async def newest_held_leases(self, feature: str, limit: int) -> list[Lease]:
        held = [
            lease
            for lease, _ in self.tables.leases.values()
            if lease.feature == feature and lease.released_at is None
        ]
        return sorted(held, key=lambda lease: lease.granted_at, reverse=True)[:limit]

    async def _release(self, lease: Lease, now: dt.datetime, reason: str) -> None:
        _, hashed = self.tables.leases[lease.lease_id]
        self.tables.leases[lease.lease_id] = (
            replace(lease, released_at=now, release_reason=reason),
            hashed,
        )
        await self.give_back_seats(Counter({lease.feature: lease.count}))

    # Certificates

    async def serving_seats(self, feature: str) -> int:
        return sum(
            c.count - c.returning
            for c in self.tables.certificates
            if c.feature == feature
            and c.retired_at is None
            and c.returned_at is None
            and c.broken_cause is None
        )

    async def held_certificates(self, feature: str) -> list[StoredCertificate]:
        return [
            c for c in self.tables.certificates if c.feature == feature and c.returned_at is None
        ]

    # Lease events

    async def announce(self, event: LeaseEvent) -> None:
        self.tables.announced.append(event)

    async def announce_all(self, events: Sequence[LeaseEvent]) -> None:
        self.tables.announced += events


class Conflict(Exception):
    """What the fake database raises for a transaction it rolls back to break a tie."""


class MemoryStore:
    """Transactions over ``Tables``: a failed one leaves them as they were.
    ``conflicts``: how many of the next retrying transactions the fake rolls back once,
    after their work ran, as PostgreSQL does to a deadlock's loser."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self.conflicts = 0
        self.attempts = 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryQueries]:
        saved = copy.deepcopy(self.tables)
        try:
            yield MemoryQueries(self.tables)
        except BaseException:
            self.tables.__dict__.update(saved.__dict__)
            raise

    async def retrying_transaction(self, work: Callable[[Any], Awaitable[T]]) -> T:
        while True:
            self.attempts += 1
            try:
                async with self.transaction() as queries:
                    result = await work(queries)
                    if self.conflicts:
                        self.conflicts -= 1
                        raise Conflict
                    return result
            except Conflict:
                continue


def certificate(
    count: int, *, installed: int = 0, broken: str | None = None, **changes: Any
) -> StoredCertificate:
    return StoredCertificate(
        certificate_id=f"cert-{count}-{installed}-{broken}",
        request_id=f"req-{count}-{installed}",
        feature=FEATURE,
        count=count,
        envelope=b"",
        installed_at=NOW + dt.timedelta(seconds=installed),
        broken_cause=broken,
        **changes,
    )


def asking(count: int) -> NewLease:
    return NewLease(FEATURE, count, "ws-1", "ana", "Ana")


def held_lease(lease_id: str, count: int, granted_seconds_ago: int) -> tuple[Lease, bytes]:
    granted = NOW - dt.timedelta(seconds=granted_seconds_ago)
    lease = Lease(
        lease_id, FEATURE, count, "ws-1", "ana", "Ana", 90, 1, granted, granted,
        granted + dt.timedelta(seconds=90), None,
    )  # fmt: skip
    return lease, secret_hash(f"secret-{lease_id}")


class StoppedClock:
    """Always ``NOW``."""

    def now(self) -> dt.datetime:
        return NOW


def group_commit(store: MemoryStore, published: list[LeaseEvent]) -> GroupCommit:
    return GroupCommit(store, StoppedClock(), published.append, LeaseMetrics(), gather_seconds=0)


async def test_checkouts_of_one_batch_are_judged_in_arrival_order_all_or_nothing() -> None:
    tables = Tables(pools={FEATURE: PoolInformation(FEATURE, activated=5, used=0)})
    store = MemoryStore(tables)
    batch = group_commit(store, [])

    results = await asyncio_gather(
        batch.checkout(asking(3), 90), batch.checkout(asking(3), 90), batch.checkout(asking(2), 90)
    )

    first, second, third = results
    assert isinstance(first, tuple) and first[0].count == 3
    assert isinstance(second, NoSeatAvailable)  # 2 free when it was judged: none of 3
    assert isinstance(third, tuple) and third[0].count == 2  # later, but it fits
    assert batch.transactions == 1
    assert tables.pools[FEATURE].used == 5
    assert {lease.lease_id for lease, _ in tables.leases.values()} == {
        first[0].lease_id,
        third[0].lease_id,
    }


async def test_a_batch_rolled_back_by_a_conflict_answers_and_announces_once() -> None:
    tables = Tables(pools={FEATURE: PoolInformation(FEATURE, activated=2, used=1)})
    lease, hashed = held_lease("old", 1, granted_seconds_ago=30)
    tables.leases["old"] = (lease, hashed)
    store = MemoryStore(tables)
    store.conflicts = 1
    published: list[LeaseEvent] = []
    batch = group_commit(store, published)

    released, granted = await asyncio_gather(
        batch.checkin("old", "secret-old"), batch.checkout(asking(2), 90)
    )

    assert store.attempts == 2
    assert released is True
    assert isinstance(granted, tuple) and granted[0].count == 2  # the check-in's seat too
    assert tables.pools[FEATURE].used == 2
    assert set(tables.leases) == {"old", granted[0].lease_id}
    assert published == [SeatsFreed(FEATURE)]
    assert tables.announced == [SeatsFreed(FEATURE)]


async def test_a_full_pool_refuses_with_no_seat_available() -> None:
    tables = Tables(
        pools={FEATURE: PoolInformation(FEATURE, activated=2, used=2)},
        certificates=[certificate(2)],
        queued=Counter({FEATURE: 1}),
    )

    why = await refusal(MemoryQueries(tables), asking(1), NOW)

    assert isinstance(why, NoSeatAvailable)
    assert why.metadata == {"feature": FEATURE, "available": "0"}


async def test_seats_kept_from_serving_are_named_as_the_cause_of_a_shortfall() -> None:
    serving = PoolInformation(FEATURE, activated=2, used=0)
    broken = Tables(
        pools={FEATURE: serving},
        certificates=[certificate(2), certificate(3, installed=1, broken="host_key_changed")],
    )
    withdrawn = Tables(
        pools={FEATURE: serving},
        certificates=[certificate(2), certificate(3, installed=1, broken=CHECK_IN_OVERDUE)],
    )
    expired = Tables(
        certificates=[certificate(2, expires_at=NOW - dt.timedelta(days=1))],
    )

    repairable = await refusal(MemoryQueries(broken), asking(4), NOW)
    beyond_repair = await refusal(MemoryQueries(broken), asking(6), NOW)
    taken_by_check_in = await refusal(MemoryQueries(withdrawn), asking(4), NOW)
    gone = await refusal(MemoryQueries(expired), asking(1), NOW)

    assert isinstance(repairable, TrustedStorageBroken)
    assert repairable.metadata["broken_seats"] == "3"
    assert isinstance(beyond_repair, CountAboveActivated)  # a repair would not do
    assert isinstance(taken_by_check_in, WithdrawnByCheckIn)  # not broken: no repair
    assert isinstance(gone, FeatureNotLicensed)
    assert "expired" in gone.message


async def test_a_shrinking_pool_revokes_its_newest_leases_first() -> None:
    tables = Tables(
        pools={FEATURE: PoolInformation(FEATURE, activated=4, used=4)},
        certificates=[certificate(2), certificate(2, installed=1, retired_at=NOW)],
    )
    for lease_id, count, age in [("oldest", 1, 300), ("middle", 1, 200), ("newest", 2, 100)]:
        tables.leases[lease_id] = held_lease(lease_id, count, age)

    events = await fit_pool(MemoryQueries(tables), FEATURE, NOW, LICENSE_EXPIRED, "expired")

    assert events == [
        LeaseEnded("newest", LICENSE_EXPIRED[1], "expired"),
        SeatsFreed(FEATURE),
    ]
    assert tables.announced == events
    assert tables.pools[FEATURE] == PoolInformation(FEATURE, activated=2, used=2)
    still_held = {lease.lease_id for lease, _ in tables.leases.values() if not lease.released_at}
    assert still_held == {"oldest", "middle"}


async def test_a_pool_that_must_not_revoke_refuses_to_shrink_below_its_leases() -> None:
    tables = Tables(
        pools={FEATURE: PoolInformation(FEATURE, activated=2, used=2)},
        certificates=[certificate(1)],
    )
    tables.leases["held"] = held_lease("held", 2, 60)
    store = MemoryStore(tables)

    with pytest.raises(SeatsInUse):
        async with store.transaction() as queries:
            await fit_pool(queries, FEATURE, NOW, LICENSE_EXPIRED, "returned", revoke=False)

    assert tables.pools[FEATURE] == PoolInformation(FEATURE, activated=2, used=2)
    assert tables.leases["held"][0].released_at is None
    assert tables.announced == []


def test_the_domain_loads_without_a_database_driver_or_grpc() -> None:
    probe = (
        "import importlib, pkgutil, sys\n"
        "import services.license_server.domain as domain\n"
        "for module in pkgutil.iter_modules(domain.__path__):\n"
        "    importlib.import_module(f'services.license_server.domain.{module.name}')\n"
        "banned = ('sqlalchemy', 'asyncpg', 'aiosqlite', 'grpc')\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in banned\n"
        "    or name.startswith('services.license_server.store')))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"


async def asyncio_gather(*calls: Awaitable[Any]) -> list[Any]:
    """Each call's result or the exception it raised, in the order given: the calls made
    at once join one batch."""
    return list(await asyncio.gather(*calls, return_exceptions=True))
