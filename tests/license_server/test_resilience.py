"""The License Server under concurrency and crashes, with real processes.

- three replicas over one PostgreSQL, 200 clients contending for 10 seats, the seat
  invariant checked continuously;
- SIGKILL with 100 leases held, restart: every holder resumes its own lease, none is
  counted twice, and leases whose TTL ran out meanwhile are freed;
- a client that vanishes without a FIN loses its seat after the TTL, not before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import grpc
import pytest

from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import reason_of
from tests.support.activating_vendor import ActivatingVendor, license_server_args
from tests.support.databases import DatabaseFactory, plain_dsn
from tests.support.processes import (
    ROOT,
    Processes,
    free_port,
)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("databases", ["postgres"], indirect=True)
async def test_three_replicas_never_over_allocate_under_200_clients(
    tmp_path: Path,
    databases: DatabaseFactory,
    activating_vendor: ActivatingVendor,
    processes: Processes,
) -> None:
    database_url = await databases.new("license")
    ports = [free_port() for _ in range(3)]
    for index, port in enumerate(ports):
        processes.start(
            f"replica-{index}",
            "services.license_server",
            *license_server_args(tmp_path, port, database_url, ttl=10),
        )
    for index, port in enumerate(ports):
        await processes.wait_serving(f"replica-{index}", port)
    await activating_vendor.activate(f"{ports[0]}@127.0.0.1", "client.station", 10)

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
    stubs = [lpb_grpc.LeaseServiceStub(channel) for channel in channels]
    held_by_clients = 0
    most_held = 0
    grants = denials = 0
    violations: list[str] = []
    stop_at = time.monotonic() + 6

    async def client(number: int) -> None:
        nonlocal held_by_clients, most_held, grants, denials
        rng = random.Random(number)
        stub = stubs[number % 3]
        acquire = lpb.LeaseAcquire(feature="client.station", count=1, client_host=f"ws-{number}")
        while time.monotonic() < stop_at:
            try:
                granted = (await stub.Checkout(lpb.CheckoutRequest(acquire=acquire))).granted
            except grpc.aio.AioRpcError as error:
                assert reason_of(error) == "NO_SEAT_AVAILABLE", error
                denials += 1
                await asyncio.sleep(rng.uniform(0, 0.02))
                continue
            grants += 1
            held_by_clients += 1
            most_held = max(most_held, held_by_clients)
            if held_by_clients > 10:
                violations.append(f"clients hold {held_by_clients} seats of 10")
            await asyncio.sleep(rng.uniform(0, 0.01))
            held_by_clients -= 1
            # Check in on another replica than the one that granted it.
            await stubs[(number + 1) % 3].Checkin(
                lpb.CheckinRequest(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
            )

    async def checker() -> int:
        checks = 0
        connection = await asyncpg.connect(plain_dsn(database_url))
        try:
            while time.monotonic() < stop_at:
                row = await connection.fetchrow(
                    "SELECT p.used, p.activated, (SELECT coalesce(sum(l.count), 0) FROM leases l"
                    " WHERE l.feature = p.feature AND l.released_at IS NULL) AS held"
                    " FROM pools p WHERE p.feature = 'client.station'"
                )
                assert row is not None
                if not (row["used"] <= row["activated"] == 10 and row["used"] == row["held"]):
                    violations.append(f"database: {dict(row)}")
                checks += 1
                await asyncio.sleep(0.005)
        finally:
            await connection.close()
        return checks

    results = await asyncio.gather(checker(), *(client(number) for number in range(200)))
    for channel in channels:
        await channel.close()
    print(f"grants={grants} denials={denials} checks={results[0]} most_held={most_held}")
    assert violations == []
    assert results[0] > 20  # the invariant was checked all along (about every 0.1 s)
    assert grants > 0 and denials > 0 and most_held <= 10


async def test_sigkill_with_100_leases_then_every_holder_resumes_its_own(
    tmp_path: Path,
    databases: DatabaseFactory,
    activating_vendor: ActivatingVendor,
    processes: Processes,
) -> None:
    database_url = await databases.new("license")
    port = free_port()
    args = license_server_args(tmp_path, port, database_url, ttl=60)
    processes.start("license_server", "services.license_server", *args)
    await processes.wait_serving("license_server", port)
    await activating_vendor.activate(f"{port}@127.0.0.1", "client.station", 100)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        leases = lpb_grpc.LeaseServiceStub(channel)
        granted: list[lpb.LeaseGranted] = []
        streams = []
        for number in range(100):
            stream = leases.Lease()
            acquire = lpb.LeaseAcquire(
                feature="client.station", count=1, client_host=f"ws-{number}"
            )
            if number >= 90:
                acquire.ttl.FromTimedelta(dt.timedelta(seconds=1))  # these will run out
            await stream.write(lpb.LeaseRequest(acquire=acquire))
            response = await stream.read()
            assert isinstance(response, lpb.LeaseResponse)
            granted.append(response.granted)
            streams.append(stream)

    processes.kill("license_server")
    await asyncio.sleep(1.5)  # the short leases' TTL runs out while the server is down
    processes.start("license_server", "services.license_server", *args)
    await processes.wait_serving("license_server", port)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        leases = lpb_grpc.LeaseServiceStub(channel)

        async def resume(grant: lpb.LeaseGranted) -> str:
            stream = leases.Lease()
            await stream.write(
                lpb.LeaseRequest(
                    resume=lpb.LeaseResume(lease_id=grant.lease_id, lease_secret=grant.lease_secret)
                )
            )
            try:
                response = await stream.read()
            except grpc.aio.AioRpcError as error:
                return reason_of(error)
            assert isinstance(response, lpb.LeaseResponse)
            assert response.granted.lease_id == grant.lease_id and response.granted.resumed
            stream.cancel()
            return "RESUMED"

        outcomes = await asyncio.gather(*(resume(grant) for grant in granted))
        assert outcomes[:90] == ["RESUMED"] * 90
        assert set(outcomes[90:]) == {"LEASE_EXPIRED"}
        for _ in range(100):
            info = await leases.GetLicenseInformation(lpb.GetLicenseInformationRequest())
            if info.features[0].used == 90:
                break
            await asyncio.sleep(0.1)
        assert (info.features[0].activated, info.features[0].used) == (100, 90)


VANISHING_CLIENT = """
import asyncio, sys, grpc
from tessera.license.v1 import license_pb2 as lpb, license_pb2_grpc as lpb_grpc

async def main():
    async with grpc.aio.insecure_channel(sys.argv[1]) as channel:
        stream = lpb_grpc.LeaseServiceStub(channel).Lease()
        await stream.write(lpb.LeaseRequest(acquire=lpb.LeaseAcquire(
            feature="client.station", count=1, client_host="vanishing")))
        await stream.read()
        print("granted", flush=True)
        while True:
            await stream.write(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
            await stream.read()
            await asyncio.sleep(0.2)

asyncio.run(main())
"""


async def test_a_client_that_vanishes_without_fin_loses_its_seat_after_the_ttl(
    tmp_path: Path,
    databases: DatabaseFactory,
    activating_vendor: ActivatingVendor,
    processes: Processes,
) -> None:
    database_url = await databases.new("license")
    port = free_port()
    processes.start(
        "license_server",
        "services.license_server",
        *license_server_args(tmp_path, port, database_url, ttl=3),
    )
    await processes.wait_serving("license_server", port)
    await activating_vendor.activate(f"{port}@127.0.0.1", "client.station", 1)
    client = subprocess.Popen(  # noqa: ASYNC220 - started once, read from a thread
        [sys.executable, "-c", VANISHING_CLIENT, f"127.0.0.1:{port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None
        line = await asyncio.to_thread(client.stdout.readline)
        assert line.strip() == b"granted"
        client.send_signal(signal.SIGSTOP)  # frozen: no heartbeats, and no FIN either
        frozen_at = time.monotonic()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            leases = lpb_grpc.LeaseServiceStub(channel)

            async def used() -> int:
                info = await leases.GetLicenseInformation(lpb.GetLicenseInformationRequest())
                return info.features[0].used

            await asyncio.sleep(1.5)
            assert await used() == 1  # halfway through the TTL the seat is still held
            while await used() == 1:
                assert time.monotonic() - frozen_at < 10, "the seat was never freed"
                await asyncio.sleep(0.1)
            # Freed no sooner than a TTL after the last heartbeat (at most 0.2 s before).
            assert time.monotonic() - frozen_at >= 3 - 0.3
    finally:
        client.kill()
        client.wait()
