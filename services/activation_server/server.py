"""Builds the Activation Server: keys, database, servicers, health, reflection, auth."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from services.activation_server.config import Settings
from services.activation_server.domain.activations import Activations
from services.activation_server.domain.entitlements import Entitlements
from services.activation_server.domain.vendor_key import VendorKey
from services.activation_server.errors import ERRORS
from services.activation_server.servicer import ActivationServicer, VendorServicer
from services.activation_server.store.repository import ActivationStore
from tessera.activation.v1 import activation_pb2, activation_pb2_grpc
from tessera.auth import BearerTokenInterceptor, load_or_create_token
from tessera.clock import Clock, SystemClock
from tessera.keys import load_or_create_signing_key
from tessera.serving import Endpoint
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
    vendor_key: VendorKey
    port: int

    async def stop(self, grace: float) -> None:
        await self.endpoint.stop(grace)
        await self.store.engine.dispose()


def load_vendor_key(path: Path) -> VendorKey:
    """The vendor key at ``path``, created on first start; its public key is published
    beside it (``vendor-keys.pub``) for License Servers to trust."""
    key_file = load_or_create_signing_key(path)
    key = VendorKey(key_file.signing_key)
    if key_file.created:
        log.warning("created a new vendor signing key %s at %s", key.key_id, path)
    public = path.parent / "vendor-keys.pub"
    line = f"{key.public_key_hex}  # {key.key_id}\n"
    if not public.exists() or line not in public.read_text():
        with public.open("a") as handle:
            handle.write(line)
    return key


async def build(settings: Settings, clock: Clock | None = None) -> ActivationServer:
    clock = clock or SystemClock()
    vendor_key = load_vendor_key(settings.signing_key)
    token = settings.vendor_token
    if not token:
        token_path = settings.common.data_dir / "vendor-token"
        token, created = load_or_create_token(token_path)
        if created:
            log.warning("created the vendor-staff bearer token in %s", token_path)
    engine = create_engine(settings.database_url)
    await migrate(engine, MIGRATIONS)
    store = ActivationStore(engine)
    entitlements = Entitlements(store, clock)
    activations = Activations(store, vendor_key, clock)
    endpoint = Endpoint(
        SERVICE_NAMES,
        error_domain=ERRORS.domain,
        interceptors=[
            BearerTokenInterceptor(token, [SERVICE_NAMES[1]], domain="tessera.activation")
        ],
    )
    activation_pb2_grpc.add_ActivationServiceServicer_to_server(
        ActivationServicer(entitlements, activations), endpoint.server
    )
    activation_pb2_grpc.add_VendorServiceServicer_to_server(
        VendorServicer(entitlements, activations), endpoint.server
    )
    port = endpoint.bind(settings.common.listen)
    await endpoint.start()
    log.info(
        "Activation Server listening on %s (vendor key %s, database %s)",
        settings.common.listen.rsplit(":", 1)[0] + f":{port}",
        vendor_key.key_id,
        engine.url.render_as_string(hide_password=True),
    )
    return ActivationServer(endpoint, store, vendor_key, port)
