"""Observability: /metrics on each service, request ids, JSON logs, no secrets in logs.

The services run in process over real gRPC with ``--metrics-listen 127.0.0.1:0``; the
metrics are read the way Prometheus reads them, over HTTP, and parsed with the client
library's own parser.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.activation_server import config as as_config
from services.activation_server import server as as_server
from services.administrator import config as admin_config
from services.administrator import server as admin_server
from services.license_server import config as ls_config
from services.license_server import server as ls_server
from tessera.admin.v1 import admin_pb2 as pb
from tessera.auth import bearer_metadata
from tessera.license.v1 import license_pb2 as lpb
from tessera.rpc import reason_of
from tessera.server import logs
from tessera.server.call_observer import REQUEST_ID_HEADER
from tessera.server.metrics import MetricsServer
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import Site
from tests.support.tokens import (
    ADMINISTRATOR_FLAGS,
    LICENSE_SERVER_FLAGS,
    OPERATOR_TOKEN,
    VENDOR_TOKEN,
)

STATION = "client.station"
LEASES = "tessera.license.v1.LeaseService"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def start_observed_site(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock | None = None
) -> Site:
    """Like tests.support.start_site, with every service serving /metrics on a free port."""
    observed = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
    activation = await as_server.build(
        as_config.load_settings(
            [
                *observed,
                "--data-dir", str(tmp_path / "activation_server"),
                "--database-url", await databases.new("activation"),
                "--vendor-token", VENDOR_TOKEN,
            ],
            environ={},
        )
    )  # fmt: skip
    license_settings = ls_config.load_settings(
        [
            *observed,
            "--data-dir", str(tmp_path / "license_server"),
            "--database-url", await databases.new("license"),
            "--vendor-keys", str(tmp_path / "activation_server" / "vendor-keys.pub"),
            "--machine-id", "test-machine",
            "--sweep-interval", "3600",
            *LICENSE_SERVER_FLAGS,
        ],
        environ={},
    )  # fmt: skip
    license_server = await ls_server.build(license_settings, clock=clock)
    admin = await admin_server.build(
        admin_config.load_settings(
            [
                *observed,
                "--data-dir", str(tmp_path / "administrator"),
                "--database-url", await databases.new("admin"),
                "--activation-server", f"127.0.0.1:{activation.port}",
                *ADMINISTRATOR_FLAGS,
            ],
            environ={},
        )
    )  # fmt: skip
    return Site(activation, license_server, admin, [], tmp_path, license_settings, clock)


@pytest.fixture
async def observed_site(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock
) -> AsyncIterator[Site]:
    observed_site = await start_observed_site(tmp_path, databases, clock)
    yield observed_site
    await observed_site.close()


@pytest.fixture
async def sqlite_site(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Site]:
    """For what does not depend on the database: request ids and logs."""
    observed_site = await start_observed_site(tmp_path, DatabaseFactory("sqlite", tmp_path), clock)
    yield observed_site
    await observed_site.close()


# Scraping


async def http_get(
    port: int, path: str = "/metrics", accept: str = "", method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if accept:
        head += f"Accept: {accept}\r\n"
    writer.write((head + "\r\n").encode())
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    header_block, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


async def scrape(port: int | None) -> Samples:
    assert port is not None, "the service serves no metrics"
    status, headers, body = await http_get(port)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc_count(samples: Samples, service: str, method: str, code: str) -> float:
    return value(
        samples,
        "tessera_rpc_duration_seconds_count",
        grpc_service=service,
        grpc_method=method,
        grpc_code=code,
    )


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """A stream's observation lands just after its status reaches the client."""
    for _ in range(250):
        if await check():
            return
        await asyncio.sleep(0.02)
    pytest.fail("never came true")


# Flows


def acquire(count: int = 1) -> lpb.LeaseAcquire:
    return lpb.LeaseAcquire(feature=STATION, count=count, client_host="ws-01")


async def activate(observed_site: Site, activation_id: str, count: int) -> pb.ActivateResponse:
    reply: pb.ActivateResponse = await observed_site.administrator.Activate(
        pb.ActivateRequest(
            license_server=observed_site.license_address, activation_id=activation_id, count=count
        )
    )
    return reply


async def test_license_server_counts_leases_and_reads_seats_at_scrape(
    observed_site: Site, clock: FakeClock
) -> None:
    entitlement = await observed_site.create_entitlement([(STATION, 5)])
    await activate(observed_site, entitlement.lines[0].activation_id, 3)
    leases = observed_site.leases

    # A checkout and a check-in.
    granted = (await leases.Checkout(lpb.CheckoutRequest(acquire=acquire()))).granted
    await leases.Checkin(
        lpb.CheckinRequest(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
    )

    # A stream holds a seat; another resumes it; a unary lease holds another.
    stream = leases.Lease()
    await stream.write(lpb.LeaseRequest(acquire=acquire()))
    held = (await stream.read()).granted
    resumed = leases.Lease()
    await resumed.write(
        lpb.LeaseRequest(
            resume=lpb.LeaseResume(lease_id=held.lease_id, lease_secret=held.lease_secret)
        )
    )
    assert (await resumed.read()).granted.epoch == 2
    assert (await stream.read()).revoked.reason == "LEASE_RESUMED_ELSEWHERE"
    unary = (await leases.Checkout(lpb.CheckoutRequest(acquire=acquire()))).granted

    samples = await scrape(observed_site.license.metrics_port)
    assert value(samples, "tessera_lease_streams_open") == 1
    assert value(samples, "tessera_seats_activated", feature=STATION) == 3
    assert value(samples, "tessera_seats_used", feature=STATION) == 2
    assert value(samples, "tessera_seats_available", feature=STATION) == 1
    assert value(samples, "tessera_seats_queued", feature=STATION) == 0

    # A denial: two seats asked for, one free.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await leases.Checkout(lpb.CheckoutRequest(acquire=acquire(count=2)))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

    # The operator revokes the resumed stream's lease; the unary lease expires.
    await observed_site.lease_admin.RevokeLease(
        lpb.RevokeLeaseRequest(lease_id=held.lease_id, reason="maintenance"),
        metadata=bearer_metadata(OPERATOR_TOKEN),
    )
    assert (await resumed.read()).revoked.reason == "REVOKED_BY_OPERATOR"
    assert await resumed.code() is grpc.StatusCode.FAILED_PRECONDITION
    clock.advance(unary.ttl.seconds + 1)
    assert await observed_site.license.leasing.release_expired() == 1

    async def streams_observed() -> bool:
        samples = await scrape(observed_site.license.metrics_port)
        return rpc_count(samples, LEASES, "Lease", "FAILED_PRECONDITION") == 2

    await eventually(streams_observed)
    samples = await scrape(observed_site.license.metrics_port)
    assert value(samples, "tessera_lease_grants_total", feature=STATION) == 3
    assert value(samples, "tessera_lease_denials_total", reason="NO_SEAT_AVAILABLE") == 1
    assert value(samples, "tessera_lease_resumes_total") == 1
    assert value(samples, "tessera_lease_expiries_total") == 1
    assert value(samples, "tessera_lease_revocations_total", reason="REVOKED_BY_OPERATOR") == 1
    assert value(samples, "tessera_lease_streams_open") == 0
    assert value(samples, "tessera_seats_used", feature=STATION) == 0
    assert value(samples, "tessera_seats_available", feature=STATION) == 3
    # Latency by method and status, streams observed as whole calls.
    assert rpc_count(samples, LEASES, "Checkout", "OK") == 2
    assert rpc_count(samples, LEASES, "Checkout", "RESOURCE_EXHAUSTED") == 1
    assert rpc_count(samples, LEASES, "Checkin", "OK") == 1
    assert rpc_count(samples, "tessera.license.v1.LeaseAdminService", "RevokeLease", "OK") == 1
    assert (
        rpc_count(samples, "tessera.license.v1.TrustedStorageService", "PrepareActivation", "OK")
        == 1
    )
    assert (
        value(
            samples,
            "tessera_rpc_duration_seconds_bucket",
            grpc_service=LEASES,
            grpc_method="Checkout",
            grpc_code="OK",
            le="+Inf",
        )
        == 2
    )
    assert value(samples, "tessera_build_info", service="license_server", version="0.1.0") == 1


async def test_vendor_and_administrator_count_outcomes(observed_site: Site) -> None:
    entitlement = await observed_site.create_entitlement([(STATION, 5)])
    activation_id = entitlement.lines[0].activation_id
    certificate = (await activate(observed_site, activation_id, 2)).certificate.certificate
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await activate(observed_site, activation_id, 4)
    assert reason_of(refused.value) == "NOT_ENOUGH_SEATS_LEFT"

    # A forced return while a seat is leased revokes the lease.
    granted = (await observed_site.leases.Checkout(lpb.CheckoutRequest(acquire=acquire()))).granted
    reply = await observed_site.administrator.Return(
        pb.ReturnRequest(
            license_server=observed_site.license_address,
            certificate_id=certificate.certificate_id,
            force=True,
        )
    )
    assert reply.operation.state == pb.OPERATION_STATE_COMPLETED and reply.revoked_leases == 1
    with pytest.raises(grpc.aio.AioRpcError):
        await observed_site.leases.Heartbeat(
            lpb.HeartbeatRequest(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
        )

    vendor = await scrape(observed_site.activation.metrics_port)
    assert value(vendor, "tessera_activations_total", result="granted", reason="") == 1
    assert (
        value(vendor, "tessera_activations_total", result="refused", reason="NOT_ENOUGH_SEATS_LEFT")
        == 1
    )
    assert value(vendor, "tessera_returns_total", result="credited", reason="") == 1
    assert rpc_count(vendor, "tessera.activation.v1.ActivationService", "Activate", "OK") == 1
    assert (
        rpc_count(
            vendor, "tessera.activation.v1.ActivationService", "Activate", "RESOURCE_EXHAUSTED"
        )
        == 1
    )
    assert rpc_count(vendor, "tessera.activation.v1.VendorService", "CreateEntitlement", "OK") == 1

    admin = await scrape(observed_site.admin.metrics_port)
    operations = "tessera_admin_operations_total"
    assert value(admin, operations, kind="activate", result="completed", reason="") == 1
    assert (
        value(admin, operations, kind="activate", result="refused", reason="NOT_ENOUGH_SEATS_LEFT")
        == 1
    )
    assert value(admin, operations, kind="return", result="completed", reason="") == 1
    admin_service = "tessera.admin.v1.AdministratorService"
    assert rpc_count(admin, admin_service, "Activate", "OK") == 1
    assert rpc_count(admin, admin_service, "Activate", "RESOURCE_EXHAUSTED") == 1
    assert rpc_count(admin, admin_service, "Return", "OK") == 1

    license = await scrape(observed_site.license.metrics_port)
    assert value(license, "tessera_lease_revocations_total", reason="LICENSE_RETURNED") == 1
    assert value(license, "tessera_seats_activated", feature=STATION) == 0
    assert (
        rpc_count(license, LEASES, "Heartbeat", "NOT_FOUND")
        + rpc_count(license, LEASES, "Heartbeat", "FAILED_PRECONDITION")
        == 1
    )


# The endpoint itself


async def test_metrics_endpoint_speaks_openmetrics_when_asked(sqlite_site: Site) -> None:
    port = sqlite_site.admin.metrics_port
    assert port is not None
    status, headers, body = await http_get(
        port, accept="application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
    )
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n") and b"tessera_rpc_duration_seconds" in body
    status, headers, body = await http_get(port, method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert (await http_get(port, path="/"))[0] == 404
    assert (await http_get(port, method="POST"))[0] == 405
    assert b"process_resident_memory_bytes" in (await http_get(port))[2]


async def test_metrics_endpoint_refuses_oversized_requests_and_stops_on_idle_scrapers() -> None:
    registry = CollectorRegistry()
    server = MetricsServer(registry)
    port = await server.start("127.0.0.1:0")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"x" * 20_000 + b"\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 431 ")
        writer.close()
        idle = await asyncio.open_connection("127.0.0.1", port)  # connects, never asks
    finally:
        async with asyncio.timeout(2):
            await server.stop()
    assert await idle[0].read() == b""
    idle[1].close()


async def test_metrics_are_off_unless_asked_for(tmp_path: Path) -> None:
    settings = admin_config.load_settings(
        ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)], environ={}
    )
    assert settings.common.metrics_listen == "" and settings.common.log_format == "text"
    admin = await admin_server.build(settings)
    try:
        assert admin.metrics_port is None
    finally:
        await admin.stop(0)


@pytest.mark.parametrize(
    ("load", "env"),
    [
        (as_config.load_settings, "TESSERA_AS_"),
        (ls_config.load_settings, "TESSERA_LS_"),
        (admin_config.load_settings, "TESSERA_ADMIN_"),
    ],
)
def test_every_service_takes_the_metrics_and_log_format_settings(
    load: Callable[..., Any], env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    environ = {env + "METRICS_LISTEN": "0.0.0.0:9100", env + "LOG_FORMAT": "json"}
    common = load([], environ=environ).common
    assert (common.metrics_listen, common.log_format) == ("0.0.0.0:9100", "json")
    flags = load(["--metrics-listen", "[::]:9100", "--log-format", "text"], environ=environ)
    assert flags.common.metrics_listen == "[::]:9100"
    for bad in (["--metrics-listen", "9100"], ["--log-format", "xml"]):
        with pytest.raises(SystemExit):
            load(bad, environ={})
    assert "--metrics-listen" in capsys.readouterr().err


# Request ids and logs


@contextmanager
def captured_logs(
    log_format: str = "json",
) -> Iterator[tuple[io.StringIO, list[logging.LogRecord]]]:
    """The services' logging at DEBUG as a service configures it, into a buffer; also the
    raw records (before any formatting or masking)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiosqlite").level)
    buffer = io.StringIO()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logs.configure_logging("DEBUG", log_format, "license_server", stream=buffer)
    root.addHandler(Keep())
    try:
        yield buffer, records
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("aiosqlite").setLevel(saved[2])


async def test_request_id_is_taken_logged_and_echoed(sqlite_site: Site) -> None:
    leases = sqlite_site.leases
    request = lpb.GetLicenseInformationRequest()
    with captured_logs() as (buffer, records):
        call = leases.GetLicenseInformation(request, metadata=((REQUEST_ID_HEADER, "req-42"),))
        await call
        assert (REQUEST_ID_HEADER, "req-42") in tuple(await call.trailing_metadata() or ())

        # Refused calls echo it too, next to their ErrorInfo.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await leases.Checkout(
                lpb.CheckoutRequest(acquire=acquire()),
                metadata=((REQUEST_ID_HEADER, "req-43"),),
            )
        assert reason_of(refused.value) == "FEATURE_NOT_LICENSED"
        assert (REQUEST_ID_HEADER, "req-43") in tuple(refused.value.trailing_metadata() or ())

        # A stream hears it at once; a call without one (or with one we do not take) gets
        # one of ours.
        stream = leases.Lease(metadata=((REQUEST_ID_HEADER, "not an id: " + "x" * 200),))
        initial = dict(await stream.initial_metadata())
        assert re.fullmatch("[0-9a-f]{32}", initial[REQUEST_ID_HEADER])
        await stream.done_writing()
        assert await stream.code() is grpc.StatusCode.OK
        plain = leases.GetLicenseInformation(request)
        await plain
        generated = dict(await plain.trailing_metadata() or ())[REQUEST_ID_HEADER]
        assert re.fullmatch("[0-9a-f]{32}", generated)

    # The records themselves carry the id (what any handler or formatter sees).
    stamped = {
        record.getMessage().split()[0]: getattr(record, "request_id", "")
        for record in records
        if record.name == "tessera.server.call_observer"
        and getattr(record, "request_id", "") in ("req-42", "req-43")
    }
    assert stamped == {
        f"/{LEASES}/GetLicenseInformation": "req-42",
        f"/{LEASES}/Checkout": "req-43",
    }
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert lines, "no log lines"
    for line in lines:
        assert set(line) >= {"ts", "level", "logger", "message", "service", "request_id"}
        assert line["service"] == "license_server"
    checkout = [line for line in lines if line["request_id"] == "req-43"]
    assert checkout and checkout[-1]["message"].startswith(f"/{LEASES}/Checkout NOT_FOUND")
    assert generated in {line["request_id"] for line in lines}
    assert all("not an id" not in (line["request_id"] or "") for line in lines)


async def test_no_secrets_in_logs(sqlite_site: Site) -> None:
    observed_site = sqlite_site
    with captured_logs("text") as (buffer, records):
        entitlement = await observed_site.create_entitlement([(STATION, 5)])
        certificate = (
            await activate(observed_site, entitlement.lines[0].activation_id, 2)
        ).certificate
        # Leases every way: unary, stream, resume, heartbeat, a wrong secret, check-in.
        granted = (
            await observed_site.leases.Checkout(lpb.CheckoutRequest(acquire=acquire()))
        ).granted
        await observed_site.leases.Heartbeat(
            lpb.HeartbeatRequest(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await observed_site.leases.Heartbeat(
                lpb.HeartbeatRequest(lease_id=granted.lease_id, lease_secret="wrong-secret-0123")
            )
        stream = observed_site.leases.Lease()
        await stream.write(lpb.LeaseRequest(acquire=acquire()))
        held = (await stream.read()).granted
        resumed = observed_site.leases.Lease()
        await resumed.write(
            lpb.LeaseRequest(
                resume=lpb.LeaseResume(lease_id=held.lease_id, lease_secret=held.lease_secret)
            )
        )
        await resumed.read()
        await resumed.write(lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()))
        await resumed.read()
        await resumed.write(lpb.LeaseRequest(release=lpb.LeaseRelease()))
        await resumed.read()
        await observed_site.leases.Checkin(
            lpb.CheckinRequest(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
        )
        # Credentials, right and wrong.
        await observed_site.lease_admin.ListLeases(
            lpb.ListLeasesRequest(), metadata=bearer_metadata(OPERATOR_TOKEN)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await observed_site.lease_admin.ListLeases(
                lpb.ListLeasesRequest(), metadata=bearer_metadata("guessed-operator-token-42")
            )
        await observed_site.administrator.Return(
            pb.ReturnRequest(
                license_server=observed_site.license_address,
                certificate_id=certificate.certificate.certificate_id,
            )
        )

    secrets = {
        "lease secret": granted.lease_secret,
        "streamed lease secret": held.lease_secret,
        "wrong lease secret": "wrong-secret-0123",
        "operator token": OPERATOR_TOKEN,
        "guessed token": "guessed-operator-token-42",
        "vendor token": VENDOR_TOKEN,
        "host key": (observed_site.tmp_path / "license_server" / "host.key").read_text().strip(),
        "vendor signing key": (observed_site.tmp_path / "activation_server" / "vendor-signing.key")
        .read_text()
        .strip(),
    }
    raw = "\n".join(
        record.getMessage()
        + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        for record in records
    )
    assert len(records) > 50, "the flows logged too little to prove anything"
    for text in (raw, buffer.getvalue()):
        leaked = [name for name, secret in secrets.items() if secret in text]
        assert not leaked, f"in the logs: {leaked}"


def test_formatters_mask_what_looks_like_a_credential() -> None:
    assert logs.redact("authorization: Bearer abcdefghijklmnopqrstu") == (
        "authorization: Bearer [redacted]"
    )
    assert logs.redact('lease_secret: "s3cr3t-value"') == 'lease_secret: "[redacted]"'
    assert logs.redact("vendor_token=abc123 left") == "vendor_token=[redacted] left"
    text = "created the operator bearer token in var/license_server/operator-token"
    assert logs.redact(text) == text
    record = logging.LogRecord(
        "tessera.x", logging.INFO, __file__, 1, "Bearer %s", ("a" * 40,), None
    )
    line = json.loads(logs.JsonFormatter("administrator").format(record))
    assert line["message"] == "Bearer [redacted]" and line["service"] == "administrator"
    assert line["request_id"] is None and line["level"] == "INFO" and line["logger"] == "tessera.x"
