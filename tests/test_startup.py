"""The client start-up rule: local license first, else a network lease, else refusal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clients.startup import (
    LicenseRequest,
    LocalLicense,
    NetworkLease,
    NoLicense,
    license_at_startup,
)
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.errors import InvalidLicenseServerAddress
from tessera.keys import read_vendor_public_keys
from tessera.local_licenses import LocalLicenseStore
from tests.conftest import DatabaseFactory
from tests.processes import free_port
from tests.support import VENDOR_TOKEN, Site, start_site


@pytest.fixture
async def site(tmp_path: Path, databases: DatabaseFactory) -> AsyncIterator[Site]:
    site = await start_site(tmp_path, databases)
    yield site
    await site.close()


async def line(site: Site, kind: int, count: int) -> str:
    reply = await site.vendor.CreateEntitlement(
        apb.CreateEntitlementRequest(
            customer_organization="Site",
            lines=[apb.NewEntitlementLine(feature="client.station", count=count, kind=kind)],
        ),
        metadata=bearer_metadata(VENDOR_TOKEN),
    )
    return reply.entitlement.lines[0].activation_id


def request(site: Site, address: str, store: LocalLicenseStore | None = None) -> LicenseRequest:
    return LicenseRequest(
        feature="client.station",
        address=address,
        client_host="ws-1",
        local_store=store,
        vendor_keys=read_vendor_public_keys(
            [site.tmp_path / "activation_server" / "vendor-keys.pub"]
        ),
    )


async def test_a_valid_local_license_comes_first(site: Site, tmp_path: Path) -> None:
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1")
    local = store.prepare_request(await line(site, LicenseKind.LICENSE_KIND_LOCAL, 1))
    reply = await site.administrator.Activate(admin_pb2.ActivateRequest(local_request=local))
    store.install(reply.local_response, request(site, "@localhost").vendor_keys)
    # No License Server at this address: the local license is enough, no network call.
    decision = await license_at_startup(request(site, f"{free_port()}@127.0.0.1", store))
    assert isinstance(decision, LocalLicense)


async def test_then_a_network_lease_on_the_first_server_that_grants(
    site: Site, tmp_path: Path
) -> None:
    activation_id = await line(site, LicenseKind.LICENSE_KIND_NETWORK, 1)
    await site.administrator.Activate(
        admin_pb2.ActivateRequest(
            license_server=site.license_address, activation_id=activation_id, count=1
        )
    )
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1")
    address = f"{free_port()}@127.0.0.1;{site.license_address}"  # the first one is down
    decision = await license_at_startup(request(site, address, store))
    assert isinstance(decision, NetworkLease)
    assert decision.target == f"127.0.0.1:{site.license.port}"

    with pytest.raises(NoLicense) as refused:
        await license_at_startup(request(site, address, store))
    reasons = " ".join(refused.value.reasons)
    assert "no local license of client.station" in reasons
    assert "NO_SEAT_AVAILABLE" in reasons


async def test_neither_is_a_clear_refusal(site: Site) -> None:
    with pytest.raises(NoLicense) as refused:
        await license_at_startup(request(site, f"{free_port()}@127.0.0.1"))
    assert "no License Server answers" in str(refused.value)
    with pytest.raises(InvalidLicenseServerAddress) as invalid:
        await license_at_startup(request(site, "localhost"))
    assert str(invalid.value).startswith("Invalid license server configuration")
