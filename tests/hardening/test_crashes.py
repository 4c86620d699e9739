"""The crash suite (issue 4): SIGKILL any of the three services at any step of activate,
return, repair and move, restart it, run the operation again, and check it completed
exactly once with the books of the License Servers and the vendor in agreement.

Every service runs as a real process (``python -m services.<name>``) on a free loopback
port with its own data directory and database. The one service under test runs with
``TESSERA_FAILPOINTS=<failpoint>`` and SIGKILLs itself on reaching that step
(``tessera.server.failpoints``). It is armed from the start when the activations that set a
return, repair or move up cannot pass its failpoint, and restarted armed after them
when they can.

For each failpoint:

1. the Administrator RPC (``Activate`` / ``Return`` / ``Repair`` / ``Move``) with a fixed
   operation id fails with ``UNAVAILABLE`` and the armed process exits with -9;
2. between crash and retry, no License Server serves more seats than the vendor records
   for it, all of them together no more than the line has activated, and seats being
   returned or moved do not serve;
3. the dead service restarts unarmed (same data directory, same database) and the same
   RPC with the same operation id succeeds;
4. the books agree: each License Server's trusted storage holds exactly the vendor's
   ACTIVE activations for that host (certificate, seats, revision, request); every
   entitlement line has ``activated <= count`` and ``activated`` is the sum of its
   ACTIVE activations; trusted storage is healthy and serves exactly those seats; the
   audit log is intact;
5. exactly once: one vendor decision for the operation's request (one activation record,
   one certificate, one granted / credited / repaired audit entry, one repair revision),
   and a third call answers the same and changes nothing anywhere.

``test_the_administrator_finishes_its_journal_after_a_crash`` kills the Administrator
mid-operation (once per flow, each time at another step) and, without anyone calling
again, waits (bounded) for its own resume at start to complete the operation.

Repair is tested the way it is needed: the License Server restarts on another machine id
(its host id changes, every certificate breaks with MACHINE_CHANGED) and the repair
re-binds the vendor's records to the new host. A move goes to a second License Server.

The full matrix (18 crash points of activate, return and repair, 11 of move, and 4
journal resumes) runs on SQLite; PostgreSQL runs every activate crash point, each
service once in return, repair and move, and all 4 resumes (``ON_POSTGRES``), to keep
each backend at about two minutes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf.message import Message

from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.admin.v1 import admin_pb2 as adpb
from tessera.admin.v1 import admin_pb2_grpc as adpb_grpc
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.server.failpoints import ENVIRONMENT_VARIABLE as FAILPOINTS
from tests.support.databases import DatabaseFactory
from tests.support.processes import ROOT, Processes, credentialed_channel, free_port
from tests.support.tokens import ADMINISTRATOR_TOKEN, OPERATOR_TOKEN, VENDOR_TOKEN

pytestmark = pytest.mark.e2e

T = TypeVar("T")

VENDOR = bearer_metadata(VENDOR_TOKEN)
RPC_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0

# The processes: a vendor, an Administrator, the License Server the operations are about
# and, for a move, a second License Server the seats move to.
AS, ADMIN, LS, TARGET = "activation_server", "administrator", "license_server", "target"
MODULES = {
    AS: "services.activation_server",
    ADMIN: "services.administrator",
    LS: "services.license_server",
    TARGET: "services.license_server",
}
ACTIVATE, RETURN, REPAIR, MOVE = "activate", "return", "repair", "move"
FLOWS = (ACTIVATE, RETURN, REPAIR)

# The steps each service can die at, per flow (``failpoints.reach`` under services/).
STEPS: dict[str, dict[str, tuple[str, ...]]] = {
    ADMIN: {flow: ("after_prepare", "after_vendor", "after_install") for flow in FLOWS},
    AS: {flow: ("after_commit",) for flow in FLOWS},
    LS: {
        ACTIVATE: ("after_prepare", "after_install"),
        RETURN: ("after_prepare", "after_complete"),
        REPAIR: ("after_prepare", "after_install"),
    },
}

OPERATION_ID = "fault-operation-0001"
MACHINE, NEW_MACHINE, TARGET_MACHINE = "fault-machine-a", "fault-machine-b", "fault-machine-t"
STATION, ENTERPRISE = "client.station", "server.enterprise.base"
SOLD = {STATION: 5, ENTERPRISE: 1}
ACTIVE = apb.ACTIVATION_STATE_ACTIVE
# The vendor's audit action that records the one decision of each flow.
DECISION = {ACTIVATE: "activation.granted", RETURN: "return.credited", REPAIR: "repair.granted"}
# A move's two halves have request ids derived from the operation id.
MOVE_RETURN, MOVE_ACTIVATE = OPERATION_ID + ".return", OPERATION_ID + ".activate"


@dataclass(frozen=True)
class Fault:
    flow: str
    # The process that dies ...
    service: str
    # ... at this failpoint.
    failpoint: str

    @property
    def id(self) -> str:
        return self.failpoint if self.flow != MOVE else f"move@{self.service}:{self.failpoint}"

    @property
    def fires_during_setup(self) -> bool:
        """Whether the activations that set a return, repair or move up pass it."""
        return self.flow != ACTIVATE and self.service in (AS, LS) and ".activate." in self.failpoint


FAULTS = [
    Fault(flow, service, f"{service}.{flow}.{step}")
    for flow in FLOWS
    for service in (ADMIN, AS, LS)
    for step in STEPS[service][flow]
]

# A move is a return from the License Server and an activation on the target, with the
# Administrator's own steps in between.
MOVE_FAULTS = [
    *(
        Fault(MOVE, ADMIN, f"administrator.move.{step}")
        for step in (
            "after_prepare",
            "after_return",
            "after_target_prepare",
            "after_target_vendor",
            "after_install",
        )
    ),
    Fault(MOVE, AS, "activation_server.return.after_commit"),
    Fault(MOVE, AS, "activation_server.activate.after_commit"),
    Fault(MOVE, LS, "license_server.return.after_prepare"),
    Fault(MOVE, LS, "license_server.return.after_complete"),
    Fault(MOVE, TARGET, "license_server.activate.after_prepare"),
    Fault(MOVE, TARGET, "license_server.activate.after_install"),
]

# On PostgreSQL, to keep the suite within about two minutes per backend: every step of
# activate, and each of the three services once in return, repair and move (on SQLite:
# everything).
ON_POSTGRES = {
    *(fault.id for fault in FAULTS if fault.flow == ACTIVATE),
    "administrator.return.after_vendor",
    "activation_server.return.after_commit",
    "license_server.return.after_prepare",
    "administrator.repair.after_prepare",
    "activation_server.repair.after_commit",
    "license_server.repair.after_install",
    "move@administrator:administrator.move.after_return",
    "move@activation_server:activation_server.activate.after_commit",
    "move@target:license_server.activate.after_install",
}


def representative(process_site: ProcessSite, fault: Fault) -> None:
    if process_site.databases.kind == "postgres" and fault.id not in ON_POSTGRES:
        pytest.skip("PostgreSQL runs a representative subset of the crash matrix")


# The site: real processes


@dataclass
class ProcessSite:
    """The three services (and a second License Server) as real processes, each killed
    and restarted on its own."""

    tmp_path: Path
    processes: Processes
    databases: DatabaseFactory
    urls: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=lambda: {n: free_port() for n in MODULES})
    machine_ids: dict[str, str] = field(
        default_factory=lambda: {LS: MACHINE, TARGET: TARGET_MACHINE}
    )
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def arguments(self, name: str) -> list[str]:
        arguments = [
            "--listen", f"127.0.0.1:{self.ports[name]}",
            "--data-dir", str(self.tmp_path / name),
            "--database-url", self.urls[name],
        ]  # fmt: skip
        if name == AS:
            arguments += ["--vendor-token", VENDOR_TOKEN]
        elif name == ADMIN:
            arguments += ["--activation-server", f"127.0.0.1:{self.ports[AS]}"]
        else:
            arguments += [
                "--vendor-keys", str(self.tmp_path / AS / "vendor-keys.pub"),
                "--machine-id", self.machine_ids[name],
            ]  # fmt: skip
        return arguments

    def launch(self, name: str, failpoint: str = "") -> None:
        self.processes.start(
            name, MODULES[name], *self.arguments(name), env={FAILPOINTS: failpoint}
        )

    async def start(self, servers: list[str], armed: Fault | None) -> None:
        """The vendor, the Administrator and License Servers (these once the vendor has
        published its keys), with ``armed``'s failpoint set in its service."""

        def failpoint(name: str) -> str:
            return armed.failpoint if armed is not None and armed.service == name else ""

        names = [AS, ADMIN, *servers]
        urls = await asyncio.gather(*(self.databases.new(name) for name in names))
        self.urls.update(zip(names, urls, strict=True))
        self.launch(AS, failpoint(AS))
        self.launch(ADMIN, failpoint(ADMIN))
        await self.processes.wait_serving(AS, self.ports[AS])
        for server in servers:
            self.launch(server, failpoint(server))
        await asyncio.gather(
            *(self.processes.wait_serving(name, self.ports[name]) for name in names[1:])
        )

    async def restart(self, name: str, failpoint: str = "") -> None:
        await self.forget_channel(name)
        self.launch(name, failpoint)
        await self.processes.wait_serving(name, self.ports[name])

    async def stop(self, name: str) -> None:
        await self.forget_channel(name)
        assert await asyncio.to_thread(self.processes.stop, name) == 0, self.processes.log(name)

    async def died(self, name: str) -> None:
        """The armed process killed itself at its failpoint."""
        assert await self.processes.wait_exit(name) == -9, self.processes.log(name)
        await self.forget_channel(name)

    async def forget_channel(self, name: str) -> None:
        # A fresh channel after a restart: no reconnect back-off left over from the dead.
        channel = self.channels.pop(name, None)
        if channel is not None:
            await channel.close()

    def channel(self, name: str) -> grpc.aio.Channel:
        if name not in self.channels:
            # The Administrator admits the operator's token, License Servers the
            # Administrator's; a vendor call presents its own.
            token = OPERATOR_TOKEN if name == ADMIN else ADMINISTRATOR_TOKEN
            self.channels[name] = credentialed_channel(f"127.0.0.1:{self.ports[name]}", token)
        return self.channels[name]

    async def close(self) -> None:
        for name in list(self.channels):
            await self.forget_channel(name)

    def address(self, server: str = LS) -> str:
        """The License Server's address as the Administrator takes it."""
        return f"{self.ports[server]}@127.0.0.1"

    @property
    def vendor(self) -> apb_grpc.VendorServiceStub:
        return apb_grpc.VendorServiceStub(self.channel(AS))

    @property
    def activation(self) -> apb_grpc.ActivationServiceStub:
        return apb_grpc.ActivationServiceStub(self.channel(AS))

    @property
    def admin(self) -> adpb_grpc.AdministratorServiceStub:
        return adpb_grpc.AdministratorServiceStub(self.channel(ADMIN))

    def storage(self, server: str = LS) -> lpb_grpc.TrustedStorageServiceStub:
        return lpb_grpc.TrustedStorageServiceStub(self.channel(server))

    def leases(self, server: str = LS) -> lpb_grpc.LeaseServiceStub:
        return lpb_grpc.LeaseServiceStub(self.channel(server))

    async def host_id(self, server: str = LS) -> str:
        identity = await self.storage(server).GetHostIdentity(
            lpb.GetHostIdentityRequest(), timeout=RPC_TIMEOUT
        )
        return identity.host_id


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    yield processes
    processes.kill_all()


@pytest.fixture
async def process_site(
    tmp_path: Path, databases: DatabaseFactory, processes: Processes
) -> AsyncIterator[ProcessSite]:
    process_site = ProcessSite(tmp_path, processes, databases)
    yield process_site
    await process_site.close()


# What each flow needs before the operation under test, and the operation itself


@dataclass
class Setup:
    flow: str
    entitlement_id: str
    lines: dict[str, str]  # feature -> activation id
    # The License Servers in play.
    servers: list[str]
    # Certificates activated before the operation under test, by feature.
    certificates: dict[str, lpb.InstalledCertificate] = field(default_factory=dict)
    host_before: str = ""

    def certificate_id(self, feature: str) -> str:
        return self.certificates[feature].certificate.certificate_id


async def create_entitlement(process_site: ProcessSite, flow: str, servers: list[str]) -> Setup:
    created = await process_site.vendor.CreateEntitlement(
        apb.CreateEntitlementRequest(
            customer_organization="Fault Tower",
            contact="bms@fault.example",
            lines=[
                apb.NewEntitlementLine(
                    feature=feature, count=count, kind=LicenseKind.LICENSE_KIND_NETWORK
                )
                for feature, count in SOLD.items()
            ],
        ),
        metadata=VENDOR,
        timeout=RPC_TIMEOUT,
    )
    entitlement = created.entitlement
    lines = {line.feature: line.activation_id for line in entitlement.lines}
    return Setup(flow, entitlement.entitlement_id, lines, servers)


async def prepare(process_site: ProcessSite, fault: Fault) -> Setup:
    """Start the site with the service under test armed (after the setup's activations
    when they would pass its failpoint) and set the flow's stage."""
    servers = [LS, TARGET] if fault.flow == MOVE else [LS]
    await process_site.start(servers, None if fault.fires_during_setup else fault)
    setup = await create_entitlement(process_site, fault.flow, servers)
    if fault.flow == ACTIVATE:
        return setup
    # Two certificates: one to return, repair or move, one that must stay as it is.
    for index, (feature, count) in enumerate(((STATION, 2), (ENTERPRISE, 1))):
        activated = await process_site.admin.Activate(
            adpb.ActivateRequest(
                license_server=process_site.address(),
                activation_id=setup.lines[feature],
                count=count,
                operation_id=f"setup-activation-{index}",
            ),
            timeout=RPC_TIMEOUT,
        )
        assert activated.operation.state == adpb.OPERATION_STATE_COMPLETED
        setup.certificates[feature] = activated.certificate
    if fault.fires_during_setup:
        await process_site.stop(fault.service)
        await process_site.restart(fault.service, fault.failpoint)
    if fault.flow == REPAIR:
        # The License Server moves to another machine: same host key, new host id, and
        # every certificate breaks until the vendor re-issues it.
        setup.host_before = await process_site.host_id()
        await process_site.stop(LS)
        process_site.machine_ids[LS] = NEW_MACHINE
        await process_site.restart(LS, fault.failpoint if fault.service == LS else "")
        health = await process_site.storage().GetTrustHealth(
            lpb.GetTrustHealthRequest(), timeout=RPC_TIMEOUT
        )
        assert not health.health.healthy
        assert {c.cause for c in health.health.certificates} == {"MACHINE_CHANGED"}
        assert health.health.sealed_host_id == setup.host_before != await process_site.host_id()
    return setup


async def run(process_site: ProcessSite, setup: Setup) -> Message:
    """The Administrator RPC under test, always with the same operation id."""
    if setup.flow == ACTIVATE:
        return await process_site.admin.Activate(
            adpb.ActivateRequest(
                license_server=process_site.address(),
                activation_id=setup.lines[STATION],
                count=2,
                operation_id=OPERATION_ID,
            ),
            timeout=RPC_TIMEOUT,
        )
    if setup.flow == RETURN:
        return await process_site.admin.Return(
            adpb.ReturnRequest(
                license_server=process_site.address(),
                certificate_id=setup.certificate_id(STATION),
                operation_id=OPERATION_ID,
            ),
            timeout=RPC_TIMEOUT,
        )
    if setup.flow == MOVE:
        return await process_site.admin.Move(
            adpb.MoveRequest(
                from_license_server=process_site.address(),
                to_license_server=process_site.address(TARGET),
                certificate_id=setup.certificate_id(STATION),
                operation_id=OPERATION_ID,
            ),
            timeout=RPC_TIMEOUT,
        )
    return await process_site.admin.Repair(
        adpb.RepairRequest(license_server=process_site.address(), operation_id=OPERATION_ID),
        timeout=RPC_TIMEOUT,
    )


async def answered(call: Callable[[], Awaitable[T]]) -> T:
    """The call's answer, asked again while a peer the Administrator holds a channel to
    is still coming back (UNAVAILABLE), within a deadline."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def crash(process_site: ProcessSite, fault: Fault, setup: Setup) -> None:
    """Run the operation into the armed failpoint: the call fails, the service is dead."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await run(process_site, setup)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    await process_site.died(fault.service)


# The books of both sides


Held = dict[str, tuple[str, int, int, str]]


@dataclass
class Host:
    """One License Server's books, and the vendor's for that host."""

    host_id: str
    # certificate id -> (feature, seats, revision, request id), in trusted storage ...
    held: Held
    # ... and the vendor's ACTIVE activations held by that host.
    vendor_held: Held
    # Seats that serve, per feature (License Information's Activated).
    serving: dict[str, int]
    health: lpb.TrustHealth


@dataclass
class Books:
    hosts: dict[str, Host]  # by License Server
    activations: list[apb.Activation]
    lines: list[apb.EntitlementLine]
    audit: list[apb.AuditEntry]
    audit_intact: bool

    def decisions(self, action: str, request_id: str) -> list[apb.AuditEntry]:
        return [
            entry
            for entry in self.audit
            if entry.action == action
            and json.loads(entry.detail_json or "{}").get("request_id") == request_id
        ]

    def activated(self) -> dict[str, int]:
        return {line.feature: line.activated for line in self.lines}


async def audit_log(process_site: ProcessSite) -> list[apb.AuditEntry]:
    entries: list[apb.AuditEntry] = []
    after = 0
    while True:
        page = await process_site.vendor.GetAuditLog(
            apb.GetAuditLogRequest(after_sequence=after, page_size=1000),
            metadata=VENDOR,
            timeout=RPC_TIMEOUT,
        )
        entries += page.entries
        if not page.next_after_sequence:
            return entries
        after = page.next_after_sequence


def held_in(certificates: Iterable[lpb.InstalledCertificate]) -> Held:
    return {
        c.certificate.certificate_id: (
            c.certificate.feature,
            c.certificate.count,
            c.certificate.revision,
            c.certificate.request_id,
        )
        for c in certificates
    }


async def books(process_site: ProcessSite, setup: Setup) -> Books:
    """Both sides' books, the License Servers' read first: they serve seats only after the
    vendor recorded them and stop serving before the vendor credits them back, so what
    serves at one moment is still on the vendor's books a moment later."""
    servers: dict[str, tuple[str, Held, dict[str, int], lpb.TrustHealth]] = {}
    for server in setup.servers:
        host_id = await process_site.host_id(server)
        storage = process_site.storage(server)
        certificates = await storage.ListCertificates(
            lpb.ListCertificatesRequest(), timeout=RPC_TIMEOUT
        )
        information = await process_site.leases(server).GetLicenseInformation(
            lpb.GetLicenseInformationRequest(), timeout=RPC_TIMEOUT
        )
        health = await storage.GetTrustHealth(lpb.GetTrustHealthRequest(), timeout=RPC_TIMEOUT)
        # When it was checked and the clock's high-water mark move on by themselves.
        health.health.ClearField("checked_at")
        health.health.ClearField("clock_high_water")
        serving = {f.feature: f.activated for f in information.features if f.activated}
        servers[server] = (host_id, held_in(certificates.certificates), serving, health.health)
    hosts = {}
    for server, (host_id, held, serving, health) in servers.items():
        vendor_held = await process_site.vendor.ListActivations(
            apb.ListActivationsRequest(host_id=host_id), metadata=VENDOR, timeout=RPC_TIMEOUT
        )
        hosts[server] = Host(
            host_id,
            held,
            {
                a.certificate_id: (a.feature, a.count, a.revision, a.request_id)
                for a in vendor_held.activations
                if a.state == ACTIVE
            },
            serving,
            health,
        )
    everything = await process_site.vendor.ListActivations(
        apb.ListActivationsRequest(entitlement_id=setup.entitlement_id),
        metadata=VENDOR,
        timeout=RPC_TIMEOUT,
    )
    order = await process_site.activation.GetOrder(
        apb.GetOrderRequest(entitlement_id=setup.entitlement_id), timeout=RPC_TIMEOUT
    )
    verified = await process_site.vendor.VerifyAuditLog(
        apb.VerifyAuditLogRequest(), metadata=VENDOR, timeout=RPC_TIMEOUT
    )
    return Books(
        hosts=hosts,
        activations=list(everything.activations),
        lines=list(order.entitlement.lines),
        audit=await audit_log(process_site),
        audit_intact=verified.intact,
    )


async def settled_books(process_site: ProcessSite, setup: Setup) -> Books:
    """Books that read the same twice running. Each side is read call by call, so while
    the Administrator may still be finishing the operation on its own (its resume at
    start) one snapshot could mix states from before and after a step."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last = await books(process_site, setup)
    while True:
        current = await books(process_site, setup)
        if current == last:
            return current
        assert time.monotonic() < deadline, "the books never settled"
        last = current


def check_lines(books: Books) -> None:
    """Never more activated than sold, a line's tally is its activations' sum, and all
    License Servers together serve no more than that."""
    for line in books.lines:
        active = sum(
            a.count
            for a in books.activations
            if a.activation_id == line.activation_id and a.state == ACTIVE
        )
        assert 0 <= line.activated <= line.count == SOLD[line.feature]
        assert line.activated == active
        assert line.available == line.count - line.activated
        serving = sum(host.serving.get(line.feature, 0) for host in books.hosts.values())
        assert serving <= line.activated, (line, books)
    assert books.audit_intact


def check_interim(books: Books, fault: Fault) -> None:
    """What holds between the crash and the retry: no License Server serves more seats
    than the vendor records for it, and seats being returned (or moved) do not serve."""
    check_lines(books)
    for host in books.hosts.values():
        for feature, serving in host.serving.items():
            recorded = sum(n for f, n, *_ in host.vendor_held.values() if f == feature)
            assert serving <= recorded, (feature, books)
    if fault.flow in (RETURN, MOVE):
        # Every failpoint of a return or move comes after the License Server withheld
        # the seats.
        assert STATION not in books.hosts[LS].serving, books


def check_books(books: Books) -> None:
    """What must hold after any crash and retry, whatever the flow."""
    check_lines(books)
    for host in books.hosts.values():
        # The License Server holds exactly what the vendor records for that host ...
        assert host.held == host.vendor_held
        for certificate_id, (*_, request_id) in host.held.items():
            assert [a.certificate_id for a in books.activations if a.request_id == request_id] == [
                certificate_id
            ]
        # ... its trusted storage is healthy and serves exactly those seats.
        assert host.health.healthy, host.health
        assert not host.health.problems
        assert host.health.host_id == host.health.sealed_host_id == host.host_id
        serving: dict[str, int] = {}
        for feature, count, *_ in host.held.values():
            serving[feature] = serving.get(feature, 0) + count
        assert host.serving == serving
        assert host.health.serving_seats == sum(serving.values())


def only(activations: Iterable[apb.Activation], request_id: str) -> apb.Activation:
    """The one activation the vendor granted for ``request_id``."""
    granted = [a for a in activations if a.request_id == request_id]
    assert len(granted) == 1, granted
    return granted[0]


def check_flow(setup: Setup, before: Books | None, after: Books, reply: Message) -> None:
    """The operation under test happened, and exactly once."""
    assert isinstance(
        reply,
        adpb.ActivateResponse | adpb.ReturnResponse | adpb.RepairResponse | adpb.MoveResponse,
    )
    operation = reply.operation
    assert operation.operation_id == OPERATION_ID
    assert operation.state == adpb.OPERATION_STATE_COMPLETED, operation
    request_id = operation.request_id
    here = after.hosts[LS]
    if setup.flow == ACTIVATE:
        assert isinstance(reply, adpb.ActivateResponse)
        activation = only(after.activations, request_id)
        assert (activation.state, activation.count, activation.host_id) == (
            ACTIVE,
            2,
            here.host_id,
        )
        assert reply.certificate.certificate.certificate_id == activation.certificate_id
        assert here.held == {
            activation.certificate_id: (STATION, 2, activation.revision, request_id)
        }
        assert after.activated() == {STATION: 2, ENTERPRISE: 0}
    elif setup.flow in (RETURN, MOVE):
        returned = setup.certificate_id(STATION)
        [activation] = [a for a in after.activations if a.certificate_id == returned]
        assert activation.state == apb.ACTIVATION_STATE_RETURNED, activation
        assert set(here.held) == {setup.certificate_id(ENTERPRISE)}
        if setup.flow == RETURN:
            assert after.activated() == {STATION: 0, ENTERPRISE: 1}
        else:
            assert isinstance(reply, adpb.MoveResponse)
            assert (operation.request_id, operation.certificate_id) == (MOVE_RETURN, returned)
            assert len(after.decisions(DECISION[ACTIVATE], MOVE_ACTIVATE)) == 1, after.audit
            moved = only(after.activations, MOVE_ACTIVATE)
            target = after.hosts[TARGET]
            assert (moved.state, moved.count, moved.host_id) == (ACTIVE, 2, target.host_id)
            assert reply.certificate.certificate.certificate_id == moved.certificate_id
            assert target.held == {
                moved.certificate_id: (STATION, 2, moved.revision, MOVE_ACTIVATE)
            }
            assert after.activated() == {STATION: 2, ENTERPRISE: 1}
    else:
        assert isinstance(reply, adpb.RepairResponse)
        assert here.host_id != setup.host_before
        assert reply.health.healthy, reply.health
        # Both certificates re-issued once, for the new host, seats unchanged.
        assert here.held == {
            c.certificate.certificate_id: (
                c.certificate.feature,
                c.certificate.count,
                c.certificate.revision + 1,
                c.certificate.request_id,
            )
            for c in setup.certificates.values()
        }
        assert after.activated() == {STATION: 2, ENTERPRISE: 1}
    decision = DECISION[RETURN if setup.flow == MOVE else setup.flow]
    assert len(after.decisions(decision, request_id)) == 1, after.audit
    if before is not None:
        # The audit log only grew.
        assert after.audit[: len(before.audit)] == before.audit


async def check_idempotent(process_site: ProcessSite, setup: Setup, reply: Message) -> None:
    """A third call answers the same and changes nothing anywhere."""
    settled = await books(process_site, setup)
    again = await run(process_site, setup)
    assert again == reply
    assert await books(process_site, setup) == settled
    operation = await process_site.admin.GetOperation(
        adpb.GetOperationRequest(operation_id=OPERATION_ID), timeout=RPC_TIMEOUT
    )
    assert operation.operation.state == adpb.OPERATION_STATE_COMPLETED
    unfinished = await process_site.admin.ListOperations(
        adpb.ListOperationsRequest(unfinished_only=True), timeout=RPC_TIMEOUT
    )
    assert not unfinished.operations


# The tests


def test_the_matrix_covers_every_failpoint_of_the_services() -> None:
    """A failpoint added to a service, or renamed, fails here until the matrix has it."""
    sources = {
        path.relative_to(ROOT).as_posix(): path.read_text()
        for path in (ROOT / "services").rglob("*.py")
    }
    # Reached by name, or (the vendor's decisions) handed by name to decide_once.
    failpoint = r'failpoints\.reach\("([^"]+)"\)|"((?:activation|license)_server\.\w+\.after_\w+)"'
    named = {
        reached or decided
        for text in sources.values()
        for reached, decided in re.findall(failpoint, text)
    }
    covered = {fault.failpoint for fault in FAULTS + MOVE_FAULTS if fault.service != ADMIN}
    # Check-in changes no seat count at the vendor; its own crash test covers these
    # (tests/hardening/test_check_in_crashes.py).
    covered |= {"license_server.check_in.after_prepare", "license_server.check_in.after_install"}
    assert named == covered

    def steps(path: str) -> set[str]:
        return set(re.findall(r'\breach\(operation, "([^"]+)"\)', sources[path]))

    exchange = steps("services/administrator/domain/exchange.py")
    assert exchange == set(STEPS[ADMIN][ACTIVATE])
    administrator = {fault.failpoint for fault in FAULTS + MOVE_FAULTS if fault.service == ADMIN}
    assert administrator == {
        *(f"administrator.{flow}.{step}" for flow in FLOWS for step in exchange),
        *(f"administrator.move.{step}" for step in steps("services/administrator/domain/moves.py")),
    }


@pytest.mark.parametrize("fault", FAULTS + MOVE_FAULTS, ids=lambda fault: fault.id)
async def test_a_crash_at_any_step_completes_exactly_once_on_retry(
    process_site: ProcessSite, fault: Fault
) -> None:
    representative(process_site, fault)
    setup = await prepare(process_site, fault)
    before = await books(process_site, setup)

    await crash(process_site, fault, setup)
    # The books between crash and retry: with the Administrator dead nothing moves; a
    # dead Activation Server or License Server has to come back to be read.
    if fault.service != ADMIN:
        await process_site.restart(fault.service)
    check_interim(await settled_books(process_site, setup), fault)
    if fault.service == ADMIN:
        await process_site.restart(fault.service)
    reply = await answered(lambda: run(process_site, setup))

    after = await books(process_site, setup)
    check_books(after)
    check_flow(setup, before, after, reply)
    await check_idempotent(process_site, setup, reply)


# One Administrator crash per flow, each at another step: the vendor decided but nothing
# was installed; seats withheld for a return the vendor has not heard of; a repair
# installed but not journaled as done; a move half way, returned but not yet activated.
RESUMED = [
    Fault(ACTIVATE, ADMIN, "administrator.activate.after_vendor"),
    Fault(RETURN, ADMIN, "administrator.return.after_prepare"),
    Fault(REPAIR, ADMIN, "administrator.repair.after_install"),
    Fault(MOVE, ADMIN, "administrator.move.after_target_prepare"),
]


@pytest.mark.parametrize("fault", RESUMED, ids=lambda fault: fault.id)
async def test_the_administrator_finishes_its_journal_after_a_crash(
    process_site: ProcessSite, fault: Fault
) -> None:
    setup = await prepare(process_site, fault)
    await crash(process_site, fault, setup)
    await process_site.restart(ADMIN)

    # Nobody calls Activate / Return / Repair / Move again: the Administrator resumes its
    # unfinished operations at start by itself.
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        found = await process_site.admin.GetOperation(
            adpb.GetOperationRequest(operation_id=OPERATION_ID), timeout=RPC_TIMEOUT
        )
        if found.operation.state == adpb.OPERATION_STATE_COMPLETED:
            break
        assert time.monotonic() < deadline, f"not resumed: {found.operation}"
        await asyncio.sleep(0.1)

    after = await books(process_site, setup)
    check_books(after)
    reply = await run(process_site, setup)
    check_flow(setup, None, after, reply)
    await check_idempotent(process_site, setup, reply)
