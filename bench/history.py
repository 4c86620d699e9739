"""``python -m bench.history``: lease histories under crashes, pauses and clock steps.

    .venv/bin/python -m bench.history --minutes 5                 # SQLite and PostgreSQL
    .venv/bin/python -m bench.history --minutes 5 --database sqlite
    .venv/bin/python -m bench.history --minutes 30 --postgres-url postgresql+asyncpg://…

Many clients contend for few seats of one feature on real License Server processes: on
SQLite one server, on PostgreSQL three replicas over one database. The clients are
written from the contracts alone (``tessera.license.v1`` stubs, not the ``clients``
library): most hold leases on ``Lease`` streams (some queue for a seat, some resume a
broken stream only shortly before the lease would run out, as a client may), a few
check out with unary ``Checkout``/``Heartbeat``/``Checkin``; a few more use the
``clients`` library, for variety. Every grant, heartbeat
acknowledgement, release, revocation and refusal goes into a history
(``bench.lease_history``), and the faults go on meanwhile:

- **kill**: SIGKILL a License Server (the replica that just acknowledged a heartbeat) and
  start it again;
- **stop**: SIGSTOP a License Server for a while, then SIGCONT;
- **clock** (SQLite only): SIGKILL and restart the server with its clock set back 30 s
  (``bench.skewed_license_server``: the service's own clock injection); replicas sharing
  a database must share a clock, so PostgreSQL runs do not step one;
- **postgres** (PostgreSQL, only on a cluster of the bench's own): restart PostgreSQL
  under the replicas (``pg_ctl restart -m immediate``, a crash and recovery).

Each run ends with every client releasing what it holds, then the checker judges the
history. The report: runs, grants, resumes, faults, the most seats clients believed they
held at one instant against the seats activated, and every violation. Exit status 1 on a
violation.

PostgreSQL restarts never touch the shared cluster on 127.0.0.1:5432 (other tests use
it: ``pg_ctlcluster --skip-systemctl-redirect 15 main restart`` would break them): by
default the bench runs PostgreSQL runs on a throw-away cluster of its own (``initdb`` as
the ``postgres`` user, on a free port), which it may restart; with ``--postgres-url`` it
uses that server and leaves out the restart fault.

``tests/hardening/test_lease_history.py`` runs short scenarios of the same harness in ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeAlias

import grpc
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.lease_history import GONE, Event, History, Kind, Verdict, check
from bench.services import (
    FEATURE,
    LicenseServerConfig,
    Probe,
    ServerProcess,
    Vendor,
    create_postgres_database,
    drop_postgres_database,
    free_port,
)
from clients import Backoff, Lease, LeaseRevoked, LicenseClient, LicenseError
from clients.events import LeaseEvent, Lost, Resumed
from clients.license import LicenseState
from services.license_server.store.tables import leases
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import reason_of

StreamCall: TypeAlias = "grpc.aio.StreamStreamCall[lpb.LeaseRequest, lpb.LeaseResponse]"

CALL_TIMEOUT = 5.0
# A channel to a server that was just killed retries the connection quickly.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
FAULTS = ("kill", "stop", "clock", "postgres")


@dataclass(frozen=True)
class Scenario:
    """One run: the site, the clients and the faults, in order."""

    name: str
    database: str  # "sqlite" (one server) or "postgres" (replicas over one database)
    replicas: int = 1
    clients: int = 30  # stream clients
    unary_clients: int = 4  # Checkout / Heartbeat / Checkin clients
    library_clients: int = 0  # clients of the client library (clients.LicenseClient)
    seats: int = 5
    ttl: int = 10  # --lease-ttl
    heartbeat: float = 0.5  # --heartbeat-interval
    sweep: float = 0.2  # --sweep-interval
    faults: tuple[str, ...] = ("kill", "stop", "kill")
    # Stream clients whose resume waits until this long before the lease runs out (by
    # the client's reckoning: the TTL since the last acknowledgement), in every
    # ``lazy_every``-th client; 0: all resume at once (jittered).
    lazy_margin: float = 0.0
    lazy_every: int = 1
    stop_seconds: float = 3.0  # how long a SIGSTOP lasts
    clock_back: float = 30.0  # seconds a clock step sets the server's clock back
    queue_every: int = 3  # every n-th acquire waits in the queue (0: none)
    # How long a client holds a lease, in heartbeat intervals.
    hold: tuple[float, float] = (0.6, 4.0)
    # A SIGKILL waits for up to this many acknowledgements from its victim for one whose
    # expiry the database does not hold yet (0: the next acknowledgement will do).
    aim_unflushed: int = 0


@dataclass
class RunResult:
    scenario: Scenario
    verdict: Verdict
    history: History
    seconds: float
    faults: dict[str, int] = field(default_factory=dict)
    # server incarnation -> its clock offset (seconds ahead of the clients' clock)
    offsets: dict[str, float] = field(default_factory=dict)
    # seconds from each SIGKILL to the server serving again
    restarts: list[float] = field(default_factory=list)
    # for each SIGKILL aimed at an acknowledgement not yet durable (``aim_unflushed``):
    # whether it was still not durable after the kill (False: the flush came first)
    aims: list[bool] = field(default_factory=list)
    # Things that are not violations but worth a look (no progress after a fault,
    # unexpected refusals).
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        faults = ", ".join(f"{name} {count}" for name, count in self.faults.items() if count)
        return (
            f"{self.scenario.name} [{self.scenario.database}, {self.scenario.replicas} "
            f"server(s), {self.scenario.clients + self.scenario.unary_clients} clients"
            f" + {self.scenario.library_clients} of the library, "
            f"{self.scenario.seats} seats] {self.seconds:.1f} s; faults: {faults or 'none'}; "
            f"{self.verdict.summary({FEATURE: self.scenario.seats})}"
        )


# The site: License Server processes, their incarnations and their clocks


class Site:
    """The License Servers under test: one on SQLite, replicas on PostgreSQL."""

    def __init__(
        self, scenario: Scenario, work_dir: Path, database_url: str, vendor_keys: Path
    ) -> None:
        self.scenario = scenario
        data_dir = work_dir / "license_server"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.configs = [
            LicenseServerConfig(
                data_dir=data_dir,
                database_url=database_url,
                port=free_port(),
                vendor_keys=vendor_keys,
                lease_ttl=scenario.ttl,
                heartbeat_interval=scenario.heartbeat,
                sweep_interval=scenario.sweep,
            )
            for _ in range(scenario.replicas)
        ]
        self.data_dir = data_dir
        self.processes: list[ServerProcess | None] = [None] * scenario.replicas
        self.incarnations = [0] * scenario.replicas
        self.clock = [0.0] * scenario.replicas  # each server's clock offset now
        # incarnation label -> clock offset: how the checker reads each one's expiries
        self.offsets: dict[str, float] = {}
        self._label_of_target: dict[str, str] = {}

    @property
    def targets(self) -> list[str]:
        return [config.target for config in self.configs]

    def label(self, target: str) -> str:
        """Which incarnation of which server answers at ``target`` now."""
        return self._label_of_target.get(target, target)

    def label_of(self, index: int) -> str:
        return f"ls-{index}#{self.incarnations[index]}"

    async def start(self, index: int) -> None:
        config = self.configs[index]
        self.incarnations[index] += 1
        module, args = "services.license_server", config.args()
        if self.clock[index]:
            module = "bench.skewed_license_server"
            args = ["--clock-offset", f"{self.clock[index]:g}", *args]
        process = ServerProcess(
            self.label_of(index), module, args, self.data_dir / f"server-{index}.log"
        )
        process.start()
        self.processes[index] = process
        self.offsets[self.label_of(index)] = self.clock[index]
        self._label_of_target[config.target] = self.label_of(index)
        await process.wait_until(Probe(config.target, echo=False))

    async def start_all(self) -> None:
        # The first creates the host key and migrates; replicas share its data directory.
        await self.start(0)
        await asyncio.gather(*(self.start(index) for index in range(1, self.scenario.replicas)))

    def kill(self, index: int) -> None:
        process = self.processes[index]
        assert process is not None
        process.kill()
        self.processes[index] = None

    def signal(self, index: int, number: signal.Signals) -> None:
        process = self.processes[index]
        assert process is not None and process.process is not None
        process.process.send_signal(number)

    def stop_all(self) -> None:
        for index, process in enumerate(self.processes):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.signal(index, signal.SIGCONT)
                process.kill()
                self.processes[index] = None


# The clients: built from the generated stubs and the contract in docs/integrator.md


class Broken(Exception):
    """The stream or call broke, or did not answer in time: the outcome is unknown."""


class Refused(Exception):
    """The server answered with a refusal (its reason was recorded)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _posix(response: lpb.LeaseGranted | lpb.LeaseHeartbeatAck | lpb.HeartbeatResponse) -> float:
    return response.expires_at.seconds + response.expires_at.nanos / 1e9


@dataclass
class Held:
    """A lease as its client knows it."""

    lease_id: str
    secret: str
    feature: str
    count: int
    ttl: float
    heartbeat: float
    # By the client's own reckoning (the TTL since it was last told), on its monotonic
    # clock: when the lease runs out.
    ends: float
    server: str  # host:port


class Client:
    """What every client shares: a name, channels to every server, the history."""

    def __init__(
        self,
        name: str,
        site: Site,
        history: History,
        stopping: asyncio.Event,
        rng: random.Random,
        scenario: Scenario,
        first: int,
    ) -> None:
        self.name = name
        self.site = site
        self.history = history
        self.stopping = stopping
        self.rng = rng
        self.scenario = scenario
        targets = site.targets
        self.order = targets[first % len(targets) :] + targets[: first % len(targets)]
        self.channels = {
            target: grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for target in targets
        }
        self.stubs = {
            target: lpb_grpc.LeaseServiceStub(channel) for target, channel in self.channels.items()
        }
        self.acquires = 0
        self.notes: list[str] = []
        self.held: Held | None = None  # the lease this client holds or is resuming

    async def run(self) -> None:
        """Take, hold and release leases until the run stops."""
        raise NotImplementedError

    def record(self, kind: Kind, target: str, **fields: object) -> None:
        self.history.record(self.name, kind, server=self.site.label(target), **fields)

    def starting_with(self, target: str) -> list[str]:
        return [target] + [other for other in self.order if other != target]

    async def pause(self, seconds: float) -> None:
        """Think time (not synchronisation): a client's own pace."""
        await asyncio.sleep(max(0.0, seconds))

    def acquire_request(self) -> lpb.LeaseAcquire:
        self.acquires += 1
        acquire = lpb.LeaseAcquire(
            feature=FEATURE, count=1, client_host=self.name, display_name="history client"
        )
        every = self.scenario.queue_every
        if every and self.acquires % every == 0:
            acquire.wait_timeout.FromSeconds(self.rng.randint(1, 3))
        return acquire

    def refusal(self, error: grpc.aio.AioRpcError, target: str, operation: str, lease: str) -> None:
        """Record a refusal's reason; raise Refused, or Broken when the call broke or may be
        tried again (recorded too when it had a reason)."""
        reason = reason_of(error)
        if error.code() == grpc.StatusCode.UNKNOWN:
            self.notes.append(f"{self.name}: {operation} answered UNKNOWN {error.details()!r}")
        if error.code() in UNAVAILABLE:
            # Try again (or elsewhere): e.g. SERVER_SHUTTING_DOWN, DATABASE_UNAVAILABLE while
            # PostgreSQL restarts, or no reason at all when the connection broke.
            if reason:
                self.record(
                    Kind.REFUSED, target, lease_id=lease, operation=operation, reason=reason
                )
            raise Broken(error.code().name) from error
        self.record(Kind.REFUSED, target, lease_id=lease, operation=operation, reason=reason)
        if error.code() == grpc.StatusCode.INTERNAL or not reason:
            self.notes.append(f"{self.name}: {operation} answered {error.code().name} {reason!r}")
        raise Refused(reason) from error

    async def checkin(self, held: Held, probe: bool) -> None:
        """Unary check-in on each server in turn until one answers or the lease has run out
        by now anyway; ``probe`` checks in a second time (must answer released: false)."""
        backoff = 0.1
        while time.monotonic() < held.ends + held.ttl:
            for target in self.starting_with(held.server):
                request = lpb.CheckinRequest(lease_id=held.lease_id, lease_secret=held.secret)
                try:
                    reply = await self.stubs[target].Checkin(request, timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    try:
                        self.refusal(error, target, "checkin", held.lease_id)
                    except Broken:
                        continue
                    except Refused:
                        return
                self.record(Kind.RELEASED, target, lease_id=held.lease_id, released=reply.released)
                if probe:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        again = await self.stubs[target].Checkin(request, timeout=CALL_TIMEOUT)
                        self.record(
                            Kind.RELEASED, target, lease_id=held.lease_id, released=again.released
                        )
                return
            await self.pause(self.rng.uniform(0, backoff))
            backoff = min(1.0, backoff * 2)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


class LeaseStream:
    """One Lease stream and the task that reads it, recording what it hears at once."""

    def __init__(self, client: Client, target: str, operation: str, lease_id: str = "") -> None:
        self.client = client
        self.target = target
        self.operation = operation
        self.lease_id = lease_id
        self.call: StreamCall = client.stubs[target].Lease()
        self.inbox: asyncio.Queue[lpb.LeaseResponse | BaseException] = asyncio.Queue()
        self.heard_end = False  # a revocation or denial came first: its status is no news
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    self.inbox.put_nowait(Broken("the stream ended"))
                    return
                assert isinstance(response, lpb.LeaseResponse)
                self._record(response)
                self.inbox.put_nowait(response)
        except grpc.aio.AioRpcError as error:
            if self.heard_end:
                self.inbox.put_nowait(Broken(error.code().name))
                return
            try:
                self.client.refusal(error, self.target, self.operation, self.lease_id)
            except (Broken, Refused) as outcome:
                self.inbox.put_nowait(outcome)
        except Exception as error:  # e.g. the call was cancelled under the read
            self.inbox.put_nowait(Broken(repr(error)))

    def _record(self, response: lpb.LeaseResponse) -> None:
        client, target = self.client, self.target
        kind = response.WhichOneof("kind")
        if kind == "granted":
            granted = response.granted
            self.lease_id = granted.lease_id
            client.record(
                Kind.RESUMED if granted.resumed else Kind.GRANTED,
                target,
                lease_id=granted.lease_id,
                feature=granted.feature,
                count=granted.count,
                expires_at=_posix(granted),
                epoch=granted.epoch,
            )
        elif kind == "heartbeat_ack":
            client.record(
                Kind.ACK, target, lease_id=self.lease_id, expires_at=_posix(response.heartbeat_ack)
            )
        elif kind == "released":
            # The stream's release says nothing of whether the lease was still held.
            client.record(Kind.RELEASED, target, lease_id=self.lease_id, released=None)
        elif kind == "revoked":
            self.heard_end = True
            client.record(
                Kind.REVOKED,
                target,
                lease_id=response.revoked.lease_id or self.lease_id,
                reason=response.revoked.reason,
            )
        elif kind == "denied":
            self.heard_end = True
            client.record(
                Kind.REFUSED,
                target,
                operation=self.operation,
                lease_id=self.lease_id,
                reason=response.denied.reason,
            )

    async def send(self, request: lpb.LeaseRequest) -> None:
        try:
            await self.call.write(request)
        except Exception as error:
            raise Broken(repr(error)) from error

    async def receive(self, within: float) -> lpb.LeaseResponse | None:
        """The next message; None when none came within ``within`` seconds. Raises Broken
        or Refused when the stream ended."""
        try:
            item = await asyncio.wait_for(self.inbox.get(), max(0.0, within))
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            self.inbox.put_nowait(item)  # the stream stays ended
            raise item
        return item

    def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()


class StreamClient(Client):
    """Holds leases on Lease streams: heartbeats, resumes a broken stream, releases."""

    lazy = False  # resume only shortly before the lease runs out

    async def run(self) -> None:
        while not self.stopping.is_set():
            taken = await self.acquire()
            if taken is None:
                await self.pause(self.rng.uniform(0.05, 0.2))
                continue
            held, stream = taken
            self.held = held
            try:
                await self.hold(held, stream)
            finally:
                self.held = None

    async def acquire(self) -> tuple[Held, LeaseStream] | None:
        request = lpb.LeaseRequest(acquire=self.acquire_request())
        wait = _seconds(request.acquire.wait_timeout)
        for target in self.order:
            stream = LeaseStream(self, target, "acquire")
            try:
                await stream.send(request)
                while True:
                    response = await stream.receive(wait + CALL_TIMEOUT)
                    if response is None:
                        raise Broken("no answer to the acquire")
                    if response.HasField("granted"):
                        granted = response.granted
                        ttl = _seconds(granted.ttl)
                        held = Held(
                            granted.lease_id,
                            granted.lease_secret,
                            granted.feature,
                            granted.count,
                            ttl,
                            _seconds(granted.heartbeat_interval),
                            time.monotonic() + ttl,
                            target,
                        )
                        return held, stream
                    if response.HasField("denied"):
                        stream.close()
                        return None
            except Broken:
                stream.close()
                continue
            except Refused:
                stream.close()
                return None
        return None

    async def hold(self, held: Held, stream: LeaseStream) -> None:
        until = time.monotonic() + self.rng.uniform(*self.scenario.hold) * held.heartbeat
        beat_at = time.monotonic() + held.heartbeat
        waiting_for_ack = False
        while True:
            now = time.monotonic()
            if self.stopping.is_set() or now >= until:
                await self.release(held, stream)
                return
            try:
                response = await stream.receive(min(beat_at, until) - now)
            except Refused:
                stream.close()
                return  # the lease is gone (recorded)
            except Broken:
                stream.close()
                resumed = await self.resume(held)
                if resumed is None:
                    return
                stream, waiting_for_ack = resumed, False
                beat_at = time.monotonic() + held.heartbeat
                continue
            if response is None:
                if time.monotonic() < beat_at:
                    continue  # time to release: the loop's top does it
                if waiting_for_ack:  # no acknowledgement within an interval: broken
                    stream.close()
                    resumed = await self.resume(held)
                    if resumed is None:
                        return
                    stream, waiting_for_ack = resumed, False
                    beat_at = time.monotonic() + held.heartbeat
                    continue
                try:
                    await stream.send(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
                except Broken:
                    continue  # the reader hears it too
                waiting_for_ack = True
                beat_at += held.heartbeat
            elif response.HasField("heartbeat_ack"):
                held.ends = time.monotonic() + held.ttl
                waiting_for_ack = False
            elif response.HasField("revoked"):
                stream.close()
                if response.revoked.reason in GONE:
                    return
                # LEASE_RESUMED_ELSEWHERE: not by this client; resume it back.
                resumed = await self.resume(held)
                if resumed is None:
                    return
                stream, waiting_for_ack = resumed, False

    async def resume(self, held: Held) -> LeaseStream | None:
        """Take the lease back on a new stream, the server that held it first, until it
        runs out by the client's reckoning; None when it is gone."""
        backoff = 0.2
        first = True
        while time.monotonic() < held.ends:
            if first and self.lazy:
                await self.pause(held.ends - self.scenario.lazy_margin - time.monotonic())
            else:
                await self.pause(self.rng.uniform(0, backoff))
                backoff = min(1.0, backoff * 2)
            first = False
            for target in self.starting_with(held.server):
                remaining = held.ends - time.monotonic()
                if remaining <= 0:
                    break
                stream = LeaseStream(self, target, "resume", held.lease_id)
                try:
                    await stream.send(
                        lpb.LeaseRequest(
                            resume=lpb.LeaseResume(lease_id=held.lease_id, lease_secret=held.secret)
                        )
                    )
                    response = await stream.receive(min(2.0, remaining))
                    if response is not None and response.HasField("granted"):
                        held.ends = time.monotonic() + held.ttl
                        held.server = target
                        return stream
                    stream.close()
                except Broken:
                    stream.close()
                except Refused:
                    stream.close()
                    return None
        self.record(Kind.LOST, held.server, lease_id=held.lease_id)
        # Gone by the client's reckoning; a check-in returns the seat sooner if the server
        # still counts it (its clock runs slow, or the stream broke only this side).
        with contextlib.suppress(Broken, Refused, grpc.aio.AioRpcError):
            for target in self.starting_with(held.server):
                await self.stubs[target].Checkin(
                    lpb.CheckinRequest(lease_id=held.lease_id, lease_secret=held.secret),
                    timeout=1.0,
                )
                break
        return None

    async def release(self, held: Held, stream: LeaseStream) -> None:
        self.record(Kind.RELEASE, stream.target, lease_id=held.lease_id)
        stream.operation = "release"
        try:
            await stream.send(lpb.LeaseRequest(release=lpb.LeaseRelease()))
            while True:
                response = await stream.receive(CALL_TIMEOUT)
                if response is None:
                    raise Broken("no answer to the release")
                if response.HasField("released"):
                    stream.close()
                    return
                if response.HasField("revoked"):
                    stream.close()
                    return
        except Refused:
            stream.close()
            return
        except Broken:
            stream.close()
        await self.checkin(held, probe=False)


class LazyStreamClient(StreamClient):
    lazy = True


class UnaryClient(Client):
    """Checkout, Heartbeat and Checkin: no stream, no push."""

    async def run(self) -> None:
        while not self.stopping.is_set():
            held = await self.checkout()
            if held is None:
                await self.pause(self.rng.uniform(0.05, 0.2))
                continue
            self.held = held
            try:
                await self.hold(held)
            finally:
                self.held = None

    async def checkout(self) -> Held | None:
        acquire = self.acquire_request()
        acquire.ClearField("wait_timeout")  # only streams queue
        for target in self.order:
            try:
                reply = await self.stubs[target].Checkout(
                    lpb.CheckoutRequest(acquire=acquire), timeout=CALL_TIMEOUT
                )
            except grpc.aio.AioRpcError as error:
                try:
                    self.refusal(error, target, "acquire", "")
                except Broken:
                    continue
                except Refused:
                    return None
            granted = reply.granted
            self.record(
                Kind.GRANTED,
                target,
                lease_id=granted.lease_id,
                feature=granted.feature,
                count=granted.count,
                expires_at=_posix(granted),
                epoch=granted.epoch,
            )
            ttl = _seconds(granted.ttl)
            return Held(
                granted.lease_id,
                granted.lease_secret,
                granted.feature,
                granted.count,
                ttl,
                _seconds(granted.heartbeat_interval),
                time.monotonic() + ttl,
                target,
            )
        return None

    async def hold(self, held: Held) -> None:
        until = time.monotonic() + self.rng.uniform(*self.scenario.hold) * held.heartbeat
        while not self.stopping.is_set() and time.monotonic() < until:
            await self.pause(min(held.heartbeat, until - time.monotonic()))
            if time.monotonic() >= until:
                break
            if not await self.heartbeat(held):
                return
        self.record(Kind.RELEASE, held.server, lease_id=held.lease_id)
        await self.checkin(held, probe=self.rng.random() < 0.3)

    async def heartbeat(self, held: Held) -> bool:
        """Extend the lease on any server; False when it is gone or ran out."""
        backoff = 0.1
        while time.monotonic() < held.ends:
            for target in self.starting_with(held.server):
                remaining = held.ends - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    reply = await self.stubs[target].Heartbeat(
                        lpb.HeartbeatRequest(lease_id=held.lease_id, lease_secret=held.secret),
                        timeout=min(held.heartbeat, remaining),
                    )
                except grpc.aio.AioRpcError as error:
                    try:
                        self.refusal(error, target, "heartbeat", held.lease_id)
                    except Broken:
                        continue
                    except Refused:
                        return False
                self.record(Kind.ACK, target, lease_id=held.lease_id, expires_at=_posix(reply))
                held.ends, held.server = time.monotonic() + held.ttl, target
                return True
            await self.pause(self.rng.uniform(0, backoff))
            backoff = min(1.0, backoff * 2)
        self.record(Kind.LOST, held.server, lease_id=held.lease_id)
        return False


class LibraryClient(Client):
    """Holds leases through the client library (``clients.LicenseClient``): its own
    heartbeats, resume, failover and check-in; recorded from what it tells the
    application (the grant, ``Resumed``, ``Lost``, ``Released``, ``lease.expires_at``)."""

    async def run(self) -> None:
        address = ";".join(f"{target.split(':')[1]}@127.0.0.1" for target in self.order)
        backoff = Backoff(initial=0.2, maximum=1.0)
        async with LicenseClient(
            address, client_host=self.name, call_timeout=CALL_TIMEOUT, backoff=backoff
        ) as library:
            while not self.stopping.is_set():
                try:
                    lease = await library.acquire(FEATURE, on_event=self.on_event)
                except LicenseError as error:
                    if error.reason:
                        self.record(
                            Kind.REFUSED, error.server, operation="acquire", reason=error.reason
                        )
                    await self.pause(self.rng.uniform(0.05, 0.2))
                    continue
                await self.hold(lease)

    def on_event(self, event: LeaseEvent) -> None:
        lease = self.lease
        if lease is None:
            return
        if isinstance(event, Resumed):
            self.record(
                Kind.RESUMED,
                event.server,
                lease_id=lease.lease_id,
                feature=lease.feature,
                count=lease.count,
                expires_at=event.expires_at.timestamp(),
                epoch=event.epoch,
            )
            self.told = event.expires_at
        elif isinstance(event, Lost):
            error = event.error
            if isinstance(error, LeaseRevoked):
                self.record(
                    Kind.REVOKED, error.server, lease_id=lease.lease_id, reason=error.reason
                )
            elif error.code is not None:  # a server's answer, e.g. LEASE_EXPIRED on resume
                self.record(
                    Kind.REFUSED,
                    error.server,
                    lease_id=lease.lease_id,
                    operation="resume",
                    reason=error.reason,
                )
            else:  # by the library's own reckoning (its reason says LEASE_EXPIRED too)
                self.record(Kind.LOST, error.server, lease_id=lease.lease_id)

    lease: Lease | None = None
    told: dt.datetime | None = None

    async def hold(self, lease: Lease) -> None:
        self.lease, self.told = lease, lease.expires_at
        self.record(
            Kind.GRANTED,
            lease.server,
            lease_id=lease.lease_id,
            feature=lease.feature,
            count=lease.count,
            expires_at=lease.expires_at.timestamp(),
            epoch=lease.epoch,
        )
        interval = lease.heartbeat_interval.total_seconds()
        until = time.monotonic() + self.rng.uniform(*self.scenario.hold) * interval
        try:
            # The library acknowledges heartbeats without telling: watch what it was told.
            while lease.held and not self.stopping.is_set() and time.monotonic() < until:
                await self.pause(0.02)
                if lease.expires_at != self.told and lease.state == LicenseState.HELD:
                    self.told = lease.expires_at
                    self.record(
                        Kind.ACK,
                        lease.server,
                        lease_id=lease.lease_id,
                        expires_at=lease.expires_at.timestamp(),
                    )
            if lease.held:
                self.record(Kind.RELEASE, lease.server, lease_id=lease.lease_id)
                if await lease.release():  # False: no server answered the check-in
                    self.record(Kind.RELEASED, lease.server, lease_id=lease.lease_id)
        finally:
            self.lease = None


# Faults


class PrivatePostgres:
    """A throw-away PostgreSQL cluster of the bench's own, which it may restart."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bins:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql")
        self.bin = bins[-1]

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run(
            [*prefix, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if done.returncode:
            raise RuntimeError(f"{command[0]} failed: {done.stderr.strip()}")

    def _pg_ctl(self, *args: str) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), *args)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self._as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.directory / "data"),
            "-U",
            "postgres",
            "--auth=trust",
        )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} "
            "-c fsync=off -c max_connections=200"
        )
        self._pg_ctl("-o", options, "-l", str(self.directory / "postgres.log"), "-w", "start")

    def restart(self) -> None:
        """A crash and recovery: every connection is cut at once."""
        self._pg_ctl("-m", "immediate", "-w", "restart")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("-m", "immediate", "-w", "stop")


async def run_scenario(
    scenario: Scenario,
    work_dir: Path,
    database_url: str,
    vendor: Vendor,
    postgres: PrivatePostgres | None = None,
    seed: float = 0,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Start the site, run the clients through the faults, release everything, judge.
    ``log`` is told what happens when (for a slow run's post-mortem)."""
    started = time.monotonic()

    def phase(what: str) -> None:
        if log is not None:
            log(f"{time.monotonic() - started:7.2f} s  {what}")

    site = Site(scenario, work_dir, database_url, vendor.vendor_keys)
    history = History()
    stopping = asyncio.Event()
    rng = random.Random(seed)
    faults = dict.fromkeys(FAULTS, 0)
    notes: list[str] = []
    restarts: list[float] = []
    aims: list[bool] = []
    durables = DurableExpiries(database_url) if scenario.aim_unflushed else None
    clients: list[Client] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        await site.start_all()
        await vendor.activate(site.configs[0].ebo_address, scenario.seats)
        phase(f"{scenario.replicas} server(s) up, {scenario.seats} seats activated")
        streams, unary = scenario.clients, scenario.unary_clients
        for number in range(streams + unary + scenario.library_clients):
            kind: type[Client]
            if number >= streams + unary:
                kind = LibraryClient
            elif number >= streams:
                kind = UnaryClient
            elif scenario.lazy_margin and number % scenario.lazy_every == 0:
                kind = LazyStreamClient
            else:
                kind = StreamClient
            client: Client = kind(
                f"{kind.__name__}-{number}",
                site,
                history,
                stopping,
                random.Random(rng.random()),
                scenario,
                first=number,
            )
            clients.append(client)
        tasks = [asyncio.create_task(client.run()) for client in clients]
        # Warm: every seat granted at least once, and heartbeats acknowledged.
        await _within(history.count_reaches(scenario.seats, Kind.GRANTED), 30, "warm-up")
        await _within(history.count_reaches(scenario.seats, Kind.ACK), 30, "warm-up acks")
        phase("clients warm")
        for number, fault in enumerate(scenario.faults):
            victim = number % scenario.replicas
            aimed_at: Event | None = None
            if fault in ("kill", "clock"):
                aimed_at = await aim(history, site.label_of(victim), scenario, durables)
            since = len(history.events)
            held_then = {c.held.lease_id for c in clients if c.held is not None}
            if fault in ("kill", "clock"):
                killed = time.monotonic()
                site.kill(victim)
                phase(f"{fault}: SIGKILLed ls-{victim} holding {len(held_then)} leases")
                if aimed_at is not None and durables is not None:
                    # Still not durable now that the server is dead: the kill won the race
                    # against the heartbeat flush (else the aim missed).
                    aims.append(not await durables.written(aimed_at))
                if fault == "clock":
                    site.clock[victim] -= scenario.clock_back
                await site.start(victim)
                restarts.append(time.monotonic() - killed)
                phase(f"{fault}: ls-{victim} serving again")
            elif fault == "stop":
                site.signal(victim, signal.SIGSTOP)
                phase(f"stop: SIGSTOPped ls-{victim} holding {len(held_then)} leases")
                await asyncio.sleep(scenario.stop_seconds)  # the fault is time passing
                site.signal(victim, signal.SIGCONT)
                phase(f"stop: SIGCONT ls-{victim}")
            elif fault == "postgres":
                if postgres is None:
                    raise ValueError("a PostgreSQL restart needs the bench's own cluster")
                await asyncio.to_thread(postgres.restart)
                phase("postgres: restarted")
            else:
                raise ValueError(f"unknown fault {fault!r}")
            faults[fault] += 1

            try:
                await _within(
                    settled(history, held_then, since), 3 * scenario.ttl + 20, f"after {fault}"
                )
            except TimeoutError as error:
                notes.append(str(error))
            phase(f"{fault}: every lease held then resumed, released or lost")
        stopping.set()
        done, pending = await asyncio.wait(tasks, timeout=3 * scenario.ttl + 30)
        for task in pending:
            notes.append("a client did not finish within its TTL after the run stopped")
            task.cancel()
        phase("every client released and stopped")
        for task in done:
            if task.exception() is not None:
                notes.append(f"a client failed: {task.exception()!r}")
    finally:
        stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            notes.extend(client.notes)
            await client.close()
        site.stop_all()
        if durables is not None:
            await durables.close()
    verdict = check(history, {FEATURE: scenario.seats}, site.offsets)
    return RunResult(
        scenario,
        verdict,
        history,
        time.monotonic() - started,
        faults,
        dict(site.offsets),
        restarts,
        aims,
        notes,
    )


class DurableExpiries:
    """What the database holds as a lease's expiry. Only to aim a SIGKILL at the moment
    an acknowledged expiry is not yet written (the checker never looks here)."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_async_engine(database_url, poolclass=NullPool)

    async def expiry(self, lease_id: str) -> float | None:
        async with self.engine.connect() as connection:
            value = await connection.scalar(
                select(leases.c.expires_at).where(leases.c.lease_id == lease_id)
            )
        return None if value is None else float(value.timestamp())

    async def written(self, ack: Event) -> bool:
        """Whether the expiry ``ack`` told is in the database (to half a second)."""
        durable = await self.expiry(ack.lease_id)
        assert ack.expires_at is not None
        return durable is not None and durable >= ack.expires_at - 0.5

    async def close(self) -> None:
        await self.engine.dispose()


async def aim(
    history: History, label: str, scenario: Scenario, durables: DurableExpiries | None
) -> Event | None:
    """Wait for the moment to SIGKILL the server ``label``: right after it acknowledged a
    heartbeat (what it promised then is the newest promise a crash can lose); with
    ``aim_unflushed``, an acknowledgement whose expiry is not in the database yet, if one
    comes within that many. Returns that acknowledgement, or None."""
    tries = max(1, scenario.aim_unflushed)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(tries * (scenario.heartbeat + 5)):
            for _ in range(tries):
                ack = await history.next(Kind.ACK)
                while ack.server != label:
                    ack = await history.next(Kind.ACK)
                if durables is None:
                    return None
                if not await durables.written(ack):
                    return ack
    return None


ENDING = (Kind.REFUSED, Kind.REVOKED, Kind.RELEASE, Kind.LOST)
SETTLING = (Kind.RESUMED, *ENDING)


async def settled(history: History, leases: set[str], since: int) -> None:
    """Wait until the client of every lease in ``leases`` learned its fate: resumed after
    event ``since``, or released, refused, revoked or given up."""
    while True:
        decided = {e.lease_id for e in history.events[since:] if e.kind == Kind.RESUMED}
        decided |= {e.lease_id for e in history.events if e.kind in ENDING}
        if leases <= decided:
            return
        await history.next(*SETTLING)


async def _within(waiting: Coroutine[object, object, None], seconds: float, what: str) -> None:
    try:
        await asyncio.wait_for(waiting, seconds)
    except TimeoutError:
        raise TimeoutError(f"{what}: not within {seconds:g} s") from None


# The soak


def scenarios(database: str, rng: random.Random, postgres_restart: bool) -> Scenario:
    """A random run of one database kind: 40 clients on 6 seats, 3 to 6 faults."""
    kinds = ["kill", "kill", "stop"]
    if database == "sqlite":
        kinds.append("clock")
    if database == "postgres" and postgres_restart:
        kinds.append("postgres")
    faults = tuple(rng.choice(kinds) for _ in range(rng.randint(3, 6)))
    if database == "sqlite" and faults.count("clock") > 3:  # trusted storage allows 5 min
        faults = tuple(fault if fault != "clock" else "kill" for fault in faults)
    return Scenario(
        name=f"soak-{database}",
        database=database,
        replicas=1 if database == "sqlite" else 3,
        clients=32,
        unary_clients=4,
        library_clients=4,
        seats=6,
        ttl=10,
        heartbeat=rng.choice([0.5, 1.0, 2.0]),
        faults=faults,
        lazy_margin=1.0,
        lazy_every=3,
        stop_seconds=rng.uniform(1.0, 8.0),
        clock_back=30.0,
        # Half the runs queue: on main a queued waiter whose server died blocks the
        # feature's queue for ~15 s (issue 16 item 2), idling the seats after a kill.
        queue_every=rng.choice([0, 3]),
    )


async def soak(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="tessera-history-"))
    rng = random.Random(args.seed)
    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    postgres: PrivatePostgres | None = None
    server_url = args.postgres_url
    if "postgres" in kinds and not server_url:
        # Outside the work directory, which only root may enter.
        postgres = PrivatePostgres(Path(tempfile.mkdtemp(prefix="tessera-history-pg-")))
        postgres.start()
        server_url = postgres.url
    vendor = await Vendor.start(work)
    # A library client's check-in while its server is down is expected here, not news.
    logging.getLogger("clients").setLevel(logging.ERROR)
    results: list[RunResult] = []
    deadline = time.monotonic() + args.minutes * 60
    try:
        number = 0
        while time.monotonic() < deadline or not results:
            database = kinds[number % len(kinds)]
            scenario = scenarios(database, rng, postgres is not None)
            scenario = replace(scenario, name=f"run {number + 1}")
            directory = work / f"run-{number + 1}"
            if database == "sqlite":
                url = f"sqlite+aiosqlite:///{directory / 'license.db'}"
                result = await run_scenario(scenario, directory, url, vendor, None, rng.random())
            else:
                name, url = await create_postgres_database(server_url)
                try:
                    result = await run_scenario(
                        scenario, directory, url, vendor, postgres, rng.random()
                    )
                finally:
                    await drop_postgres_database(server_url, name)
            results.append(result)
            print(result.line(), flush=True)
            for violation in result.verdict.violations[:10]:
                print(f"    {violation}")
            if result.verdict.violations:
                path = directory / "history.jsonl"
                result.history.dump(path)
                print(f"    history: {path}")
            for note in sorted(set(result.notes))[:5]:
                print(f"    note: {note}")
            number += 1
    finally:
        await vendor.stop()
        if postgres is not None:
            postgres.stop()
            shutil.rmtree(postgres.directory, ignore_errors=True)
    report(results)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(result.verdict.violations for result in results) else 0


def report(results: Sequence[RunResult]) -> None:
    faults = dict.fromkeys(FAULTS, 0)
    grants = resumes = acks = believed = seats = 0
    violations = {"a": 0, "b": 0, "c": 0}
    for result in results:
        verdict = result.verdict
        grants, resumes, acks = (
            grants + verdict.grants,
            resumes + verdict.resumes,
            acks + verdict.acks,
        )
        believed = max(believed, verdict.max_believed.get(FEATURE, 0))
        seats = max(seats, result.scenario.seats)
        for name, count in result.faults.items():
            faults[name] += count
        for violation in verdict.violations:
            violations[violation.rule] += 1
    print(
        f"runs {len(results)}; grants {grants}, resumes {resumes}, heartbeat acks {acks}; "
        f"kills {faults['kill']}, stops {faults['stop']}, clock steps {faults['clock']}, "
        f"PostgreSQL restarts {faults['postgres']}; max believed held {believed} of {seats} "
        f"seats; violations {sum(violations.values())} (a {violations['a']}, "
        f"b {violations['b']}, c {violations['c']})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.history", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to go on")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--postgres-url",
        default="",
        help="a PostgreSQL server to use (no restart fault); default: a cluster of the "
        "bench's own, which it restarts",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
