"""The crash suite (issue 4): SIGKILL any of the three services at any step of activate,
return and repair, restart it, run the operation again, and check it completed exactly
once with the books of the License Server and the vendor in agreement.

Every service runs as a real process (``python -m services.<name>``) on a free loopback
port with its own data directory and database. The one service under test runs with
``TESSERA_FAILPOINTS=<service>.<flow>.<step>`` and SIGKILLs itself on reaching that step
(``tessera.failpoints``); the failpoint names are per flow, so arming the service for a
return or a repair from the start leaves the activations that set the test up alone.

For each failpoint of each flow:

1. the Administrator RPC (``Activate`` / ``Return`` / ``Repair``) with a fixed operation
   id fails with ``UNAVAILABLE`` and the armed process exits with -9;
2. the dead service restarts unarmed (same data directory, same database) and the same
   RPC with the same operation id succeeds;
3. the books agree: the certificates in the License Server's trusted storage are exactly
   the vendor's ACTIVE activations held by that host (id, seats, revision); every
   entitlement line has ``activated <= count`` and ``activated`` is the sum of its ACTIVE
   activations; trusted storage is healthy and serves exactly those seats; the audit log
   is intact;
4. exactly once: one vendor decision for the operation's request (one activation record,
   one certificate, one granted / credited / repaired audit entry, one repair revision),
   and a third call answers the same and changes nothing anywhere.

``test_the_administrator_finishes_its_journal_after_a_crash`` kills the Administrator
mid-operation (once per flow, each time at another step) and, without anyone calling
again, waits (bounded) for its own resume at start to complete the operation.

Repair is tested the way it is needed: the License Server restarts on another machine id
(its host id changes, every certificate breaks with MACHINE_CHANGED) and the repair
re-binds the vendor's records to the new host.

The full matrix runs on SQLite and on PostgreSQL (each test once per backend).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
from tessera.failpoints import ENVIRONMENT_VARIABLE as FAILPOINTS
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tests.conftest import DatabaseFactory
from tests.processes import Processes, free_port

pytestmark = pytest.mark.e2e

T = TypeVar("T")

VENDOR_TOKEN = "fault-vendor-token"
VENDOR = bearer_metadata(VENDOR_TOKEN)
RPC_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0

AS, LS, ADMIN = "activation_server", "license_server", "administrator"
MODULES = {
    AS: "services.activation_server",
    LS: "services.license_server",
    ADMIN: "services.administrator",
}
ACTIVATE, RETURN, REPAIR = "activate", "return", "repair"
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
MACHINE, NEW_MACHINE = "fault-machine-a", "fault-machine-b"
STATION, ENTERPRISE = "client.station", "server.enterprise.base"
SOLD = {STATION: 5, ENTERPRISE: 1}
ACTIVE = apb.ACTIVATION_STATE_ACTIVE
# The vendor's audit action that records the one decision of each flow.
DECISION = {ACTIVATE: "activation.granted", RETURN: "return.credited", REPAIR: "repair.granted"}


@dataclass(frozen=True)
class Fault:
    flow: str
    service: str
    step: str

    @property
    def failpoint(self) -> str:
        return f"{self.service}.{self.flow}.{self.step}"


FAULTS = [
    Fault(flow, service, step)
    for flow in FLOWS
    for service in (ADMIN, AS, LS)
    for step in STEPS[service][flow]
]


# The site: three real processes


@dataclass
class Site:
    tmp_path: Path
    processes: Processes
    urls: dict[str, str]
    ports: dict[str, int] = field(default_factory=lambda: {n: free_port() for n in MODULES})
    machine_id: str = MACHINE
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def arguments(self, name: str) -> list[str]:
        arguments = [
            "--listen", f"127.0.0.1:{self.ports[name]}",
            "--data-dir", str(self.tmp_path / name),
            "--database-url", self.urls[name],
        ]  # fmt: skip
        if name == AS:
            arguments += ["--vendor-token", VENDOR_TOKEN]
        elif name == LS:
            arguments += [
                "--vendor-keys", str(self.tmp_path / AS / "vendor-keys.pub"),
                "--machine-id", self.machine_id,
            ]  # fmt: skip
        else:
            arguments += ["--activation-server", f"127.0.0.1:{self.ports[AS]}"]
        return arguments

    def launch(self, name: str, failpoint: str = "") -> None:
        self.processes.start(
            name, MODULES[name], *self.arguments(name), env={FAILPOINTS: failpoint}
        )

    async def start(self, armed: Fault | None) -> None:
        """All three; the License Server once the vendor has published its keys."""

        def failpoint(name: str) -> str:
            return armed.failpoint if armed is not None and armed.service == name else ""

        self.launch(AS, failpoint(AS))
        self.launch(ADMIN, failpoint(ADMIN))
        await self.processes.wait_serving(AS, self.ports[AS])
        self.launch(LS, failpoint(LS))
        await asyncio.gather(
            self.processes.wait_serving(LS, self.ports[LS]),
            self.processes.wait_serving(ADMIN, self.ports[ADMIN]),
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
            self.channels[name] = grpc.aio.insecure_channel(f"127.0.0.1:{self.ports[name]}")
        return self.channels[name]

    async def close(self) -> None:
        for name in list(self.channels):
            await self.forget_channel(name)

    @property
    def license_server(self) -> str:
        return f"{self.ports[LS]}@127.0.0.1"

    @property
    def vendor(self) -> apb_grpc.VendorServiceStub:
        return apb_grpc.VendorServiceStub(self.channel(AS))

    @property
    def activation(self) -> apb_grpc.ActivationServiceStub:
        return apb_grpc.ActivationServiceStub(self.channel(AS))

    @property
    def admin(self) -> adpb_grpc.AdministratorServiceStub:
        return adpb_grpc.AdministratorServiceStub(self.channel(ADMIN))

    @property
    def storage(self) -> lpb_grpc.TrustedStorageServiceStub:
        return lpb_grpc.TrustedStorageServiceStub(self.channel(LS))

    @property
    def leases(self) -> lpb_grpc.LeaseServiceStub:
        return lpb_grpc.LeaseServiceStub(self.channel(LS))

    async def host_id(self) -> str:
        identity = await self.storage.GetHostIdentity(
            lpb.GetHostIdentityRequest(), timeout=RPC_TIMEOUT
        )
        return identity.host_id


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    yield processes
    processes.kill_all()


@pytest.fixture
async def site(
    tmp_path: Path, databases: DatabaseFactory, processes: Processes
) -> AsyncIterator[Site]:
    names = list(MODULES)
    urls = await asyncio.gather(*(databases.new(name) for name in names))
    site = Site(tmp_path, processes, dict(zip(names, urls, strict=True)))
    yield site
    await site.close()


# What each flow needs before the operation under test, and the operation itself


@dataclass
class Setup:
    entitlement_id: str
    lines: dict[str, str]  # feature -> activation id
    # Certificates activated before the operation under test, by feature.
    certificates: dict[str, lpb.InstalledCertificate] = field(default_factory=dict)
    host_before: str = ""


async def create_entitlement(site: Site) -> Setup:
    created = await site.vendor.CreateEntitlement(
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
    return Setup(
        entitlement.entitlement_id, {line.feature: line.activation_id for line in entitlement.lines}
    )


async def prepare(site: Site, flow: str, fault: Fault | None) -> Setup:
    """Start the site (the service under test armed) and set the flow's stage."""
    armed_now = fault is not None and not (fault.flow == REPAIR and fault.service == LS)
    await site.start(fault if armed_now else None)
    setup = await create_entitlement(site)
    if flow == ACTIVATE:
        return setup
    # Two certificates: one to return (or repair), one that must stay as it is.
    for index, (feature, count) in enumerate(((STATION, 2), (ENTERPRISE, 1))):
        activated = await site.admin.Activate(
            adpb.ActivateRequest(
                license_server=site.license_server,
                activation_id=setup.lines[feature],
                count=count,
                operation_id=f"setup-activation-{index}",
            ),
            timeout=RPC_TIMEOUT,
        )
        assert activated.operation.state == adpb.OPERATION_STATE_COMPLETED
        setup.certificates[feature] = activated.certificate
    if flow == REPAIR:
        # The License Server moves to another machine: same host key, new host id, and
        # every certificate breaks until the vendor re-issues it.
        setup.host_before = await site.host_id()
        await site.stop(LS)
        site.machine_id = NEW_MACHINE
        armed = fault.failpoint if fault is not None and fault.service == LS else ""
        await site.restart(LS, armed)
        health = await site.storage.GetTrustHealth(lpb.GetTrustHealthRequest(), timeout=RPC_TIMEOUT)
        assert not health.health.healthy
        assert {c.cause for c in health.health.certificates} == {"MACHINE_CHANGED"}
        assert health.health.sealed_host_id == setup.host_before != await site.host_id()
    return setup


async def run(site: Site, flow: str, setup: Setup) -> Message:
    """The Administrator RPC under test, always with the same operation id."""
    if flow == ACTIVATE:
        return await site.admin.Activate(
            adpb.ActivateRequest(
                license_server=site.license_server,
                activation_id=setup.lines[STATION],
                count=2,
                operation_id=OPERATION_ID,
            ),
            timeout=RPC_TIMEOUT,
        )
    if flow == RETURN:
        return await site.admin.Return(
            adpb.ReturnRequest(
                license_server=site.license_server,
                certificate_id=setup.certificates[STATION].certificate.certificate_id,
                operation_id=OPERATION_ID,
            ),
            timeout=RPC_TIMEOUT,
        )
    return await site.admin.Repair(
        adpb.RepairRequest(license_server=site.license_server, operation_id=OPERATION_ID),
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


async def crash(site: Site, fault: Fault, setup: Setup) -> None:
    """Run the operation into the armed failpoint: the call fails, the service is dead."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await run(site, fault.flow, setup)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    await site.died(fault.service)


# The books of both sides


@dataclass
class Books:
    host_id: str
    # certificate id -> (feature, seats, revision, request id), in trusted storage ...
    held: dict[str, tuple[str, int, int, str]]
    # ... and the vendor's ACTIVE activations held by that host.
    vendor_held: dict[str, tuple[str, int, int, str]]
    activations: list[apb.Activation]
    lines: list[apb.EntitlementLine]
    activated_on_host: dict[str, int]
    health: lpb.TrustHealth
    audit: list[apb.AuditEntry]
    audit_intact: bool

    def decisions(self, action: str, request_id: str) -> list[apb.AuditEntry]:
        return [
            entry
            for entry in self.audit
            if entry.action == action
            and json.loads(entry.detail_json or "{}").get("request_id") == request_id
        ]


async def audit_log(site: Site) -> list[apb.AuditEntry]:
    entries: list[apb.AuditEntry] = []
    after = 0
    while True:
        page = await site.vendor.GetAuditLog(
            apb.GetAuditLogRequest(after_sequence=after, page_size=1000),
            metadata=VENDOR,
            timeout=RPC_TIMEOUT,
        )
        entries += page.entries
        if not page.next_after_sequence:
            return entries
        after = page.next_after_sequence


async def books(site: Site, setup: Setup) -> Books:
    """Both sides' books, the License Server's read first: it serves seats only after the
    vendor recorded them and stops serving before the vendor credits them back, so what
    it serves at one moment is still on the vendor's books a moment later."""
    host_id = await site.host_id()
    certificates = await site.storage.ListCertificates(
        lpb.ListCertificatesRequest(), timeout=RPC_TIMEOUT
    )
    information = await site.leases.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(), timeout=RPC_TIMEOUT
    )
    health = await site.storage.GetTrustHealth(lpb.GetTrustHealthRequest(), timeout=RPC_TIMEOUT)
    # When it was checked and the clock's high-water mark move on by themselves.
    health.health.ClearField("checked_at")
    health.health.ClearField("clock_high_water")
    held_by_host = await site.vendor.ListActivations(
        apb.ListActivationsRequest(host_id=host_id), metadata=VENDOR, timeout=RPC_TIMEOUT
    )
    everything = await site.vendor.ListActivations(
        apb.ListActivationsRequest(entitlement_id=setup.entitlement_id),
        metadata=VENDOR,
        timeout=RPC_TIMEOUT,
    )
    order = await site.activation.GetOrder(
        apb.GetOrderRequest(entitlement_id=setup.entitlement_id), timeout=RPC_TIMEOUT
    )
    verified = await site.vendor.VerifyAuditLog(
        apb.VerifyAuditLogRequest(), metadata=VENDOR, timeout=RPC_TIMEOUT
    )
    return Books(
        host_id=host_id,
        held={
            c.certificate.certificate_id: (
                c.certificate.feature,
                c.certificate.count,
                c.certificate.revision,
                c.certificate.request_id,
            )
            for c in certificates.certificates
        },
        vendor_held={
            a.certificate_id: (a.feature, a.count, a.revision, a.request_id)
            for a in held_by_host.activations
            if a.state == ACTIVE
        },
        activations=list(everything.activations),
        lines=list(order.entitlement.lines),
        activated_on_host={f.feature: f.activated for f in information.features},
        health=health.health,
        audit=await audit_log(site),
        audit_intact=verified.intact,
    )


async def settled_books(site: Site, setup: Setup) -> Books:
    """Books that read the same twice running. Each side is read call by call, so while
    the Administrator may still be finishing the operation on its own (its resume at
    start) one snapshot could mix states from before and after a step."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last = await books(site, setup)
    while True:
        current = await books(site, setup)
        if current == last:
            return current
        assert time.monotonic() < deadline, "the books never settled"
        last = current


def check_lines(books: Books) -> None:
    """Never more activated than sold, and a line's tally is its activations' sum."""
    for line in books.lines:
        active = sum(
            a.count
            for a in books.activations
            if a.activation_id == line.activation_id and a.state == ACTIVE
        )
        assert 0 <= line.activated <= line.count == SOLD[line.feature]
        assert line.activated == active
        assert line.available == line.count - line.activated


def check_interim(flow: str, books: Books) -> None:
    """What holds between the crash and the retry: the License Server never serves more
    seats than the vendor records for it, and seats being returned do not serve."""
    check_lines(books)
    for feature, serving in books.activated_on_host.items():
        recorded = sum(count for f, count, *_ in books.vendor_held.values() if f == feature)
        assert serving <= recorded, (feature, books)
    if flow == RETURN:
        # Every failpoint of a return comes after the License Server withheld the seats.
        assert books.activated_on_host.get(STATION, 0) == 0, books
    assert books.audit_intact


def check_books(books: Books) -> None:
    """What must hold after any crash and retry, whatever the flow."""
    # The License Server holds exactly what the vendor records for that host.
    assert books.held == books.vendor_held
    assert len(books.held) == len({request for *_, request in books.held.values()})
    for certificate_id, (*_, request_id) in books.held.items():
        assert [a.certificate_id for a in books.activations if a.request_id == request_id] == [
            certificate_id
        ]
    check_lines(books)
    # Trusted storage is healthy and serves exactly those seats.
    assert books.health.healthy, books.health
    assert not books.health.problems
    assert books.health.host_id == books.health.sealed_host_id == books.host_id
    serving: dict[str, int] = {}
    for feature, count, *_ in books.held.values():
        serving[feature] = serving.get(feature, 0) + count
    assert books.health.serving_seats == sum(serving.values())
    assert {f: n for f, n in books.activated_on_host.items() if n} == serving
    assert books.audit_intact


def check_flow(flow: str, setup: Setup, before: Books | None, after: Books, reply: Message) -> None:
    """The operation under test happened, and exactly once."""
    assert isinstance(reply, adpb.ActivateResponse | adpb.ReturnResponse | adpb.RepairResponse)
    operation = reply.operation
    assert operation.operation_id == OPERATION_ID
    assert operation.state == adpb.OPERATION_STATE_COMPLETED, operation
    request_id = operation.request_id
    assert request_id
    if flow == ACTIVATE:
        assert isinstance(reply, adpb.ActivateResponse)
        mine = [a for a in after.activations if a.request_id == request_id]
        assert len(mine) == 1, mine
        [activation] = mine
        assert (activation.state, activation.count, activation.host_id) == (
            ACTIVE,
            2,
            after.host_id,
        )
        certificate = reply.certificate.certificate
        assert certificate.certificate_id == activation.certificate_id
        assert after.held == {
            activation.certificate_id: (STATION, 2, activation.revision, request_id)
        }
        assert {line.feature: line.activated for line in after.lines} == {
            STATION: 2,
            ENTERPRISE: 0,
        }
    elif flow == RETURN:
        returned = setup.certificates[STATION].certificate
        kept = setup.certificates[ENTERPRISE].certificate
        [activation] = [a for a in after.activations if a.certificate_id == returned.certificate_id]
        assert activation.state == apb.ACTIVATION_STATE_RETURNED, activation
        assert returned.certificate_id not in after.held
        assert set(after.held) == {kept.certificate_id}
        assert {line.feature: line.activated for line in after.lines} == {
            STATION: 0,
            ENTERPRISE: 1,
        }
    else:
        assert isinstance(reply, adpb.RepairResponse)
        assert after.host_id != setup.host_before
        assert reply.health.healthy, reply.health
        # Both certificates re-issued once, for the new host, seats unchanged.
        assert after.held == {
            c.certificate.certificate_id: (
                c.certificate.feature,
                c.certificate.count,
                c.certificate.revision + 1,
                c.certificate.request_id,
            )
            for c in setup.certificates.values()
        }
        assert {line.feature: line.activated for line in after.lines} == {
            STATION: 2,
            ENTERPRISE: 1,
        }
    assert len(after.decisions(DECISION[flow], request_id)) == 1, after.audit
    if before is not None:
        # The audit log only grew by the operation's own decision (and, where a crash
        # came before the answer, nothing else was decided twice).
        assert after.audit[: len(before.audit)] == before.audit


async def check_idempotent(site: Site, flow: str, setup: Setup, reply: Message) -> None:
    """A third call answers the same and changes nothing anywhere."""
    settled = await books(site, setup)
    again = await run(site, flow, setup)
    assert again == reply
    assert await books(site, setup) == settled
    operation = await site.admin.GetOperation(
        adpb.GetOperationRequest(operation_id=OPERATION_ID), timeout=RPC_TIMEOUT
    )
    assert operation.operation.state == adpb.OPERATION_STATE_COMPLETED
    unfinished = await site.admin.ListOperations(
        adpb.ListOperationsRequest(unfinished_only=True), timeout=RPC_TIMEOUT
    )
    assert not unfinished.operations


# The tests


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.failpoint)
async def test_a_crash_at_any_step_completes_exactly_once_on_retry(
    site: Site, fault: Fault
) -> None:
    setup = await prepare(site, fault.flow, fault)
    before = await books(site, setup)

    await crash(site, fault, setup)
    # The books between crash and retry: with the Administrator dead nothing moves; a
    # dead Activation Server or License Server has to come back to be read.
    if fault.service != ADMIN:
        await site.restart(fault.service)
    check_interim(fault.flow, await settled_books(site, setup))
    if fault.service == ADMIN:
        await site.restart(fault.service)
    reply = await answered(lambda: run(site, fault.flow, setup))

    after = await books(site, setup)
    check_books(after)
    check_flow(fault.flow, setup, before, after, reply)
    await check_idempotent(site, fault.flow, setup, reply)


# One Administrator crash per flow, each at another step: the vendor decided but nothing
# was installed; seats withheld for a return the vendor has not heard of; a repair
# installed but not journaled as done.
RESUMED = [
    Fault(ACTIVATE, ADMIN, "after_vendor"),
    Fault(RETURN, ADMIN, "after_prepare"),
    Fault(REPAIR, ADMIN, "after_install"),
]


@pytest.mark.parametrize("fault", RESUMED, ids=lambda fault: fault.failpoint)
async def test_the_administrator_finishes_its_journal_after_a_crash(
    site: Site, fault: Fault
) -> None:
    setup = await prepare(site, fault.flow, fault)
    await crash(site, fault, setup)
    await site.restart(ADMIN)

    # Nobody calls Activate / Return / Repair again: the Administrator resumes its
    # unfinished operations at start by itself.
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        found = await site.admin.GetOperation(
            adpb.GetOperationRequest(operation_id=OPERATION_ID), timeout=RPC_TIMEOUT
        )
        if found.operation.state == adpb.OPERATION_STATE_COMPLETED:
            break
        assert time.monotonic() < deadline, f"not resumed: {found.operation}"
        await asyncio.sleep(0.1)

    after = await books(site, setup)
    check_books(after)
    reply = await run(site, fault.flow, setup)
    check_flow(fault.flow, setup, None, after, reply)
    await check_idempotent(site, fault.flow, setup, reply)
