"""The client library against real License Servers on loopback (SQLite and PostgreSQL).

Leases heartbeat by themselves, resume the same lease after a broken stream (graceful
stop, SIGKILL of a real process), fail over to the next server of the address, check in
on exit and on cancellation, and tell revocation and expiry; the sync wrapper and the
check-in at interpreter exit work from other threads and processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from clients import (
    Backoff,
    CountAboveActivated,
    ExpiryWarning,
    FeatureNotLicensed,
    Interrupted,
    InvalidLicenseRequest,
    LeaseEvent,
    LeaseExpired,
    LeaseRevoked,
    LicenseClient,
    LicenseServerUnreachable,
    LicenseState,
    Lost,
    NoSeatAvailable,
    Queued,
    QueueTimeout,
    Released,
    Resumed,
    SyncLicenseClient,
)
from clients.lease import Lease
from clients.license import EventStream
from services.license_server import config as ls_config
from services.license_server import server as ls_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.auth import BearerCredentials, bearer_metadata
from tessera.clock import Clock
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.processes import ROOT, Processes, free_port
from tests.support.tokens import OPERATOR_TOKEN
from tests.support.trust import SigningVendor, new_activation_id

FAST = Backoff(initial=0.05, maximum=0.2)


@dataclass
class LicenseServerReplicas:
    """License Servers over one database (replicas, or one restarted), real gRPC."""

    tmp_path: Path
    database_url: str
    vendor: SigningVendor = field(default_factory=SigningVendor)
    servers: list[ls_server.LicenseServer] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def args(self, port: int = 0) -> list[str]:
        return [
            "--listen", f"127.0.0.1:{port}",
            "--data-dir", str(self.tmp_path / "license_server"),
            "--database-url", self.database_url,
            "--vendor-keys", str(self.tmp_path / "vendor-keys.pub"),
            "--machine-id", "client-test-machine",
            "--sweep-interval", "0.2",
            "--trust-check-interval", "3600",
            "--operator-token", OPERATOR_TOKEN,
        ]  # fmt: skip

    async def start(self, port: int = 0, clock: Clock | None = None) -> ls_server.LicenseServer:
        settings = ls_config.load_settings(self.args(port), environ={})
        server = await ls_server.build(settings, clock=clock)
        self.servers.append(server)
        return server

    async def stop(self, server: ls_server.LicenseServer) -> None:
        """A graceful stop, as SIGTERM does: open streams are told SERVER_SHUTTING_DOWN
        and end at once, so the grace period is never waited out. (With no grace at all,
        grpc may cancel a stream before its goodbye goes out.)"""
        self.servers.remove(server)
        await server.stop(5)

    def leases(self, port: int) -> pb_grpc.LeaseServiceAsyncStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return pb_grpc.LeaseServiceStub(channel)

    def lease_admin(self, port: int) -> pb_grpc.LeaseAdminServiceStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return pb_grpc.LeaseAdminServiceStub(channel)

    async def activate(self, port: int, count: int, feature: str = "client.station") -> None:
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=[BearerCredentials(lambda: OPERATOR_TOKEN)]
        )
        self.channels.append(channel)
        storage = pb_grpc.TrustedStorageServiceStub(channel)
        prepared = await storage.PrepareActivation(
            pb.PrepareActivationRequest(activation_id=new_activation_id(), count=count)
        )
        request = apb.HostActivationRequest.FromString(prepared.request.payload)
        await storage.InstallActivation(
            pb.InstallActivationRequest(response=self.vendor.activation(request, feature=feature))
        )

    async def used(self, port: int, feature: str = "client.station") -> int:
        reply = await self.leases(port).GetLicenseInformation(
            pb.GetLicenseInformationRequest(feature=feature)
        )
        return reply.features[0].used

    async def held_leases(self, port: int) -> list[pb.LeaseEntry]:
        reply = await self.lease_admin(port).ListLeases(
            pb.ListLeasesRequest(), metadata=bearer_metadata(OPERATOR_TOKEN)
        )
        return [entry for entry in reply.leases if entry.state == pb.LEASE_STATE_HELD]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for server in self.servers:
            await server.stop(0)


@pytest.fixture
async def license_servers(
    tmp_path: Path, databases: DatabaseFactory
) -> AsyncIterator[LicenseServerReplicas]:
    license_servers = LicenseServerReplicas(tmp_path, await databases.new("license"))
    license_servers.vendor.publish(tmp_path / "vendor-keys.pub")
    yield license_servers
    await license_servers.close()


async def started(license_servers: LicenseServerReplicas, seats: int = 2) -> int:
    server = await license_servers.start()
    await license_servers.activate(server.port, seats)
    return server.port


def client_for(address: str, **options: object) -> LicenseClient:
    return LicenseClient(
        address, client_host="ws-test", backoff=FAST, connect_timeout=1.0, **options
    )  # type: ignore[arg-type]


async def next_event(events: EventStream, *kinds: type) -> LeaseEvent:
    """The next event of one of ``kinds`` (others are skipped), within 10 s."""
    async with asyncio.timeout(10):
        async for event in events:
            if isinstance(event, kinds):
                return event
    raise AssertionError(f"the lease ended without {kinds}")


async def test_a_lease_heartbeats_by_itself_and_checks_in_on_exit(
    license_servers: LicenseServerReplicas,
) -> None:
    port = await started(license_servers)
    async with client_for(f"{port}@127.0.0.1") as client:
        async with client.lease("client.station", ttl=2) as lease:
            assert lease.server == f"127.0.0.1:{port}"
            assert lease.ttl == dt.timedelta(seconds=2)
            assert lease.heartbeat_interval <= dt.timedelta(seconds=2) / 3
            first_expiry = lease.expires_at
            # Past the TTL, with the server's sweeper freeing expired leases every 0.2 s:
            # the lease lives only by its heartbeats.
            await asyncio.sleep(2.5)
            assert lease.state is LicenseState.HELD
            assert lease.expires_at > first_expiry + dt.timedelta(seconds=0.5)
            assert await license_servers.used(port) == 1
        assert lease.state is LicenseState.RELEASED
        assert await license_servers.used(port) == 0  # checked in at once, not after the TTL


async def test_resume_after_the_server_restarts_keeps_the_same_lease(
    license_servers: LicenseServerReplicas,
) -> None:
    port = await started(license_servers)
    async with client_for(f"{port}@127.0.0.1") as client:
        async with client.lease("client.station") as lease:
            events = lease.events()
            lease_id, epoch = lease.lease_id, lease.epoch
            await license_servers.stop(
                license_servers.servers[0]
            )  # tells the stream SERVER_SHUTTING_DOWN
            interrupted = await next_event(events, Interrupted)
            assert isinstance(interrupted, Interrupted)
            assert interrupted.error is not None
            assert interrupted.error.reason == "SERVER_SHUTTING_DOWN"
            assert lease.state is LicenseState.INTERRUPTED and lease.held
            await license_servers.start(port)
            resumed = await next_event(events, Resumed)
            assert isinstance(resumed, Resumed) and resumed.epoch == epoch + 1
            assert (lease.lease_id, lease.resumes) == (lease_id, 1)
            assert await license_servers.used(port) == 1  # the same seat, not a second one
            assert [entry.lease_id for entry in await license_servers.held_leases(port)] == [
                lease_id
            ]
        assert await license_servers.used(port) == 0


async def test_failover_resumes_on_the_next_server_of_the_address(
    license_servers: LicenseServerReplicas,
) -> None:
    first, second = (
        await license_servers.start(),
        await license_servers.start(),
    )  # replicas over one database
    await license_servers.activate(first.port, 2)
    address = f"{first.port}@127.0.0.1;{second.port}@127.0.0.1"
    async with client_for(address) as client:
        async with client.lease("client.station") as lease:
            assert lease.server == f"127.0.0.1:{first.port}"
            events = lease.events()
            lease_id = lease.lease_id
            await license_servers.stop(first)
            await next_event(events, Resumed)
            assert (lease.server, lease.lease_id) == (f"127.0.0.1:{second.port}", lease_id)
            assert await license_servers.used(second.port) == 1
        assert await license_servers.used(second.port) == 0  # checked in on the second server


async def test_the_first_server_that_answers_grants(license_servers: LicenseServerReplicas) -> None:
    port = await started(license_servers)
    down = free_port()
    client = client_for(f"{down}@127.0.0.1;{port}@127.0.0.1")
    async with client, client.lease("client.station") as lease:
        assert lease.server == f"127.0.0.1:{port}"


async def test_a_cancelled_task_checks_its_lease_in(license_servers: LicenseServerReplicas) -> None:
    port = await started(license_servers)
    granted = asyncio.Event()

    async def workstation(client: LicenseClient) -> None:
        async with client.lease("client.station"):
            granted.set()
            await asyncio.Event().wait()  # runs until cancelled

    async with client_for(f"{port}@127.0.0.1") as client:
        task = asyncio.create_task(workstation(client))
        await granted.wait()
        assert await license_servers.used(port) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await license_servers.used(port) == 0  # checked in before the task ended

        # The same under a timeout, the way applications bound their work.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2), client.lease("client.station", count=2):
                await asyncio.Event().wait()
        assert await license_servers.used(port) == 0


async def test_revocation_is_pushed_to_events_and_callbacks(
    license_servers: LicenseServerReplicas,
) -> None:
    port = await started(license_servers)
    seen: list[LeaseEvent] = []
    async with client_for(f"{port}@127.0.0.1") as client:
        async with client.lease("client.station", on_event=seen.append) as lease:
            events = lease.events()
            await license_servers.lease_admin(port).RevokeLease(
                pb.RevokeLeaseRequest(lease_id=lease.lease_id, reason="maintenance"),
                metadata=bearer_metadata(OPERATOR_TOKEN),
            )
            lost = await next_event(events, Lost)
            assert isinstance(lost, Lost) and isinstance(lost.error, LeaseRevoked)
            assert lost.error.reason == "REVOKED_BY_OPERATOR"
            assert "maintenance" in lost.error.message
            assert await lease.wait_lost() is lost.error
            assert not lease.held and seen == [lost]
            with pytest.raises(LeaseRevoked):
                lease.check()
        assert seen == [lost]  # leaving the block adds nothing: there was nothing to check in


async def test_an_unreachable_server_gives_an_expiry_warning_then_expiry(
    license_servers: LicenseServerReplicas,
) -> None:
    port = await started(license_servers)
    async with client_for(f"{port}@127.0.0.1") as client:
        lease = await client.acquire("client.station", ttl=1)
        events = lease.events()
        await license_servers.stop(license_servers.servers[0])  # and it never comes back
        assert isinstance(await next_event(events, Interrupted), Interrupted)
        warning = await next_event(events, ExpiryWarning)
        assert isinstance(warning, ExpiryWarning)
        assert warning.remaining <= dt.timedelta(seconds=1) / 3
        lost = await next_event(events, Lost)
        assert isinstance(lost, Lost) and isinstance(lost.error, LeaseExpired)
        assert lost.error.reason == "LEASE_EXPIRED"
        assert await lease.release()  # nothing left to check in


async def test_a_lease_the_server_expired_is_told_as_expired(
    license_servers: LicenseServerReplicas, clock: FakeClock
) -> None:
    server = await license_servers.start(clock=clock)
    await license_servers.activate(server.port, 1)
    async with client_for(f"{server.port}@127.0.0.1") as client:
        lease = await client.acquire("client.station")
        events = lease.events()
        clock.advance(120)  # the server's clock passes the TTL: its sweeper frees the seat
        lost = await next_event(events, Lost)
        assert isinstance(lost, Lost) and isinstance(lost.error, LeaseExpired)
        assert lost.error.reason == "LEASE_EXPIRED" and lost.error.server == lease.server


async def test_queued_then_granted_when_a_seat_frees(
    license_servers: LicenseServerReplicas,
) -> None:
    port = await started(license_servers, seats=1)
    seen: list[LeaseEvent] = []
    queued = asyncio.Event()

    def on_event(event: LeaseEvent) -> None:
        seen.append(event)
        queued.set()

    async with client_for(f"{port}@127.0.0.1") as client:
        first = await client.acquire("client.station")
        waiting = asyncio.create_task(client.acquire("client.station", wait=10, on_event=on_event))
        async with asyncio.timeout(10):
            await queued.wait()
        assert seen == [Queued(position=1)]
        await first.release()
        second = await waiting
        assert second.held and second.lease_id != first.lease_id
        with pytest.raises(QueueTimeout) as timed_out:
            await client.acquire("client.station", wait=0.3)
        assert timed_out.value.reason == "QUEUE_TIMEOUT"


async def test_refusals_are_typed_with_the_servers_reason(
    license_servers: LicenseServerReplicas,
) -> None:
    port = await started(license_servers, seats=1)
    async with client_for(f"{port}@127.0.0.1") as client:
        async with client.lease("client.station"):
            with pytest.raises(NoSeatAvailable) as no_seat:
                await client.acquire("client.station")
        assert no_seat.value.reason == "NO_SEAT_AVAILABLE"
        assert no_seat.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert no_seat.value.server == f"127.0.0.1:{port}"
        assert "in use" in no_seat.value.message

        with pytest.raises(FeatureNotLicensed) as not_licensed:
            await client.acquire("client.graphiceditor")
        assert not_licensed.value.code is grpc.StatusCode.NOT_FOUND

        with pytest.raises(CountAboveActivated) as above:
            await client.acquire("client.station", count=5)
        assert above.value.reason == "COUNT_ABOVE_ACTIVATED"

        with pytest.raises(InvalidLicenseRequest) as invalid:
            await client.acquire("client.station", count=0)
        assert invalid.value.reason == "INVALID_INPUT"

    with pytest.raises(LicenseServerUnreachable) as unreachable:
        await client_for(f"{free_port()}@127.0.0.1;{free_port()}@127.0.0.1").acquire(
            "client.station"
        )
    assert len(unreachable.value.attempts) == 2


async def test_required_counts_and_license_information(
    license_servers: LicenseServerReplicas,
) -> None:
    port = await started(license_servers, seats=2)
    async with client_for(f"{port}@127.0.0.1") as client:
        await client.declare_requirement("client.station", 3)
        (station,) = await client.license_information("client.station")
        assert (station.activated, station.required, station.violation) == (2, 3, True)
        await client.declare_requirement("client.station", 0)
        (station,) = await client.license_information("client.station")
        assert not station.violation


async def test_the_sync_wrapper_from_a_thread_without_a_loop(
    license_servers: LicenseServerReplicas,
) -> None:
    port = await started(license_servers, seats=1)

    def workstation() -> tuple[str, bool, str]:
        with SyncLicenseClient(f"{port}@127.0.0.1", backoff=FAST) as client:
            with client.lease("client.station") as lease:
                assert lease.held and lease.kind == "network"
                try:
                    client.acquire("client.station")
                except NoSeatAvailable as error:
                    refusal = error.reason
                information = client.license_information()
                assert information[0].used == 1
            return refusal, lease.held, lease.state.value

    assert await asyncio.to_thread(workstation) == ("NO_SEAT_AVAILABLE", False, "released")
    assert await license_servers.used(port) == 0


async def test_the_sync_wrapper_waits_for_a_loss(license_servers: LicenseServerReplicas) -> None:
    port = await started(license_servers, seats=1)
    client = SyncLicenseClient(f"{port}@127.0.0.1", backoff=FAST)
    try:
        lease = await asyncio.to_thread(client.acquire, "client.station")
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(lease.wait_lost, 0.05)
        waiting = asyncio.create_task(asyncio.to_thread(lease.wait_lost, 10))
        assert isinstance(lease.license, Lease)
        await license_servers.lease_admin(port).RevokeLease(
            pb.RevokeLeaseRequest(lease_id=lease.license.lease_id),
            metadata=bearer_metadata(OPERATOR_TOKEN),
        )
        lost = await waiting
        assert isinstance(lost, LeaseRevoked) and lease.lost is lost
    finally:
        await asyncio.to_thread(client.close)


EXITING_CLIENT = """
import asyncio, sys
from clients import LicenseClient

async def hold():
    client = LicenseClient(sys.argv[1], client_host="exiting")
    return await client.acquire("client.station")

loop = asyncio.new_event_loop()
lease = loop.run_until_complete(hold())
print(lease.lease_id, flush=True)
# The loop is abandoned, never closed: only the atexit hook can check the lease in.
"""

SYNC_EXITING_CLIENT = """
import sys
from clients import SyncLicenseClient

client = SyncLicenseClient(sys.argv[1], client_host="exiting")
lease = client.acquire("client.station")
print(lease.license.lease_id, flush=True)
sys.exit(0)  # never closed, never released
"""


@pytest.mark.parametrize("script", [EXITING_CLIENT, SYNC_EXITING_CLIENT], ids=["loop", "sync"])
async def test_interpreter_exit_checks_in_what_was_left_held(
    license_servers: LicenseServerReplicas, script: str
) -> None:
    port = await started(license_servers)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(script), f"{port}@127.0.0.1",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().strip()  # it held a lease
    assert await license_servers.used(port) == 0  # checked in before the process ended
    assert await license_servers.held_leases(port) == []


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    yield processes
    processes.kill_all()


async def test_resume_after_sigkill_of_the_server_process(
    license_servers: LicenseServerReplicas, processes: Processes
) -> None:
    port = free_port()
    processes.start("license_server", "services.license_server", *license_servers.args(port))
    await processes.wait_serving("license_server", port)
    await license_servers.activate(port, 2)
    async with client_for(f"{port}@127.0.0.1") as client:
        async with client.lease("client.station") as lease:
            events = lease.events()
            lease_id = lease.lease_id
            processes.kill("license_server")  # no goodbye: the stream just breaks
            interrupted = await next_event(events, Interrupted)
            assert isinstance(interrupted, Interrupted)
            processes.start(
                "license_server", "services.license_server", *license_servers.args(port)
            )
            await next_event(events, Resumed)
            assert lease.lease_id == lease_id and lease.resumes == 1
            assert await license_servers.used(port) == 1
            assert [entry.lease_id for entry in await license_servers.held_leases(port)] == [
                lease_id
            ]
        assert await license_servers.used(port) == 0


async def test_release_reports_false_when_no_server_can_be_reached(
    license_servers: LicenseServerReplicas,
) -> None:
    port = await started(license_servers)
    seen: list[LeaseEvent] = []
    client = client_for(f"{port}@127.0.0.1", release_timeout=0.5)
    lease = await client.acquire("client.station", on_event=seen.append)
    await license_servers.stop(license_servers.servers[0])
    assert not await lease.release()
    assert seen[-1] == Released(checked_in=False)


class Proxy:
    """A TCP proxy on loopback between the client and a License Server, to break the
    network without the server noticing: ``cut`` closes the client's side only, ``freeze``
    stops forwarding on the connections open now (new ones are forwarded again)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.frozen: set[asyncio.StreamWriter] = set()
        self.pumps: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.links.append((writer, up_writer))
        for source, target, gate in ((reader, up_writer, writer), (up_reader, writer, writer)):
            task = asyncio.create_task(self._pump(source, target, gate))
            self.pumps.add(task)
            task.add_done_callback(self.pumps.discard)

    async def _pump(
        self, source: asyncio.StreamReader, target: asyncio.StreamWriter, gate: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await source.read(65536):
                if gate not in self.frozen:
                    target.write(data)
                    await target.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if gate not in self.frozen:
                target.close()

    def cut(self) -> None:
        for client_side, _ in self.links:
            client_side.transport.abort()  # the server's side stays open, as in a blip
        self.links.clear()

    def freeze(self) -> None:
        self.frozen.update(client_side for client_side, _ in self.links)
        self.links.clear()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.pumps):
            task.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)


@pytest.fixture
async def proxied(license_servers: LicenseServerReplicas) -> AsyncIterator[tuple[int, Proxy]]:
    port = await started(license_servers)
    proxy = Proxy(port)
    await proxy.start()
    yield port, proxy
    await proxy.close()


async def test_a_network_blip_resumes_the_same_lease_without_a_double_count(
    license_servers: LicenseServerReplicas, proxied: tuple[int, Proxy]
) -> None:
    port, proxy = proxied
    assert proxy.server is not None
    address = f"{proxy.server.sockets[0].getsockname()[1]}@127.0.0.1"
    async with client_for(address) as client:
        async with client.lease("client.station") as lease:
            events = lease.events()
            lease_id, epoch = lease.lease_id, lease.epoch
            proxy.cut()  # the client's connection drops; the server's old stream lives on
            await next_event(events, Resumed)
            assert (lease.lease_id, lease.epoch) == (lease_id, epoch + 1)
            assert await license_servers.used(port) == 1
            assert [entry.lease_id for entry in await license_servers.held_leases(port)] == [
                lease_id
            ]
        assert await license_servers.used(port) == 0


async def test_a_silent_connection_is_noticed_by_the_missing_acknowledgement(
    license_servers: LicenseServerReplicas, proxied: tuple[int, Proxy]
) -> None:
    port, proxy = proxied
    assert proxy.server is not None
    address = f"{proxy.server.sockets[0].getsockname()[1]}@127.0.0.1"
    async with client_for(address) as client:
        async with client.lease("client.station", ttl=2) as lease:
            events = lease.events()
            proxy.freeze()  # nothing passes, nothing closes: a half-open connection
            interrupted = await next_event(events, Interrupted)
            assert isinstance(interrupted, Interrupted) and interrupted.error is not None
            assert "no heartbeat acknowledgement" in interrupted.error.message
            await next_event(events, Resumed)
            assert lease.held and await license_servers.used(port) == 1
        assert await license_servers.used(port) == 0
