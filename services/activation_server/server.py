"""Builds the Activation Server: keys, database, servicers, health, reflection, auth.

The one module that names both the rules (``domain/``) and the store that implements
their ports (``store/``): it hands the store to the rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from services.activation_server.config import Settings
from services.activation_server.domain.activations import Activations
from services.activation_server.domain.audit import AuditLog, verify_store
from services.activation_server.domain.check_ins import CheckIns
from services.activation_server.domain.entitlements import Entitlements
from services.activation_server.domain.metrics import VendorMetrics
from services.activation_server.domain.model import AuditVerdict
from services.activation_server.domain.repairs import Repairs
from services.activation_server.domain.returns import Returns
from services.activation_server.domain.vendor_key import VendorKey, VendorKeys
from services.activation_server.errors import ERRORS
from services.activation_server.servicer import ActivationServicer, VendorServicer
from services.activation_server.store.key_files import KeyDirectory
from services.activation_server.store.repository import ActivationStore
from tessera.activation.v1 import activation_pb2, activation_pb2_grpc
from tessera.clock import Clock, SystemClock
from tessera.server.auth import AccessControl
from tessera.server.error_table import ErrorTranslation
from tessera.server.metrics import metrics_note, new_registry
from tessera.server.serving import Endpoint
from tessera.storage import create_engine, migrate

log = logging.getLogger("tessera.activation_server")

MIGRATIONS = Path(__file__).parent / "store" / "migrations"
SERVICE_NAMES = [
    activation_pb2.DESCRIPTOR.services_by_name["ActivationService"].full_name,
    activation_pb2.DESCRIPTOR.services_by_name["VendorService"].full_name,
]


@dataclass
class ActivationServer:
    endpoint: Endpoint
    store: ActivationStore
    vendor_keys: VendorKeys
    port: int

    @property
    def metrics_port(self) -> int | None:
        """Where GET /metrics is served (``--metrics-listen``), or None."""
        return self.endpoint.metrics_port

    @property
    def vendor_key(self) -> VendorKey:
        """The vendor key that signs now."""
        return self.vendor_keys.active

    async def stop(self, grace: float) -> None:
        await self.endpoint.stop(grace)
        await self.store.engine.dispose()


async def build(settings: Settings, clock: Clock | None = None) -> ActivationServer:
    clock = clock or SystemClock()
    credentials = settings.credentials.with_token_files(settings.common.data_dir)
    engine = create_engine(settings.database_url)
    await migrate(engine, MIGRATIONS)
    store = ActivationStore(engine)
    vendor_keys = VendorKeys(KeyDirectory(settings.signing_key), store, clock)
    registry = new_registry(settings.common.service)
    metrics = VendorMetrics(registry)
    entitlements = Entitlements(store, clock)
    activations = Activations(store, vendor_keys, clock, metrics, settings.limits)
    returns = Returns(store, vendor_keys, clock, settings.limits, metrics)
    repairs = Repairs(store, vendor_keys, clock, settings.limits, metrics)
    check_ins = CheckIns(store, vendor_keys, clock, metrics)
    endpoint = Endpoint(
        SERVICE_NAMES,
        error_domain=ERRORS.domain,
        wrappers=[AccessControl(credentials, ERRORS), ErrorTranslation(ERRORS)],
        registry=registry,
        max_message_bytes=settings.common.max_message_bytes,
        max_call_seconds=settings.common.max_call_seconds,
    )
    endpoint.add_servicer(
        activation_pb2_grpc.add_ActivationServiceServicer_to_server,
        ActivationServicer(entitlements, activations, returns, repairs, vendor_keys, check_ins),
    )
    endpoint.add_servicer(
        activation_pb2_grpc.add_VendorServiceServicer_to_server,
        VendorServicer(entitlements, activations, returns, AuditLog(store), vendor_keys),
    )
    common = settings.common
    port = endpoint.bind(common.listen, common.tls, common.allow_plaintext)
    await endpoint.start(settings.common.metrics_listen)
    log.info(
        "Activation Server listening on %s, %s (vendor key %s, database %s)%s",
        settings.common.listen.rsplit(":", 1)[0] + f":{port}",
        common.transport,
        vendor_keys.active.key_id,
        engine.url.render_as_string(hide_password=True),
        metrics_note(settings.common.metrics_listen, endpoint.metrics_port),
    )
    return ActivationServer(endpoint, store, vendor_keys, port)


async def verify_audit_log(database_url: str) -> AuditVerdict:
    """Walk the audit chain of the database at ``database_url`` (``python -m
    services.activation_server.audit verify``); the database is not migrated."""
    engine = create_engine(database_url)
    try:
        return await verify_store(ActivationStore(engine))
    finally:
        await engine.dispose()
