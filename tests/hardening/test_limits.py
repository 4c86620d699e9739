"""Limits: each exceeded limit is refused with its status and reason, changes nothing,
leaves other clients (another host, another order) served at the same time, and the
service healthy after.

The License Server listens on ``localhost``, i.e. on 127.0.0.1 and ::1 at once: a client
dialling 127.0.0.1 and one dialling ::1 come from two different addresses, which is what
the per-host limits key on (the connection's address, not the ``client_host`` a request
names). Rates are refused by a bucket that refills slower than the test runs, so nothing
waits for time to pass; idle streams and call deadlines use short real limits and the
tests await the refusal itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.activation_server import config as as_config
from services.license_server import config as ls_config
from services.license_server import server as ls_server
from services.license_server.domain.admission import ClientLimits
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.auth import bearer_metadata
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import error_info, reason_of, retry_delay, rich_status
from tessera.server.limits import StreamCounter, TokenBuckets, peer_host
from tessera_cli.failures import HINTS, Service, Situation, explain
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory, plain_dsn
from tests.support.in_process_site import Site, restart_activation_server, start_site
from tests.support.tokens import VENDOR_TOKEN
from tests.support.vendor import Host, activate, expect, give_back, start_vendor

Code = grpc.StatusCode
Stream = grpc.aio.StreamStreamCall[lpb.LeaseRequest, lpb.LeaseResponse]
SQLITE = pytest.mark.parametrize("databases", ["sqlite"], indirect=True)
POSTGRES = pytest.mark.parametrize(
    "databases", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_two_hosts = pytest.mark.skipif(
    not ipv6_loopback(), reason="needs IPv6 loopback (::1) as a second client address"
)


@pytest.fixture
async def activated_site(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock
) -> AsyncIterator[Site]:
    activated_site = await start_site(tmp_path, databases, license_clock=clock)
    entitlement = await activated_site.create_entitlement([("client.station", 10)])
    await activated_site.administrator.Activate(
        admin_pb2.ActivateRequest(
            license_server=activated_site.license_address,
            activation_id=entitlement.lines[0].activation_id,
            count=10,
        )
    )
    yield activated_site
    await activated_site.close()


async def limit_license_server(
    activated_site: Site,
    limits: ClientLimits,
    max_message_bytes: int = 0,
    max_call_seconds: float = 0,
) -> None:
    """Restart the site's License Server with ``limits``, listening on localhost
    (127.0.0.1 and ::1) so that two client addresses can reach it."""
    settings = activated_site.license_settings
    common = replace(settings.common, listen="localhost:0", max_call_seconds=max_call_seconds)
    if max_message_bytes:
        common = replace(common, max_message_bytes=max_message_bytes)
    await activated_site.license.stop(0)
    activated_site.license_settings = replace(settings, common=common, client_limits=limits)
    activated_site.license = await ls_server.build(
        activated_site.license_settings, clock=activated_site.license_clock
    )


def leases_from(activated_site: Site, address: str) -> lpb_grpc.LeaseServiceStub:
    """A LeaseService stub whose connection comes from ``address`` (127.0.0.1 or ::1)."""
    host = f"[{address}]" if ":" in address else address
    channel = grpc.aio.insecure_channel(f"{host}:{activated_site.license.port}")
    activated_site.channels.append(channel)
    return lpb_grpc.LeaseServiceStub(channel)


def acquire(host: str = "ws") -> lpb.LeaseAcquire:
    return lpb.LeaseAcquire(feature="client.station", count=1, client_host=host, user="op")


async def hold(leases: lpb_grpc.LeaseServiceStub) -> tuple[Stream, lpb.LeaseGranted]:
    stream = leases.Lease()
    await stream.write(lpb.LeaseRequest(acquire=acquire()))
    response = await stream.read()
    assert isinstance(response, lpb.LeaseResponse) and response.HasField("granted"), response
    return stream, response.granted


async def refused(stream: Stream) -> grpc.aio.AioRpcError:
    """Read ``stream`` to its end; it must end with an error status."""
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while await stream.read() is not grpc.aio.EOF:
            pass
    return ended.value


async def used(activated_site: Site) -> int:
    reply = await leases_from(activated_site, "127.0.0.1").GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature="client.station")
    )
    return reply.features[0].used


async def serving(activated_site: Site) -> bool:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{activated_site.license.port}")
    activated_site.channels.append(channel)
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


# Message size


@SQLITE
async def test_an_oversized_request_is_refused_and_the_server_stays_healthy(
    activated_site: Site,
) -> None:
    await limit_license_server(activated_site, ClientLimits(), max_message_bytes=64 * 1024)
    leases = leases_from(activated_site, "127.0.0.1")
    oversized = acquire()
    oversized.display_name = "x" * (100 * 1024)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await leases.Checkout(lpb.CheckoutRequest(acquire=oversized))
    assert caught.value.code() is Code.RESOURCE_EXHAUSTED
    assert "larger than max" in (caught.value.details() or "")
    stream = leases.Lease()
    await stream.write(lpb.LeaseRequest(acquire=oversized))
    assert (await refused(stream)).code() is Code.RESOURCE_EXHAUSTED

    assert await used(activated_site) == 0
    assert await serving(activated_site)
    await leases.Checkout(lpb.CheckoutRequest(acquire=acquire()))
    assert await used(activated_site) == 1


def test_message_size_defaults_per_service_and_the_flag() -> None:
    assert ls_config.load_settings([], environ={}).common.max_message_bytes == 1024 * 1024
    assert as_config.load_settings([], environ={}).common.max_message_bytes == 4 * 1024 * 1024
    settings = ls_config.load_settings([], environ={"TESSERA_LS_MAX_MESSAGE_BYTES": "65536"})
    assert settings.common.max_message_bytes == 65536
    with pytest.raises(SystemExit):
        ls_config.load_settings(["--max-message-bytes", "12"], environ={})


# Lease streams per client host


@SQLITE
@needs_two_hosts
async def test_lease_streams_per_host_are_limited_and_other_hosts_are_not(
    activated_site: Site,
) -> None:
    await limit_license_server(activated_site, ClientLimits(max_streams_per_host=2))
    here, there = leases_from(activated_site, "127.0.0.1"), leases_from(activated_site, "::1")
    first, _ = await hold(here)
    second, _ = await hold(here)

    error = await refused(here.Lease())
    assert (error.code(), reason_of(error)) == (Code.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
    info = error_info(error)
    assert info is not None and info.metadata["client_address"] == "127.0.0.1"
    # Another host is served at the same time; the refused stream took no seat.
    elsewhere, _ = await hold(there)
    assert await used(activated_site) == 3

    # A stream that ends gives its host's place back.
    await first.write(lpb.LeaseRequest(release=lpb.LeaseRelease()))
    assert (await first.read()).HasField("released")
    assert await first.code() is Code.OK
    again, _ = await hold(here)
    assert await used(activated_site) == 3
    assert await serving(activated_site)
    for stream in (second, elsewhere, again):
        stream.cancel()


# Acquire rate per client host


@SQLITE
@needs_two_hosts
async def test_acquires_per_host_are_rate_limited_resumes_and_other_hosts_are_not(
    activated_site: Site,
) -> None:
    # Two acquires at once, then one every 1000 s: the third is refused within the test.
    await limit_license_server(activated_site, ClientLimits(acquire_rate=0.001, acquire_burst=2))
    here, there = leases_from(activated_site, "127.0.0.1"), leases_from(activated_site, "::1")
    held = (await here.Checkout(lpb.CheckoutRequest(acquire=acquire()))).granted
    stream, _ = await hold(here)

    error = await expect(
        here.Checkout(lpb.CheckoutRequest(acquire=acquire("another-name"))),
        Code.RESOURCE_EXHAUSTED,
        "ACQUIRE_RATE_EXCEEDED",
    )
    delay = retry_delay(error)
    assert delay is not None and 900 < delay <= 1000
    info = error_info(error)
    assert info is not None and float(info.metadata["retry_after_seconds"]) == pytest.approx(
        delay, abs=0.01
    )
    on_stream = here.Lease()
    await on_stream.write(lpb.LeaseRequest(acquire=acquire()))
    denied = await on_stream.read()
    assert isinstance(denied, lpb.LeaseResponse)
    assert denied.denied.reason == "ACQUIRE_RATE_EXCEEDED"
    error = await refused(on_stream)
    assert (error.code(), reason_of(error)) == (Code.RESOURCE_EXHAUSTED, "ACQUIRE_RATE_EXCEEDED")
    assert retry_delay(error) is not None
    assert await used(activated_site) == 2

    # Another host is served; this host's resumes and heartbeats are never rate-limited.
    await there.Checkout(lpb.CheckoutRequest(acquire=acquire()))
    resumed = here.Lease()
    await resumed.write(
        lpb.LeaseRequest(
            resume=lpb.LeaseResume(lease_id=held.lease_id, lease_secret=held.lease_secret)
        )
    )
    answer = await resumed.read()
    assert isinstance(answer, lpb.LeaseResponse) and answer.granted.resumed
    await here.Heartbeat(
        lpb.HeartbeatRequest(lease_id=held.lease_id, lease_secret=held.lease_secret)
    )
    assert await used(activated_site) == 3
    assert await serving(activated_site)
    for open_stream in (stream, resumed):
        open_stream.cancel()


def test_a_token_bucket_refills_at_its_rate_and_forgets_idle_clients() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, monotonic=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # another client has its own bucket
    now[0] += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] += TokenBuckets.PRUNE_SECONDS
    buckets.take("c")
    assert len(buckets) == 1  # a and b had refilled: forgotten
    assert TokenBuckets(rate=0, burst=1).take("a") == 0.0  # rate 0: no limit


def test_streams_are_counted_per_client_and_given_back() -> None:
    streams = StreamCounter(2)
    assert streams.try_open("a") and streams.try_open("a") and not streams.try_open("a")
    assert streams.try_open("b")
    streams.close("a")
    assert streams.try_open("a")
    assert StreamCounter(0).try_open("a")  # 0: no limit


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:50412", "10.0.0.7"),
        ("ipv4:10.0.0.7", "10.0.0.7"),
        ("ipv6:%5B::1%5D:50412", "::1"),
        ("ipv6:[fe80::1%25eth0]:50412", "fe80::1"),
        ("ipv6:%5B::ffff:10.0.0.7%5D:1", "10.0.0.7"),
        ("unix:/run/tessera.sock", "local"),
    ],
)
def test_a_client_is_its_connection_address(peer: str, host: str) -> None:
    assert peer_host(peer) == host


# Idle lease streams


@SQLITE
async def test_an_idle_lease_stream_is_closed_and_a_holding_one_is_not(
    activated_site: Site,
) -> None:
    await limit_license_server(activated_site, ClientLimits(stream_idle_seconds=0.3))
    leases = leases_from(activated_site, "127.0.0.1")
    holding, _ = await hold(leases)

    error = await refused(leases.Lease())  # sends nothing
    assert (error.code(), reason_of(error)) == (Code.DEADLINE_EXCEEDED, "LEASE_STREAM_IDLE")

    # Longer than the idle limit later, the stream that holds a lease lives on.
    await holding.write(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
    ack = await holding.read()
    assert isinstance(ack, lpb.LeaseResponse) and ack.HasField("heartbeat_ack")
    assert await used(activated_site) == 1
    await holding.write(lpb.LeaseRequest(release=lpb.LeaseRelease()))
    assert (await holding.read()).HasField("released")


# Call deadlines


@POSTGRES
async def test_a_call_past_the_deadline_is_cancelled_and_rolled_back(activated_site: Site) -> None:
    await limit_license_server(activated_site, ClientLimits(), max_call_seconds=0.5)
    leases = leases_from(activated_site, "127.0.0.1")
    url = activated_site.license.store.engine.url.render_as_string(hide_password=False)
    blocker = await asyncpg.connect(plain_dsn(url))
    try:
        leases_before = await blocker.fetchval("SELECT count(*) FROM leases")
        # Hold the pool row, so a checkout writes its lease and then waits for the seats.
        locked = blocker.transaction()
        await locked.start()
        await blocker.execute("SELECT 1 FROM pools WHERE feature = 'client.station' FOR UPDATE")
        started = asyncio.get_running_loop().time()
        error = await expect(
            # The client's own deadline is longer: the server's must end the call.
            leases.Checkout(lpb.CheckoutRequest(acquire=acquire()), timeout=10),
            Code.DEADLINE_EXCEEDED,
            "CALL_DEADLINE_EXCEEDED",
        )
        assert asyncio.get_running_loop().time() - started < 5
        assert "0.5 s" in (error.details() or "")
        # Reads are served meanwhile; the cancelled checkout left nothing behind.
        assert await used(activated_site) == 0
        await locked.rollback()
        assert await blocker.fetchval("SELECT count(*) FROM leases") == leases_before
    finally:
        await blocker.close()

    await leases.Checkout(lpb.CheckoutRequest(acquire=acquire()))
    assert await used(activated_site) == 1
    assert await serving(activated_site)


# Activation cycling per order, at the vendor


async def test_network_activations_per_order_are_limited_in_a_rolling_window(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock
) -> None:
    vendor = await start_vendor(
        tmp_path, databases, clock, "--max-activations-per-entitlement", "2"
    )
    try:
        host = Host.new()
        line = await vendor.line(count=5)
        first_at = clock.now()
        # activate -> return -> activate: the loop the limit ends.
        certificate = await activate(vendor, host, line, 1)
        await give_back(vendor, host, certificate)
        clock.advance(dt.timedelta(days=1).total_seconds())
        await activate(vendor, host, line, 1)
        request = host.activation(line.activation_id, 1)

        error = await expect(
            vendor.activation.Activate(apb.ActivateRequest(request=request)),
            Code.RESOURCE_EXHAUSTED,
            "ACTIVATION_LIMIT_REACHED",
        )
        next_allowed = first_at + dt.timedelta(days=30)
        info = error_info(error)
        assert info is not None
        assert info.metadata["next_allowed_at"] == next_allowed.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert retry_delay(error) == pytest.approx((next_allowed - clock.now()).total_seconds())
        assert (await vendor.line_now(line)).activated == 1  # nothing taken
        assert (await vendor.audit("activation.refused"))[-1].subject == line.activation_id

        # Another order is served at the same time; after the window, this one again.
        await activate(vendor, host, await vendor.line(count=1), 1)
        clock.current = next_allowed
        await vendor.activation.Activate(apb.ActivateRequest(request=request))
        assert (await vendor.line_now(line)).activated == 2
    finally:
        await vendor.close()


@SQLITE
async def test_the_administrator_journals_the_activation_limit_as_the_vendors_refusal(
    activated_site: Site,
) -> None:
    # The site fixture activated the order once; the vendor now allows one per window.
    await restart_activation_server(activated_site, "--max-activations-per-entitlement", "1")
    activation_id = (
        (
            await activated_site.vendor.ListActivations(
                apb.ListActivationsRequest(), metadata=bearer_metadata(VENDOR_TOKEN)
            )
        )
        .activations[0]
        .activation_id
    )
    request = admin_pb2.ActivateRequest(
        license_server=activated_site.license_address,
        activation_id=activation_id,
        count=1,
        operation_id="one-more",
    )
    error = await expect(
        activated_site.administrator.Activate(request),
        Code.RESOURCE_EXHAUSTED,
        "ACTIVATION_LIMIT_REACHED",
    )
    assert "next activation is allowed from" in (error.details() or "")
    found = await activated_site.administrator.GetOperation(
        admin_pb2.GetOperationRequest(operation_id="one-more")
    )
    assert found.operation.state == admin_pb2.OPERATION_STATE_REFUSED
    assert await used(activated_site) == 0
    info = await leases_from(activated_site, "127.0.0.1").GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature="client.station")
    )
    assert info.features[0].activated == 10  # the earlier activation still serves


def test_the_cli_says_when_the_next_activation_fits() -> None:
    def hint(when: str) -> str:
        situation = Situation({"next_allowed_at": when}, Service.ADMINISTRATOR, "admin", "")
        return HINTS["ACTIVATION_LIMIT_REACHED"](situation)

    assert "next activation fits from 2027-01-26" in hint("2027-01-26T12:00:00Z")
    assert "activates no network licenses" in hint("9999-12-31T23:59:59Z")


def test_the_cli_tells_a_server_cut_call_from_its_own_timeout() -> None:
    status = rich_status(
        Code.DEADLINE_EXCEEDED,
        "the call ran longer than this service allows one call (30 s)",
        "CALL_DEADLINE_EXCEEDED",
        "tessera.admin",
        {"max_call_seconds": "30"},
    )
    error = grpc.aio.AioRpcError(
        Code.DEADLINE_EXCEEDED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        status.details,
    )
    failure = explain(error, Service.ADMINISTRATOR, "127.0.0.1:27200", "op-1", timeout=60)
    assert failure.reason == "CALL_DEADLINE_EXCEEDED"
    assert "own limit (30 s, --max-call-seconds)" in failure.hint
    assert "changed nothing" in failure.hint and "did not answer" not in failure.message
