"""Faults from below and beside: the database restarts, turns read-only or fills up, and
a client stops reading. Real processes, real gRPC on loopback.

- PostgreSQL restarted under load (a private instance in the test's directory, so other
  users of the shared server are not disturbed): clients holding leases and clients
  churning see UNAVAILABLE, never INTERNAL; afterwards the License Server serves again,
  every holder resumes its own lease, and no lease is lost or counted twice
  (pool used == held rows == the clients' leases).
- A read-only database (PostgreSQL ``default_transaction_read_only``) and a full disk
  (SQLite on a 16 MB tmpfs, filled up): writes answer UNAVAILABLE with the reason
  DATABASE_UNAVAILABLE, nothing changes, and the service recovers when the condition goes.
- A Lease stream client that stops reading does not stall the others: their heartbeats
  are still acknowledged promptly, and the server stops reading the slow one's stream
  (HTTP/2 flow control pushes back) instead of buffering its messages without bound.

The private PostgreSQL needs its binaries (/usr/lib/postgresql/*/bin) and, as root, a
``postgres`` user to run them; the full disk needs root to mount a tmpfs. Without them
those tests skip and say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import grpc
import pytest

from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import reason_of
from tests.support.processes import free_port
from tests.support.real_site import RealSite, state_of
from tests.support.real_site import reason_of as sync_reason_of

pytestmark = pytest.mark.e2e

FEATURE = "client.station"
Code = grpc.StatusCode
WITHIN = 60.0  # every wait in this file is bounded by this
StreamCall: TypeAlias = "grpc.aio.StreamStreamCall[lpb.LeaseRequest, lpb.LeaseResponse]"


# ---------------------------------------------------------------------------------------
# A private PostgreSQL
# ---------------------------------------------------------------------------------------


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of this test alone, in its temporary directory."""

    bin: Path
    directory: Path
    port: int
    user: str | None  # run the binaries as this user (root may not run them)

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, timeout=WITHIN, check=False)
        if done.returncode != 0:
            raise AssertionError(f"{args[0]} failed: {done.stderr.decode(errors='replace')}")

    def init(self) -> None:
        self.directory.mkdir(parents=True)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.directory / "data"), "-A", "trust", "-U", "postgres")
        self.start()

    def _ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", action, "-D", str(self.directory / "data"), "-w", "-t", "60",
            "-o", options, "-l", str(self.directory / "postgres.log"), *extra,
        )  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        """A fast restart: sessions are cut off, like a failover or an upgrade."""
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run("pg_ctl", "stop", "-D", str(self.directory / "data"), "-m", "immediate")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def new_database(self, name: str) -> str:
        connection = await asyncpg.connect(self.dsn)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    async def sql(self, database: str, statement: str) -> list[asyncpg.Record]:
        connection = await asyncpg.connect(self.dsn.rsplit("/", 1)[0] + "/" + database)
        try:
            return list(await connection.fetch(statement))
        finally:
            await connection.close()


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    binaries = _postgres_bin()
    if binaries is None:
        pytest.skip("no PostgreSQL binaries in /usr/lib/postgresql/*/bin for a private instance")
    user: str | None = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.skip("running as root without a postgres user to run a private PostgreSQL")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to run a private PostgreSQL")
    # Not under pytest's root-only temporary directory: the postgres user must reach it.
    home = Path(tempfile.mkdtemp(prefix="tessera-test-pg-"))
    home.chmod(0o755)
    cluster = PrivatePostgres(binaries, home / "cluster", free_port(), user)
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


def license_site(root: Path, url: str, *extra: str) -> RealSite:
    site = RealSite(root, ("--lease-ttl", "30", *extra), ls_database_url=url)
    site.start()
    return site


# ---------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------


@dataclass
class Outcomes:
    """Status codes the clients saw, and when."""

    codes: list[tuple[float, Code, str]] = field(default_factory=list)

    def saw(self, error: grpc.aio.AioRpcError) -> None:
        self.codes.append((time.monotonic(), error.code(), reason_of(error)))

    def forbidden(self) -> list[tuple[float, Code, str]]:
        return [c for c in self.codes if c[1] in (Code.INTERNAL, Code.UNKNOWN)]


class Holder:
    """A client holding one lease on a stream, heartbeating, resuming after any break."""

    def __init__(self, target: str, host: str, outcomes: Outcomes) -> None:
        self.target, self.host, self.outcomes = target, host, outcomes
        self.lease_id = ""
        self.secret = ""
        self.granted = asyncio.Event()
        self.acks = 0
        self.breaks = 0
        self.acks_after_break = 0
        self.acks_at_restart = 0
        self.progress = asyncio.Condition()

    async def run(self, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = lpb_grpc.LeaseServiceStub(channel)
            while not stop.is_set():
                try:
                    await self._session(stub, stop)
                except grpc.aio.AioRpcError as error:
                    self.outcomes.saw(error)
                    self.breaks += 1
                    self.acks_after_break = 0
                    # Pacing between attempts, not synchronisation: retry until it works.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.2)

    async def _session(self, stub: lpb_grpc.LeaseServiceAsyncStub, stop: asyncio.Event) -> None:
        call: StreamCall = stub.Lease(timeout=WITHIN)
        try:
            if not self.lease_id:
                acquire = lpb.LeaseAcquire(feature=FEATURE, count=1, client_host=self.host)
                await call.write(lpb.LeaseRequest(acquire=acquire))
            else:
                resume = lpb.LeaseResume(lease_id=self.lease_id, lease_secret=self.secret)
                await call.write(lpb.LeaseRequest(resume=resume))
            response = await call.read()
            assert isinstance(response, lpb.LeaseResponse), response
            assert response.HasField("granted"), response
            if self.lease_id:
                assert response.granted.lease_id == self.lease_id  # the same lease, resumed
            self.lease_id = response.granted.lease_id
            self.secret = response.granted.lease_secret
            self.granted.set()
            while not stop.is_set():
                await call.write(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
                ack = await call.read()
                assert isinstance(ack, lpb.LeaseResponse) and ack.HasField("heartbeat_ack"), ack
                async with self.progress:
                    self.acks += 1
                    self.acks_after_break += 1
                    self.progress.notify_all()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)  # heartbeat pacing
        finally:
            call.cancel()


class Churner:
    """A client checking a seat out and in again, over and over (unary calls)."""

    def __init__(self, target: str, host: str, outcomes: Outcomes) -> None:
        self.target, self.host, self.outcomes = target, host, outcomes
        self.cycles = 0
        self.ambiguous = 0  # checkouts that failed after maybe taking a seat

    async def run(self, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = lpb_grpc.LeaseServiceStub(channel)
            while not stop.is_set():
                try:
                    granted = (
                        await stub.Checkout(
                            lpb.CheckoutRequest(
                                acquire=lpb.LeaseAcquire(
                                    feature=FEATURE, count=1, client_host=self.host
                                )
                            ),
                            timeout=10,
                        )
                    ).granted
                except grpc.aio.AioRpcError as error:
                    self.outcomes.saw(error)
                    if error.code() in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
                        self.ambiguous += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.2)
                    continue
                # Check in until the server confirms (an UNAVAILABLE check-in is retried).
                while True:
                    try:
                        await stub.Checkin(
                            lpb.CheckinRequest(
                                lease_id=granted.lease_id, lease_secret=granted.lease_secret
                            ),
                            timeout=10,
                        )
                        break
                    except grpc.aio.AioRpcError as error:
                        self.outcomes.saw(error)
                        await asyncio.sleep(0.2)  # retry pacing
                self.cycles += 1


async def bounded(condition: Any, what: str, within: float = WITHIN) -> None:
    """Await ``condition()`` (a coroutine) within ``within`` seconds, or fail saying what."""
    try:
        await asyncio.wait_for(condition(), within)
    except TimeoutError:
        pytest.fail(f"{what} did not happen within {within} s")


async def until(predicate: Any, holders: list[Holder]) -> None:
    """Wait on the holders' progress until ``predicate()`` is true."""
    condition = holders[0].progress
    while not predicate():
        async with condition:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(condition.wait(), 1.0)


# ---------------------------------------------------------------------------------------
# PostgreSQL restarted under load
# ---------------------------------------------------------------------------------------


@pytest.fixture
async def pg_site(tmp_path: Path, postgres: PrivatePostgres) -> AsyncIterator[tuple[RealSite, str]]:
    name = f"ls_{tmp_path.name[-20:].replace('-', '_').lower()}"
    url = await postgres.new_database(name)
    # Churners from one loopback address stand in for several hosts: no acquire rate.
    site = await asyncio.to_thread(
        license_site, tmp_path, url, "--sweep-interval", "0.5", "--acquire-rate", "0"
    )
    yield site, name
    await asyncio.to_thread(site.close)


async def held_rows(postgres: PrivatePostgres, database: str) -> list[asyncpg.Record]:
    return await postgres.sql(
        database,
        "SELECT lease_id, client_host, count FROM leases WHERE released_at IS NULL",
    )


@pytest.mark.timeout(180)
async def test_postgres_restarted_under_load_loses_and_doubles_no_lease(
    postgres: PrivatePostgres, pg_site: tuple[RealSite, str]
) -> None:
    site, database = pg_site
    await asyncio.to_thread(site.activate, FEATURE, 30)
    target = site["license"].target
    outcomes = Outcomes()
    holders = [Holder(target, f"holder-{n}", outcomes) for n in range(10)]
    churners = [Churner(target, f"churner-{n}", outcomes) for n in range(4)]
    stop = asyncio.Event()
    clients: list[Holder | Churner] = [*holders, *churners]
    tasks = [asyncio.create_task(c.run(stop)) for c in clients]
    try:
        await bounded(lambda: asyncio.gather(*(h.granted.wait() for h in holders)), "grants")
        await bounded(lambda: until(lambda: min(c.cycles for c in churners) >= 3, holders), "churn")

        restarted_at = time.monotonic()
        await asyncio.to_thread(postgres.restart)
        churned = [c.cycles for c in churners]
        for holder in holders:
            holder.acks_at_restart = holder.acks

        # Every holder heartbeats its own lease again, and every churner goes on.
        await bounded(
            lambda: until(
                lambda: (
                    all(h.acks_after_break >= 3 for h in holders)
                    and all(c.cycles >= n + 3 for c, n in zip(churners, churned, strict=True))
                ),
                holders,
            ),
            "recovery after the restart",
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WITHIN)
    for task in tasks:
        assert task.exception() is None, task.exception()

    assert not outcomes.forbidden(), outcomes.forbidden()
    after = [c for c in outcomes.codes if c[0] >= restarted_at]
    assert {code for _, code, _ in after} <= {Code.UNAVAILABLE}, after
    assert site.healthy("license"), site.log("license")

    rows = await held_rows(postgres, database)
    holder_rows = [r for r in rows if r["client_host"].startswith("holder-")]
    # No lost lease, none doubled: each holder's one lease, held once.
    assert sorted(r["lease_id"] for r in holder_rows) == sorted(h.lease_id for h in holders)
    # A checkout cut off by the restart may have taken a seat its client never heard of;
    # such a lease is a churner's, and its TTL frees it.
    extra = [r for r in rows if not r["client_host"].startswith("holder-")]
    assert len(extra) <= sum(c.ambiguous for c in churners), extra
    (pool,) = await postgres.sql(database, f"SELECT used FROM pools WHERE feature = '{FEATURE}'")
    assert pool["used"] == sum(r["count"] for r in rows)
    information = await asyncio.to_thread(
        site.leases.GetLicenseInformation, lpb.GetLicenseInformationRequest(feature=FEATURE)
    )
    assert [f.used for f in information.features] == [pool["used"]]
    print(
        f"restart: {len(outcomes.codes)} refused calls (all UNAVAILABLE), "
        f"{sum(h.breaks for h in holders)} stream breaks, {len(extra)} ambiguous leases"
    )


# ---------------------------------------------------------------------------------------
# A read-only database
# ---------------------------------------------------------------------------------------


async def cut_sessions(postgres: PrivatePostgres, database: str) -> None:
    """End the License Server's sessions, so its pool reconnects with the new setting."""
    await postgres.sql(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND pid <> pg_backend_pid()",
    )


async def test_a_read_only_database_answers_unavailable_and_recovers(
    postgres: PrivatePostgres, pg_site: tuple[RealSite, str]
) -> None:
    site, database = pg_site
    await asyncio.to_thread(site.activate, FEATURE, 3)
    async with grpc.aio.insecure_channel(site["license"].target) as channel:
        stub = lpb_grpc.LeaseServiceStub(channel)
        request = lpb.CheckoutRequest(
            acquire=lpb.LeaseAcquire(feature=FEATURE, count=1, client_host="ws-ro")
        )
        held = (await stub.Checkout(request, timeout=10)).granted
        await postgres.sql(
            "postgres", f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'
        )
        await cut_sessions(postgres, database)
        before = await postgres.sql(database, "SELECT * FROM leases ORDER BY lease_id")

        for call in (
            stub.Checkout(request, timeout=10),
            stub.Heartbeat(
                lpb.HeartbeatRequest(lease_id=held.lease_id, lease_secret=held.lease_secret),
                timeout=10,
            ),
            stub.Checkin(
                lpb.CheckinRequest(lease_id=held.lease_id, lease_secret=held.lease_secret),
                timeout=10,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert (caught.value.code(), reason_of(caught.value)) == (
                Code.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
            ), caught.value.details()
            assert "read-only" in (caught.value.details() or "")
        assert await postgres.sql(database, "SELECT * FROM leases ORDER BY lease_id") == before
        assert site.healthy("license")

        await postgres.sql("postgres", f'ALTER DATABASE "{database}" RESET ALL')
        await cut_sessions(postgres, database)
        again = (await stub.Checkout(request, timeout=10)).granted
        assert again.lease_id
        await stub.Checkin(
            lpb.CheckinRequest(lease_id=held.lease_id, lease_secret=held.lease_secret), timeout=10
        )


# ---------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs (root only)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 16 MB tmpfs for the full-disk test needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace')}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Fill the disk of ``directory`` to the last byte."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(descriptor, b"\0" * size)
    finally:
        os.close(descriptor)
    return filler


def test_a_full_disk_answers_unavailable_and_recovers(tmp_path: Path, small_disk: Path) -> None:
    database = small_disk / "ls.db"
    site = RealSite(tmp_path, ls_database_url=f"sqlite+aiosqlite:///{database}")
    site.services["license"].database = database
    try:
        site.start()
        site.activate(FEATURE, 200)
        acquire = lpb.LeaseAcquire(feature=FEATURE, count=1, client_host="ws-full")
        filler = fill(small_disk)
        refusal: grpc.RpcError | None = None
        granted = 0
        # SQLite may still find room in pages it holds; the disk runs out within a few
        # hundred leases at most.
        for _ in range(200):
            before = state_of(database)
            try:
                site.leases.Checkout(lpb.CheckoutRequest(acquire=acquire), timeout=10)
                granted += 1
            except grpc.RpcError as error:
                refusal = error
                break
        assert refusal is not None, f"{granted} checkouts fit on a full disk"
        assert isinstance(refusal, grpc.Call)
        assert refusal.code() == Code.UNAVAILABLE, (refusal.code(), refusal.details())
        assert sync_reason_of(refusal) == "DATABASE_UNAVAILABLE"
        # SQLITE_FULL, or an I/O error when the WAL cannot grow
        assert "disk" in (refusal.details() or ""), refusal.details()
        assert state_of(database) == before
        assert site.healthy("license"), site.log("license")

        filler.unlink()
        site.leases.Checkout(lpb.CheckoutRequest(acquire=acquire), timeout=10)
        assert site.healthy("license")
    finally:
        site.close()


# ---------------------------------------------------------------------------------------
# A client that stops reading
# ---------------------------------------------------------------------------------------


SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]
FLOOD = 5.0


def rss_of(site: RealSite) -> int:
    """The License Server process's resident memory, in bytes."""
    process = site["license"].process
    assert process is not None
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc")


@pytest.mark.timeout(120)
async def test_a_client_that_stops_reading_does_not_stall_the_others(tmp_path: Path) -> None:
    site = await asyncio.to_thread(license_site, tmp_path, "")
    try:
        await asyncio.to_thread(site.activate, FEATURE, 10)
        target = site["license"].target
        outcomes = Outcomes()
        holders = [Holder(target, f"steady-{n}", outcomes) for n in range(4)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(h.run(stop)) for h in holders]
        await bounded(lambda: asyncio.gather(*(h.granted.wait() for h in holders)), "grants")

        # The slow client's window stays at HTTP/2's 64 KiB (no BDP probing), so its unread
        # answers push back on the server within seconds.
        async with grpc.aio.insecure_channel(target, options=SMALL_WINDOW) as channel:
            slow: StreamCall = lpb_grpc.LeaseServiceStub(channel).Lease(timeout=WITHIN)
            await slow.write(
                lpb.LeaseRequest(
                    acquire=lpb.LeaseAcquire(feature=FEATURE, count=1, client_host="slow")
                )
            )
            # Heartbeats without ever reading an answer, for FLOOD seconds. The acks fill
            # the slow client's window; then the server stops reading its stream.
            rss_before = rss_of(site)
            written = 0
            heartbeat = lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat())

            async def flood() -> None:
                nonlocal written
                started = time.monotonic()
                while (left := FLOOD - (time.monotonic() - started)) > 0:
                    try:
                        await asyncio.wait_for(slow.write(heartbeat), left)
                    except TimeoutError:
                        return  # the server stopped reading: HTTP/2 holds our writes back
                    written += 1

            flooding = asyncio.create_task(flood())
            # Meanwhile the others' heartbeats are acknowledged, promptly: each with the
            # next heartbeat flush, about a second after it was sent.
            acks = sum(h.acks for h in holders)
            started = time.monotonic()
            await bounded(
                lambda: until(lambda: sum(h.acks for h in holders) >= acks + 8, holders),
                "heartbeats of the other clients",
                within=10,
            )
            prompt = time.monotonic() - started
            await asyncio.wait_for(flooding, WITHIN)
            grown = rss_of(site) - rss_before
            slow.cancel()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WITHIN)
        assert not outcomes.codes, outcomes.codes
        assert prompt < 5.0
        # The server holds a bounded read-ahead for the slow client, not every message it
        # wrote (before the fix: about 5 MiB more per second of flooding).
        assert grown < 16 * 2**20, f"the License Server grew by {grown / 2**20:.0f} MiB"
        assert site.healthy("license")
        print(
            f"slow client: {written} unread heartbeats in {FLOOD} s; server RSS "
            f"{grown / 2**20:+.1f} MiB; 8 heartbeats of the others acknowledged in {prompt:.2f} s"
        )
    finally:
        await asyncio.to_thread(site.close)
