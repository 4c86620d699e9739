"""What the three services of an in-process site hold, read through their APIs and straight
from their databases, so a test can prove that a refused call changed nothing: orders,
activations and the audit log on the vendor side; License Information, certificates,
pending requests and leases on the License Server; the Administrator's journal."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.activation_server.store import tables as vendor_tables
from services.administrator.store import tables as admin_tables
from services.license_server import server as ls_server
from services.license_server.store import tables as ls_tables
from tessera.activation.v1 import activation_pb2 as apb
from tessera.auth import bearer_metadata
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tests.support.in_process_site import Site
from tests.support.tokens import VENDOR_TOKEN


def storage_of(site: Site, server: ls_server.LicenseServer) -> lpb_grpc.TrustedStorageServiceStub:
    """The trusted storage service of ``server``, one of the site's License Servers."""
    return lpb_grpc.TrustedStorageServiceStub(site.channel(server.port))


def leases_of(site: Site, server: ls_server.LicenseServer) -> lpb_grpc.LeaseServiceStub:
    """The lease service of ``server``, one of the site's License Servers."""
    return lpb_grpc.LeaseServiceStub(site.channel(server.port))


async def count_rows(engine: AsyncEngine, table: Table) -> int:
    """How many rows ``table`` holds now."""
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(table)) or 0)


async def count_decisions(engine: AsyncEngine) -> int:
    """Audited vendor decisions other than refusals."""
    audit = vendor_tables.audit_log
    async with engine.connect() as connection:
        query = select(func.count()).where(audit.c.action.not_like("%.refused"))
        return int(await connection.scalar(query.select_from(audit)) or 0)


async def license_state(site: Site, server: ls_server.LicenseServer, name: str) -> dict[str, Any]:
    information = await leases_of(site, server).GetLicenseInformation(
        lpb.GetLicenseInformationRequest()
    )
    certificates = await storage_of(site, server).ListCertificates(lpb.ListCertificatesRequest())
    engine = server.store.engine
    return {
        f"{name}.information": [
            (f.feature, f.activated, f.used, f.available) for f in information.features
        ],
        f"{name}.certificates": [c.certificate.certificate_id for c in certificates.certificates],
        f"{name}.pending": await count_rows(engine, ls_tables.pending_requests),
        f"{name}.leases": await count_rows(engine, ls_tables.leases),
    }


async def snapshot(site: Site, *others: ls_server.LicenseServer) -> dict[str, Any]:
    """Everything the services hold that a refused call must not change."""
    vendor_engine = site.activation.store.engine
    async with vendor_engine.connect() as connection:
        entitlement_ids = sorted(
            (await connection.execute(select(vendor_tables.entitlements.c.entitlement_id)))
            .scalars()
            .all()
        )
    orders = {}
    for entitlement_id in entitlement_ids:
        order = await site.activation_service.GetOrder(
            apb.GetOrderRequest(entitlement_id=entitlement_id)
        )
        orders[entitlement_id] = [
            (line.activation_id, line.count, line.activated, line.available)
            for line in order.entitlement.lines
        ]
    activations = await site.vendor.ListActivations(
        apb.ListActivationsRequest(), metadata=bearer_metadata(VENDOR_TOKEN)
    )
    state: dict[str, Any] = {
        "vendor.orders": orders,
        "vendor.activations": [
            (a.request_id, a.activation_id, a.count, a.host_id) for a in activations.activations
        ],
        # A refusal is itself a vendor decision and is audited; nothing else may be.
        "vendor.audit": await count_decisions(vendor_engine),
        "admin.operations": await count_rows(site.admin.journal.engine, admin_tables.operations),
        **await license_state(site, site.license, "ls"),
    }
    for index, other in enumerate(others):
        state.update(await license_state(site, other, f"ls{index + 2}"))
    return state


def changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {key for key in before if before[key] != after[key]}
