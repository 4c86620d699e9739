"""Local licenses: issued through the Administrator for a client host's key, verified by
the client offline; node-locked, time-limited, and void while the clock is set back."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.auth import bearer_metadata
from tessera.clock import to_timestamp
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.keys import read_vendor_public_keys
from tessera.local_licenses import LocalLicenseRejected, LocalLicenseStore
from tessera.rpc import reason_of
from tests.conftest import DatabaseFactory, FakeClock
from tests.support import VENDOR_TOKEN, Site, start_site

EXPIRES = dt.datetime(2027, 1, 31, tzinfo=dt.UTC)


@pytest.fixture
async def site(tmp_path: Path, databases: DatabaseFactory) -> AsyncIterator[Site]:
    site = await start_site(tmp_path, databases)
    yield site
    await site.close()


async def local_line(site: Site, kind: int = LicenseKind.LICENSE_KIND_LOCAL) -> apb.EntitlementLine:
    reply = await site.vendor.CreateEntitlement(
        apb.CreateEntitlementRequest(
            customer_organization="Site under construction",
            lines=[
                apb.NewEntitlementLine(
                    feature="client.station", count=3, kind=kind, expires_at=to_timestamp(EXPIRES)
                )
            ],
        ),
        metadata=bearer_metadata(VENDOR_TOKEN),
    )
    return reply.entitlement.lines[0]


def trusted(site: Site) -> dict:  # type: ignore[type-arg]
    return read_vendor_public_keys([site.tmp_path / "activation_server" / "vendor-keys.pub"])


async def issue(
    site: Site, store: LocalLicenseStore, activation_id: str
) -> admin_pb2.ActivateResponse:
    request = store.prepare_request(activation_id, request_id="demo-1")
    return await site.administrator.Activate(admin_pb2.ActivateRequest(local_request=request))


async def test_a_local_license_is_issued_installed_and_verified_offline(
    site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    line = await local_line(site)
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1", clock=clock)
    reply = await issue(site, store, line.activation_id)
    assert reply.operation.state == admin_pb2.OPERATION_STATE_COMPLETED
    certificate = store.install(reply.local_response, trusted(site))
    assert (certificate.kind, certificate.host_id) == (
        LicenseKind.LICENSE_KIND_LOCAL,
        store.host_id,
    )

    check = store.check("client.station", trusted(site))
    assert check.certificate is not None and check.certificate.feature == "client.station"
    assert store.check("client.graphiceditor", trusted(site)).certificate is None

    # The same request again is the same answer, and counts once at the vendor.
    again = await issue(site, store, line.activation_id)
    assert again.local_response == reply.local_response
    order = await site.activation_service.GetOrder(
        apb.GetOrderRequest(entitlement_id=certificate.entitlement_id)
    )
    assert order.entitlement.lines[0].activated == 1


async def test_a_local_license_is_node_locked(site: Site, tmp_path: Path) -> None:
    line = await local_line(site)
    mine = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1")
    other = LocalLicenseStore(tmp_path / "ws-2", machine_id="ws-2")
    reply = await issue(site, mine, line.activation_id)
    with pytest.raises(LocalLicenseRejected):
        other.install(reply.local_response, trusted(site))
    # Copying the license file to another host does not help either.
    mine.install(reply.local_response, trusted(site))
    (other.directory / "licenses").mkdir(parents=True)
    for path in (mine.directory / "licenses").iterdir():
        (other.directory / "licenses" / path.name).write_bytes(path.read_bytes())
    assert other.check("client.station", trusted(site)).certificate is None


async def test_setting_the_clock_back_voids_local_licenses(
    site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    line = await local_line(site)
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1", clock=clock)
    store.install((await issue(site, store, line.activation_id)).local_response, trusted(site))
    assert store.check("client.station", trusted(site)).certificate is not None
    clock.advance(-3600)
    check = store.check("client.station", trusted(site))
    assert check.certificate is None and "set back" in check.problems[0]
    clock.advance(3600)
    assert store.check("client.station", trusted(site)).certificate is not None


async def test_an_expired_or_tampered_local_license_is_not_valid(
    site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    line = await local_line(site)
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1", clock=clock)
    store.install((await issue(site, store, line.activation_id)).local_response, trusted(site))
    [path] = (store.directory / "licenses").iterdir()
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert store.check("client.station", trusted(site)).certificate is None
    path.write_bytes(original)
    clock.current = EXPIRES + dt.timedelta(seconds=1)
    check = store.check("client.station", trusted(site))
    assert check.certificate is None and "expired" in check.problems[0]


async def test_network_and_local_lines_go_only_where_they_belong(
    site: Site, tmp_path: Path
) -> None:
    network = await local_line(site, kind=LicenseKind.LICENSE_KIND_NETWORK)
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await issue(site, store, network.activation_id)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(refused.value) == "NETWORK_LINE_NOT_FOR_CLIENT_HOST"
    local = await local_line(site)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await site.administrator.Activate(
            admin_pb2.ActivateRequest(
                license_server=site.license_address, activation_id=local.activation_id, count=1
            )
        )
    assert reason_of(refused.value) == "LOCAL_LINE_NOT_FOR_LICENSE_SERVER"
