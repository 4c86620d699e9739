"""Trusted storage against late answers, hand-edited rows and racing requests.

Each test is a case a review found broken: a repair answer installed late, a receipt
installed after a repair, rows and pools edited by hand, and (on PostgreSQL) requests
that interleave at the exact point that used to let them act on stale reads — held there
with events, not timing. Where a real Activation Server is used, the License Server trusts
its published keys, so the flows are the real ones end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import update

from services.license_server.domain.ledger import AnchorFile
from services.license_server.domain.returns import Returns as LicenseReturns
from services.license_server.domain.trusted_storage import TrustedStorage
from services.license_server.store.leases import SqlLeaseQueries
from services.license_server.store.tables import certificates, pools
from services.license_server.store.trust import SqlTrustQueries
from tessera.activation.v1 import activation_pb2 as apb
from tessera.common.v1.common_pb2 import LicenseCertificate
from tessera.keys import read_vendor_public_keys
from tessera.license.v1 import license_pb2 as pb
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.trust import LicenseServerUnderTest, SigningVendor
from tests.support.vendor import STAFF, ActivationServerUnderTest

T = TypeVar("T")

# ---------------------------------------------------------------------------------------
# Fixtures: a real Activation Server and a License Server trusting its keys.


async def _license_server(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock, keys: Path, name: str
) -> LicenseServerUnderTest:
    server = LicenseServerUnderTest(
        data_dir=tmp_path / name,
        database_url=await databases.new(name.replace("-", "_")),
        vendor_keys=keys,
        machine_id=f"machine-{name}",
        clock=clock,
    )
    return await server.start()


@pytest.fixture
async def license_server_with_vendor(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock, vendor: ActivationServerUnderTest
) -> AsyncIterator[LicenseServerUnderTest]:
    server = await _license_server(
        tmp_path, databases, clock, vendor.published_keys_file, "license"
    )
    yield server
    await server.stop()


async def activate(
    license_server_with_vendor: LicenseServerUnderTest,
    vendor: ActivationServerUnderTest,
    line: apb.EntitlementLine,
    count: int,
) -> LicenseCertificate:
    prepared = await license_server_with_vendor.storage.PrepareActivation(
        pb.PrepareActivationRequest(activation_id=line.activation_id, count=count)
    )
    answer = await vendor.activation.Activate(apb.ActivateRequest(request=prepared.request))
    installed = await license_server_with_vendor.storage.InstallActivation(
        pb.InstallActivationRequest(response=answer.response)
    )
    return installed.certificate.certificate


async def vendor_return(vendor: ActivationServerUnderTest, request: object) -> apb.ReturnResponse:
    return await vendor.activation.Return(apb.ReturnRequest(request=request))


async def vendor_repair(
    license_server_with_vendor: LicenseServerUnderTest, vendor: ActivationServerUnderTest
) -> apb.RepairResponse:
    # Forced: these interleavings repair storage that is still healthy.
    prepared = await license_server_with_vendor.storage.PrepareRepair(
        pb.PrepareRepairRequest(force=True)
    )
    return await vendor.activation.Repair(apb.RepairRequest(request=prepared.request))


async def vendor_holds(vendor: ActivationServerUnderTest, host_id: str) -> int:
    """Seats the vendor records ``host_id`` as holding (active network activations)."""
    reply = await vendor.staff.ListActivations(
        apb.ListActivationsRequest(host_id=host_id),
        metadata=STAFF,
    )
    return sum(a.count for a in reply.activations if a.state == apb.ACTIVATION_STATE_ACTIVE)


def postgres_only(databases: DatabaseFactory) -> None:
    # The interleavings below need two transactions open at once; SQLite's BEGIN
    # IMMEDIATE serializes whole transactions, so they cannot happen there.
    if databases.kind != "postgres":
        pytest.skip("a PostgreSQL interleaving")


# ---------------------------------------------------------------------------------------
# 1. A stale repair answer brings back a certificate the vendor has credited.


async def test_stale_repair_answer_does_not_resurrect_a_returned_certificate(
    license_server_with_vendor: LicenseServerUnderTest,
    vendor: ActivationServerUnderTest,
    tmp_path: Path,
    databases: DatabaseFactory,
    clock: FakeClock,
) -> None:
    line = await vendor.line(count=5)
    certificate = await activate(license_server_with_vendor, vendor, line, 5)

    # An older repair is answered by the vendor but its answer is not installed (yet).
    stale = await vendor_repair(license_server_with_vendor, vendor)
    # A newer repair is answered and installed.
    fresh = await vendor_repair(license_server_with_vendor, vendor)
    await license_server_with_vendor.storage.CompleteRepair(
        pb.CompleteRepairRequest(response=fresh.response)
    )

    # The whole certificate goes back to the vendor, which credits it.
    prepared, _ = await license_server_with_vendor.prepare_return(certificate.certificate_id)
    receipt = await vendor_return(vendor, prepared.request)
    done = await license_server_with_vendor.storage.CompleteReturn(
        pb.CompleteReturnRequest(receipt=receipt.receipt)
    )
    assert done.credited
    assert await license_server_with_vendor.activated() == 0
    assert (await vendor.line_now(line)).activated == 0  # the vendor has the seats back

    # The stale repair answer is imported later (e.g. an offline file).
    with contextlib.suppress(grpc.aio.AioRpcError):  # refusing it is fine
        await license_server_with_vendor.storage.CompleteRepair(
            pb.CompleteRepairRequest(response=stale.response)
        )
    # The vendor sold the credited seats again, to another License Server.
    other = await _license_server(tmp_path, databases, clock, vendor.published_keys_file, "other")
    try:
        await activate(other, vendor, line, 5)
        serving = await license_server_with_vendor.activated() + await other.activated()
    finally:
        await other.stop()
    assert await vendor_holds(vendor, license_server_with_vendor.host_id) == 0
    # Whatever happens, no seat the vendor credited may serve again.
    assert serving <= 5, f"{serving} seats serve of the 5 sold"


# ---------------------------------------------------------------------------------------
# 2. A repair while a partial return is under way leaves its receipt uninstallable.


async def test_partial_return_receipt_installs_after_a_repair(
    license_server_with_vendor: LicenseServerUnderTest, vendor: ActivationServerUnderTest
) -> None:
    line = await vendor.line(count=10, partial_return_allowed=True)
    certificate = await activate(license_server_with_vendor, vendor, line, 10)

    prepared, _ = await license_server_with_vendor.prepare_return(
        certificate.certificate_id, count=3
    )
    receipt = await vendor_return(vendor, prepared.request)  # credited: 7 kept (revision 1)
    assert await license_server_with_vendor.activated() == 7

    # Before the receipt is installed (Administrator crashed, offline file on its way),
    # the operator repairs; the vendor re-issues the 7 seats it records (revision 2).
    repair = await vendor_repair(license_server_with_vendor, vendor)
    await license_server_with_vendor.storage.CompleteRepair(
        pb.CompleteRepairRequest(response=repair.response)
    )
    assert await vendor_holds(vendor, license_server_with_vendor.host_id) == 7

    # Now the receipt arrives.
    problem = "none"
    try:
        await license_server_with_vendor.storage.CompleteReturn(
            pb.CompleteReturnRequest(receipt=receipt.receipt)
        )
    except grpc.aio.AioRpcError as error:
        problem = f"{error.code().name}: {error.details()}"
    # Another repair does not get the License Server out of it either.
    again = await vendor_repair(license_server_with_vendor, vendor)
    await license_server_with_vendor.storage.CompleteRepair(
        pb.CompleteRepairRequest(response=again.response)
    )
    serving = await license_server_with_vendor.activated()
    assert serving == 7 == await vendor_holds(vendor, license_server_with_vendor.host_id), (
        f"the License Server serves {serving} seats, the vendor records 7 (installing the "
        f"receipt: {problem})"
    )


# ---------------------------------------------------------------------------------------
# 6./7. Row edits that trusted storage does not notice.


async def test_a_certificate_row_moved_to_another_feature_is_detected(
    license_server_with_vendor: LicenseServerUnderTest, vendor: ActivationServerUnderTest
) -> None:
    line = await vendor.line(count=5)
    certificate = await activate(license_server_with_vendor, vendor, line, 5)
    assert license_server_with_vendor.server is not None
    async with license_server_with_vendor.server.store.engine.begin() as connection:
        await connection.execute(
            update(certificates)
            .where(certificates.c.certificate_id == certificate.certificate_id)
            .values(feature="server.enterprise.base")
        )
    health = await license_server_with_vendor.health()
    assert not health.healthy, "a certificate row serving another feature went unnoticed"


async def test_a_time_limited_certificate_cannot_be_kept_alive_by_editing_its_row(
    license_server_with_vendor: LicenseServerUnderTest,
    vendor: ActivationServerUnderTest,
    clock: FakeClock,
) -> None:
    line = await vendor.line(count=5, duration=Duration(seconds=3600))
    certificate = await activate(license_server_with_vendor, vendor, line, 5)
    assert certificate.HasField("expires_at")
    assert license_server_with_vendor.server is not None
    async with license_server_with_vendor.server.store.engine.begin() as connection:
        await connection.execute(
            update(certificates)
            .where(certificates.c.certificate_id == certificate.certificate_id)
            .values(expires_at=None)
        )
    clock.advance(2 * 3600)
    await license_server_with_vendor.server.leasing.retire_expired_certificates()  # the sweeper
    health = await license_server_with_vendor.health()  # the trust check
    assert await license_server_with_vendor.activated() == 0, (
        f"an expired licence still serves after its row was edited (healthy={health.healthy})"
    )


async def test_an_edited_pool_row_is_put_right_by_the_trust_check(
    license_server_with_vendor: LicenseServerUnderTest, vendor: ActivationServerUnderTest
) -> None:
    line = await vendor.line(count=2)
    await activate(license_server_with_vendor, vendor, line, 2)
    assert license_server_with_vendor.server is not None
    async with license_server_with_vendor.server.store.engine.begin() as connection:
        await connection.execute(
            update(pools).where(pools.c.feature == "client.station").values(activated=500)
        )
    await license_server_with_vendor.health()  # the periodic trust check
    await license_server_with_vendor.stop()
    await license_server_with_vendor.start()  # the check at start
    assert await license_server_with_vendor.activated() == 2, (
        "the License Server serves more seats than it holds"
    )


# ---------------------------------------------------------------------------------------
# 3.-5. PostgreSQL interleavings on the License Server (License Server logic only, so the
# vendor is played with a test key).


@pytest.fixture
async def fake_vendor(tmp_path: Path) -> SigningVendor:
    vendor = SigningVendor()
    vendor.publish(tmp_path / "fake-vendor-keys.pub")
    return vendor


@pytest.fixture
async def racing_site(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock, fake_vendor: SigningVendor
) -> AsyncIterator[LicenseServerUnderTest]:
    postgres_only(databases)
    server = await _license_server(
        tmp_path, databases, clock, tmp_path / "fake-vendor-keys.pub", "racing"
    )
    yield server
    await server.stop()


def second_storage(license_server_with_vendor: LicenseServerUnderTest) -> TrustedStorage:
    """Another TrustedStorage over the same database, host key and anchor: what a second
    request handled by this process (or a replica) works with."""
    assert license_server_with_vendor.server is not None
    return TrustedStorage(
        license_server_with_vendor.server.store,
        license_server_with_vendor.server.identity,
        lambda: read_vendor_public_keys([license_server_with_vendor.vendor_keys]),
        license_server_with_vendor.clock,  # type: ignore[arg-type]
        AnchorFile(license_server_with_vendor.data_dir / "trust-anchor"),
    )


_PAUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("paused", default=False)


def pause_at_seal(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the task run in a ``_PAUSED`` context stop the first time it is about to lock
    the seal, until ``go`` is set; ``there`` is set when it got there. Whatever it read
    before locking is what a late request would act on."""
    there, go = asyncio.Event(), asyncio.Event()
    original = SqlTrustQueries.get_seal

    async def paused(self: SqlTrustQueries, *, lock: bool = False) -> object:
        if lock and _PAUSED.get() and not there.is_set():
            there.set()
            await go.wait()
        return await original(self, lock=lock)

    monkeypatch.setattr(SqlTrustQueries, "get_seal", paused)
    return there, go


def in_paused_context(coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    context = contextvars.copy_context()
    context.run(_PAUSED.set, True)
    return asyncio.create_task(coroutine, context=context)


async def test_a_late_duplicate_refusal_does_not_release_a_newer_return(
    racing_site: LicenseServerUnderTest, fake_vendor: SigningVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    license_server_with_vendor = racing_site
    certificate = await license_server_with_vendor.activate(fake_vendor, 5)
    _, first = await license_server_with_vendor.prepare_return(certificate.certificate_id)
    refusal = fake_vendor.refuse(first, "RETURN_LIMIT_REACHED")

    # Two deliveries of the same refusal (an Administrator retry and its journal resume):
    # the late one has read the pending return before the first one committed.
    there, go = pause_at_seal(monkeypatch)
    late = in_paused_context(
        LicenseReturns(second_storage(license_server_with_vendor)).complete(refusal)
    )
    await there.wait()
    await license_server_with_vendor.storage.CompleteReturn(
        pb.CompleteReturnRequest(receipt=refusal)
    )
    assert await license_server_with_vendor.activated() == 5  # the refused seats serve again

    # The operator returns the certificate again; its seats are withheld.
    await license_server_with_vendor.prepare_return(certificate.certificate_id)
    assert await license_server_with_vendor.activated() == 0

    go.set()
    await late
    # The vendor may credit the second return at any moment: its seats must not serve.
    assert await license_server_with_vendor.activated() == 0, (
        "the first return's refusal released the second's seats"
    )


async def test_concurrent_prepare_return_with_one_request_id_gets_one_answer(
    racing_site: LicenseServerUnderTest, fake_vendor: SigningVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    license_server_with_vendor = racing_site
    certificate = await license_server_with_vendor.activate(fake_vendor, 5)
    there, go = pause_at_seal(monkeypatch)
    late = in_paused_context(
        LicenseReturns(second_storage(license_server_with_vendor)).prepare(
            certificate.certificate_id, 0, "ret-1", False
        )
    )
    await there.wait()
    first, _ = await license_server_with_vendor.prepare_return(
        certificate.certificate_id, request_id="ret-1"
    )
    go.set()
    prepared = await late  # a retry of the same request must get the same signed request
    assert prepared.request == first.request


_IN_SWEEPER: contextvars.ContextVar[bool] = contextvars.ContextVar("in_sweeper", default=False)


async def test_retiring_an_expired_certificate_does_not_put_withheld_seats_back(
    racing_site: LicenseServerUnderTest,
    fake_vendor: SigningVendor,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    license_server_with_vendor = racing_site
    assert license_server_with_vendor.server is not None
    await license_server_with_vendor.activate(
        fake_vendor, 5, expires_at=clock.now() + dt.timedelta(hours=1)
    )
    keeps = await license_server_with_vendor.activate(fake_vendor, 5)
    assert await license_server_with_vendor.activated() == 10
    clock.advance(2 * 3600)

    # The sweeper retires the expired certificate; before it recounts the pool, a return
    # of the other certificate commits.
    there, go = asyncio.Event(), asyncio.Event()
    original = SqlLeaseQueries.lock_pool

    async def slow(self: SqlLeaseQueries, feature: str) -> object:
        if _IN_SWEEPER.get() and not there.is_set():
            there.set()
            await go.wait()
        return await original(self, feature)

    monkeypatch.setattr(SqlLeaseQueries, "lock_pool", slow)
    context = contextvars.copy_context()
    context.run(_IN_SWEEPER.set, True)
    sweep = asyncio.create_task(
        license_server_with_vendor.server.leasing.retire_expired_certificates(), context=context
    )
    await there.wait()
    await license_server_with_vendor.prepare_return(
        keeps.certificate_id
    )  # withholds all 5 of its seats
    go.set()
    assert await sweep == 1

    await license_server_with_vendor.server.leasing.retire_expired_certificates()
    await license_server_with_vendor.health()
    # Nothing serves: one certificate expired, the other is being returned.
    assert await license_server_with_vendor.activated() == 0, (
        "seats being returned to the vendor serve again"
    )
