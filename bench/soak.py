"""``python -m bench.soak``: hours of steady lease churn against one real License Server.

    .venv/bin/python -m bench.soak                    # 60 minutes on SQLite
    .venv/bin/python -m bench.soak --minutes 5 --rate 40
    .venv/bin/python -m bench.soak --database postgres --postgres-url postgresql+asyncpg://…

Clients hold leases on streams and heartbeat them, while others check seats out and in
again at a steady rate (half over unary Checkout/Checkin, half over Lease streams). Every
``--sample`` seconds it records the server's resident memory and the seats in use. At the
end every client checks in, and the report says:

- seats leaked: seats still in use, and held leases still listed, once every client has
  checked in (must be 0);
- server RSS drift: resident memory at the end against the first sample after warm-up, and
  the least-squares slope over the run in MiB per hour;
- refusals by status code (any is worth a look; INTERNAL or UNKNOWN is a bug).

Not a test: nothing runs it in CI. Exit status 1 when a seat leaked or a call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeAlias

import grpc

from bench.phases import held_lease_ids, license_information
from bench.procstat import rss_kib
from bench.services import (
    FEATURE,
    LicenseServerConfig,
    Vendor,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    start_license_server,
)
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc

CALL_TIMEOUT = 30.0
StreamCall: TypeAlias = "grpc.aio.StreamStreamCall[lpb.LeaseRequest, lpb.LeaseResponse]"


@dataclass
class Sample:
    elapsed: float
    rss_mib: float
    used: int
    churn_in_flight: int


@dataclass
class Report:
    minutes: float
    database: str
    holders: int
    rate: float
    cycles: int = 0
    heartbeats: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    seats_leaked: int = 0
    leases_left: int = 0
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_drift_mib: float = 0.0
    rss_slope_mib_per_hour: float = 0.0
    samples: list[Sample] = field(default_factory=list)


class Soak:
    def __init__(self, target: str, args: argparse.Namespace) -> None:
        self.target = target
        self.args = args
        self.stop = asyncio.Event()
        self.refusals: collections.Counter[str] = collections.Counter()
        self.cycles = 0
        self.heartbeats = 0
        self.in_flight = 0

    def refused(self, error: grpc.aio.AioRpcError) -> None:
        self.refusals[error.code().name] += 1

    async def pause(self, seconds: float) -> None:
        """Pacing that ends early when the soak stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def holder(self, stub: lpb_grpc.LeaseServiceAsyncStub, number: int) -> None:
        """Hold one lease on a stream, heartbeating, until the soak stops; then release."""
        while not self.stop.is_set():
            call: StreamCall = stub.Lease(timeout=self.args.minutes * 60 + 600)
            try:
                acquire = lpb.LeaseAcquire(feature=FEATURE, count=1, client_host=f"hold-{number}")
                await call.write(lpb.LeaseRequest(acquire=acquire))
                response = await call.read()
                assert isinstance(response, lpb.LeaseResponse) and response.HasField("granted")
                while not self.stop.is_set():
                    await self.pause(self.args.heartbeat)
                    await call.write(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
                    await call.read()
                    self.heartbeats += 1
                await call.write(lpb.LeaseRequest(release=lpb.LeaseRelease()))
                await call.read()
                return
            except grpc.aio.AioRpcError as error:
                self.refused(error)
                await self.pause(1.0)
            finally:
                call.cancel()

    async def cycle(self, stub: lpb_grpc.LeaseServiceAsyncStub, number: int) -> None:
        """Check one seat out and in again: unary for even numbers, a stream for odd."""
        self.in_flight += 1
        acquire = lpb.LeaseAcquire(feature=FEATURE, count=1, client_host=f"churn-{number % 64}")
        try:
            if number % 2 == 0:
                granted = (
                    await stub.Checkout(lpb.CheckoutRequest(acquire=acquire), timeout=CALL_TIMEOUT)
                ).granted
                await stub.Checkin(
                    lpb.CheckinRequest(
                        lease_id=granted.lease_id, lease_secret=granted.lease_secret
                    ),
                    timeout=CALL_TIMEOUT,
                )
            else:
                call: StreamCall = stub.Lease(timeout=CALL_TIMEOUT)
                try:
                    await call.write(lpb.LeaseRequest(acquire=acquire))
                    await call.read()
                    await call.write(lpb.LeaseRequest(release=lpb.LeaseRelease()))
                    await call.read()
                finally:
                    call.cancel()
            self.cycles += 1
        except grpc.aio.AioRpcError as error:
            self.refused(error)
        finally:
            self.in_flight -= 1

    async def churn(self, stubs: list[lpb_grpc.LeaseServiceAsyncStub]) -> None:
        """Start cycles at a steady rate, whatever the server's latency."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        tasks: set[asyncio.Task[None]] = set()
        number = 0
        while not self.stop.is_set():
            task = asyncio.create_task(self.cycle(stubs[number % len(stubs)], number))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            number += 1
            await self.pause(max(0.0, started + number / self.args.rate - loop.time()))
        if tasks:
            await asyncio.wait(tasks, timeout=CALL_TIMEOUT * 2)


def slope_per_hour(samples: list[Sample]) -> float:
    """Least-squares slope of RSS over time, in MiB per hour."""
    if len(samples) < 2:
        return 0.0
    xs = [s.elapsed for s in samples]
    ys = [s.rss_mib for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread * 3600


async def run(args: argparse.Namespace, work_dir: Path) -> Report:
    vendor = await Vendor.start(work_dir)
    pg_name = ""
    if args.database == "postgres":
        pg_name, database_url = await create_postgres_database(args.postgres_url)
    else:
        database_url = f"sqlite+aiosqlite:///{(work_dir / 'license.db').resolve()}"
    config = LicenseServerConfig(
        data_dir=work_dir / "license_server",
        database_url=database_url,
        port=free_port(),
        vendor_keys=vendor.vendor_keys,
        lease_ttl=args.ttl,
        heartbeat_interval=args.heartbeat,
        sweep_interval=5.0,
    )
    server = await start_license_server(config, "license server")
    report = Report(args.minutes, args.database, args.holders, args.rate)
    try:
        # Seats for the holders and the churn's worst case in flight.
        await vendor.activate(config.ebo_address, args.holders + int(args.rate * CALL_TIMEOUT))
        channels = [grpc.aio.insecure_channel(config.target) for _ in range(args.channels)]
        stubs: list[lpb_grpc.LeaseServiceAsyncStub] = [
            lpb_grpc.LeaseServiceStub(channel) for channel in channels
        ]
        soak = Soak(config.target, args)
        loop = asyncio.get_running_loop()
        started = loop.time()
        holders = [
            asyncio.create_task(soak.holder(stubs[n % len(stubs)], n)) for n in range(args.holders)
        ]
        churn = asyncio.create_task(soak.churn(stubs))
        end = started + args.minutes * 60
        while loop.time() < end:
            await asyncio.sleep(min(args.sample, max(0.0, end - loop.time())))  # sampling pace
            information = await license_information(config.target)
            sample = Sample(
                round(loop.time() - started, 1),
                round(rss_kib(server.pid) / 1024, 1),
                information.used,
                soak.in_flight,
            )
            report.samples.append(sample)
            print(
                f"{sample.elapsed:8.0f} s  rss {sample.rss_mib:7.1f} MiB  used {sample.used:5d}  "
                f"cycles {soak.cycles:8d}  refusals {dict(soak.refusals)}",
                flush=True,
            )
            if not server.alive():
                raise RuntimeError(f"the License Server died: {server.log_tail()}")
        soak.stop.set()
        await asyncio.wait_for(asyncio.gather(churn, *holders), CALL_TIMEOUT * 3)
        for channel in channels:
            await channel.close()

        information = await license_information(config.target)
        report.seats_leaked = information.used
        report.leases_left = len(await held_lease_ids(config.target))
        report.cycles = soak.cycles
        report.heartbeats = soak.heartbeats
        report.refusals = dict(soak.refusals)
        warm = [s for s in report.samples if s.elapsed >= args.warmup] or report.samples
        if warm:
            report.rss_start_mib = warm[0].rss_mib
            report.rss_end_mib = warm[-1].rss_mib
            report.rss_drift_mib = round(warm[-1].rss_mib - warm[0].rss_mib, 1)
            report.rss_slope_mib_per_hour = round(slope_per_hour(warm), 1)
        return report
    finally:
        server.stop()
        await vendor.stop()
        if pg_name:
            await drop_postgres_database(args.postgres_url, pg_name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Steady lease churn against one License Server: leaks and memory drift.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--minutes", type=float, default=60.0, help="how long to churn")
    add("--rate", type=float, default=40.0, help="check-out/check-in cycles started per second")
    add("--holders", type=int, default=200, help="leases held on streams all along")
    add("--heartbeat", type=float, default=5.0, help="holders' heartbeat interval, seconds")
    add("--ttl", type=int, default=30, help="the server's lease TTL, seconds")
    add("--channels", type=int, default=4, help="client connections")
    add("--sample", type=float, default=10.0, help="seconds between samples")
    add("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    add("--database", choices=("sqlite", "postgres"), default="sqlite")
    add(
        "--postgres-url",
        default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
        help="server for --database postgres (a fresh database is made and dropped)",
    )
    add("--json", type=Path, help="also write the report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = Path(tempfile.mkdtemp(prefix="tessera-soak-"))
    started = time.monotonic()
    try:
        report = asyncio.run(run(args, work_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    summary = {k: v for k, v in asdict(report).items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    print(f"soak: {time.monotonic() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    failed = report.seats_leaked or report.leases_left or report.refusals
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
