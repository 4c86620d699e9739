"""Queue hand-over: how fast a freed seat reaches the next waiter in the queue.

One seat, one holder and ``--handover-waiters`` clients waiting in the feature's queue
(raw ``Lease`` streams with a ``wait_timeout``, spread at random over the replicas:
two replicas over one PostgreSQL database, or one License Server on SQLite). The holder
checks in; the waiter first in line is granted the seat, records when, checks in at once
and joins the back of the queue again, so about as many clients wait all along. Each
hand-over is timed from the moment the check-in is sent to the moment the next waiter
reads its ``granted``: the check-in's transaction, the lease event (over LISTEN/NOTIFY
when the next waiter is on the other replica), the waiter's dequeue and the answer.

Target (issue 16): a freed seat reaches the next waiter within 100 ms at the 99th
percentile, on the same replica or another. ``python -m bench --phases handover``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from dataclasses import dataclass, field

import grpc

from bench.phases import Database, Options
from bench.procstat import CpuWindow
from bench.scaleout import Replica, start_replicas, stop_replicas
from bench.services import FEATURE, Vendor
from bench.stats import percentile
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc

Stream = grpc.aio.StreamStreamCall[pb.LeaseRequest, pb.LeaseResponse]

MAX_HANDOVER_P99 = 0.100  # seconds
# A hand-over slower than this is a stall: the phase stops and says so.
STALL_SECONDS = 10.0


@dataclass
class HandoverResult:
    db: str
    replicas: int
    waiters: int
    handovers: int
    latencies: list[float]  # seconds, in order
    cross: list[bool]  # whether each hand-over went to the other replica
    stalled: bool
    servers_cpu: float  # cores, all replicas together, over the measured window
    elapsed: float
    notes: list[str] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(sorted(self.latencies), 0.5)

    @property
    def p99(self) -> float:
        return percentile(sorted(self.latencies), 0.99)

    def split(self, cross: bool) -> list[float]:
        return sorted(x for x, c in zip(self.latencies, self.cross, strict=True) if c == cross)

    @property
    def ok(self) -> bool:
        return not self.stalled and self.handovers > 0 and self.p99 <= MAX_HANDOVER_P99

    def show(self) -> None:
        where = "2 replicas over one PostgreSQL" if self.replicas > 1 else "1 License Server"
        print(
            f"  {self.db}, {where}: 1 seat, {self.waiters} waiters; {self.handovers} "
            f"hand-overs in {self.elapsed:.1f} s"
            + (" (STALLED: a freed seat reached nobody within 10 s)" if self.stalled else "")
        )
        if not self.latencies:
            return
        ordered = sorted(self.latencies)
        print(
            f"  check-in sent -> next waiter granted: p50 {1000 * self.p50:.1f} ms, p90 "
            f"{1000 * percentile(ordered, 0.9):.1f} ms, p99 {1000 * self.p99:.1f} ms, max "
            f"{1000 * ordered[-1]:.1f} ms"
        )
        if self.replicas > 1:
            for cross, label in ((False, "same replica"), (True, "other replica")):
                part = self.split(cross)
                if part:
                    print(
                        f"    to the {label}: {len(part)}, p50 {1000 * percentile(part, 0.5):.1f}"
                        f" ms, p99 {1000 * percentile(part, 0.99):.1f} ms"
                    )
        print(
            f"  servers {100 * self.servers_cpu:.0f}% of a core (together) = "
            f"{1000 * self.servers_cpu * self.elapsed / max(self.handovers, 1):.1f} ms CPU per "
            "hand-over"
        )
        for note in self.notes:
            print(f"  {note}")


class Queue:
    """The clients of the phase: who holds the seat, when it was last checked in."""

    def __init__(self, targets: list[str], handovers: int) -> None:
        self.channels = [grpc.aio.insecure_channel(target) for target in targets]
        self.stubs = [pb_grpc.LeaseServiceStub(channel) for channel in self.channels]
        self.handovers = handovers
        self.latencies: list[float] = []
        self.cross: list[bool] = []
        self.released_at = 0.0  # when the last check-in was sent
        self.released_on = -1  # the replica it was sent to
        self.granted = asyncio.Event()  # set at each grant (the stall watch)
        self.done = asyncio.Event()
        self.errors: list[str] = []

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def acquire(client: str, wait: float) -> pb.LeaseRequest:
    request = pb.LeaseAcquire(feature=FEATURE, count=1, client_host=client)
    if wait:
        request.wait_timeout.FromTimedelta(dt.timedelta(seconds=wait))
    return pb.LeaseRequest(acquire=request)


async def enqueue(queue: Queue, replica: int, client: str) -> Stream:
    """A stream waiting in the queue (its ``queued`` read), or holding the seat already."""
    stream = queue.stubs[replica].Lease()
    await stream.write(acquire(client, wait=3600))
    return stream


async def read_until_granted(stream: Stream) -> pb.LeaseResponse:
    while True:
        response = await stream.read()
        if response is grpc.aio.EOF:
            raise RuntimeError("the stream ended without a grant")
        assert isinstance(response, pb.LeaseResponse)
        kind = response.WhichOneof("kind")
        if kind == "granted":
            return response
        if kind != "queued":
            raise RuntimeError(f"waiting for a grant, got {response}")


async def check_in(queue: Queue, replica: int, stream: Stream) -> None:
    queue.released_on = replica
    queue.released_at = time.monotonic()
    await stream.write(pb.LeaseRequest(release=pb.LeaseRelease()))
    response = await stream.read()
    assert isinstance(response, pb.LeaseResponse) and response.HasField("released"), response
    await stream.done_writing()


async def waiter(queue: Queue, replica: int, client: str, first: Stream) -> None:
    """Wait, take the seat, check in at once, queue again: until enough hand-overs."""
    stream = first
    while True:
        await read_until_granted(stream)
        granted_at = time.monotonic()
        if queue.done.is_set():
            await check_in(queue, replica, stream)
            return
        queue.latencies.append(granted_at - queue.released_at)
        queue.cross.append(replica != queue.released_on)
        queue.granted.set()
        if len(queue.latencies) >= queue.handovers:
            queue.done.set()
        await check_in(queue, replica, stream)
        if queue.done.is_set():
            return
        stream = await enqueue(queue, replica, client)


async def handover_phase(options: Options, vendor: Vendor) -> HandoverResult:
    name = f"handover-{options.handover_db}"
    directory = options.work_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    count = 2 if options.handover_db == "postgres" else 1
    async with Database(options, options.handover_db, directory) as database_url:
        replicas = await start_replicas(
            options,
            vendor,
            name,
            database_url,
            count,
            seats=1,
            lease_ttl=options.lease_ttl,
            heartbeat_interval=options.heartbeat_interval,
        )
        try:
            return await measure(options, replicas, options.handover_db)
        finally:
            stop_replicas(replicas)


async def measure(options: Options, replicas: list[Replica], db: str) -> HandoverResult:
    queue = Queue([replica.target for replica in replicas], options.handover_grants)
    rng = random.Random(16)
    tasks: list[asyncio.Task[None]] = []
    stalled = False
    try:
        holder = queue.stubs[0].Lease()
        await holder.write(acquire("bench-holder", wait=0))
        response = await holder.read()
        assert isinstance(response, pb.LeaseResponse) and response.HasField("granted"), response
        # Enqueued one after another, so the tickets follow the waiters' numbers.
        for number in range(options.handover_waiters):
            replica = rng.randrange(len(replicas))
            client = f"bench-waiter-{number}"
            stream = await enqueue(queue, replica, client)
            response = await stream.read()
            assert isinstance(response, pb.LeaseResponse) and response.HasField("queued"), response
            tasks.append(asyncio.create_task(waiter(queue, replica, client, stream)))
        await asyncio.sleep(1.0)  # the queue settles (every waiter's first turn is over)
        window = CpuWindow([replica.process.pid for replica in replicas])
        started = time.monotonic()
        await check_in(queue, 0, holder)
        while not queue.done.is_set():
            queue.granted.clear()
            try:
                await asyncio.wait_for(queue.granted.wait(), STALL_SECONDS)
            except TimeoutError:
                stalled = True
                break
        elapsed = time.monotonic() - started
        usage = window.stop()
    finally:
        queue.done.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await queue.close()
    return HandoverResult(
        db=db,
        replicas=len(replicas),
        waiters=options.handover_waiters,
        handovers=len(queue.latencies),
        latencies=list(queue.latencies),
        cross=list(queue.cross),
        stalled=stalled,
        servers_cpu=sum(usage.cores([replica.process.pid]) for replica in replicas),
        elapsed=elapsed,
    )
