"""Local licenses: issued through the Administrator for a client host's key, verified by
the client offline; node-locked, time-limited, and void while the clock is set back. The
store's high-water mark cannot be deleted, swapped for an older copy or edited away."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.auth import bearer_metadata
from tessera.clock import to_timestamp
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.keys import read_vendor_public_keys
from tessera.local_licenses import LocalLicenseRejected, LocalLicenseStore, LocalStoreTampered
from tessera.rpc import reason_of
from tests.support.clock import FakeClock
from tests.support.in_process_site import Site
from tests.support.tokens import VENDOR_TOKEN

EXPIRES = dt.datetime(2027, 1, 31, tzinfo=dt.UTC)


@pytest.fixture
def clock() -> FakeClock:
    # The vendor signs issue times by the real clock; the store must not start behind it
    # (a license issued "later" than the store's clock reads proves the clock set back).
    return FakeClock(dt.datetime.now(dt.UTC))


async def local_line(
    real_clock_site: Site, kind: int = LicenseKind.LICENSE_KIND_LOCAL
) -> apb.EntitlementLine:
    reply = await real_clock_site.vendor.CreateEntitlement(
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


def trusted(real_clock_site: Site) -> dict:  # type: ignore[type-arg]
    return read_vendor_public_keys(
        [real_clock_site.tmp_path / "activation_server" / "vendor-keys.pub"]
    )


async def issue(
    real_clock_site: Site, store: LocalLicenseStore, activation_id: str, request_id: str = "demo-1"
) -> admin_pb2.ActivateResponse:
    request = store.prepare_request(activation_id, request_id=request_id)
    return await real_clock_site.administrator.Activate(
        admin_pb2.ActivateRequest(local_request=request)
    )


async def test_a_local_license_is_issued_installed_and_verified_offline(
    real_clock_site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    line = await local_line(real_clock_site)
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1", clock=clock)
    reply = await issue(real_clock_site, store, line.activation_id)
    assert reply.operation.state == admin_pb2.OPERATION_STATE_COMPLETED
    certificate = store.install(reply.local_response, trusted(real_clock_site))
    assert (certificate.kind, certificate.host_id) == (
        LicenseKind.LICENSE_KIND_LOCAL,
        store.host_id,
    )

    check = store.check("client.station", trusted(real_clock_site))
    assert check.certificate is not None and check.certificate.feature == "client.station"
    assert store.check("client.graphiceditor", trusted(real_clock_site)).certificate is None

    # The same request again is the same answer, and counts once at the vendor.
    again = await issue(real_clock_site, store, line.activation_id)
    assert again.local_response == reply.local_response
    order = await real_clock_site.activation_service.GetOrder(
        apb.GetOrderRequest(entitlement_id=certificate.entitlement_id)
    )
    assert order.entitlement.lines[0].activated == 1


async def test_a_local_license_is_node_locked(real_clock_site: Site, tmp_path: Path) -> None:
    line = await local_line(real_clock_site)
    mine = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1")
    other = LocalLicenseStore(tmp_path / "ws-2", machine_id="ws-2")
    reply = await issue(real_clock_site, mine, line.activation_id)
    with pytest.raises(LocalLicenseRejected):
        other.install(reply.local_response, trusted(real_clock_site))
    # Copying the license file to another host does not help either.
    mine.install(reply.local_response, trusted(real_clock_site))
    (other.directory / "licenses").mkdir(parents=True)
    for path in (mine.directory / "licenses").iterdir():
        (other.directory / "licenses" / path.name).write_bytes(path.read_bytes())
    assert other.check("client.station", trusted(real_clock_site)).certificate is None


async def test_setting_the_clock_back_voids_local_licenses(
    real_clock_site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    line = await local_line(real_clock_site)
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1", clock=clock)
    store.install(
        (await issue(real_clock_site, store, line.activation_id)).local_response,
        trusted(real_clock_site),
    )
    assert store.check("client.station", trusted(real_clock_site)).certificate is not None
    clock.advance(-3600)
    check = store.check("client.station", trusted(real_clock_site))
    assert check.certificate is None and "set back" in check.problems[0]
    clock.advance(3600)
    assert store.check("client.station", trusted(real_clock_site)).certificate is not None


async def test_an_expired_or_tampered_local_license_is_not_valid(
    real_clock_site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    line = await local_line(real_clock_site)
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1", clock=clock)
    store.install(
        (await issue(real_clock_site, store, line.activation_id)).local_response,
        trusted(real_clock_site),
    )
    [path] = (store.directory / "licenses").iterdir()
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert store.check("client.station", trusted(real_clock_site)).certificate is None
    path.write_bytes(original)
    clock.current = EXPIRES + dt.timedelta(seconds=1)
    check = store.check("client.station", trusted(real_clock_site))
    assert check.certificate is None and "expired" in check.problems[0]


async def test_network_and_local_lines_go_only_where_they_belong(
    real_clock_site: Site, tmp_path: Path
) -> None:
    network = await local_line(real_clock_site, kind=LicenseKind.LICENSE_KIND_NETWORK)
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await issue(real_clock_site, store, network.activation_id)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(refused.value) == "NETWORK_LINE_NOT_FOR_CLIENT_HOST"
    local = await local_line(real_clock_site)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await real_clock_site.administrator.Activate(
            admin_pb2.ActivateRequest(
                license_server=real_clock_site.license_address,
                activation_id=local.activation_id,
                count=1,
            )
        )
    assert reason_of(refused.value) == "LOCAL_LINE_NOT_FOR_LICENSE_SERVER"


async def installed_store(
    real_clock_site: Site, tmp_path: Path, clock: FakeClock
) -> LocalLicenseStore:
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1", clock=clock)
    line = await local_line(real_clock_site)
    store.install(
        (await issue(real_clock_site, store, line.activation_id)).local_response,
        trusted(real_clock_site),
    )
    assert store.check("client.station", trusted(real_clock_site)).certificate is not None
    return store


def valid(real_clock_site: Site, store: LocalLicenseStore) -> bool:
    return store.check("client.station", trusted(real_clock_site)).certificate is not None


def clock_file(store: LocalLicenseStore) -> Path:
    return store.directory / "clock.json"


async def test_deleting_the_high_water_mark_does_not_revive_a_voided_license(
    real_clock_site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    store = await installed_store(real_clock_site, tmp_path, clock)
    clock.advance(-3600)
    assert not valid(real_clock_site, store)  # set back

    clock_file(store).unlink()
    check = store.check("client.station", trusted(real_clock_site))
    # The license's own record remembers the time the mark said.
    assert check.certificate is None and "set back" in check.problems[0]
    assert clock_file(store).exists()  # the rollback is written down, not forgotten
    # Putting the clock right does not bring it back: a deleted mark is a rollback.
    clock.advance(3600)
    check = store.check("client.station", trusted(real_clock_site))
    assert check.certificate is None
    assert "void" in check.problems[0] and "clock.json" in check.problems[0]
    assert "was missing" in check.problems[0]
    clock_file(store).unlink()  # nor deleting it again
    assert not valid(real_clock_site, store)

    # The way out is a new local license; the voided one cannot be installed again.
    line = await local_line(real_clock_site)
    store.install(
        (
            await issue(real_clock_site, store, line.activation_id, request_id="demo-2")
        ).local_response,
        trusted(real_clock_site),
    )
    assert valid(real_clock_site, store)
    voided = [p for p in (store.directory / "licenses").iterdir() if p.suffix == ".lic"]
    assert len(voided) == 2


async def test_an_older_copy_of_the_high_water_mark_does_not_revive_a_voided_license(
    real_clock_site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    store = await installed_store(real_clock_site, tmp_path, clock)
    after_install = clock_file(store).read_bytes()
    clock.advance(7200)
    assert valid(real_clock_site, store)  # the mark moves on to now
    clock.advance(-3600)
    assert not valid(real_clock_site, store)  # set back behind the mark

    # The copy taken after the install is genuinely signed and older than the clock:
    # the licenses' own records remember the later time.
    clock_file(store).write_bytes(after_install)
    check = store.check("client.station", trusted(real_clock_site))
    assert check.certificate is None and "set back" in check.problems[0]
    clock.advance(3600)  # the clock right again: still void, for good
    check = store.check("client.station", trusted(real_clock_site))
    assert check.certificate is None and "older copy" in check.problems[0]
    clock.advance(3600)
    assert not valid(real_clock_site, store)

    # A copy from before the license was installed does not cover it: the same, even
    # with the clock right all along.
    other = LocalLicenseStore(tmp_path / "ws-2", machine_id="ws-2", clock=clock)
    assert not valid(real_clock_site, other)
    before_install = clock_file(other).read_bytes()
    line = await local_line(real_clock_site)
    other.install(
        (await issue(real_clock_site, other, line.activation_id)).local_response,
        trusted(real_clock_site),
    )
    assert valid(real_clock_site, other)
    clock_file(other).write_bytes(before_install)
    check = other.check("client.station", trusted(real_clock_site))
    assert check.certificate is None and "older copy" in check.problems[0]

    # Another store's mark is refused as altered.
    clock_file(other).write_bytes(after_install)
    assert "does not verify" in other.check("client.station", trusted(real_clock_site)).problems[0]


async def test_an_altered_high_water_mark_is_refused_as_tampered_and_left_alone(
    real_clock_site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    store = await installed_store(real_clock_site, tmp_path, clock)
    another = (
        await issue(
            real_clock_site, store, (await local_line(real_clock_site)).activation_id, "demo-2"
        )
    ).local_response
    original = clock_file(store).read_bytes()
    # One byte: a digit of the year in "seen", so the mark claims an earlier time.
    year = original.index(str(clock.now().year).encode())
    altered = original[:year] + bytes([original[year] - 1]) + original[year + 1 :]
    for damaged in (altered, original[:-2], b"", b"{}"):
        clock_file(store).write_bytes(damaged)
        check = store.check("client.station", trusted(real_clock_site))
        assert check.certificate is None
        assert "does not verify" in check.problems[0] and "altered" in check.problems[0]
        assert clock_file(store).read_bytes() == damaged  # not silently reset
        with pytest.raises(LocalStoreTampered):
            store.install(another, trusted(real_clock_site))
        assert clock_file(store).read_bytes() == damaged
    clock_file(store).write_bytes(original)
    assert valid(real_clock_site, store)  # the genuine mark back: nothing was latched


async def test_a_clock_behind_a_licenses_issue_time_voids_it_without_any_mark(
    real_clock_site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    # The store's own clock a day behind the vendor's from the start: no mark it wrote
    # knows better, but the vendor-signed issue time does.
    clock.advance(-86400)
    store = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1", clock=clock)
    line = await local_line(real_clock_site)
    store.install(
        (await issue(real_clock_site, store, line.activation_id)).local_response,
        trusted(real_clock_site),
    )
    check = store.check("client.station", trusted(real_clock_site))
    assert check.certificate is None and "was issued at" in check.problems[0]
    clock.advance(86400)
    assert valid(real_clock_site, store)


class SteppingClock:
    """A clock that moves a little more than the mark's write step on every reading, from
    any thread, so that every check rewrites the store."""

    def __init__(self) -> None:
        self._start = dt.datetime.now(dt.UTC)
        self._readings = itertools.count()
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self._lock:
            return self._start + dt.timedelta(seconds=61 * next(self._readings))


async def test_checks_from_several_processes_at_once_never_read_as_a_rollback(
    real_clock_site: Site, tmp_path: Path
) -> None:
    clock = SteppingClock()
    first = LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1", clock=clock)
    line = await local_line(real_clock_site)
    first.install(
        (await issue(real_clock_site, first, line.activation_id)).local_response,
        trusted(real_clock_site),
    )
    # Each store object stands for a process with the directory open (WorkStation, tools).
    stores = [first] + [
        LocalLicenseStore(tmp_path / "ws-1", machine_id="ws-1", clock=clock) for _ in range(3)
    ]
    keys = trusted(real_clock_site)

    def checks(store: LocalLicenseStore) -> list[tuple[str, ...]]:
        return [
            found.problems
            for found in (store.check("client.station", keys) for _ in range(40))
            if found.certificate is None
        ]

    with ThreadPoolExecutor(len(stores)) as pool:
        refused = [problems for result in pool.map(checks, stores) for problems in result]
    assert refused == []
