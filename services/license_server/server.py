"""Builds the License Server: host identity, database, servicers, sweeper, health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from services.license_server.config import Settings
from services.license_server.domain.admission import Admission
from services.license_server.domain.check_ins import CheckIns
from services.license_server.domain.events import LeaseBus
from services.license_server.domain.leasing import Leasing
from services.license_server.domain.ledger import AnchorFile
from services.license_server.domain.metrics import LeaseMetrics, SeatGauges
from services.license_server.domain.repairs import Repairs
from services.license_server.domain.returns import Returns
from services.license_server.domain.trusted_storage import TrustedStorage
from services.license_server.errors import ERRORS
from services.license_server.servicer import (
    LeaseAdminServicer,
    LeaseServicer,
    TrustedStorageServicer,
)
from services.license_server.store.database import SqlLicenseStore
from services.license_server.store.notifications import PostgresLeaseNotifications
from tessera.clock import Clock, SystemClock
from tessera.keys import (
    HostIdentity,
    load_or_create_signing_key,
    machine_binding,
    read_machine_id,
    read_vendor_public_keys,
)
from tessera.license.v1 import license_pb2, license_pb2_grpc
from tessera.server.auth import AccessControl
from tessera.server.error_table import ErrorTranslation
from tessera.server.metrics import metrics_note, new_registry
from tessera.server.serving import Endpoint
from tessera.storage import create_engine, migrate

log = logging.getLogger("tessera.license_server")

MIGRATIONS = Path(__file__).parent / "store" / "migrations"
SERVICES = license_pb2.DESCRIPTOR.services_by_name
SERVICE_NAMES = [
    SERVICES["LeaseService"].full_name,
    SERVICES["TrustedStorageService"].full_name,
    SERVICES["LeaseAdminService"].full_name,
]


@dataclass
class LicenseServer:
    endpoint: Endpoint
    store: SqlLicenseStore
    leasing: Leasing
    lease_servicer: LeaseServicer
    identity: HostIdentity
    sweeper: asyncio.Task[None]
    notifications: PostgresLeaseNotifications | None
    port: int

    @property
    def metrics_port(self) -> int | None:
        """Where GET /metrics is served (``--metrics-listen``), or None."""
        return self.endpoint.metrics_port

    async def stop(self, grace: float) -> None:
        async def tell_streams() -> None:
            self.lease_servicer.close_streams()

        await self.endpoint.stop(grace, before_grace=tell_streams)
        await self.leasing.group_commit.drain()
        await self.leasing.heartbeats.stop()
        await self.leasing.replicas.stop()
        self.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sweeper
        if self.notifications is not None:
            await self.notifications.stop()
        await self.store.engine.dispose()


async def sweep_forever(
    leasing: Leasing, trusted_storage: TrustedStorage, interval: float, trust_interval: float
) -> None:
    """Free expired leases and retire expired certificates every ``interval`` seconds,
    and re-judge trusted storage every ``trust_interval`` (idempotent on every replica)."""
    loop = asyncio.get_running_loop()
    next_trust_check = loop.time() + trust_interval
    while True:
        if loop.time() >= next_trust_check:
            next_trust_check = loop.time() + trust_interval
            try:
                await trusted_storage.check()  # logs what breaks when it breaks
            except Exception:
                log.exception("trusted storage check failed; retrying next interval")
        try:
            await leasing.notice_clock_step()
            freed = await leasing.release_expired()
            if freed:
                log.info("freed %d expired lease(s)", freed)
            retired = await leasing.retire_expired_certificates()
            if retired:
                log.warning("retired %d expired certificate(s)", retired)
        except Exception:
            log.exception("sweep failed; retrying next interval")
        await asyncio.sleep(interval)


def load_host_identity(settings: Settings) -> HostIdentity:
    key_file = load_or_create_signing_key(settings.host_key)
    identity = HostIdentity(
        key_file.signing_key, machine_binding(settings.machine_id or read_machine_id())
    )
    if key_file.created:
        log.warning("created host key %s: host id %s", settings.host_key, identity.host_id)
    return identity


async def build(settings: Settings, clock: Clock | None = None) -> LicenseServer:
    clock = clock or SystemClock()
    identity = load_host_identity(settings)
    credentials = settings.credentials.with_token_files(settings.common.data_dir)
    engine = create_engine(settings.database_url)
    await migrate(engine, MIGRATIONS)
    origin = uuid.uuid4().hex
    store = SqlLicenseStore(engine, origin)
    bus = LeaseBus()
    notifications = None
    if engine.dialect.name == "postgresql":
        notifications = PostgresLeaseNotifications(settings.database_url, bus.publish, origin)
        await notifications.start()
    registry = new_registry(settings.common.service)
    lease_metrics = LeaseMetrics(registry)
    # A SQLite file is one process's: queued clients found at start are a dead process's.
    leasing = Leasing(
        store, settings.policy, clock, bus, lease_metrics, engine.dialect.name == "sqlite"
    )
    await leasing.replicas.start()
    trusted_storage = TrustedStorage(
        store,
        identity,
        lambda: read_vendor_public_keys(settings.vendor_keys),
        clock,
        AnchorFile(settings.common.data_dir / "trust-anchor"),
        bus,
        lease_metrics,
    )
    # Before serving: leases from a time the clock was ahead get one TTL from now.
    await leasing.shorten_stretched_leases()
    await trusted_storage.open()
    report = await trusted_storage.check()
    for problem in report.problems:
        log.error("trusted storage: %s", problem)
    if not read_vendor_public_keys(settings.vendor_keys):
        log.warning(
            "no vendor public keys in %s: activations cannot be installed until there are",
            ", ".join(str(p) for p in settings.vendor_keys),
        )
    endpoint = Endpoint(
        SERVICE_NAMES,
        error_domain=ERRORS.domain,
        wrappers=[AccessControl(credentials, ERRORS), ErrorTranslation(ERRORS)],
        registry=registry,
        max_message_bytes=settings.common.max_message_bytes,
        max_call_seconds=settings.common.max_call_seconds,
    )
    seats = SeatGauges(store, clock)
    registry.register(seats)
    endpoint.metrics.before_scrape.append(seats.refresh)
    lease_servicer = LeaseServicer(leasing, Admission(settings.client_limits, lease_metrics))
    endpoint.add_servicer(license_pb2_grpc.add_LeaseServiceServicer_to_server, lease_servicer)
    endpoint.add_servicer(
        license_pb2_grpc.add_LeaseAdminServiceServicer_to_server, LeaseAdminServicer(leasing)
    )
    endpoint.add_servicer(
        license_pb2_grpc.add_TrustedStorageServiceServicer_to_server,
        TrustedStorageServicer(
            trusted_storage,
            Returns(trusted_storage),
            Repairs(trusted_storage),
            identity,
            CheckIns(trusted_storage),
        ),
    )
    common = settings.common
    port = endpoint.bind(common.listen, common.tls, common.allow_plaintext)
    await endpoint.start(settings.common.metrics_listen)
    sweeper = asyncio.create_task(
        sweep_forever(
            leasing, trusted_storage, settings.sweep_interval, settings.trust_check_interval
        )
    )
    leasing.heartbeats.start()
    log.info(
        "License Server %s listening on %s, %s (database %s)%s",
        identity.host_id,
        settings.common.listen.rsplit(":", 1)[0] + f":{port}",
        common.transport,
        engine.url.render_as_string(hide_password=True),
        metrics_note(settings.common.metrics_listen, endpoint.metrics_port),
    )
    return LicenseServer(
        endpoint, store, leasing, lease_servicer, identity, sweeper, notifications, port
    )
