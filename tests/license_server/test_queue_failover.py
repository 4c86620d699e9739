"""A queued client whose License Server died must not block the queue (issue 16, item 2).

Real License Server processes on loopback, SIGKILLed or SIGSTOPped, over one PostgreSQL
database (two replicas) or alone on SQLite or PostgreSQL:

- a replica SIGKILLed while a client waits in line on it: a seat freed on the other
  replica goes to the other's waiter within about the replica timeout (1 s), not after
  the dead waiter's 15 s alive time;
- a replica SIGSTOPped: the other drops its waiter within about the replica timeout;
  when it comes back, its client queues again behind those who queued meanwhile, and
  the seat goes to them first (its dropped place cannot be granted);
- a License Server SIGKILLed and restarted: the dead process's waiter is gone at once on
  SQLite (one process's file), within about the replica timeout on PostgreSQL, and a
  freed seat can be taken;
- three replicas, clients of the client library queueing for two seats, one replica
  SIGKILLed and restarted again and again: a seat never stays free while clients wait
  for longer than about the replica timeout, and the grants go on.

Every test checks that the pool never holds more seats than are activated and that its
count is the held leases'.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from clients import LicenseClient, LicenseError, LicenseServerUnreachable
from services.license_server.store.tables import leases, pools
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.storage import create_engine
from tests.support.activating_vendor import ActivatingVendor
from tests.support.databases import DatabaseFactory
from tests.support.processes import Processes, free_port

pytestmark = pytest.mark.e2e

Stream = grpc.aio.StreamStreamCall[lpb.LeaseRequest, lpb.LeaseResponse]
FEATURE = "client.station"
# The License Server's --replica-timeout (its default), and what a test allows on top of
# it for the dead replica's last beat to be seen, the drop, the grant and a loaded machine.
REPLICA_TIMEOUT = 1.0
SLACK = 2.0


@pytest.fixture
async def channels() -> AsyncIterator[list[grpc.aio.Channel]]:
    opened: list[grpc.aio.Channel] = []
    yield opened
    for channel in opened:
        await channel.close()


def license_server_args(tmp_path: Path, port: int, database_url: str, ttl: int) -> list[str]:
    return [
        "--listen", f"127.0.0.1:{port}",
        "--data-dir", str(tmp_path / "ls"),
        "--database-url", database_url,
        "--vendor-keys", str(tmp_path / "as" / "vendor-keys.pub"),
        "--machine-id", "queue-failover-machine",
        "--lease-ttl", str(ttl),
        "--heartbeat-interval", str(ttl / 3),
        "--sweep-interval", "0.2",
        "--replica-timeout", str(REPLICA_TIMEOUT),
        # The test's clients all come from 127.0.0.1, standing in for many hosts.
        "--max-streams-per-host", "0",
        "--acquire-rate", "0",
    ]  # fmt: skip


async def start_license_server(
    processes: Processes,
    channels: list[grpc.aio.Channel],
    name: str,
    port: int,
    database_url: str,
    ttl: int = 60,
) -> lpb_grpc.LeaseServiceStub:
    """A License Server process (its raw streams here send no heartbeats: a long TTL)."""
    args = license_server_args(processes.tmp_path, port, database_url, ttl)
    processes.start(name, "services.license_server", *args)
    await processes.wait_serving(name, port)
    channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    return lpb_grpc.LeaseServiceStub(channels[-1])


def acquire(host: str, wait: float = 0) -> lpb.LeaseRequest:
    message = lpb.LeaseAcquire(feature=FEATURE, count=1, client_host=host, user="op")
    if wait:
        message.wait_timeout.FromTimedelta(dt.timedelta(seconds=wait))
    return lpb.LeaseRequest(acquire=message)


async def receive(stream: Stream, within: float = 10.0) -> lpb.LeaseResponse:
    async with asyncio.timeout(within):
        response = await stream.read()
    assert isinstance(response, lpb.LeaseResponse), "the stream ended"
    return response


async def hold(stub: lpb_grpc.LeaseServiceStub, host: str) -> tuple[Stream, lpb.LeaseGranted]:
    stream = stub.Lease()
    await stream.write(acquire(host))
    granted = (await receive(stream)).granted
    assert granted.lease_id
    return stream, granted


async def queue(stub: lpb_grpc.LeaseServiceStub, host: str, position: int) -> Stream:
    stream = stub.Lease()
    await stream.write(acquire(host, wait=120))
    queued = await receive(stream)
    assert queued.queued.position == position, queued
    return stream


async def release(stream: Stream) -> None:
    await stream.write(lpb.LeaseRequest(release=lpb.LeaseRelease()))
    assert (await receive(stream)).HasField("released")


async def granted_within(stream: Stream, within: float) -> lpb.LeaseGranted:
    """The grant a queued stream reads within ``within`` seconds (position updates may
    come first); fails when none comes."""
    try:
        async with asyncio.timeout(within):
            while True:
                response = await receive(stream, within)
                if response.HasField("granted"):
                    return response.granted
                assert response.HasField("queued"), response
    except TimeoutError:
        pytest.fail(f"no grant within {within:g} s")


async def information(stub: lpb_grpc.LeaseServiceStub) -> lpb.FeatureInformation:
    reply = await stub.GetLicenseInformation(lpb.GetLicenseInformationRequest(feature=FEATURE))
    return reply.features[0]


async def until(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Ask ``condition`` every 20 ms until it holds; how long that took. Fails past
    ``within`` seconds."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > within:
            pytest.fail(f"{what}: not within {within:g} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def seats_in_database(database_url: str) -> tuple[int, int, int]:
    """(activated, used, seats of held leases) as the database has them."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            row = (
                await connection.execute(
                    select(pools.c.activated, pools.c.used).where(pools.c.feature == FEATURE)
                )
            ).one()
            held = await connection.scalar(
                select(func.coalesce(func.sum(leases.c.count), 0)).where(
                    leases.c.feature == FEATURE, leases.c.released_at.is_(None)
                )
            )
    finally:
        await engine.dispose()
    return int(row.activated), int(row.used), int(held or 0)


async def held_by(database_url: str) -> list[str]:
    """The client hosts of the held leases."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                select(leases.c.client_host).where(
                    leases.c.feature == FEATURE, leases.c.released_at.is_(None)
                )
            )
            return sorted(rows.scalars())
    finally:
        await engine.dispose()


@pytest.mark.parametrize("databases", ["postgres"], indirect=True)
async def test_a_waiter_on_a_sigkilled_replica_does_not_stall_the_queue_on_the_other(
    databases: DatabaseFactory,
    activating_vendor: ActivatingVendor,
    processes: Processes,
    channels: list[grpc.aio.Channel],
) -> None:
    database_url = await databases.new("license")
    port_a, port_b = free_port(), free_port()
    replica_a = await start_license_server(processes, channels, "a", port_a, database_url)
    replica_b = await start_license_server(processes, channels, "b", port_b, database_url)
    await activating_vendor.activate(f"{port_a}@127.0.0.1", FEATURE, 1)

    holder, _ = await hold(replica_b, "holder")
    await queue(replica_a, "waiter-on-a", position=1)
    on_b = await queue(replica_b, "waiter-on-b", position=2)

    processes.kill("a")
    freed_at = time.monotonic()
    await release(holder)
    await granted_within(on_b, REPLICA_TIMEOUT + SLACK)
    waited = time.monotonic() - freed_at

    info = await information(replica_b)
    assert (info.activated, info.used, info.queued) == (1, 1, 0)
    assert await seats_in_database(database_url) == (1, 1, 1)
    assert await held_by(database_url) == ["waiter-on-b"]
    print(f"seat freed -> granted on the surviving replica: {waited:.2f} s")


@pytest.mark.parametrize("databases", ["postgres"], indirect=True)
async def test_a_stopped_replica_that_comes_back_cannot_serve_its_dropped_waiter(
    databases: DatabaseFactory,
    activating_vendor: ActivatingVendor,
    processes: Processes,
    channels: list[grpc.aio.Channel],
) -> None:
    database_url = await databases.new("license")
    port_a, port_b = free_port(), free_port()
    replica_a = await start_license_server(processes, channels, "a", port_a, database_url)
    replica_b = await start_license_server(processes, channels, "b", port_b, database_url)
    await activating_vendor.activate(f"{port_a}@127.0.0.1", FEATURE, 1)

    holder, _ = await hold(replica_b, "holder")
    on_a = await queue(replica_a, "waiter-on-a", position=1)
    pid_a = processes.running["a"].pid
    os.kill(pid_a, signal.SIGSTOP)
    try:

        async def dropped() -> bool:
            return (await information(replica_b)).queued == 0

        took = await until(dropped, REPLICA_TIMEOUT + SLACK, "the stopped replica's waiter dropped")
        # First in line now: the stopped replica's waiter lost its place.
        on_b = await queue(replica_b, "waiter-on-b", position=1)
    finally:
        os.kill(pid_a, signal.SIGCONT)

    # Back, the stopped replica finds it was declared dead, and its client queues again
    # behind the one that queued meanwhile.
    requeued = await receive(on_a)
    assert requeued.queued.position == 2, requeued
    assert (await information(replica_a)).queued == 2

    await release(holder)
    await granted_within(on_b, SLACK)
    assert await held_by(database_url) == ["waiter-on-b"]
    assert await seats_in_database(database_url) == (1, 1, 1)
    info = await information(replica_b)
    assert (info.used, info.queued) == (1, 1)

    # The stopped replica serves its client again, in its new place.
    await release(on_b)
    await granted_within(on_a, SLACK)
    assert await held_by(database_url) == ["waiter-on-a"]
    assert await seats_in_database(database_url) == (1, 1, 1)
    print(f"SIGSTOP -> the stopped replica's waiter dropped: {took:.2f} s")


async def test_a_restarted_license_server_drops_the_waiters_of_its_dead_process(
    databases: DatabaseFactory,
    activating_vendor: ActivatingVendor,
    processes: Processes,
    channels: list[grpc.aio.Channel],
) -> None:
    database_url = await databases.new("license")
    port = free_port()
    server = await start_license_server(processes, channels, "ls", port, database_url)
    await activating_vendor.activate(f"{port}@127.0.0.1", FEATURE, 1)
    _, granted = await hold(server, "holder")
    await queue(server, "waiter", position=1)

    processes.kill("ls")
    server = await start_license_server(processes, channels, "ls", port, database_url)
    restarted_at = time.monotonic()
    holder = server.Lease()
    await holder.write(
        lpb.LeaseRequest(
            resume=lpb.LeaseResume(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
        )
    )
    assert (await receive(holder)).granted.resumed

    async def nobody_queued() -> bool:
        return (await information(server)).queued == 0

    if databases.kind == "sqlite":
        # One process's file: the dead process's waiters went when the new one started.
        assert await nobody_queued()
    else:
        # Another replica could still be serving them: dropped once its beat stood still.
        await until(nobody_queued, REPLICA_TIMEOUT + SLACK, "the dead process's waiter dropped")
    dropped_after = time.monotonic() - restarted_at

    await release(holder)
    # A fresh acquire, not queued, takes the freed seat at once: nobody live waits ahead.
    checkout = await server.Checkout(lpb.CheckoutRequest(acquire=acquire("newcomer").acquire))
    assert checkout.granted.lease_id
    assert await held_by(database_url) == ["newcomer"]
    assert await seats_in_database(database_url) == (1, 1, 1)
    print(f"{databases.kind}: restart -> the dead process's waiter dropped: {dropped_after:.2f} s")


SEATS = 2
CLIENTS = 12
KILLS = 3


@pytest.mark.parametrize("databases", ["postgres"], indirect=True)
async def test_repeated_replica_kills_leave_no_free_seat_idle_while_clients_wait(
    databases: DatabaseFactory,
    activating_vendor: ActivatingVendor,
    processes: Processes,
    channels: list[grpc.aio.Channel],
) -> None:
    database_url = await databases.new("license")
    ports = [free_port() for _ in range(3)]
    # The client library heartbeats: a short TTL, so a grant the SIGKILL cut short (the
    # client never heard it) holds its seat only briefly.
    stubs = [await start_license_server(processes, channels, "ls-0", ports[0], database_url, 6)]
    stubs += await asyncio.gather(
        *(
            start_license_server(processes, channels, f"ls-{index}", ports[index], database_url, 6)
            for index in (1, 2)
        )
    )
    await activating_vendor.activate(f"{ports[0]}@127.0.0.1", FEATURE, SEATS)

    stopping = asyncio.Event()
    grants = 0
    errors: list[str] = []
    # The longest stretch in which a seat was free while clients waited, as the replica
    # that is never killed told it (License Information every 20 ms), and its checks.
    idle_since: float | None = None
    longest_idle = 0.0
    looks = 0

    async def client(number: int) -> None:
        nonlocal grants
        order = [ports[(number + step) % 3] for step in range(3)]
        address = ";".join(f"{port}@127.0.0.1" for port in order)
        async with LicenseClient(address, client_host=f"client-{number}") as license_client:
            while not stopping.is_set():
                try:
                    lease = await license_client.acquire(FEATURE, wait=30)
                except LicenseServerUnreachable:
                    continue  # its replica died as it asked; the next one is asked anew
                except LicenseError as error:
                    errors.append(f"client-{number}: {error!r}")
                    await asyncio.sleep(0.1)
                    continue
                grants += 1
                await asyncio.sleep(0.05)
                await lease.release()

    async def watch() -> None:
        nonlocal idle_since, longest_idle, looks
        while not stopping.is_set():
            info = await information(stubs[0])
            now = time.monotonic()
            if info.used > info.activated:
                errors.append(f"over-allocated: {info}")
            if info.available > 0 and info.queued > 0:
                idle_since = now if idle_since is None else idle_since
                longest_idle = max(longest_idle, now - idle_since)
            else:
                idle_since = None
            looks += 1
            await asyncio.sleep(0.02)

    async def grants_reach(count: int) -> bool:
        return grants >= count

    tasks = [asyncio.create_task(client(number)) for number in range(CLIENTS)]
    watcher = asyncio.create_task(watch())
    try:
        await until(lambda: grants_reach(20), 30, "20 grants before the first SIGKILL")
        for kill in range(KILLS):
            victim = 1 + kill % 2
            processes.kill(f"ls-{victim}")
            stubs[victim] = await start_license_server(
                processes, channels, f"ls-{victim}", ports[victim], database_url, 6
            )
            await until(
                lambda target=grants + 20: grants_reach(target),
                30,
                f"20 grants after SIGKILL {kill}",
            )
    finally:
        stopping.set()
        await asyncio.gather(*tasks, watcher, return_exceptions=True)

    assert errors == []
    assert looks > 100  # the watch ran all along
    assert longest_idle < REPLICA_TIMEOUT + SLACK, f"a seat idled {longest_idle:.2f} s"
    activated, used, held = await seats_in_database(database_url)
    assert used == held <= activated == SEATS
    print(
        f"{KILLS} SIGKILLs, {grants} grants; longest stretch with a free seat and clients "
        f"waiting: {longest_idle:.2f} s ({looks} looks)"
    )
