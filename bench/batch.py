"""``python -m bench.batch``: CPU per group-commit transaction and per flushed heartbeat.

    .venv/bin/python -m bench.batch                       # SQLite, about 20 s
    .venv/bin/python -m bench.batch --database postgres   # a fresh PostgreSQL database

The domain and the store alone, in this process: no gRPC, no client processes. A real
``Leasing`` over a real database (migrated, one certificate of seats) takes batches of N
checkouts and N check-ins, gathered into one group-commit transaction each, and the
CPU time of the process (``time.process_time``: every thread, aiosqlite's included) is
divided by the transactions they took; the figure is the median over the rounds. Then
the heartbeat batcher flushes 2,000 heartbeats out of 20,000 held leases per round, as at
20,000 leases beating every 10 s, answers the 2,000 heartbeats waiting for it, and the
CPU is divided by the leases extended.

Use it to compare two versions of the domain or store code: it moves far less with the
machine's drift than the throughput phases of ``python -m bench`` (about 10 % between
runs against 30 %), so alternate the two versions a few times each. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import secrets
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.services import FEATURE, create_postgres_database, drop_postgres_database
from services.license_server.domain.leasing import LeasePolicy, Leasing
from services.license_server.domain.model import Grant, Lease, NewLease, StoredCertificate
from services.license_server.server import MIGRATIONS
from services.license_server.store.database import SqlLicenseStore
from tessera.storage import create_engine, migrate

SEATS = 1_000_000
FLUSH_LEASES = 20_000
FLUSH_BEATS = 2_000


class SteppedClock:
    """A clock that moves only when told to (each round is a second later)."""

    def __init__(self) -> None:
        self.current = dt.datetime.now(dt.UTC)

    def now(self) -> dt.datetime:
        return self.current

    def step(self) -> None:
        self.current += dt.timedelta(seconds=1)


async def open_leasing(url: str, clock: SteppedClock) -> Leasing:
    engine = create_engine(url)
    await migrate(engine, MIGRATIONS)
    # Gather nothing on purpose: each round's calls are all waiting when its batch starts.
    leasing = Leasing(
        SqlLicenseStore(engine), LeasePolicy(ttl_seconds=90, group_commit_delay_seconds=0), clock
    )
    certificate_id = str(uuid.uuid4())
    async with leasing.store.transaction() as repo:
        await repo.insert_certificate(
            StoredCertificate(
                certificate_id=certificate_id,
                request_id=f"bench-{certificate_id}",
                feature=FEATURE,
                count=SEATS,
                envelope=b"not verified by this benchmark",
                installed_at=clock.now(),
            )
        )
        await repo.lock_pool(FEATURE)
        await repo.set_pool_activated(FEATURE, await repo.serving_seats(FEATURE))
    return leasing


async def transaction_cpu(url: str, calls: int, rounds: int) -> float:
    """Median CPU seconds per transaction of ``calls`` checkouts + ``calls`` check-ins."""
    clock = SteppedClock()
    leasing = await open_leasing(url, clock)
    try:
        asking = NewLease(FEATURE, 1, "bench-host", "bench", "bench")
        held: list[Grant] = [await leasing.acquire(asking) for _ in range(calls)]
        committer = leasing.group_commit
        figures = []
        for _ in range(rounds):
            clock.step()
            transactions = committer.transactions
            started = time.process_time()
            checkouts = [leasing.acquire(asking) for _ in range(calls)]
            checkins = [leasing.release(g.lease.lease_id, g.secret) for g in held]
            results = await asyncio.gather(*checkouts, *checkins)
            spent = time.process_time() - started
            figures.append(spent / max(1, committer.transactions - transactions))
            held = [grant for grant in results[:calls] if isinstance(grant, Grant)]
        return statistics.median(figures[2:])  # the first rounds warm the caches
    finally:
        await close(leasing)


async def close(leasing: Leasing) -> None:
    """Close the database under ``leasing`` (the domain sees only the store's port)."""
    assert isinstance(leasing.store, SqlLicenseStore)
    await leasing.store.engine.dispose()


async def flush_cpu(url: str, rounds: int) -> float:
    """Median CPU seconds per lease of a heartbeat flush of 2,000 out of 20,000 leases,
    with the 2,000 heartbeats that wait for it answered."""
    clock = SteppedClock()
    leasing = await open_leasing(url, clock)
    try:
        now = clock.now()
        leases = [
            Lease(str(uuid.uuid4()), FEATURE, 1, f"host-{n}", "bench", "bench", 90, 1, now, now,
                  now + dt.timedelta(seconds=90), None)
            for n in range(FLUSH_LEASES)
        ]  # fmt: skip
        for start in range(0, FLUSH_LEASES, 1000):
            async with leasing.store.transaction() as repo:
                await repo.insert_leases(
                    [(lease, secrets.token_bytes(32)) for lease in leases[start : start + 1000]]
                )
        batcher = leasing.heartbeats
        figures = []
        for round_number in range(rounds):
            clock.step()
            beating = random.Random(round_number).sample(leases, FLUSH_BEATS)
            waiting = [asyncio.ensure_future(batcher.beat(lease, 30.0)) for lease in beating]
            await asyncio.sleep(0)  # each records its heartbeat and waits for the flush
            started = time.process_time()
            extended = await batcher.flush()
            await asyncio.gather(*waiting)  # the flush answers each of them
            figures.append((time.process_time() - started) / max(1, extended))
        return statistics.median(figures[2:])
    finally:
        await close(leasing)


async def run(args: argparse.Namespace) -> None:
    work_dir = Path(tempfile.mkdtemp(prefix="tessera-bench-batch-"))
    created: list[str] = []

    async def fresh_url() -> str:
        if args.database == "sqlite":
            return f"sqlite+aiosqlite:///{work_dir / uuid.uuid4().hex}.db"
        name, url = await create_postgres_database(args.postgres_url)
        created.append(name)
        return url

    try:
        print(f"database: {args.database}; {args.rounds} rounds each, median after 2")
        for calls in args.calls:
            spent = await transaction_cpu(await fresh_url(), calls, args.rounds)
            print(
                f"  batches of {calls}+{calls} (checkouts+check-ins): {spent * 1e6:,.0f} µs CPU "
                f"per transaction, {spent / (2 * calls) * 1e6:,.0f} µs per call"
            )
        spent = await flush_cpu(await fresh_url(), args.rounds)
        print(
            f"  heartbeat flush, {FLUSH_BEATS:,} of {FLUSH_LEASES:,} leases: "
            f"{spent * 1e6:,.1f} µs CPU per lease extended"
        )
    finally:
        for name in created:
            await drop_postgres_database(args.postgres_url, name)
        shutil.rmtree(work_dir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batch",
        description="CPU per group-commit transaction and per flushed heartbeat (no gRPC).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "TESSERA_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
        ),
        help="PostgreSQL server; a fresh database is created there and dropped after",
    )
    parser.add_argument(
        "--calls", type=int, nargs="+", default=[1, 15], help="checkouts (= check-ins) per batch"
    )
    parser.add_argument("--rounds", type=int, default=200, help="batches (and flushes) timed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    asyncio.run(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
