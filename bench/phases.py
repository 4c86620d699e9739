"""The four phases. Each starts its own server process(es), loads them from client
processes, reads /proc, stops everything it started and returns a result."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import grpc

from bench.mailbox import CLOSED, Mailbox, Message
from bench.procstat import CpuUsage, CpuWindow, rss_kib
from bench.profile import Profile
from bench.services import (
    FEATURE,
    OPERATOR_TOKEN,
    LicenseServerConfig,
    Probe,
    ServerProcess,
    Vendor,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    start_echo_server,
    start_license_server,
)
from bench.stats import ms, percentile
from bench.workers import LeaseSpec, UnarySpec, lease_worker, unary_worker
from tessera.auth import bearer_metadata
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc

SPAWN = multiprocessing.get_context("spawn")


@dataclass
class Options:
    work_dir: Path
    postgres_url: str
    client_procs: int
    concurrency: int
    channels: int
    warmup: float
    duration: float
    streams: int
    stream_procs: int
    streams_per_connection: int
    heartbeat_interval: float
    acquire_concurrency: int
    streams_window: float
    streams_db: str
    storm: int
    storm_db: str
    storm_timeout: float
    ramp_limit: float
    storm_heartbeat_interval: float
    lease_ttl: int
    profile_dir: Path | None
    profile_mode: str = "all"
    # Scale-out (bench/scaleout.py): replica counts compared by the replicas phase, and
    # the failover phase's leases, lease TTL, heartbeat interval and timeout.
    replica_counts: tuple[int, ...] = (1, 3)
    failover_leases: int = 1_500
    failover_ttl: int = 30
    failover_heartbeat_interval: float = 10.0
    failover_timeout: float = 60.0
    # Queue hand-over (bench/handover.py): the database (postgres: 2 replicas), the
    # clients waiting all along, the hand-overs measured.
    handover_db: str = "postgres"
    handover_waiters: int = 100
    handover_grants: int = 300


class Workers:
    """Client processes, each with a pipe to this process."""

    def __init__(self, target: Callable[..., None], specs: Sequence[Any]) -> None:
        self.processes: list[SpawnProcess] = []
        self.mailboxes: list[Mailbox] = []
        for spec in specs:
            parent, child = SPAWN.Pipe()
            process = SPAWN.Process(target=target, args=(child, spec), daemon=True)
            process.start()
            child.close()
            self.processes.append(process)
            self.mailboxes.append(Mailbox(parent))

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid is not None]

    def send_all(self, kind: str, **body: Any) -> None:
        for mailbox in self.mailboxes:
            mailbox.send(kind, **body)

    async def receive_all(self, kind: str, within: float) -> list[dict[str, Any]]:
        async def one(mailbox: Mailbox) -> dict[str, Any]:
            message = await mailbox.receive(kind, "failed")
            if message[0] != kind:
                raise RuntimeError(f"a client process failed: {message[1] or 'it exited'}")
            return message[1]

        return list(
            await asyncio.wait_for(asyncio.gather(*(one(m) for m in self.mailboxes)), within)
        )

    def latest(self, kind: str, latest: list[dict[str, Any]]) -> None:
        """Drain pending messages, keeping each process's newest of ``kind``."""
        for index, mailbox in enumerate(self.mailboxes):
            while not mailbox.inbox.empty():
                message: Message = mailbox.inbox.get_nowait()
                if message[0] == kind:
                    latest[index] = message[1]
                elif message[0] == "failed" or message is CLOSED:
                    raise RuntimeError(f"a client process failed: {message[1] or 'it exited'}")

    async def join(self, within: float = 20) -> None:
        deadline = time.monotonic() + within
        for process in self.processes:
            await asyncio.to_thread(process.join, max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
            process.join(1)
        for mailbox in self.mailboxes:
            mailbox.close()
            mailbox.connection.close()


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


def profile_window(options: Options, pid: int, seconds: float, name: str) -> Profile | None:
    if options.profile_dir is None:
        return None
    options.profile_dir.mkdir(parents=True, exist_ok=True)
    return Profile(pid, seconds, options.profile_dir / f"{name}.txt", options.profile_mode)


def show_profile(profile: Profile | None) -> None:
    if profile is not None:
        summary = profile.finish()
        if summary:
            print(summary)


# Closed-loop unary phases: echo and checkout+checkin


@dataclass
class UnaryResult:
    name: str
    cycles_per_second: float
    p50: float
    p99: float
    completed: int
    errors: dict[str, int]
    server_cpu: float  # cores
    clients_cpu: float  # cores
    machine_busy: float  # fraction of all cores
    server_threads: str  # the server's CPU by thread
    others_cpu: float  # cores busy outside the server and the clients
    notes: list[str] = field(default_factory=list)
    # With several replicas: each one's CPU (cores), in the order given.
    replica_cpu: list[float] = field(default_factory=list)
    # The PostgreSQL backends serving the License Server(s), when measured apart (cores).
    database_cpu: float | None = None

    def show(self) -> None:
        print(
            f"  {self.cycles_per_second:,.0f} cycles/s ({2 * self.cycles_per_second:,.0f} RPC/s), "
            f"p50 {ms(self.p50)}, p99 {ms(self.p99)} per cycle; {self.completed:,} cycles"
        )
        database = (
            f"PostgreSQL backends {100 * self.database_cpu:.0f}%, "
            if self.database_cpu is not None
            else ""
        )
        print(
            f"  CPU: server {100 * self.server_cpu:.0f}% of a core ({self.server_threads}), "
            f"clients {100 * self.clients_cpu:.0f}%, {database}everything else "
            f"{100 * self.others_cpu:.0f}%; machine {100 * self.machine_busy:.0f}% busy"
        )
        if len(self.replica_cpu) > 1:
            shares = ", ".join(f"{100 * cpu:.0f}%" for cpu in self.replica_cpu)
            print(f"  per replica: {shares} of a core")
        if self.errors:
            print(f"  errors: {self.errors}")
        for note in self.notes:
            print(f"  {note}")


async def run_unary(
    options: Options,
    name: str,
    target: str,
    op: str,
    server_pid: int,
    replicas: Sequence[tuple[str, int]] = (),
    backends: Callable[[], Awaitable[list[int]]] | None = None,
) -> UnaryResult:
    """Closed loops of ``op`` against ``target``, or spread over ``replicas`` (target, pid)
    when given; the server CPU is then the sum over the replicas (the thread split is
    the first replica's). ``backends`` lists the PostgreSQL backends serving the servers
    when the window opens, to measure the database's CPU apart."""
    specs = [
        UnarySpec(
            target,
            op,
            index,
            options.concurrency,
            options.channels,
            tuple(replica for replica, _ in replicas),
        )
        for index in range(options.client_procs)
    ]
    server_pids = [pid for _, pid in replicas] or [server_pid]
    workers = Workers(unary_worker, specs)
    try:
        await workers.receive_all("ready", within=60)
        measure_from = time.monotonic() + options.warmup
        until = measure_from + options.duration
        workers.send_all("go", measure_from=measure_from, until=until)
        await sleep_until(measure_from)
        database_pids = await backends() if backends is not None else []
        window = CpuWindow([*server_pids, *workers.pids, *database_pids])
        profile = profile_window(options, server_pids[0], options.duration, name)
        await sleep_until(until)
        usage = window.stop()
        results = await workers.receive_all("result", within=60)
        show_profile(profile)
    finally:
        await workers.join()
    latencies = sorted(latency for result in results for latency in result["latencies"])
    completed = sum(result["completed"] for result in results)
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result["errors"])
    return UnaryResult(
        name=name,
        cycles_per_second=completed / options.duration,
        p50=percentile(latencies, 0.50),
        p99=percentile(latencies, 0.99),
        completed=completed,
        errors=dict(errors),
        server_cpu=usage.cores(server_pids),
        clients_cpu=usage.cores(workers.pids),
        machine_busy=usage.machine_busy,
        server_threads=usage.threads(),
        others_cpu=usage.others([*server_pids, *workers.pids, *database_pids]),
        replica_cpu=[usage.per_pid[pid] for pid in server_pids] if replicas else [],
        database_cpu=usage.cores(database_pids) if backends is not None else None,
    )


async def echo_phase(options: Options) -> UnaryResult:
    server, target = await start_echo_server(options.work_dir)
    try:
        return await run_unary(options, "echo", target, "echo", server.pid)
    finally:
        server.stop()


async def floor_phase(options: Options, vendor: Vendor) -> UnaryResult:
    """The same harness against a License Server's grpc.health Check: what a cycle costs
    on this server's gRPC stack before any lease work (no target; it bounds the ratio)."""
    name = "floor"
    directory = options.work_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    async with Database(options, "sqlite", directory) as database_url:
        server, config = await license_server(options, vendor, name, database_url, 1)
        try:
            return await run_unary(options, name, config.target, "health", server.pid)
        finally:
            server.stop()


async def license_information(target: str) -> lpb.FeatureInformation:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await lpb_grpc.LeaseServiceStub(channel).GetLicenseInformation(
            lpb.GetLicenseInformationRequest(feature=FEATURE), timeout=30
        )
    return reply.features[0]


async def held_lease_ids(target: str) -> list[str]:
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        reply = await lpb_grpc.LeaseAdminServiceStub(channel).ListLeases(
            lpb.ListLeasesRequest(feature=FEATURE),
            metadata=bearer_metadata(OPERATOR_TOKEN),
            timeout=60,
        )
    return [entry.lease_id for entry in reply.leases if entry.state == lpb.LEASE_STATE_HELD]


class Database:
    """A License Server database for one phase: a SQLite file, or a fresh PostgreSQL
    database dropped afterwards."""

    def __init__(self, options: Options, kind: str, directory: Path) -> None:
        self.options = options
        self.kind = kind
        self.directory = directory
        self.url = ""
        self._pg_name = ""

    @property
    def name(self) -> str:
        """The PostgreSQL database's name ("" for SQLite)."""
        return self._pg_name

    async def __aenter__(self) -> str:
        if self.kind == "sqlite":
            self.url = f"sqlite+aiosqlite:///{(self.directory / 'license.db').resolve()}"
        else:
            self._pg_name, self.url = await create_postgres_database(self.options.postgres_url)
        return self.url

    async def __aexit__(self, *_exc: object) -> None:
        if self._pg_name:
            await drop_postgres_database(self.options.postgres_url, self._pg_name)


async def license_server(
    options: Options,
    vendor: Vendor,
    name: str,
    database_url: str,
    seats: int,
    heartbeat_interval: float | None = None,
) -> tuple[ServerProcess, LicenseServerConfig]:
    config = LicenseServerConfig(
        data_dir=options.work_dir / name,
        database_url=database_url,
        port=free_port(),
        vendor_keys=vendor.vendor_keys,
        metrics_port=free_port(),
        lease_ttl=options.lease_ttl,
        heartbeat_interval=heartbeat_interval or options.heartbeat_interval,
    )
    server = await start_license_server(config, name)
    try:
        await vendor.activate(config.ebo_address, seats)
    except BaseException:
        server.stop()
        raise
    return server, config


async def cycles_phase(options: Options, vendor: Vendor, kind: str) -> UnaryResult:
    name = f"cycles-{kind}"
    directory = options.work_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    async with Database(options, kind, directory) as database_url:
        seats = max(1000, 2 * options.client_procs * options.concurrency)
        server, config = await license_server(options, vendor, name, database_url, seats)
        try:
            result = await run_unary(options, name, config.target, "cycle", server.pid)
            info = await license_information(config.target)
            result.notes.append(
                f"afterwards: {info.activated} activated, {info.used} used "
                "(in-flight cycles at the window's end may still hold a seat until checked in)"
            )
            commits, calls = await asyncio.to_thread(
                lambda: (
                    config.counter("tessera_lease_group_commits_total"),
                    config.counter("tessera_lease_group_commit_calls_total"),
                )
            )
            result.notes.append(
                f"group commit: {calls:,.0f} checkouts and check-ins in {commits:,.0f} "
                f"transactions = {calls / max(commits, 1):.1f} per transaction (whole run)"
            )
            return result
        finally:
            server.stop()


# Held leases: streams and storm


@dataclass
class Holding:
    """Client processes holding leases on one License Server."""

    workers: Workers
    latest: list[dict[str, Any]]
    started_at: float
    all_held_at: float

    def total(self, key: str) -> int:
        return sum(int(progress.get(key, 0)) for progress in self.latest)

    def newest(self, key: str) -> float:
        return max(float(progress.get(key, 0.0)) for progress in self.latest)


async def hold_leases(
    options: Options,
    target: str,
    leases: int,
    ramp_limit: float,
    label: str,
    heartbeat_interval: float,
) -> Holding:
    procs = max(1, min(options.stream_procs, leases))
    specs = [
        LeaseSpec(
            target=target,
            worker=index,
            leases=count,
            streams_per_channel=options.streams_per_connection,
            heartbeat_interval=heartbeat_interval,
            acquire_concurrency=options.acquire_concurrency,
        )
        for index, count in enumerate(split(leases, procs))
    ]
    workers = Workers(lease_worker, specs)
    try:
        started = await workers.receive_all("started", within=60)
        started_at = min(body["at"] for body in started)
        latest: list[dict[str, Any]] = [{} for _ in specs]
        deadline = time.monotonic() + ramp_limit
        shown = time.monotonic()
        holding = Holding(workers, latest, started_at, 0.0)
        while True:
            workers.latest("progress", latest)
            held = holding.total("held")
            failed = holding.total("acquire_failed")
            if held + failed >= leases:
                break
            if time.monotonic() > deadline:
                print(f"  {label}: gave up waiting after {ramp_limit:.0f} s: {held:,} held")
                break
            if time.monotonic() - shown >= 5:
                shown = time.monotonic()
                print(f"  {label}: {held:,} of {leases:,} held after {shown - started_at:.0f} s")
            await asyncio.sleep(0.1)
        holding.all_held_at = holding.newest("last_held_at")
        return holding
    except BaseException:
        workers.send_all("stop")
        await workers.join()
        raise


async def release_holding(holding: Holding) -> list[dict[str, Any]]:
    holding.workers.send_all("stop")
    try:
        return await holding.workers.receive_all("final", within=120)
    finally:
        await holding.workers.join(within=60)


@dataclass
class StreamsResult:
    leases: int
    held: int
    ramp_seconds: float
    rss_before_kib: int
    rss_after_kib: int
    usage: CpuUsage
    server_pid: int
    client_pids: list[int]
    heartbeats: int
    expected_heartbeats: float
    p50: float
    p99: float
    breaks: int
    lost: int
    errors: dict[str, int]
    database: str

    @property
    def kib_per_lease(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / max(self.held, 1)

    @property
    def server_cpu(self) -> float:
        return self.usage.per_pid[self.server_pid]

    def show(self) -> None:
        print(
            f"  {self.held:,} of {self.leases:,} leases held ({self.database}); acquired in "
            f"{self.ramp_seconds:.1f} s ({self.held / max(self.ramp_seconds, 1e-9):,.0f}/s)"
        )
        print(
            f"  server RSS {self.rss_before_kib / 1024:,.1f} MiB -> "
            f"{self.rss_after_kib / 1024:,.1f} MiB: {self.kib_per_lease:.1f} KiB per lease"
        )
        print(
            f"  heartbeats over {self.usage.seconds:.0f} s: {self.heartbeats:,} acked "
            f"({self.heartbeats / self.usage.seconds:,.0f}/s, expected "
            f"{self.expected_heartbeats / self.usage.seconds:,.0f}/s), p50 {ms(self.p50)}, "
            f"p99 {ms(self.p99)}"
        )
        print(
            f"  CPU: server {100 * self.server_cpu:.0f}% of a core ({self.usage.threads()}), "
            f"clients {100 * self.usage.cores(self.client_pids):.0f}%, everything else "
            f"{100 * self.usage.others([self.server_pid, *self.client_pids]):.0f}%; machine "
            f"{100 * self.usage.machine_busy:.0f}% busy"
        )
        if self.breaks or self.lost or self.errors:
            print(f"  broken streams {self.breaks}, lost leases {self.lost}, errors {self.errors}")


async def streams_phase(options: Options, vendor: Vendor) -> StreamsResult:
    name = "streams"
    directory = options.work_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    async with Database(options, options.streams_db, directory) as database_url:
        server, config = await license_server(options, vendor, name, database_url, options.streams)
        server_pid = server.pid
        try:
            await asyncio.sleep(1)
            rss_before = rss_kib(server_pid)
            holding = await hold_leases(
                options,
                config.target,
                options.streams,
                options.ramp_limit,
                name,
                options.heartbeat_interval,
            )
            try:
                # One interval for the heartbeats to spread out, then the window.
                await asyncio.sleep(options.heartbeat_interval)
                window = CpuWindow([server_pid, *holding.workers.pids])
                since = time.monotonic()
                profile = profile_window(options, server_pid, options.streams_window, name)
                await asyncio.sleep(options.streams_window)
                usage = window.stop()
                until = time.monotonic()
                rss_after = rss_kib(server_pid)
                holding.workers.send_all("window", since=since, until=until)
                windows = await holding.workers.receive_all("window", within=60)
                show_profile(profile)
                holding.workers.latest("progress", holding.latest)
            finally:
                finals = await release_holding(holding)
        finally:
            server.stop()
    latencies = sorted(x for window_ in windows for x in window_["heartbeat_latencies"])
    held = sum(final["held"] for final in finals)
    errors: Counter[str] = Counter()
    for final in finals:
        errors.update(final["errors"])
    return StreamsResult(
        leases=options.streams,
        held=held,
        ramp_seconds=holding.all_held_at - holding.started_at,
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        usage=usage,
        server_pid=server_pid,
        client_pids=holding.workers.pids,
        heartbeats=len(latencies),
        expected_heartbeats=held * usage.seconds / options.heartbeat_interval,
        p50=percentile(latencies, 0.5),
        p99=percentile(latencies, 0.99),
        breaks=sum(final["breaks"] for final in finals),
        lost=sum(final["lost"] for final in finals),
        errors=dict(errors),
        database=options.streams_db,
    )


@dataclass
class StormResult:
    leases: int
    held: int
    resumed: int
    lost: int
    mismatched: int
    restart_seconds: float  # SIGKILL -> serving again
    all_resumed_seconds: float | None  # SIGKILL -> the last lease resumed
    resume_attempts: int
    used_before: int
    used_after: int
    held_rows_after: int
    unknown_rows: int
    missing_rows: int
    server_cpu_storm: float
    errors: dict[str, int]
    details: dict[str, str]
    retried: dict[str, int]
    retry_spread: dict[str, str]
    resume_p50: float  # per lease: its stream broke -> it was resumed
    resume_p99: float
    database: str

    @property
    def double_counts(self) -> int:
        return max(0, self.used_after - self.held) + self.unknown_rows + self.mismatched

    def show(self) -> None:
        print(f"  {self.held:,} of {self.leases:,} leases held ({self.database}); SIGKILL")
        print(f"  restarted and serving again {self.restart_seconds:.2f} s after the SIGKILL")
        done = (
            f"{self.all_resumed_seconds:.2f} s after the SIGKILL"
            if self.all_resumed_seconds is not None
            else "NOT within the timeout"
        )
        print(
            f"  {self.resumed:,} resumed ({self.resume_attempts:,} attempts), {self.lost} lost; "
            f"all resumed {done}; per lease, break -> resumed p50 {self.resume_p50:.1f} s, "
            f"p99 {self.resume_p99:.1f} s"
        )
        print(
            f"  License Information used: {self.used_before:,} before, {self.used_after:,} "
            f"after; held rows {self.held_rows_after:,} ({self.unknown_rows} not ours, "
            f"{self.missing_rows} missing); other-lease grants {self.mismatched}; "
            f"double counts {self.double_counts}"
        )
        print(
            f"  server CPU from restart to all resumed: {100 * self.server_cpu_storm:.0f}% "
            "of a core"
        )
        if self.retried:
            print(f"  resume attempts that failed and were retried: {self.retried}")
            for kind, spread in self.retry_spread.items():
                print(f"    {kind}: {spread}")
        if self.errors:
            print(f"  errors: {self.errors}")
        for kind, detail in self.details.items():
            print(f"    {kind}: {detail[:300]}")


def _spread(moments: list[float], serving: float) -> str:
    """When transport errors happened, in seconds after the SIGKILL."""
    before = sum(1 for moment in moments if moment < serving)
    return (
        f"{before} before the restarted server served, {len(moments) - before} after; "
        f"first {moments[0]:.2f} s, median {percentile(moments, 0.5):.2f} s, "
        f"last {moments[-1]:.2f} s after the SIGKILL"
    )


async def storm_phase(options: Options, vendor: Vendor) -> StormResult:
    name = "storm"
    directory = options.work_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    async with Database(options, options.storm_db, directory) as database_url:
        interval = options.storm_heartbeat_interval
        server, config = await license_server(
            options, vendor, name, database_url, options.storm, interval
        )
        try:
            holding = await hold_leases(
                options,
                config.target,
                options.storm,
                options.ramp_limit,
                name,
                interval,
            )
            try:
                await asyncio.sleep(2)
                used_before = (await license_information(config.target)).used
                held = holding.total("held")
                killed_at = time.monotonic()
                server.kill()
                server.start()  # same arguments: same port, database and host key
                window = CpuWindow([server.pid])
                await server.wait_until(Probe(config.target, echo=False))
                serving_at = time.monotonic()
                deadline = killed_at + options.storm_timeout
                all_resumed_at: float | None = None
                while time.monotonic() < deadline:
                    holding.workers.latest("progress", holding.latest)
                    settled = holding.total("resumed") + holding.total("lost")
                    if settled >= held and holding.total("broken_now") == 0:
                        all_resumed_at = holding.newest("last_resumed_at")
                        break
                    await asyncio.sleep(0.05)
                usage = window.stop()
                if all_resumed_at is None:
                    print(
                        f"  storm: {holding.total('resumed'):,} of {held:,} resumed when the "
                        f"{options.storm_timeout:.0f} s timeout ran out"
                    )
                info = await license_information(config.target)
                rows = await held_lease_ids(config.target)
            finally:
                finals = await release_holding(holding)
        finally:
            server.stop()
    ours = {lease_id for final in finals for lease_id in final["lease_ids"]}
    errors: Counter[str] = Counter()
    details: dict[str, str] = {}
    retried: Counter[str] = Counter()
    for final in finals:
        errors.update(final["errors"])
        details.update(final["details"])
        retried.update(final["retried"])
    times: dict[str, list[float]] = {}
    for final in finals:
        for kind, moments in final["retry_times"].items():
            times.setdefault(kind, []).extend(moment - killed_at for moment in moments)
    resume_latencies = sorted(x for final in finals for x in final["resume_latencies"])
    retry_spread = {
        kind: _spread(sorted(moments), serving_at - killed_at) for kind, moments in times.items()
    }
    return StormResult(
        leases=options.storm,
        held=held,
        resumed=sum(final["resumed"] for final in finals),
        lost=sum(final["lost"] for final in finals),
        mismatched=sum(final["mismatched"] for final in finals),
        restart_seconds=serving_at - killed_at,
        all_resumed_seconds=None if all_resumed_at is None else all_resumed_at - killed_at,
        resume_attempts=sum(final["resume_attempts"] for final in finals),
        used_before=used_before,
        used_after=info.used,
        held_rows_after=len(rows),
        unknown_rows=len(set(rows) - ours),
        missing_rows=len(ours - set(rows)),
        server_cpu_storm=next(iter(usage.per_pid.values())),
        errors=dict(errors),
        details=details,
        retried=dict(retried),
        retry_spread=retry_spread,
        resume_p50=percentile(resume_latencies, 0.5),
        resume_p99=percentile(resume_latencies, 0.99),
        database=options.storm_db,
    )
