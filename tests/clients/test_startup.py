"""The client start-up rule: local license first, else a network lease, else refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients import (
    InvalidLicenseServerConfiguration,
    Lease,
    LicenseClient,
    LicenseServerUnreachable,
    LocalLicense,
    NoLicense,
    NoSeatAvailable,
)
from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.errors import InvalidLicenseServerAddress
from tessera.local_licenses import LocalLicenseStore
from tests.support.in_process_site import Site
from tests.support.processes import free_port
from tests.support.tokens import VENDOR_TOKEN


async def line(real_clock_site: Site, kind: int, count: int) -> str:
    reply = await real_clock_site.vendor.CreateEntitlement(
        apb.CreateEntitlementRequest(
            customer_organization="Site",
            lines=[apb.NewEntitlementLine(feature="client.station", count=count, kind=kind)],
        ),
        metadata=bearer_metadata(VENDOR_TOKEN),
    )
    return reply.entitlement.lines[0].activation_id


def client(
    real_clock_site: Site, address: str, store: LocalLicenseStore | None = None
) -> LicenseClient:
    return LicenseClient(
        address,
        client_host="ws-1",
        local_licenses=store,
        vendor_keys=real_clock_site.tmp_path / "activation_server" / "vendor-keys.pub",
    )


async def test_a_valid_local_license_comes_first(real_clock_site: Site, tmp_path: Path) -> None:
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1")
    local = store.prepare_request(await line(real_clock_site, LicenseKind.LICENSE_KIND_LOCAL, 1))
    reply = await real_clock_site.administrator.Activate(
        admin_pb2.ActivateRequest(local_request=local)
    )
    store.install(reply.local_response, client(real_clock_site, "@localhost").vendor_keys)
    # No License Server at this address: the local license is enough, no network call.
    async with client(real_clock_site, f"{free_port()}@127.0.0.1", store) as ws:
        async with ws.license("client.station") as license:
            assert isinstance(license, LocalLicense) and license.kind == "local"
            assert license.held and license.certificate.feature == "client.station"
        assert not license.held


async def test_then_a_network_lease_on_the_first_server_that_grants(
    real_clock_site: Site, tmp_path: Path
) -> None:
    activation_id = await line(real_clock_site, LicenseKind.LICENSE_KIND_NETWORK, 1)
    await real_clock_site.administrator.Activate(
        admin_pb2.ActivateRequest(
            license_server=real_clock_site.license_address, activation_id=activation_id, count=1
        )
    )
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1")
    address = f"{free_port()}@127.0.0.1;{real_clock_site.license_address}"  # the first one is down
    async with (
        client(real_clock_site, address, store) as ws,
        ws.license("client.station") as license,
    ):
        assert isinstance(license, Lease) and license.kind == "network"
        assert license.server == f"127.0.0.1:{real_clock_site.license.port}"

        with pytest.raises(NoLicense) as refused:
            await ws.check_out("client.station")
    assert refused.value.local_problems == ("no local license of client.station on this host",)
    assert isinstance(refused.value.network_error, NoSeatAvailable)
    assert refused.value.reason == "NO_SEAT_AVAILABLE"
    assert "no local license of client.station" in str(refused.value)


async def test_neither_is_a_clear_refusal(real_clock_site: Site) -> None:
    with pytest.raises(NoLicense) as refused:
        await client(real_clock_site, f"{free_port()}@127.0.0.1").check_out("client.station")
    assert isinstance(refused.value.network_error, LicenseServerUnreachable)
    assert "no License Server answers" in str(refused.value)
    with pytest.raises(InvalidLicenseServerConfiguration) as invalid:
        client(real_clock_site, "localhost")  # refused when the client is made, before any call
    assert str(invalid.value).startswith("Invalid license server configuration")
    assert isinstance(invalid.value, InvalidLicenseServerAddress)
