"""``python -m bench``: measure the License Server against a bare gRPC echo server.

    .venv/bin/python -m bench                         # the default phases, ~3 minutes
    .venv/bin/python -m bench --phases echo,cycles    # just the throughput phases
    .venv/bin/python -m bench --phases streams --streams 20000
    .venv/bin/python -m bench --phases replicas,failover   # scale-out (opt-in, PostgreSQL)
    .venv/bin/python -m bench --phases handover       # queue hand-over, 100 waiters
    .venv/bin/python -m bench.soak --minutes 60       # leaks and memory drift (bench/soak.py)
    .venv/bin/python -m bench.batch                   # CPU per group-commit transaction

See docs/performance.md for what each phase measures and the figures on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.handover import MAX_HANDOVER_P99, HandoverResult, handover_phase
from bench.phases import (
    Options,
    StormResult,
    StreamsResult,
    UnaryResult,
    cycles_phase,
    echo_phase,
    floor_phase,
    storm_phase,
    streams_phase,
)
from bench.procstat import cpu_model
from bench.scaleout import FailoverResult, ReplicasResult, failover_phase, replicas_phase
from bench.services import Vendor
from bench.stats import verdict

PHASES = ("echo", "floor", "cycles", "streams", "storm", "handover", "replicas", "failover")
# The echo phase measured a second time, after the floor and cycles phases.
ECHO_AFTER = "echo-after"
# The scale-out phases (replicas, failover) run only when asked for.
DEFAULT_PHASES = PHASES[:6]
DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"

# Targets (issue "License Server ... fast").
SQLITE_RATIO = 0.6
POSTGRES_RATIO = 0.5
MAX_BYTES_PER_LEASE = 40_000
MAX_HEARTBEAT_CORE = 0.5
HEARTBEAT_TARGET_LEASES = 20_000
MAX_STORM_SECONDS = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Load generator for the License Server (prints figures, not a test).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--phases",
        default=",".join(DEFAULT_PHASES),
        help="comma-separated: " + ",".join(PHASES),
    )
    add("--cycles-dbs", default="sqlite,postgres", help="databases for the cycles phase")
    add(
        "--postgres-url",
        default=os.environ.get("TESSERA_BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        help="PostgreSQL server; a fresh database is created there and dropped after "
        "[env TESSERA_BENCH_POSTGRES_URL]",
    )
    add("--client-procs", type=int, default=2, help="client processes (echo, cycles)")
    add("--concurrency", type=int, default=32, help="closed loops per client process")
    add("--channels", type=int, default=4, help="connections per client process")
    add("--warmup", type=float, default=3.0, help="seconds before each measured window")
    add("--duration", type=float, default=10.0, help="seconds measured (echo, cycles)")
    add("--streams", type=int, default=20_000, help="leases held in the streams phase")
    add("--storm", type=int, default=10_000, help="leases held through the storm")
    add("--stream-procs", type=int, default=2, help="client processes holding leases")
    add("--streams-per-connection", type=int, default=100, help="Lease streams per connection")
    add("--heartbeat-interval", type=float, default=10.0, help="seconds between heartbeats")
    add("--acquire-concurrency", type=int, default=16, help="acquires in flight per process")
    add("--streams-window", type=float, default=20.0, help="seconds of heartbeats measured")
    add(
        "--ramp-limit",
        type=float,
        default=180.0,
        help="seconds to wait for all leases to be acquired before measuring what is held",
    )
    add("--streams-db", choices=["sqlite", "postgres"], default="sqlite")
    add("--storm-db", choices=["sqlite", "postgres"], default="sqlite")
    add("--storm-timeout", type=float, default=60.0, help="give up on the storm after this")
    add(
        "--storm-heartbeat-interval",
        type=float,
        default=30.0,
        help="seconds between heartbeats in the storm phase (the server's default)",
    )
    add("--lease-ttl", type=int, default=90, help="the License Server's --lease-ttl")
    add("--replicas", default="1,3", help="replica counts the replicas phase compares")
    add("--failover-leases", type=int, default=1_500, help="leases held in the failover phase")
    add("--failover-ttl", type=int, default=30, help="--lease-ttl in the failover phase")
    add(
        "--failover-heartbeat-interval",
        type=float,
        default=10.0,
        help="--heartbeat-interval in the failover phase",
    )
    add("--failover-timeout", type=float, default=60.0, help="give up on the failover after this")
    add(
        "--handover-db",
        choices=["sqlite", "postgres"],
        default="postgres",
        help="the handover phase's database (postgres: two replicas, sqlite: one server)",
    )
    add("--handover-waiters", type=int, default=100, help="clients waiting in the queue")
    add("--handover-grants", type=int, default=300, help="hand-overs measured")
    add("--work-dir", default="", help="where servers keep data (default: a temp dir)")
    add("--keep", action="store_true", help="keep the work dir (logs, SQLite files)")
    add("--profile", default="", help="record py-spy profiles of the server into this dir")
    add(
        "--profile-mode",
        choices=["all", "gil", "native"],
        default="all",
        help="py-spy: all busy threads, only the GIL holder, or with native (C) frames",
    )
    add("--json", default="", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    try:
        counts = [int(count) for count in args.replicas.split(",") if count.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        parser.error(f"--replicas: {args.replicas!r} is not a list of counts such as 1,3")
    return args


def machine() -> str:
    return f"{os.cpu_count()} CPUs ({cpu_model()}), Python {sys.version.split()[0]}"


def revision() -> str:
    """The commit measured, and whether the server's code differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "services", "tessera"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes in services/ or tessera/" if changed else "")


def summary(results: dict[str, Any], options: Options) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    echo = results.get("echo")
    ceiling = echo.cycles_per_second if isinstance(echo, UnaryResult) else None
    if isinstance(echo, UnaryResult):
        measured = (
            f"{echo.cycles_per_second:,.0f} cycles/s (2 RPC each), p99 {echo.p99 * 1000:.1f} ms"
        )
        after = results.get(ECHO_AFTER)
        if isinstance(after, UnaryResult):
            # The machine's speed drifts (other tenants): the ceiling for the phases in
            # between is the mean of the echo measured before them and after them.
            ceiling = (echo.cycles_per_second + after.cycles_per_second) / 2
            measured = (
                f"{ceiling:,.0f} cycles/s (2 RPC each): {echo.cycles_per_second:,.0f} before "
                f"the License Server phases, {after.cycles_per_second:,.0f} after; p99 "
                f"{echo.p99 * 1000:.1f} and {after.p99 * 1000:.1f} ms"
            )
        rows.append(("echo ceiling", measured, "-", ""))
    floor = results.get("floor")
    if isinstance(floor, UnaryResult):
        measured = f"{floor.cycles_per_second:,.0f} cycles/s (2 health Checks each)"
        if ceiling:
            measured += f" = {floor.cycles_per_second / ceiling:.2f} x echo"
        rows.append(("LS gRPC floor", measured, "-", ""))
    for kind, ratio in (("sqlite", SQLITE_RATIO), ("postgres", POSTGRES_RATIO)):
        result = results.get(f"cycles-{kind}")
        label = f"cycles {'SQLite' if kind == 'sqlite' else 'PostgreSQL'}"
        if isinstance(result, UnaryResult):
            measured = (
                f"{result.cycles_per_second:,.0f} cycles/s, p50 {result.p50 * 1000:.1f} ms, "
                f"p99 {result.p99 * 1000:.1f} ms"
            )
            ok = None
            if ceiling:
                achieved = result.cycles_per_second / ceiling
                measured += f" = {achieved:.2f} x echo"
                ok = achieved >= ratio and not result.errors
            rows.append((label, measured, f">= {ratio:.2f} x echo", verdict(ok)))
        elif isinstance(result, str):
            rows.append((label, result, f">= {ratio:.2f} x echo", "ERROR"))
    streams = results.get("streams")
    if isinstance(streams, StreamsResult):
        per_lease = streams.kib_per_lease * 1024
        rows.append(
            (
                "RSS per held lease",
                f"{per_lease / 1000:.1f} kB ({streams.kib_per_lease:.1f} KiB) at "
                f"{streams.held:,} leases",
                f"<= {MAX_BYTES_PER_LEASE / 1000:.0f} kB",
                verdict(per_lease <= MAX_BYTES_PER_LEASE and streams.held == streams.leases),
            )
        )
        core = streams.server_cpu
        measured = f"{100 * core:.0f}% of a core at {streams.held:,} leases"
        judged = core
        note = ""
        if streams.held != HEARTBEAT_TARGET_LEASES and streams.held:
            judged = core * HEARTBEAT_TARGET_LEASES / streams.held
            measured += f" (linear to 20,000: {100 * judged:.0f}%)"
            note = " (projected)"
        lagging = streams.heartbeats < 0.95 * streams.expected_heartbeats
        if lagging:
            measured += ", heartbeats lagging"
        rows.append(
            (
                "heartbeat CPU",
                measured,
                f"<= {100 * MAX_HEARTBEAT_CORE:.0f}% at 20,000",
                verdict(judged <= MAX_HEARTBEAT_CORE and not lagging) + note,
            )
        )
    elif isinstance(streams, str):
        rows.append(("streams", streams, "", "ERROR"))
    storm = results.get("storm")
    if isinstance(storm, StormResult):
        seconds = storm.all_resumed_seconds
        measured = (
            f"{seconds:.1f} s" if seconds is not None else f"> {options.storm_timeout:.0f} s"
        ) + f" for {storm.held:,} leases, {storm.double_counts} double counts, {storm.lost} lost"
        ok = (
            seconds is not None
            and seconds <= MAX_STORM_SECONDS
            and storm.double_counts == 0
            and storm.lost == 0
            and storm.used_after == storm.held == storm.leases
        )
        rows.append(
            ("reconnect storm", measured, f"<= {MAX_STORM_SECONDS:.0f} s, 0 double", verdict(ok))
        )
    elif isinstance(storm, str):
        rows.append(("reconnect storm", storm, "", "ERROR"))
    handover = results.get("handover")
    if isinstance(handover, HandoverResult):
        measured = (
            f"p99 {1000 * handover.p99:.1f} ms (p50 {1000 * handover.p50:.1f} ms), "
            f"{handover.handovers} hand-overs, {handover.waiters} waiters, {handover.db}"
            + (f" x {handover.replicas} replicas" if handover.replicas > 1 else "")
            + (", STALLED" if handover.stalled else "")
        )
        target = f"<= {1000 * MAX_HANDOVER_P99:.0f} ms p99"
        rows.append(("queue hand-over", measured, target, verdict(handover.ok)))
    elif isinstance(handover, str):
        rows.append(("queue hand-over", handover, "", "ERROR"))
    rows += scale_out_summary(results)
    return rows


def scale_out_summary(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    replicas = results.get("replicas")
    if isinstance(replicas, ReplicasResult):
        base = min(replicas.runs, default=0)
        for count, run in sorted(replicas.runs.items()):
            measured = (
                f"{run.cycles_per_second:,.0f} cycles/s, p50 {run.p50 * 1000:.1f} ms, "
                f"p99 {run.p99 * 1000:.1f} ms; servers {100 * run.server_cpu:.0f}% of a core"
            )
            if count != base and replicas.runs[base].cycles_per_second:
                ratio = run.cycles_per_second / replicas.runs[base].cycles_per_second
                measured += f" = {ratio:.2f} x {base} replica(s)"
            ok = None if not run.errors else False
            rows.append((f"cycles PostgreSQL, {count} replica(s)", measured, "-", verdict(ok)))
    elif isinstance(replicas, str):
        rows.append(("replicas", replicas, "", "ERROR"))
    failover = results.get("failover")
    if isinstance(failover, FailoverResult):
        seconds = failover.all_resumed_seconds
        measured = (f"{seconds:.2f} s" if seconds is not None else "not within the timeout") + (
            f" for {failover.victims:,} leases (p50 {failover.p50:.2f} s), "
            f"{failover.double_counts} double counts, {failover.lost} lost"
        )
        ok = (
            seconds is not None
            and seconds <= failover.ttl
            and failover.double_counts == 0
            and failover.lost == 0
            and failover.missing_rows == 0
            and failover.moved == failover.victims
            and failover.used_after == failover.held
        )
        rows.append(
            (
                "failover (SIGKILL 1 of 3)",
                measured,
                f"<= 1 TTL ({failover.ttl} s), 0 double",
                verdict(ok),
            )
        )
    elif isinstance(failover, str):
        rows.append(("failover", failover, "", "ERROR"))
    return rows


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def make_options(args: argparse.Namespace) -> Options:
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="tessera-bench-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    return Options(
        work_dir=work_dir,
        postgres_url=args.postgres_url,
        client_procs=args.client_procs,
        concurrency=args.concurrency,
        channels=args.channels,
        warmup=args.warmup,
        duration=args.duration,
        streams=args.streams,
        stream_procs=args.stream_procs,
        streams_per_connection=args.streams_per_connection,
        heartbeat_interval=args.heartbeat_interval,
        acquire_concurrency=args.acquire_concurrency,
        streams_window=args.streams_window,
        streams_db=args.streams_db,
        storm=args.storm,
        storm_db=args.storm_db,
        storm_timeout=args.storm_timeout,
        ramp_limit=args.ramp_limit,
        storm_heartbeat_interval=args.storm_heartbeat_interval,
        lease_ttl=args.lease_ttl,
        profile_dir=Path(args.profile).resolve() if args.profile else None,
        profile_mode=args.profile_mode,
        replica_counts=tuple(int(count) for count in args.replicas.split(",") if count.strip()),
        failover_leases=args.failover_leases,
        failover_ttl=args.failover_ttl,
        failover_heartbeat_interval=args.failover_heartbeat_interval,
        failover_timeout=args.failover_timeout,
        handover_db=args.handover_db,
        handover_waiters=args.handover_waiters,
        handover_grants=args.handover_grants,
    )


async def run(args: argparse.Namespace, options: Options) -> dict[str, Any]:
    """Run the chosen phases; their results (or "failed: ...") by phase name."""
    phases = [phase for phase in PHASES if phase in args.phases.split(",")]
    if "echo" in phases and {"floor", "cycles"} & set(phases):
        # Echo again right after the phases it is the ceiling of (see ``summary``).
        last = max(phases.index(phase) for phase in ("floor", "cycles") if phase in phases)
        phases.insert(last + 1, ECHO_AFTER)
    results: dict[str, Any] = {}
    vendor = None
    try:
        if set(phases) - {"echo"}:
            vendor = await Vendor.start(options.work_dir)
        for phase in phases:
            names: list[str] = (
                [f"cycles-{kind}" for kind in args.cycles_dbs.split(",") if kind]
                if phase == "cycles"
                else [phase]
            )
            for name in names:
                print(f"\n== {name} ==", flush=True)
                phase_started = time.monotonic()
                try:
                    if name in ("echo", ECHO_AFTER):
                        result: Any = await echo_phase(options)
                    elif name == "floor":
                        assert vendor is not None
                        result = await floor_phase(options, vendor)
                    elif name.startswith("cycles-"):
                        assert vendor is not None
                        result = await cycles_phase(options, vendor, name.split("-", 1)[1])
                    elif name == "streams":
                        assert vendor is not None
                        result = await streams_phase(options, vendor)
                    elif name == "replicas":
                        assert vendor is not None
                        result = await replicas_phase(options, vendor)
                    elif name == "failover":
                        assert vendor is not None
                        result = await failover_phase(options, vendor)
                    elif name == "handover":
                        assert vendor is not None
                        result = await handover_phase(options, vendor)
                    else:
                        assert vendor is not None
                        result = await storm_phase(options, vendor)
                    result.show()
                except Exception as error:
                    traceback.print_exc()
                    result = f"failed: {error!r}"
                    print(f"  {result}")
                results[name] = result
                print(f"  ({time.monotonic() - phase_started:.0f} s)", flush=True)
    finally:
        if vendor is not None:
            await vendor.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = make_options(args)
    print(f"Machine: {machine()}")
    print(f"Code: {revision()}")
    print(f"Work dir: {options.work_dir}")
    print(
        f"Clients: {options.client_procs} processes x {options.concurrency} closed loops over "
        f"{options.channels} connections each (echo, cycles); {options.stream_procs} processes "
        f"holding leases, {options.streams_per_connection} streams per connection"
    )
    started = time.monotonic()
    try:
        results = asyncio.run(run(args, options))
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(options.work_dir, ignore_errors=True)
    print(f"\n== Summary ({time.monotonic() - started:.0f} s) ==")
    rows = summary(results, options)
    if rows:
        print_table([("phase", "measured", "target", "result"), *rows])
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "code": revision(),
                    "options": {k: str(v) for k, v in dataclasses.asdict(options).items()},
                    "results": {
                        name: dataclasses.asdict(value)
                        if dataclasses.is_dataclass(value) and not isinstance(value, type)
                        else value
                        for name, value in results.items()
                    },
                    "summary": rows,
                },
                indent=2,
            )
        )
    failed = any(isinstance(value, str) for value in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
