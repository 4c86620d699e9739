"""What a client is told about its lease's expiry holds, with real processes.

- An acknowledged heartbeat survives a SIGKILL of the License Server right after the
  acknowledgement: after the restart the lease can be resumed until the acknowledged
  expiry, and no other client gets its seat meanwhile.
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
from tests.conftest import DatabaseFactory
from tests.processes import Processes, free_port
from tests.test_resilience import Vendor, license_server_args
from tests.test_resilience import processes as processes  # fixtures
from tests.test_resilience import vendor as vendor

pytestmark = pytest.mark.e2e

FEATURE = "client.station"
Stream = grpc.aio.StreamStreamCall[lpb.LeaseRequest, lpb.LeaseResponse]


async def next_response(stream: Stream) -> lpb.LeaseResponse:
    response = await stream.read()
    assert isinstance(response, lpb.LeaseResponse), "the stream ended"
    return response


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
    tmp_path: Path, databases: DatabaseFactory, vendor: Vendor, processes: Processes
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
    await vendor.activate(f"{port}@127.0.0.1", FEATURE, 1)

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
