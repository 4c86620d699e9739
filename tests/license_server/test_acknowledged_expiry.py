"""What a client is told about its lease's expiry holds, with real processes.

- An acknowledged heartbeat survives a SIGKILL of the License Server right after the
  acknowledgement: after the restart the lease can be resumed until the acknowledged
  expiry, and no other client gets its seat meanwhile.
- A lease granted while the server's clock ran a day ahead does not hold its seat for a
  day once the clock is put right, whether the server restarts with the right clock or
  sees its clock go back while it runs (libfaketime).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import grpc
import pytest

from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import reason_of
from tests.support.activating_vendor import ActivatingVendor, license_server_args
from tests.support.databases import DatabaseFactory
from tests.support.processes import Processes, credentialed_channel, free_port
from tests.support.tokens import OPERATOR_TOKEN

pytestmark = pytest.mark.e2e

FEATURE = "client.station"
Stream = grpc.aio.StreamStreamCall[lpb.LeaseRequest, lpb.LeaseResponse]


async def next_response(stream: Stream) -> lpb.LeaseResponse:
    response = await stream.read()
    assert isinstance(response, lpb.LeaseResponse), "the stream ended"
    return response


async def acquire_on_stream(leases: lpb_grpc.LeaseServiceStub, host: str) -> lpb.LeaseGranted:
    stream = leases.Lease()
    await stream.write(
        lpb.LeaseRequest(acquire=lpb.LeaseAcquire(feature=FEATURE, count=1, client_host=host))
    )
    granted = (await next_response(stream)).granted
    assert granted.lease_id
    return granted


async def checkout(leases: lpb_grpc.LeaseServiceStub, host: str) -> str:
    """One unary Checkout: the lease id granted, or the refusal's reason."""
    try:
        reply = await leases.Checkout(
            lpb.CheckoutRequest(
                acquire=lpb.LeaseAcquire(feature=FEATURE, count=1, client_host=host)
            ),
            timeout=5,
        )
    except grpc.aio.AioRpcError as error:
        return reason_of(error)
    return reply.granted.lease_id


def wall(stamp: dt.datetime) -> float:
    """A server time (same machine, same clock) as time.time()."""
    return stamp.timestamp()


async def test_a_heartbeat_acknowledged_just_before_a_sigkill_holds_after_restart(
    tmp_path: Path,
    databases: DatabaseFactory,
    activating_vendor: ActivatingVendor,
    processes: Processes,
) -> None:
    """TTL 12 s, heartbeat interval 4 s. The holder heartbeats 5 s after its grant, gets
    the acknowledgement and the License Server is SIGKILLed at once. After the restart
    the holder resumes its lease 0.5 s before the acknowledged expiry, well after the
    expiry it had before that heartbeat (grant + 12 s, which the sweeper would have
    freed), and another client polling for the seat until then is refused all along."""
    database_url = await databases.new("license")
    port = free_port()
    args = license_server_args(tmp_path, port, database_url, ttl=12)
    args += ["--heartbeat-interval", "4"]
    processes.start("license_server", "services.license_server", *args)
    await processes.wait_serving("license_server", port)
    await activating_vendor.activate(f"{port}@127.0.0.1", FEATURE, 1)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        leases = lpb_grpc.LeaseServiceStub(channel)
        stream = leases.Lease()
        await stream.write(
            lpb.LeaseRequest(acquire=lpb.LeaseAcquire(feature=FEATURE, count=1, client_host="a"))
        )
        granted = (await next_response(stream)).granted
        granted_expiry = granted.expires_at.ToDatetime(tzinfo=dt.UTC)
        await asyncio.sleep(5)  # the client's own schedule, not a synchronisation
        await stream.write(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
        ack = (await next_response(stream)).heartbeat_ack
        processes.kill("license_server")
    told = ack.expires_at.ToDatetime(tzinfo=dt.UTC)
    assert told >= granted_expiry + dt.timedelta(seconds=5)

    processes.start("license_server", "services.license_server", *args)
    await processes.wait_serving("license_server", port)
    resume_at = wall(told) - 0.5
    assert time.time() < resume_at, "the restart took longer than the lease's lifetime"

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        leases = lpb_grpc.LeaseServiceStub(channel)
        # Another client asks for the seat until the holder resumes, well past the
        # expiry the lease had before the acknowledged heartbeat (and the sweeps after it).
        refusals: list[str] = []
        while time.time() < resume_at:
            refusals.append(await checkout(leases, "b"))
            await asyncio.sleep(0.2)
        assert set(refusals) == {"NO_SEAT_AVAILABLE"}, refusals

        holder = leases.Lease()
        await holder.write(
            lpb.LeaseRequest(
                resume=lpb.LeaseResume(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
            )
        )
        resumed = (await next_response(holder)).granted
        assert time.time() < wall(told), "the resume came too late to tell"
        assert resumed.lease_id == granted.lease_id and resumed.resumed
        assert await checkout(leases, "b") == "NO_SEAT_AVAILABLE"
        await holder.write(lpb.LeaseRequest(release=lpb.LeaseRelease()))
        assert (await next_response(holder)).HasField("released")
        assert (await checkout(leases, "b")) not in ("NO_SEAT_AVAILABLE", "")


# libfaketime, from Debian's faketime package; the offset is read from a file, so a
# test can set the clock back under a running process.
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def faked_clock(offset_file: Path) -> dict[str, str]:
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_CACHE_DURATION": "1",  # re-read the file at most every second
        # asyncio's loop time stays true (a day's jump would stall every timer).
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


async def held_expiries(port: int) -> list[dt.datetime]:
    async with credentialed_channel(f"127.0.0.1:{port}") as channel:
        listing = await lpb_grpc.LeaseAdminServiceStub(channel).ListLeases(lpb.ListLeasesRequest())
    return [
        entry.expires_at.ToDatetime(tzinfo=dt.UTC)
        for entry in listing.leases
        if entry.state == lpb.LEASE_STATE_HELD
    ]


async def used_seats(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = await lpb_grpc.LeaseServiceStub(channel).GetLicenseInformation(
            lpb.GetLicenseInformationRequest(feature=FEATURE)
        )
    return int(info.features[0].used)


async def wait_until_freed(port: int, within: float) -> float:
    """Seconds until the feature's seats are all free (fails after ``within``)."""
    started = time.monotonic()
    while await used_seats(port) != 0:
        assert time.monotonic() - started < within, "the seat was never freed"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


needs_faketime = pytest.mark.skipif(
    not LIBFAKETIME.exists(), reason="needs libfaketime (apt-get install faketime)"
)


@needs_faketime
async def test_a_lease_from_a_clock_a_day_ahead_gets_one_ttl_after_a_restart(
    tmp_path: Path,
    databases: DatabaseFactory,
    activating_vendor: ActivatingVendor,
    processes: Processes,
) -> None:
    """The License Server runs a day ahead and grants a lease (expiring tomorrow); it is
    SIGKILLed and restarts with the right clock. The lease now expires at most one TTL
    from the corrected now, and with no heartbeat its seat is freed within that TTL."""
    database_url = await databases.new("license")
    port = free_port()
    args = license_server_args(tmp_path, port, database_url, ttl=6)
    args += ["--operator-token", OPERATOR_TOKEN]  # to list the leases
    processes.start("license_server", "services.license_server", *args)
    await processes.wait_serving("license_server", port)
    await activating_vendor.activate(f"{port}@127.0.0.1", FEATURE, 1)
    processes.stop("license_server")

    offset = tmp_path / "faketime"
    offset.write_text("+1d\n")
    processes.start("license_server", "services.license_server", *args, env=faked_clock(offset))
    await processes.wait_serving("license_server", port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        granted = await acquire_on_stream(lpb_grpc.LeaseServiceStub(channel), "ahead")
        expiry = granted.expires_at.ToDatetime(tzinfo=dt.UTC)
        assert wall(expiry) > time.time() + 86_000  # the server's clock was a day ahead
        processes.kill("license_server")

    processes.start("license_server", "services.license_server", *args)
    await processes.wait_serving("license_server", port)
    [expires_at] = await held_expiries(port)
    assert wall(expires_at) <= time.time() + 6
    await wait_until_freed(port, within=6 + 3)


@needs_faketime
async def test_a_clock_set_back_under_a_running_server_cuts_its_leases(
    tmp_path: Path,
    databases: DatabaseFactory,
    activating_vendor: ActivatingVendor,
    processes: Processes,
) -> None:
    """The License Server's clock is a day ahead while it grants a lease, then is put
    right while it runs: its sweeper notices the clock went back and the lease expires
    one TTL from the corrected now, not tomorrow."""
    database_url = await databases.new("license")
    port = free_port()
    args = license_server_args(tmp_path, port, database_url, ttl=6)
    args += ["--operator-token", OPERATOR_TOKEN]  # to list the leases
    offset = tmp_path / "faketime"
    offset.write_text("+1d\n")
    processes.start("license_server", "services.license_server", *args, env=faked_clock(offset))
    await processes.wait_serving("license_server", port)
    await activating_vendor.activate(f"{port}@127.0.0.1", FEATURE, 1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        granted = await acquire_on_stream(lpb_grpc.LeaseServiceStub(channel), "ahead")
        assert wall(granted.expires_at.ToDatetime(tzinfo=dt.UTC)) > time.time() + 86_000

        offset.write_text("+0\n")
        # Noticed within a second (the file is re-read) and a sweep (0.2 s).
        started = time.monotonic()
        while wall(max(await held_expiries(port))) > time.time() + 6 + 1:
            assert time.monotonic() - started < 10, "the set-back clock was never noticed"
            await asyncio.sleep(0.2)
        await wait_until_freed(port, within=6 + 3)
    assert "the clock went back" in processes.log("license_server")
