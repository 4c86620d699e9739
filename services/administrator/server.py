"""Builds the Administrator: journal database, peer clients, the use cases over them,
servicer, health, and the background pass that resumes unfinished operations.

The one module that names both sides: the domain's flows and the store and gRPC peer
clients that implement its ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from services.administrator.config import Settings
from services.administrator.domain.activations import ActivationExchange, Activations
from services.administrator.domain.check_ins import CheckIns
from services.administrator.domain.exchange import ExchangeRunner
from services.administrator.domain.journal import OperationJournal
from services.administrator.domain.metrics import OperationMetrics
from services.administrator.domain.model import OperationKind
from services.administrator.domain.moves import ActivationHalf, Moves, ReturnHalf
from services.administrator.domain.offline import Offline
from services.administrator.domain.operations import Operations
from services.administrator.domain.overview import Overview
from services.administrator.domain.ports import JournalStore, LicenseServerDirectory, Vendor
from services.administrator.domain.registration import Registrations
from services.administrator.domain.repairs import RepairExchange, Repairs
from services.administrator.domain.resume import ResumeReport
from services.administrator.domain.returns import ReturnExchange, Returns
from services.administrator.errors import ERRORS
from services.administrator.peers import ActivationServerClient, LicenseServers
from services.administrator.servicer import AdministratorServicer
from services.administrator.store.repository import Journal
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.clock import Clock, SystemClock
from tessera.server.auth import AccessControl
from tessera.server.error_table import ErrorTranslation
from tessera.server.metrics import metrics_note, new_registry
from tessera.server.serving import Endpoint
from tessera.storage import create_engine, migrate

log = logging.getLogger("tessera.administrator")

MIGRATIONS = Path(__file__).parent / "store" / "migrations"
SERVICE_NAMES = [admin_pb2.DESCRIPTOR.services_by_name["AdministratorService"].full_name]


@dataclass
class Administrator:
    endpoint: Endpoint
    journal: Journal
    activation_server: ActivationServerClient
    operations: Operations
    # The pass over the journal started with the service (await it to know it is done).
    resumed: asyncio.Task[ResumeReport]
    port: int
    # Checks the License Servers in with the vendor when their policy makes it due.
    check_ins: asyncio.Task[None] | None = None

    @property
    def metrics_port(self) -> int | None:
        """Where GET /metrics is served (``--metrics-listen``), or None."""
        return self.endpoint.metrics_port

    async def stop(self, grace: float) -> None:
        await self.endpoint.stop(grace)
        for task in (self.resumed, self.check_ins):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.activation_server.close()
        await self.journal.engine.dispose()


async def resume_in_background(operations: Operations) -> ResumeReport:
    try:
        report = await operations.resume_unfinished()
    except Exception:
        log.exception("resuming the journal failed")
        return ResumeReport()
    if report.finished or report.failed:
        log.info(
            "journal resumed: %d operation(s) finished, %d still unfinished or refused",
            len(report.finished),
            len(report.failed),
        )
    return report


async def check_in_forever(check_ins: CheckIns, interval: float) -> None:
    """Every ``interval`` seconds, check in the License Servers whose licenses' check-in
    policy makes it due (a failure is logged and tried again at the next pass)."""
    while True:
        try:
            await check_ins.check_in_due()
        except Exception:
            log.exception("the check-in pass failed; trying again in %g s", interval)
        await asyncio.sleep(interval)


def wire_operations(
    store: JournalStore,
    vendor: Vendor,
    license_servers: LicenseServerDirectory,
    clock: Clock,
    metrics: OperationMetrics | None = None,
) -> Operations:
    """The Administrator's use cases over a journal, the vendor and the License Servers
    (the real ones here; fakes in tests)."""
    journal = OperationJournal(store, clock, metrics)
    registrations = Registrations(store, clock)
    runner = ExchangeRunner(journal, registrations, clock, license_servers)
    activation = ActivationExchange(vendor)
    return_ = ReturnExchange(vendor)
    repair = RepairExchange(vendor)
    return Operations(
        journal=journal,
        registrations=registrations,
        overview=Overview(vendor, license_servers),
        check_ins=CheckIns(store, vendor, license_servers),
        activations=Activations(journal, runner, activation, clock),
        returns=Returns(runner, return_),
        repairs=Repairs(runner, repair),
        moves=Moves(journal, runner, ReturnHalf(vendor), ActivationHalf(vendor), clock),
        offline=Offline(
            journal,
            runner,
            {
                OperationKind.ACTIVATE: activation,
                OperationKind.RETURN: return_,
                OperationKind.REPAIR: repair,
            },
            registrations,
        ),
    )


async def build(settings: Settings, clock: Clock | None = None) -> Administrator:
    for tls in (settings.activation_server_tls, settings.license_server_tls):
        if tls is not None:
            tls.check()
    credentials = settings.credentials.with_token_files(settings.common.data_dir)
    engine = create_engine(settings.database_url)
    await migrate(engine, MIGRATIONS)
    journal = Journal(engine)
    activation_server = ActivationServerClient(
        settings.activation_server, settings.activation_server_tls
    )
    registry = new_registry(settings.common.service)
    operations = wire_operations(
        journal,
        activation_server,
        LicenseServers(settings.license_server_tls, settings.license_server_credential),
        clock or SystemClock(),
        OperationMetrics(registry),
    )
    endpoint = Endpoint(
        SERVICE_NAMES,
        error_domain=ERRORS.domain,
        wrappers=[AccessControl(credentials, ERRORS), ErrorTranslation(ERRORS)],
        registry=registry,
        max_message_bytes=settings.common.max_message_bytes,
        max_call_seconds=settings.common.max_call_seconds,
    )
    endpoint.add_servicer(
        admin_pb2_grpc.add_AdministratorServiceServicer_to_server, AdministratorServicer(operations)
    )
    common = settings.common
    port = endpoint.bind(common.listen, common.tls, common.allow_plaintext)
    await endpoint.start(settings.common.metrics_listen)
    log.info(
        "Administrator listening on %s, %s (Activation Server %s)%s",
        settings.common.listen.rsplit(":", 1)[0] + f":{port}",
        common.transport,
        settings.activation_server,
        metrics_note(settings.common.metrics_listen, endpoint.metrics_port),
    )
    resumed = asyncio.create_task(resume_in_background(operations))
    check_ins = None
    if settings.check_in_poll_seconds > 0:
        check_ins = asyncio.create_task(
            check_in_forever(operations.check_ins, settings.check_in_poll_seconds)
        )
    return Administrator(endpoint, journal, activation_server, operations, resumed, port, check_ins)
