"""Scale-out on PostgreSQL (issue 6), with every service a real process on loopback.

1. Three License Server replicas share one database and one host identity (one data
   directory: host key, operator token, trust anchor; one machine id); two Activation
   Server replicas share another database and their vendor keys (one data directory).
   Clients of the client library hold leases and churn checkout/heartbeat/checkin through
   the ``;``-separated address of the three replicas, each client listing them in another
   order. One replica is SIGKILLed under that load: every lease it held is resumed, with
   the same lease id, on another replica within one TTL; no seat is counted twice (the
   operator's lease list, License Information and the ``leases`` table agree with what
   the clients hold); and a watcher task checks all along, in the database and through
   the replicas' License Information, that the pool never over-allocates.
2. Two Administrators, each on its own site (its own License Server: another host key,
   machine and database), activate one seat at a time from the same entitlement line,
   many calls at once, each Administrator through its own Activation Server replica:
   exactly the seats sold are activated, the rest are refused ``RESOURCE_EXHAUSTED`` /
   ``NOT_ENOUGH_SEATS_LEFT``, and the two sites' seats add up to what the vendor records.

SQLite is one process's file, so these run on PostgreSQL only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest

from clients import Lease, LicenseClient, NoSeatAvailable
from clients.events import LeaseEvent, Lost, Resumed
from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import reason_of
from tests.support.databases import DatabaseFactory, plain_dsn
from tests.support.processes import Processes, credentialed_channel, free_port
from tests.support.tokens import ADMINISTRATOR_TOKEN, OPERATOR_TOKEN, VENDOR_TOKEN

pytestmark = pytest.mark.e2e

FEATURE = "client.station"
TTL = 6  # --lease-ttl, seconds
HEARTBEAT = 2  # --heartbeat-interval, seconds
RPC_TIMEOUT = 30.0
NEVER = dt.datetime.min.replace(tzinfo=dt.UTC)


def postgres_only(databases: DatabaseFactory) -> None:
    if databases.kind == "sqlite":
        pytest.skip(
            "scale-out needs PostgreSQL: replicas share one database (conditional updates, "
            "LISTEN/NOTIFY); a SQLite file belongs to one process"
        )


def target(port: int) -> str:
    return f"127.0.0.1:{port}"


def activation_server_args(port: int, data_dir: Path, database_url: str) -> list[str]:
    return [
        "--listen", target(port),
        "--data-dir", str(data_dir),
        "--database-url", database_url,
        "--vendor-token", VENDOR_TOKEN,
    ]  # fmt: skip


def license_server_args(
    port: int, data_dir: Path, database_url: str, vendor_keys: Path, machine_id: str
) -> list[str]:
    return [
        "--listen", target(port),
        "--data-dir", str(data_dir),
        "--database-url", database_url,
        "--vendor-keys", str(vendor_keys),
        "--machine-id", machine_id,
        "--lease-ttl", str(TTL),
        "--heartbeat-interval", str(HEARTBEAT),
        "--sweep-interval", "0.2",
        "--operator-token", OPERATOR_TOKEN,
        # The test's clients all come from 127.0.0.1, standing in for many hosts.
        "--max-streams-per-host", "0",
        "--acquire-rate", "0",
    ]  # fmt: skip


def administrator_args(
    port: int, data_dir: Path, database_url: str, activation_port: int
) -> list[str]:
    return [
        "--listen", target(port),
        "--data-dir", str(data_dir),
        "--database-url", database_url,
        "--activation-server", target(activation_port),
    ]  # fmt: skip


async def start(processes: Processes, *services: tuple[str, str, list[str], int]) -> None:
    """Start ``(name, module, args, port)`` services at once and wait until all serve."""
    for name, module, args, _port in services:
        processes.start(name, module, *args)
    await asyncio.gather(*(processes.wait_serving(name, port) for name, _, _, port in services))


async def until(condition: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``condition`` every 20 ms; fail when it is not true ``within`` seconds. Returns
    how long it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            pytest.fail(f"{what}: not within {within:g} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def sell(activation_port: int, seats: int) -> tuple[str, str]:
    """A new order of ``seats`` network seats: (entitlement id, activation id)."""
    async with grpc.aio.insecure_channel(target(activation_port)) as channel:
        created = await apb_grpc.VendorServiceStub(channel).CreateEntitlement(
            apb.CreateEntitlementRequest(
                customer_organization="Scale-out",
                lines=[
                    apb.NewEntitlementLine(
                        feature=FEATURE, count=seats, kind=LicenseKind.LICENSE_KIND_NETWORK
                    )
                ],
            ),
            metadata=bearer_metadata(VENDOR_TOKEN),
            timeout=RPC_TIMEOUT,
        )
    return created.entitlement.entitlement_id, created.entitlement.lines[0].activation_id


async def station(stub: lpb_grpc.LeaseServiceStub) -> lpb.FeatureInformation:
    info = await stub.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature=FEATURE), timeout=RPC_TIMEOUT
    )
    [feature] = info.features
    return feature


async def held_leases(stub: lpb_grpc.LeaseAdminServiceStub) -> list[lpb.LeaseEntry]:
    reply = await stub.ListLeases(
        lpb.ListLeasesRequest(feature=FEATURE),
        metadata=bearer_metadata(OPERATOR_TOKEN),
        timeout=RPC_TIMEOUT,
    )
    return [entry for entry in reply.leases if entry.state == lpb.LEASE_STATE_HELD]


# 1. Three License Server replicas, one SIGKILLed under load

SEATS = 24
HOLDERS = 12  # long-lived leases that heartbeat, 4 first on each replica
CHURNERS = 18  # closed loops of acquire, hold 50-400 ms, release


@dataclass
class Holder:
    """A client holding one lease through the whole run."""

    client: LicenseClient
    home: str  # the replica first in its address
    events: list[tuple[float, LeaseEvent]] = field(default_factory=list)
    lease: Lease | None = None
    lease_id: str = ""
    epoch: int = 0
    expires_at: dt.datetime = NEVER

    def record(self, event: LeaseEvent) -> None:
        self.events.append((time.monotonic(), event))

    def resumed_after(self, moment: float) -> float | None:
        """When the lease was first resumed after ``moment``."""
        return next(
            (at for at, event in self.events if at > moment and isinstance(event, Resumed)),
            None,
        )


@dataclass
class Load:
    """What the clients hold and did; what the watcher saw."""

    in_hands: int = 0  # leases the clients believe they hold right now
    most_in_hands: int = 0
    cycles: int = 0
    denied: int = 0
    checks: int = 0
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def took(self, count: int) -> None:
        self.in_hands += count
        self.most_in_hands = max(self.most_in_hands, self.in_hands)
        if self.in_hands > SEATS:
            self.violations.append(f"clients hold {self.in_hands} leases of {SEATS} seats")


async def test_a_replica_sigkilled_under_load_its_leases_resume_elsewhere_within_a_ttl(
    tmp_path: Path, databases: DatabaseFactory, processes: Processes
) -> None:
    postgres_only(databases)
    activation_url, license_url, admin_url = await asyncio.gather(
        databases.new("activation"), databases.new("license"), databases.new("admin")
    )
    as_ports = [free_port(), free_port()]
    ls_ports = [free_port(), free_port(), free_port()]
    admin_port = free_port()
    as_dir, ls_dir = tmp_path / "activation_server", tmp_path / "license_server"
    vendor_keys = as_dir / "vendor-keys.pub"

    def replica(index: int) -> tuple[str, str, list[str], int]:
        args = license_server_args(ls_ports[index], ls_dir, license_url, vendor_keys, "site")
        return f"ls-{index}", "services.license_server", args, ls_ports[index]

    def vendor(index: int) -> tuple[str, str, list[str], int]:
        args = activation_server_args(as_ports[index], as_dir, activation_url)
        return f"as-{index}", "services.activation_server", args, as_ports[index]

    # The first replica of each kind starts alone: it creates the keys the others share.
    admin_args = administrator_args(admin_port, tmp_path / "admin", admin_url, as_ports[1])
    await start(
        processes,
        vendor(0),
        replica(0),
        ("administrator", "services.administrator", admin_args, admin_port),
    )
    await start(processes, vendor(1), replica(1), replica(2))

    # The site's seats, through the second Activation Server replica onto the second
    # License Server replica: one activation serves all three (one host identity).
    entitlement_id, activation_id = await sell(as_ports[0], SEATS)
    async with credentialed_channel(target(admin_port), OPERATOR_TOKEN) as channel:
        administrator = admin_pb2_grpc.AdministratorServiceStub(channel)
        activated = await administrator.Activate(
            admin_pb2.ActivateRequest(
                license_server=f"{ls_ports[1]}@127.0.0.1",
                activation_id=activation_id,
                count=SEATS,
            ),
            timeout=RPC_TIMEOUT,
        )
        assert activated.operation.state == admin_pb2.OPERATION_STATE_COMPLETED
    for port in as_ports:  # both vendor replicas keep the same books
        async with grpc.aio.insecure_channel(target(port)) as channel:
            order = await apb_grpc.ActivationServiceStub(channel).GetOrder(
                apb.GetOrderRequest(entitlement_id=entitlement_id), timeout=RPC_TIMEOUT
            )
            assert (order.entitlement.lines[0].activated, order.entitlement.lines[0].count) == (
                SEATS,
                SEATS,
            )

    channels = [grpc.aio.insecure_channel(target(port)) for port in ls_ports]
    leases = [lpb_grpc.LeaseServiceStub(channel) for channel in channels]
    admins = [lpb_grpc.LeaseAdminServiceStub(channel) for channel in channels]
    for stub in leases:
        assert (await station(stub)).activated == SEATS

    def address(first: int) -> str:
        """The three replicas, ``first`` first: each client lists them in its own order."""
        order = [ls_ports[(first + step) % 3] for step in range(3)]
        return ";".join(f"{port}@127.0.0.1" for port in order)

    load = Load()
    stopping = asyncio.Event()
    victim = 1
    killed_at: float | None = None

    # Held leases, then the churn, then the watcher.
    holders = [
        Holder(
            LicenseClient(address(number % 3), client_host=f"holder-{number}"),
            home=target(ls_ports[number % 3]),
        )
        for number in range(HOLDERS)
    ]

    async def hold(holder: Holder) -> None:
        lease = await holder.client.acquire(FEATURE, on_event=holder.record)
        load.took(1)
        holder.lease, holder.lease_id, holder.epoch = lease, lease.lease_id, lease.epoch
        holder.expires_at = lease.expires_at

    await asyncio.gather(*(hold(holder) for holder in holders))

    def no_loss(event: LeaseEvent) -> None:
        if isinstance(event, Lost):
            load.errors.append(f"a churned lease was lost: {event.error!r}")

    async def churn(number: int) -> None:
        rng = random.Random(number)
        async with LicenseClient(address(number % 3), client_host=f"churn-{number}") as client:
            while not stopping.is_set():
                try:
                    lease = await client.acquire(FEATURE, on_event=no_loss)
                except NoSeatAvailable:
                    load.denied += 1
                    await asyncio.sleep(rng.uniform(0.05, 0.2))
                    continue
                except Exception as error:
                    load.errors.append(f"churn-{number} acquire: {error!r}")
                    await asyncio.sleep(0.1)
                    continue
                load.took(1)
                await asyncio.sleep(rng.uniform(0.05, 0.4))
                load.in_hands -= 1
                if not await lease.release():
                    load.errors.append(f"churn-{number}: lease {lease.lease_id} not checked in")
                load.cycles += 1

    async def watch(connection: asyncpg.Connection) -> None:
        """Check the pool every 20 ms: in the database (one snapshot: the pool row and
        the held leases) and through a live replica's License Information."""
        turn = 0
        while not stopping.is_set():
            row = await connection.fetchrow(
                "SELECT p.used, p.activated, (SELECT coalesce(sum(l.count), 0) FROM leases l"
                " WHERE l.feature = p.feature AND l.released_at IS NULL) AS held"
                " FROM pools p WHERE p.feature = $1",
                FEATURE,
            )
            assert row is not None
            if not (row["used"] <= row["activated"] == SEATS and row["used"] == row["held"]):
                load.violations.append(f"database: {dict(row)}")
            turn += 1
            index = turn % 3
            if not (index == victim and killed_at is not None):
                try:
                    info = await station(leases[index])
                except grpc.aio.AioRpcError as error:
                    if not (index == victim and killed_at is not None):
                        load.errors.append(f"License Information from ls-{index}: {error!r}")
                else:
                    if not info.used <= info.activated == SEATS:
                        load.violations.append(f"ls-{index}: used {info.used} of {info.activated}")
            load.checks += 1
            await asyncio.sleep(0.02)

    watcher_db = await asyncpg.connect(plain_dsn(license_url))
    churners = [asyncio.create_task(churn(number)) for number in range(CHURNERS)]
    watcher = asyncio.create_task(watch(watcher_db))
    try:
        # Steady state: every holder's heartbeat acknowledged once, the churn going.
        await until(
            lambda: (
                all(h.lease is not None and h.lease.expires_at > h.expires_at for h in holders)
                and load.cycles >= 20
            ),
            within=6 * HEARTBEAT,
            what="every holder heartbeating and 20 churn cycles",
        )
        for holder in holders:
            assert holder.lease is not None and holder.lease.server == holder.home
        victims = [h for h in holders if h.home == target(ls_ports[victim])]
        assert len(victims) == HOLDERS // 3

        expiry_at_kill = [h.lease.expires_at for h in victims if h.lease is not None]
        cycles_before, checks_before = load.cycles, load.checks
        killed_at = time.monotonic()
        processes.kill(f"ls-{victim}")

        # Its holders resume, with the same lease, on another replica within one TTL.
        await until(
            lambda: all(h.resumed_after(killed_at) is not None for h in victims),
            within=TTL + 10,
            what="every lease of the killed replica resumed",
        )
        failover = max(h.resumed_after(killed_at) or 0.0 for h in victims) - killed_at
        checks_during = load.checks - checks_before
        survivors = {target(ls_ports[i]) for i in range(3) if i != victim}
        for holder in victims:
            lease = holder.lease
            assert lease is not None
            assert lease.lease_id == holder.lease_id and lease.held
            assert lease.server in survivors and lease.resumes >= 1
            assert lease.epoch > holder.epoch
        assert failover <= TTL, f"failover took {failover:.2f} s, more than one TTL"

        # The load goes on against the two survivors, past the moment the victims' leases
        # would have run out had nobody resumed them: heartbeats on the survivors keep
        # them, and their sweepers leave them alone.
        outlived = max(expiry_at_kill)
        await until(
            lambda: (
                load.cycles >= cycles_before + 20
                and dt.datetime.now(dt.UTC) > outlived
                and all(h.lease is not None and h.lease.expires_at > outlived for h in victims)
            ),
            within=TTL + 30,
            what="20 churn cycles after the SIGKILL and the victims' leases past their expiry",
        )
        stopping.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*churners, watcher)
    finally:
        stopping.set()
        for task in [*churners, watcher]:
            task.cancel()
        await asyncio.gather(*churners, watcher, return_exceptions=True)

    try:
        # Only the holders' leases are left: an acquire the SIGKILL cut short may have been
        # granted without the client hearing it; such a lease runs out within one TTL.
        ours = {holder.lease_id for holder in holders}
        survivor = (victim + 1) % 3
        rows: list[lpb.LeaseEntry] = []

        async def settled() -> bool:
            rows[:] = await held_leases(admins[survivor])
            return {row.lease_id for row in rows} == ours

        deadline = time.monotonic() + TTL + 10
        while not await settled():
            assert time.monotonic() < deadline, f"held leases {sorted(r.client_host for r in rows)}"
            await asyncio.sleep(0.1)

        # No seat counted twice: one held row per holder, its own lease, and every count
        # (each survivor's License Information, the pool row, the rows) says HOLDERS.
        assert sorted(row.client_host for row in rows) == sorted(
            f"holder-{number}" for number in range(HOLDERS)
        )
        for index in range(3):
            if index != victim:
                info = await station(leases[index])
                assert (info.activated, info.used) == (SEATS, HOLDERS)
        row = await watcher_db.fetchrow(
            "SELECT p.used, (SELECT count(*) FROM leases l WHERE l.feature = p.feature"
            " AND l.released_at IS NULL) AS held FROM pools p WHERE p.feature = $1",
            FEATURE,
        )
        assert row is not None and (row["used"], row["held"]) == (HOLDERS, HOLDERS)
        for holder in holders:
            assert holder.lease is not None and holder.lease.held
            assert holder.lease.lease_id == holder.lease_id
            assert not [e for _, e in holder.events if isinstance(e, Lost)]

        print(
            f"failover {failover:.2f} s for {len(victims)} leases; churn cycles {load.cycles} "
            f"({cycles_before} before the SIGKILL), denied {load.denied}; most in hands "
            f"{load.most_in_hands}/{SEATS}; pool checks {load.checks} ({checks_during} "
            "from the SIGKILL to the last resume)"
        )
        assert load.errors == []
        assert load.violations == []
        # Checked all along, also between the SIGKILL and the last resume.
        assert checks_during > 0 and load.checks >= 20

        # Checking in frees every seat, on the survivors and in the database.
        held = [holder.lease for holder in holders if holder.lease is not None]
        assert all(await asyncio.gather(*(lease.release() for lease in held)))
        for index in range(3):
            if index != victim:
                assert (await station(leases[index])).used == 0
    finally:
        await watcher_db.close()
        for holder in holders:
            await holder.client.close()
        for channel in channels:
            await channel.close()


# 2. Two Administrators, two Activation Server replicas, one entitlement line

SOLD = 12
# Per Administrator, all at once: 16 asks for 12 seats. (Kept small: each call may hold a
# database connection in each service it passes, and PostgreSQL allows 100 by default.)
CALLS = 8
REFUSED = "RESOURCE_EXHAUSTED/NOT_ENOUGH_SEATS_LEFT"


async def test_two_administrators_on_two_vendor_replicas_never_activate_more_than_sold(
    tmp_path: Path, databases: DatabaseFactory, processes: Processes
) -> None:
    postgres_only(databases)
    activation_url, *urls = await asyncio.gather(
        *(databases.new(name) for name in ("activation", "ls_a", "ls_b", "admin_a", "admin_b"))
    )
    ls_urls, admin_urls = urls[:2], urls[2:]
    as_ports = [free_port(), free_port()]
    ls_ports = [free_port(), free_port()]
    admin_ports = [free_port(), free_port()]
    as_dir = tmp_path / "activation_server"
    vendor_keys = as_dir / "vendor-keys.pub"
    sites = ("a", "b")

    def vendor(index: int) -> tuple[str, str, list[str], int]:
        args = activation_server_args(as_ports[index], as_dir, activation_url)
        return f"as-{index}", "services.activation_server", args, as_ports[index]

    # Two sites: each its own License Server (host key, machine, database) and its own
    # Administrator, which talks to its own Activation Server replica.
    site_services = []
    for index, site in enumerate(sites):
        ls_args = license_server_args(
            ls_ports[index], tmp_path / f"ls_{site}", ls_urls[index], vendor_keys, f"site-{site}"
        )
        admin_args = administrator_args(
            admin_ports[index], tmp_path / f"admin_{site}", admin_urls[index], as_ports[index]
        )
        site_services += [
            (f"ls-{site}", "services.license_server", ls_args, ls_ports[index]),
            (f"admin-{site}", "services.administrator", admin_args, admin_ports[index]),
        ]
    await start(processes, vendor(0), *site_services)
    await start(processes, vendor(1))

    entitlement_id, activation_id = await sell(as_ports[0], SOLD)
    channels = [
        *(credentialed_channel(target(port), OPERATOR_TOKEN) for port in admin_ports),
        *(credentialed_channel(target(port), ADMINISTRATOR_TOKEN) for port in ls_ports),
    ]
    try:
        administrators = [admin_pb2_grpc.AdministratorServiceStub(c) for c in channels[:2]]
        lease_stubs = [lpb_grpc.LeaseServiceStub(c) for c in channels[2:]]
        trust_stubs = [lpb_grpc.TrustedStorageServiceStub(c) for c in channels[2:]]

        async def activate_one(site: int) -> str:
            try:
                reply = await administrators[site].Activate(
                    admin_pb2.ActivateRequest(
                        license_server=f"{ls_ports[site]}@127.0.0.1",
                        activation_id=activation_id,
                        count=1,
                    ),
                    timeout=60,
                )
            except grpc.aio.AioRpcError as error:
                return f"{error.code().name}/{reason_of(error)}"
            assert reply.operation.state == admin_pb2.OPERATION_STATE_COMPLETED
            assert reply.certificate.certificate.count == 1
            return "ACTIVATED"

        outcomes = await asyncio.gather(
            *(activate_one(site) for _ in range(CALLS) for site in range(2))
        )
        by_site = [Counter(outcomes[site::2]) for site in range(2)]
        print(f"site a: {dict(by_site[0])}; site b: {dict(by_site[1])}")
        assert Counter(outcomes) == {"ACTIVATED": SOLD, REFUSED: 2 * CALLS - SOLD}
        # Neither could take everything alone (CALLS < SOLD): both vendor replicas sold.
        assert all(counts["ACTIVATED"] >= SOLD - CALLS for counts in by_site)

        # The vendor, through either replica: exactly what was sold is activated.
        for administrator in administrators:
            order = await administrator.GetOrder(
                admin_pb2.GetOrderRequest(entitlement_id=entitlement_id), timeout=RPC_TIMEOUT
            )
            [line] = order.entitlement.lines
            assert (line.count, line.activated, line.available) == (SOLD, SOLD, 0)

        # The two sites hold together what the vendor records, each what it was granted.
        seats = [(await station(stub)).activated for stub in lease_stubs]
        assert seats == [counts["ACTIVATED"] for counts in by_site]
        assert sum(seats) == SOLD
        async with grpc.aio.insecure_channel(target(as_ports[1])) as channel:
            records = (
                await apb_grpc.VendorServiceStub(channel).ListActivations(
                    apb.ListActivationsRequest(entitlement_id=entitlement_id),
                    metadata=bearer_metadata(VENDOR_TOKEN),
                    timeout=RPC_TIMEOUT,
                )
            ).activations
        assert all(r.state == apb.ACTIVATION_STATE_ACTIVE and r.count == 1 for r in records)
        per_host = Counter(record.host_id for record in records)
        for index, trust in enumerate(trust_stubs):
            health = (
                await trust.GetTrustHealth(lpb.GetTrustHealthRequest(), timeout=RPC_TIMEOUT)
            ).health
            assert health.healthy, list(health.problems)
            assert per_host[health.host_id] == seats[index]
        assert len(per_host) == 2 and sum(per_host.values()) == SOLD
    finally:
        for channel in channels:
            await channel.close()
