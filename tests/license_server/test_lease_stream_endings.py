"""How a Lease stream ends when something goes wrong under it: a client gone under a write
ends it quietly; anything else (a fault in the reader's acknowledgement, a read that
fails, a write refused on a live call) is raised for the error table, never taken for
the client going away."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc._cython.cygrpc import ExecuteBatchError

from services.license_server.domain.model import Grant
from services.license_server.lease_stream import LeaseStream
from tessera.license.v1 import license_pb2 as lpb
from tests.support.in_process_site import Site
from tests.support.lease_stream import activate

HEARTBEAT = lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat())
ACQUIRE = lpb.LeaseRequest(
    acquire=lpb.LeaseAcquire(feature="client.station", count=1, client_host="ws", user="op")
)


@pytest.fixture(autouse=True)
async def two_seats(site: Site) -> None:
    await activate(site, seats=2)


class FakeCall:
    """The server side of one Lease call as a LeaseStream uses it: the client's messages
    (or an error a read raises), the answers written, and writes that fail as grpc's do
    once the call has ended (``gone``) or, with ``refuse_writes``, on a live call."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[object] = asyncio.Queue()
        self.written: asyncio.Queue[lpb.LeaseResponse] = asyncio.Queue()
        self.gone = False
        self.refuse_writes = False

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    async def read(self) -> object:
        item = await self.messages.get()
        if isinstance(item, Exception):
            raise item
        return item

    async def write(self, response: lpb.LeaseResponse) -> None:
        if self.gone or self.refuse_writes:
            raise ExecuteBatchError('Failed "execute_batch": (SendMessageOperation,)')
        self.written.put_nowait(response)

    def done(self) -> bool:
        return self.gone

    def cancelled(self) -> bool:
        return self.gone


def open_stream(site: Site, call: FakeCall) -> asyncio.Task[None]:
    """A stream on ``call``, asking for a seat."""
    stream = LeaseStream(site.license.lease_servicer.streams, call)
    running = asyncio.create_task(stream.run())
    call.messages.put_nowait(ACQUIRE)
    return running


async def seats_used(site: Site) -> int:
    reply = await site.leases.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature="client.station")
    )
    return reply.features[0].used


@pytest.mark.parametrize("databases", ["sqlite"], indirect=True)
async def test_a_client_gone_under_a_write_ends_the_stream_quietly(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """Gone under an answer the stream's loop writes (the grant), and under the
    acknowledgement its reader writes on the spot: either way the stream ends as after a
    half-close, and the lease stays held until its TTL runs out."""
    call = FakeCall()
    call.gone = True
    await open_stream(site, call)  # returns: no error
    assert await seats_used(site) == 1

    call = FakeCall()
    running = open_stream(site, call)
    assert (await call.written.get()).HasField("granted")
    call.gone = True
    call.messages.put_nowait(HEARTBEAT)
    await running
    assert await seats_used(site) == 2
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("databases", ["sqlite"], indirect=True)
async def test_a_write_refused_on_a_live_call_is_raised(site: Site) -> None:
    call = FakeCall()
    running = open_stream(site, call)
    assert (await call.written.get()).HasField("granted")
    call.refuse_writes = True
    call.messages.put_nowait(HEARTBEAT)
    with pytest.raises(grpc.aio.InternalError):
        await running


@pytest.mark.parametrize("databases", ["sqlite"], indirect=True)
async def test_a_read_that_fails_is_raised_not_taken_for_a_half_close(site: Site) -> None:
    call = FakeCall()
    running = open_stream(site, call)
    assert (await call.written.get()).HasField("granted")
    call.messages.put_nowait(RuntimeError("the read broke"))
    with pytest.raises(RuntimeError, match="the read broke"):
        await running


async def test_a_fault_in_the_readers_acknowledgement_ends_the_stream_as_internal(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat answered on the spot whose acknowledgement fails with a fault of ours
    (not a lease gone) is raised by the stream's loop: INTERNAL, and logged."""

    async def broken_keep_alive(grant: Grant, known_expiry: object) -> object:
        raise RuntimeError("keep_alive broke")

    stream = site.leases.Lease()
    await stream.write(ACQUIRE)
    assert (await stream.read()).HasField("granted")
    monkeypatch.setattr(site.license.leasing, "keep_alive", broken_keep_alive)
    await stream.write(HEARTBEAT)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stream.read()
    assert ended.value.code() == grpc.StatusCode.INTERNAL
    assert any(
        record.exc_info and "keep_alive broke" in str(record.exc_info[1])
        for record in caplog.records
    )
