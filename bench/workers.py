"""The client processes: the same harness drives the echo server and the License Server.

``unary_worker`` runs ``concurrency`` closed loops of one operation (two unary RPCs in
sequence: echo+echo, or Checkout+Checkin) and reports the latency of every operation
that completed inside the measured window. ``lease_worker`` holds ``leases`` Lease
streams, heartbeats each on its own timer, and resumes each lease on a new stream when
its stream breaks (the reconnect storm). Both run in processes started with the
``spawn`` method, so several can load a server on separate cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2

from bench.echo_server import METHOD as ECHO_METHOD
from bench.mailbox import Mailbox
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import reason_of

FEATURE = "client.station"

# Each channel gets its own TCP connection (no sharing through the global subchannel
# pool), and reconnects quickly after the server went away (the storm).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

Operation = Callable[[], Awaitable[None]]

# A resume that fails with one of these is not retried: the lease is gone or not ours.
FINAL_CODES = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


def describe(error: grpc.aio.AioRpcError) -> str:
    reason = reason_of(error)
    return f"{error.code().name}/{reason}" if reason else error.code().name


# Closed-loop unary load


@dataclass(frozen=True)
class UnarySpec:
    target: str
    op: str  # "echo", "health" or "cycle"
    worker: int
    concurrency: int
    channels: int
    # Several License Server replicas: the closed loops are spread evenly over them,
    # each replica with its own connections (``channels`` split between them).
    replicas: tuple[str, ...] = ()


def _echo_op(channel: grpc.aio.Channel, payload: bytes) -> Operation:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO_METHOD)

    async def op() -> None:
        await call(payload)
        await call(payload)

    return op


def _cycle_op(channel: grpc.aio.Channel, client_host: str) -> Operation:
    stub = lpb_grpc.LeaseServiceStub(channel)
    checkout = lpb.CheckoutRequest(
        acquire=lpb.LeaseAcquire(feature=FEATURE, count=1, client_host=client_host)
    )

    async def op() -> None:
        granted = (await stub.Checkout(checkout)).granted
        await stub.Checkin(
            lpb.CheckinRequest(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
        )

    return op


def _health_op(channel: grpc.aio.Channel) -> Operation:
    """Two grpc.health Checks: the License Server's own stack (interceptors, protobuf,
    servicer dispatch) with no lease work behind it."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    request = health_pb2.HealthCheckRequest()

    async def op() -> None:
        await check(request)
        await check(request)

    return op


def echo_payload() -> bytes:
    """What the echo RPC carries: a Checkout request of the size the real one has."""
    return lpb.CheckoutRequest(
        acquire=lpb.LeaseAcquire(feature=FEATURE, count=1, client_host="bench-0-00")
    ).SerializeToString()


def unary_worker(connection: Connection, spec: UnarySpec) -> None:
    asyncio.run(_unary_main(connection, spec))


async def _unary_main(connection: Connection, spec: UnarySpec) -> None:
    mailbox = Mailbox(connection)
    targets = spec.replicas or (spec.target,)
    per_target = max(1, round(spec.channels / len(targets)))
    by_target = [
        [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(per_target)]
        for target in targets
    ]
    channels = [channel for group in by_target for channel in group]
    try:
        ops: list[Operation] = []
        for index in range(spec.concurrency):
            # Loop i goes to replica (i + worker) mod n, so the processes even each other out.
            group = by_target[(index + spec.worker) % len(targets)]
            channel = group[(index // len(targets)) % len(group)]
            if spec.op == "echo":
                ops.append(_echo_op(channel, echo_payload()))
            elif spec.op == "health":
                ops.append(_health_op(channel))
            else:
                ops.append(_cycle_op(channel, f"bench-{spec.worker}-{index:02d}"))
        for op in ops[: len(channels)]:
            await op()  # connect every channel before the clock starts (and warm it)
        mailbox.send("ready")
        kind, body = await mailbox.receive("go")
        if kind != "go":
            return
        measure_from: float = body["measure_from"]
        until: float = body["until"]
        latencies: list[float] = []
        completed = 0
        errors: Counter[str] = Counter()

        async def closed_loop(op: Operation) -> None:
            nonlocal completed
            while (start := time.monotonic()) < until:
                try:
                    await op()
                except grpc.aio.AioRpcError as error:
                    errors[describe(error)] += 1
                    await asyncio.sleep(0.01)
                    continue
                end = time.monotonic()
                if measure_from <= end <= until:
                    completed += 1
                    if start >= measure_from:
                        latencies.append(end - start)

        await asyncio.gather(*(closed_loop(op) for op in ops))
        mailbox.send("result", completed=completed, latencies=latencies, errors=dict(errors))
    except Exception as error:  # report rather than die silently
        mailbox.send("failed", error=repr(error))
    finally:
        for channel in channels:
            await channel.close()


# Held leases: streams, heartbeats, resume


@dataclass(frozen=True)
class LeaseSpec:
    target: str
    worker: int
    leases: int
    streams_per_channel: int
    heartbeat_interval: float
    acquire_concurrency: int


StreamCall: TypeAlias = "grpc.aio.StreamStreamCall[lpb.LeaseRequest, lpb.LeaseResponse]"


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    def set_event(_call: object) -> None:
        event.set()

    return set_event


class Holder:
    """Holds ``spec.leases`` leases, one Lease stream each, over shared channels."""

    def __init__(self, spec: LeaseSpec, mailbox: Mailbox) -> None:
        self.spec = spec
        self.mailbox = mailbox
        count = max(1, math.ceil(spec.leases / spec.streams_per_channel))
        self.channels = [
            grpc.aio.insecure_channel(spec.target, options=CHANNEL_OPTIONS) for _ in range(count)
        ]
        self.stubs = [lpb_grpc.LeaseServiceStub(channel) for channel in self.channels]
        self.acquiring = asyncio.Semaphore(spec.acquire_concurrency)
        self.held = 0
        self.acquire_failed = 0
        self.broken_now = 0
        self.breaks = 0
        self.resumed = 0
        self.resume_attempts = 0
        self.lost = 0
        self.mismatched = 0
        self.last_held_at = 0.0
        self.last_resumed_at = 0.0
        self.heartbeats: list[tuple[float, float]] = []  # (done at, latency)
        self.resume_latencies: list[float] = []  # from the break to the resumed grant
        self.lease_ids: list[str] = []
        self.errors: Counter[str] = Counter()
        self.details: dict[str, str] = {}  # the first message of each kind of error
        self.retried: Counter[str] = Counter()  # resume attempts that failed in transport
        self.retry_times: dict[str, list[float]] = {}

    def progress(self) -> dict[str, Any]:
        return {
            "held": self.held,
            "acquire_failed": self.acquire_failed,
            "broken_now": self.broken_now,
            "breaks": self.breaks,
            "resumed": self.resumed,
            "resume_attempts": self.resume_attempts,
            "lost": self.lost,
            "mismatched": self.mismatched,
            "last_held_at": self.last_held_at,
            "last_resumed_at": self.last_resumed_at,
            "heartbeats": len(self.heartbeats),
        }

    async def hold(self, index: int) -> None:
        stub = self.stubs[index // self.spec.streams_per_channel]
        async with self.acquiring:
            stream: StreamCall = stub.Lease()
            try:
                await stream.write(
                    lpb.LeaseRequest(
                        acquire=lpb.LeaseAcquire(
                            feature=FEATURE,
                            count=1,
                            client_host=f"bench-{self.spec.worker}-{index}",
                            display_name="bench",
                        )
                    )
                )
                response = await stream.read()
            except grpc.aio.AioRpcError as error:
                self.acquire_failed += 1
                self.errors[f"acquire {describe(error)}"] += 1
                return
            if not isinstance(response, lpb.LeaseResponse) or not response.HasField("granted"):
                self.acquire_failed += 1
                self.errors["acquire: no grant"] += 1
                return
        granted = response.granted
        self.held += 1
        self.last_held_at = time.monotonic()
        self.lease_ids.append(granted.lease_id)
        interval = self.spec.heartbeat_interval
        # Spread the heartbeats evenly over the interval.
        next_beat = time.monotonic() + random.uniform(0, interval)
        heartbeat = lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat())
        while True:
            broken = asyncio.Event()
            stream.add_done_callback(_setter(broken))
            while not broken.is_set():
                delay = next_beat - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(broken.wait(), delay)
                    if broken.is_set():
                        break
                started = time.monotonic()
                try:
                    await stream.write(heartbeat)
                    response = await stream.read()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    break
                if not isinstance(response, lpb.LeaseResponse):
                    break  # the server ended the stream
                if not response.HasField("heartbeat_ack"):
                    self.lost += 1
                    self.errors[f"heartbeat: {response.WhichOneof('kind')}"] += 1
                    return
                done = time.monotonic()
                self.heartbeats.append((done, done - started))
                next_beat += interval
                if next_beat < done:
                    next_beat = done + interval
            resumed = await self.resume(stub, granted)
            if resumed is None:
                return
            stream = resumed

    async def resume(
        self, stub: lpb_grpc.LeaseServiceAsyncStub, granted: lpb.LeaseGranted
    ) -> StreamCall | None:
        """Take the lease over on a new stream; None when it cannot be resumed."""
        broke_at = time.monotonic()
        self.breaks += 1
        self.broken_now += 1
        backoff = 0.05
        request = lpb.LeaseRequest(
            resume=lpb.LeaseResume(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
        )
        while True:
            self.resume_attempts += 1
            stream: StreamCall = stub.Lease(wait_for_ready=True)
            try:
                await stream.write(request)
                response = await stream.read()
            except grpc.aio.AioRpcError as error:
                # Only the server's verdict that the lease is gone (LEASE_EXPIRED, ...) is
                # final; transport errors (the dying connection, the restart, streams the
                # burst cancels) and server errors (INTERNAL) are retried with backoff.
                if error.code() not in FINAL_CODES:
                    self.retried[describe(error)] += 1
                    self.retry_times.setdefault(describe(error), []).append(time.monotonic())
                    self.details.setdefault(
                        describe(error), f"{error.details()} {error.debug_error_string()}"
                    )
                    await asyncio.sleep(random.uniform(0, backoff))
                    backoff = min(backoff * 2, 1.0)
                    continue
                self.broken_now -= 1
                self.lost += 1
                self.errors[f"resume {describe(error)}"] += 1
                self.details.setdefault(
                    describe(error), f"{error.details()} {error.debug_error_string()}"
                )
                return None
            if not isinstance(response, lpb.LeaseResponse) or not response.HasField("granted"):
                self.broken_now -= 1
                self.lost += 1
                self.errors["resume: no grant"] += 1
                return None
            if response.granted.lease_id != granted.lease_id or not response.granted.resumed:
                self.mismatched += 1
            self.broken_now -= 1
            self.resumed += 1
            self.last_resumed_at = time.monotonic()
            self.resume_latencies.append(self.last_resumed_at - broke_at)
            return stream

    async def report_forever(self) -> None:
        while True:
            self.mailbox.send("progress", **self.progress())
            await asyncio.sleep(0.25)

    def window(self, since: float, until: float) -> dict[str, Any]:
        latencies = [latency for done, latency in self.heartbeats if since <= done <= until]
        return {"heartbeat_latencies": latencies}

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(channel.close() for channel in self.channels)), 15
            )


def lease_worker(connection: Connection, spec: LeaseSpec) -> None:
    asyncio.run(_lease_main(connection, spec))


async def _lease_main(connection: Connection, spec: LeaseSpec) -> None:
    mailbox = Mailbox(connection)
    holder = Holder(spec, mailbox)
    mailbox.send("started", at=time.monotonic())
    tasks = [asyncio.create_task(holder.hold(index)) for index in range(spec.leases)]
    reporter = asyncio.create_task(holder.report_forever())
    try:
        while True:
            kind, body = await mailbox.receive("window", "stop")
            if kind == "window":
                mailbox.send("window", **holder.window(body["since"], body["until"]))
                continue
            break
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        mailbox.send(
            "final",
            **holder.progress(),
            lease_ids=holder.lease_ids,
            resume_latencies=holder.resume_latencies,
            errors=dict(holder.errors),
            details=holder.details,
            retried=dict(holder.retried),
            retry_times=holder.retry_times,
        )
    except Exception as error:
        mailbox.send("failed", error=repr(error))
    finally:
        reporter.cancel()
        await holder.close()
