"""Scale-out on PostgreSQL: License Server replicas over one database.

- **replicas**: checkout+checkin cycles per second with 1 replica, then with 3 (each on a
  fresh database), the same client processes and closed loops spread evenly over the
  replicas. Replicas share one data directory (host key, trust anchor) and machine id,
  as one site's License Server scaled out does.
- **failover**: 3 replicas; client processes hold leases with the client library
  (``clients.LicenseClient``, heartbeats, resume and failover as an application gets
  them), each lease's address listing the replicas in another order, so each replica
  holds a third. One replica is SIGKILLed and not restarted. The phase times SIGKILL →
  the last of its leases resumed on another replica, and checks that nothing was counted
  twice (License Information ``used`` and the held rows against the clients' leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.mailbox import Mailbox
from bench.phases import (
    Database,
    Options,
    UnaryResult,
    Workers,
    held_lease_ids,
    license_information,
    run_unary,
    split,
)
from bench.procstat import CpuWindow
from bench.services import (
    FEATURE,
    LicenseServerConfig,
    Probe,
    ServerProcess,
    Vendor,
    backend_pids,
    free_port,
)
from bench.stats import percentile
from clients import Lease, LicenseClient, LicenseError
from clients.events import LeaseEvent, Lost, Resumed


@dataclass
class Replica:
    process: ServerProcess
    config: LicenseServerConfig

    @property
    def target(self) -> str:
        return self.config.target


async def start_replicas(
    options: Options,
    vendor: Vendor,
    name: str,
    database_url: str,
    count: int,
    seats: int,
    lease_ttl: int,
    heartbeat_interval: float,
) -> list[Replica]:
    """``count`` License Server replicas over ``database_url`` with one data directory
    (one host identity), ``seats`` seats activated onto them (once: they share the
    database). The first starts alone: it creates the host key and migrates."""
    data_dir = options.work_dir / name / "license_server"
    data_dir.mkdir(parents=True, exist_ok=True)
    replicas = []
    for index in range(count):
        config = LicenseServerConfig(
            data_dir=data_dir,
            database_url=database_url,
            port=free_port(),
            vendor_keys=vendor.vendor_keys,
            lease_ttl=lease_ttl,
            heartbeat_interval=heartbeat_interval,
        )
        process = ServerProcess(
            f"{name} replica {index}",
            "services.license_server",
            config.args(),
            data_dir / f"replica-{index}.log",
        )
        replicas.append(Replica(process, config))
    try:
        replicas[0].process.start()
        await replicas[0].process.wait_until(Probe(replicas[0].target, echo=False))
        for replica in replicas[1:]:
            replica.process.start()
        await asyncio.gather(
            *(r.process.wait_until(Probe(r.target, echo=False)) for r in replicas[1:])
        )
        await vendor.activate(replicas[0].config.ebo_address, seats)
    except BaseException:
        stop_replicas(replicas)
        raise
    return replicas


def stop_replicas(replicas: list[Replica]) -> None:
    for replica in replicas:
        replica.process.stop()


# Throughput: 1 vs 3 replicas


@dataclass
class ReplicasResult:
    runs: dict[int, UnaryResult]

    def show(self) -> None:
        for count, run in self.runs.items():
            print(f"  {count} replica{'s' if count > 1 else ''}:")
            run.show()
        counts = sorted(self.runs)
        if len(counts) > 1 and self.runs[counts[0]].cycles_per_second:
            base = self.runs[counts[0]].cycles_per_second
            ratios = ", ".join(
                f"{n}: {self.runs[n].cycles_per_second / base:.2f} x" for n in counts[1:]
            )
            print(f"  throughput relative to {counts[0]} replica(s): {ratios}")


async def replicas_phase(options: Options, vendor: Vendor) -> ReplicasResult:
    runs: dict[int, UnaryResult] = {}
    seats = max(1000, 2 * options.client_procs * options.concurrency)
    for count in options.replica_counts:
        name = f"replicas-{count}"
        directory = options.work_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        database = Database(options, "postgres", directory)
        async with database as database_url:
            replicas = await start_replicas(
                options,
                vendor,
                name,
                database_url,
                count,
                seats,
                options.lease_ttl,
                options.heartbeat_interval,
            )

            async def backends(name: str = database.name) -> list[int]:
                return await backend_pids(options.postgres_url, name)

            try:
                run = await run_unary(
                    options,
                    name,
                    replicas[0].target,
                    "cycle",
                    replicas[0].process.pid,
                    replicas=[(r.target, r.process.pid) for r in replicas],
                    backends=backends,
                )
                info = await license_information(replicas[0].target)
                run.notes.append(
                    f"afterwards: {info.activated} activated, {info.used} used"
                    + (
                        f"; server CPU is the sum over the {count} replicas, its split by "
                        "thread the first replica's"
                        if count > 1
                        else ""
                    )
                )
                runs[count] = run
            finally:
                stop_replicas(replicas)
    return ReplicasResult(runs)


# Failover: SIGKILL one of 3 replicas holding leases


@dataclass(frozen=True)
class FailoverSpec:
    # The replicas' targets (host:port) and, for each, an address listing all of them
    # with that one first ("port@host;...").
    replicas: tuple[str, ...]
    addresses: tuple[str, ...]
    worker: int
    leases: int
    acquire_concurrency: int


@dataclass
class Tracked:
    """One lease held by a failover worker, and what happened to it."""

    granted_on: str = ""
    lease: Lease | None = None
    resumed_at: list[float] = field(default_factory=list)
    lost: str = ""

    def record(self, event: LeaseEvent) -> None:
        if isinstance(event, Resumed):
            self.resumed_at.append(time.monotonic())
        elif isinstance(event, Lost):
            self.lost = event.error.reason or type(event.error).__name__


def first_after(moments: list[float], moment: float) -> float:
    """The first of ``moments`` (in order) after ``moment``."""
    return next(t for t in moments if t > moment)


class RetryCounter(logging.Handler):
    """Counts the client library's failed resume attempts by what went wrong (it logs
    each at DEBUG as "resume of lease <id>: <error>")."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("resume of lease") and len(record.args or ()) >= 2:
            error = record.args[-1] if isinstance(record.args, tuple) else ""
            # Group by the error's text without the target (host:port).
            self.counts[re.sub(r"127\.0\.0\.1:\d+", "<replica>", str(error))] += 1


def failover_worker(connection: Connection, spec: FailoverSpec) -> None:
    asyncio.run(_failover_main(connection, spec))


async def _failover_main(connection: Connection, spec: FailoverSpec) -> None:
    mailbox = Mailbox(connection)
    clients = [
        LicenseClient(address, client_host=f"bench-{spec.worker}-via-{index}")
        for index, address in enumerate(spec.addresses)
    ]
    tracked = [Tracked() for _ in range(spec.leases)]
    acquiring = asyncio.Semaphore(spec.acquire_concurrency)
    errors: Counter[str] = Counter()
    killed: dict[str, Any] = {}
    retries = RetryCounter()
    client_log = logging.getLogger("clients.lease")
    client_log.setLevel(logging.DEBUG)
    client_log.addHandler(retries)
    client_log.propagate = False  # the counts, not thousands of lines

    async def take(index: int) -> None:
        entry = tracked[index]
        client = clients[(index + spec.worker) % len(clients)]
        async with acquiring:
            try:
                entry.lease = await client.acquire(FEATURE, on_event=entry.record)
            except LicenseError as error:
                errors[f"acquire {error.reason or type(error).__name__}"] += 1
                return
        entry.granted_on = entry.lease.server

    def progress() -> dict[str, Any]:
        held = [entry for entry in tracked if entry.lease is not None]
        report: dict[str, Any] = {
            "held": len(held),
            "acquire_failed": sum(errors.values()),
            "lost": sum(1 for entry in held if entry.lost),
            "on": dict(Counter(entry.granted_on for entry in held)),
        }
        if killed:
            at = killed["at"]
            victims = [entry for entry in held if entry.granted_on == killed["target"]]
            resumed = [first_after(e.resumed_at, at) for e in victims if e.resumed_at[-1:] > [at]]
            report.update(
                victims=len(victims),
                victims_resumed=len(resumed),
                victims_lost=sum(1 for entry in victims if entry.lost),
                last_victim_resumed_at=max(resumed, default=0.0),
            )
        return report

    async def report_forever() -> None:
        while True:
            mailbox.send("progress", **progress())
            await asyncio.sleep(0.1)

    mailbox.send("started", at=time.monotonic())
    tasks = [asyncio.create_task(take(index)) for index in range(spec.leases)]
    reporter = asyncio.create_task(report_forever())
    try:
        while True:
            kind, body = await mailbox.receive("killed", "stop")
            if kind != "killed":
                break
            killed.update(body)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        at = float(killed.get("at", 0.0))
        gone = killed.get("target")
        victims = [e for e in tracked if e.lease is not None and e.granted_on == gone]
        others = [e for e in tracked if e.lease is not None and e.granted_on != gone]
        final = progress()
        final.update(
            lease_ids=[e.lease.lease_id for e in tracked if e.lease is not None and not e.lost],
            victim_latencies=[
                first_after(e.resumed_at, at) - at for e in victims if e.resumed_at[-1:] > [at]
            ],
            victims_moved=sum(
                1 for e in victims if e.lease is not None and e.lease.server not in ("", gone)
            ),
            others_resumed=sum(1 for e in others if e.resumed_at),
            errors=dict(errors),
            retries=dict(retries.counts),
        )
        # Check in a few at a time: thousands at once would wait past the client's
        # release timeout (5 s) for the surviving replicas.
        releasing = asyncio.Semaphore(spec.acquire_concurrency)

        async def release(lease: Lease) -> bool:
            async with releasing:
                return await lease.release()

        checked_in = await asyncio.gather(
            *(release(e.lease) for e in tracked if e.lease is not None),
            return_exceptions=True,
        )
        final["not_checked_in"] = sum(1 for ok in checked_in if ok is not True)
        mailbox.send("final", **final)
    except Exception as error:
        mailbox.send("failed", error=repr(error))
    finally:
        reporter.cancel()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()


@dataclass
class FailoverResult:
    leases: int
    held: int
    ttl: int
    heartbeat_interval: float
    distribution: dict[str, int]  # leases per replica before the SIGKILL
    victims: int
    resumed: int
    lost: int
    moved: int  # victims now held on another replica
    all_resumed_seconds: float | None  # SIGKILL -> the last victim resumed
    p50: float  # per victim: SIGKILL -> resumed
    p99: float
    others_resumed: int  # leases of the surviving replicas that had to resume
    used_before: int
    used_after: int
    held_rows_after: int
    unknown_rows: int
    missing_rows: int
    survivors_cpu: float  # cores, from the SIGKILL to the last resume
    clients_cpu: float  # cores, the client processes over the same window
    machine_busy: float  # fraction of all cores, same window
    not_checked_in: int
    errors: dict[str, int]
    retries: dict[str, int]  # failed resume attempts (each retried), by error

    @property
    def double_counts(self) -> int:
        return max(0, self.used_after - self.held) + self.unknown_rows

    def show(self) -> None:
        spread = ", ".join(f"{count:,}" for count in self.distribution.values())
        print(
            f"  {self.held:,} of {self.leases:,} leases held on 3 replicas ({spread}); TTL "
            f"{self.ttl} s, heartbeat every {self.heartbeat_interval:g} s; SIGKILL one replica"
        )
        done = (
            f"{self.all_resumed_seconds:.2f} s after the SIGKILL"
            if self.all_resumed_seconds is not None
            else "NOT within the timeout"
        )
        print(
            f"  its {self.victims:,} leases: {self.resumed:,} resumed ({self.moved:,} now on "
            f"another replica), {self.lost} lost; all resumed {done}; per lease p50 "
            f"{self.p50:.2f} s, p99 {self.p99:.2f} s"
        )
        print(
            f"  License Information used: {self.used_before:,} before, {self.used_after:,} "
            f"after; held rows {self.held_rows_after:,} ({self.unknown_rows} not ours, "
            f"{self.missing_rows} missing); double counts {self.double_counts}; leases of the "
            f"surviving replicas that resumed: {self.others_resumed}"
        )
        print(
            f"  CPU from the SIGKILL to the last resume: surviving replicas "
            f"{100 * self.survivors_cpu:.0f}% of a core (both together), clients "
            f"{100 * self.clients_cpu:.0f}%; machine {100 * self.machine_busy:.0f}% busy"
        )
        if self.retries:
            print(f"  failed resume attempts, each retried: {sum(self.retries.values()):,}")
            for error, count in sorted(self.retries.items(), key=lambda item: -item[1]):
                print(f"    {count:,} x {error[:160]}")
        if self.not_checked_in or self.errors:
            print(f"  not checked in at the end: {self.not_checked_in}; errors {self.errors}")


async def failover_phase(options: Options, vendor: Vendor) -> FailoverResult:
    name = "failover"
    directory = options.work_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    leases = options.failover_leases
    async with Database(options, "postgres", directory) as database_url:
        replicas = await start_replicas(
            options,
            vendor,
            name,
            database_url,
            3,
            leases,
            options.failover_ttl,
            options.failover_heartbeat_interval,
        )
        targets = tuple(replica.target for replica in replicas)
        addresses = tuple(
            ";".join(replicas[(first + step) % 3].config.ebo_address for step in range(3))
            for first in range(3)
        )
        victim, survivor = replicas[1], replicas[2]
        try:
            procs = max(1, min(options.stream_procs, leases))
            specs = [
                FailoverSpec(targets, addresses, index, count, options.acquire_concurrency)
                for index, count in enumerate(split(leases, procs))
            ]
            workers = Workers(failover_worker, specs)
            client_pids = workers.pids
            try:
                await workers.receive_all("started", within=60)
                latest: list[dict[str, Any]] = [{} for _ in specs]

                def total(key: str) -> int:
                    return sum(int(report.get(key, 0)) for report in latest)

                deadline = time.monotonic() + options.ramp_limit
                while total("held") + total("acquire_failed") < leases:
                    if time.monotonic() > deadline:
                        print(f"  failover: gave up waiting: {total('held'):,} held")
                        break
                    await asyncio.sleep(0.1)
                    workers.latest("progress", latest)
                await asyncio.sleep(2)
                workers.latest("progress", latest)
                distribution: Counter[str] = Counter()
                for report in latest:
                    distribution.update(report.get("on", {}))
                held = total("held")
                used_before = (await license_information(survivor.target)).used

                killed_at = time.monotonic()
                victim.process.kill()
                workers.send_all("killed", target=victim.target, at=killed_at)
                survivor_pids = [r.process.pid for r in replicas if r is not victim]
                window = CpuWindow([*survivor_pids, *workers.pids])
                deadline = killed_at + options.failover_timeout
                all_resumed_at: float | None = None
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    workers.latest("progress", latest)
                    if any("victims" not in report for report in latest):
                        continue
                    if total("victims_resumed") + total("victims_lost") >= total("victims"):
                        all_resumed_at = max(
                            float(report["last_victim_resumed_at"]) for report in latest
                        )
                        break
                usage = window.stop()
                info = await license_information(survivor.target)
                rows = await held_lease_ids(survivor.target)
                workers.send_all("stop")
                finals = await workers.receive_all("final", within=120)
            finally:
                workers.send_all("stop")
                await workers.join(within=60)
        finally:
            stop_replicas(replicas)
    ours = {lease_id for final in finals for lease_id in final["lease_ids"]}
    latencies = sorted(x for final in finals for x in final["victim_latencies"])
    errors: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    for final in finals:
        errors.update(final["errors"])
        retries.update(final["retries"])
    return FailoverResult(
        leases=leases,
        held=held,
        ttl=options.failover_ttl,
        heartbeat_interval=options.failover_heartbeat_interval,
        distribution={target: distribution.get(target, 0) for target in targets},
        victims=sum(final["victims"] for final in finals),
        resumed=sum(final["victims_resumed"] for final in finals),
        lost=sum(final["lost"] for final in finals),
        moved=sum(final["victims_moved"] for final in finals),
        all_resumed_seconds=None if all_resumed_at is None else all_resumed_at - killed_at,
        p50=percentile(latencies, 0.5),
        p99=percentile(latencies, 0.99),
        others_resumed=sum(final["others_resumed"] for final in finals),
        used_before=used_before,
        used_after=info.used,
        held_rows_after=len(rows),
        unknown_rows=len(set(rows) - ours),
        missing_rows=len(ours - set(rows)),
        survivors_cpu=usage.cores(survivor_pids),
        clients_cpu=usage.cores(client_pids),
        machine_busy=usage.machine_busy,
        not_checked_in=sum(final["not_checked_in"] for final in finals),
        errors=dict(errors),
        retries=dict(retries),
    )
