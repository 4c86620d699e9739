"""Activation Server decisions over real migrated databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nacl.signing import SigningKey
from sqlalchemy import func, select

from services.activation_server.domain.activations import Activations
from services.activation_server.domain.entitlements import Entitlements
from services.activation_server.domain.errors import (
    HostKeyMismatch,
    LineExpired,
    NotEnoughSeatsLeft,
    RequestIdReused,
)
from services.activation_server.domain.model import EntitlementLine, LicenseKind, NewLine
from services.activation_server.domain.vendor_key import VendorKey
from services.activation_server.server import MIGRATIONS
from services.activation_server.store.repository import ActivationStore
from services.activation_server.store.tables import activations, audit_log
from tessera.activation.v1.activation_pb2 import HostActivationRequest, VendorActivationResponse
from tessera.clock import to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.envelope import open_envelope, seal
from tessera.errors import BadSignature, InvalidInput
from tessera.keys import HostIdentity, machine_binding
from tessera.storage import create_engine, migrate
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory

FEATURE = "client.station"


class ActivationReplica:
    """One Activation Server replica: its own engine and store over the shared database."""

    def __init__(self, store: ActivationStore, key: VendorKey, clock: FakeClock) -> None:
        self.store = store
        self.entitlements = Entitlements(store, clock)
        self.activations = Activations(store, key, clock)


Replicas = Callable[[int], Awaitable[list[ActivationReplica]]]


@pytest.fixture
def vendor_key() -> VendorKey:
    return VendorKey(SigningKey.generate())


@pytest.fixture
async def replicas(
    databases: DatabaseFactory, clock: FakeClock, vendor_key: VendorKey
) -> AsyncIterator[Replicas]:
    url = await databases.new("activation")
    stores: list[ActivationStore] = []

    async def make(count: int) -> list[ActivationReplica]:
        made = []
        for _ in range(count):
            engine = create_engine(url)
            await migrate(engine, MIGRATIONS)
            store = ActivationStore(engine)
            stores.append(store)
            made.append(ActivationReplica(store, vendor_key, clock))
        return made

    yield make
    for store in stores:
        await store.engine.dispose()


@pytest.fixture
async def replica(replicas: Replicas) -> ActivationReplica:
    [one] = await replicas(1)
    return one


def host(name: str) -> HostIdentity:
    return HostIdentity(SigningKey.generate(), machine_binding(name))


def request(
    identity: HostIdentity,
    activation_id: str,
    count: int,
    request_id: str,
    clock: FakeClock,
    *,
    claimed_host_id: str | None = None,
) -> SignedEnvelope:
    host_id = claimed_host_id or identity.host_id
    return seal(
        HostActivationRequest(
            request_id=request_id,
            activation_id=activation_id,
            count=count,
            host_id=host_id,
            host_public_key=identity.public_key,
            machine_binding=identity.machine_binding,
            created_at=to_timestamp(clock.now()),
        ),
        host_id,
        identity.signing_key,
    )


async def new_line(
    replica: ActivationReplica, count: int, expires_at: dt.datetime | None = None
) -> EntitlementLine:
    entitlement = await replica.entitlements.create(
        "Test Building Owner",
        "ops@example.com",
        [NewLine(FEATURE, count, LicenseKind.NETWORK, expires_at)],
    )
    return entitlement.lines[0]


async def line_now(replica: ActivationReplica, line: EntitlementLine) -> EntitlementLine:
    order = await replica.entitlements.get_order(line.entitlement_id)
    [current] = [x for x in order.lines if x.activation_id == line.activation_id]
    return current


async def count_rows(replica: ActivationReplica, table: object) -> int:
    async with replica.store.engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(table)))  # type: ignore[arg-type]


def certificate_of(response: SignedEnvelope, key: VendorKey) -> LicenseCertificate:
    trusted = {key.key_id: key.signing_key.verify_key}
    answer = open_envelope(response, VendorActivationResponse, trusted)
    return open_envelope(answer.certificate, LicenseCertificate, trusted)


async def test_activation_grants_a_signed_certificate_for_the_host(
    replica: ActivationReplica, vendor_key: VendorKey, clock: FakeClock
) -> None:
    line = await new_line(replica, 10)
    identity = host("site-a")
    response = await replica.activations.activate(
        request(identity, line.activation_id, 4, "req-1", clock)
    )
    certificate = certificate_of(response, vendor_key)
    assert (certificate.host_id, certificate.count, certificate.feature) == (
        identity.host_id,
        4,
        FEATURE,
    )
    assert certificate.request_id == "req-1"
    current = await line_now(replica, line)
    assert (current.activated, current.available) == (4, 6)


async def test_concurrent_activations_from_many_hosts_never_exceed_the_line(
    replicas: Replicas, vendor_key: VendorKey, clock: FakeClock
) -> None:
    servers = await replicas(3)
    line = await new_line(servers[0], 10)
    hosts = [host(f"site-{i}") for i in range(8)]
    asks = [(identity, count) for identity in hosts for count in (1, 2, 3)]  # 48 seats asked

    results = await asyncio.gather(
        *(
            servers[i % 3].activations.activate(
                request(identity, line.activation_id, count, f"req-{i}", clock)
            )
            for i, (identity, count) in enumerate(asks)
        ),
        return_exceptions=True,
    )
    granted = [
        (asks[i][1], certificate_of(r, vendor_key))
        for i, r in enumerate(results)
        if isinstance(r, SignedEnvelope)
    ]
    refused = [asks[i][1] for i, r in enumerate(results) if isinstance(r, NotEnoughSeatsLeft)]
    unexpected = [r for r in results if not isinstance(r, SignedEnvelope | NotEnoughSeatsLeft)]
    assert unexpected == []
    total = sum(count for count, _ in granted)
    assert 0 < total <= 10
    for count, certificate in granted:
        assert certificate.count == count
    for server in servers:
        current = await line_now(server, line)
        assert current.activated == total
        # Seats only shrink, so whatever was refused is more than what is left now.
        assert all(count > current.available for count in refused)
    recorded = await servers[1].activations.list(line.entitlement_id, "")
    assert sum(record.count for record in recorded) == total
    assert len(recorded) == len(granted)
    assert await count_rows(servers[2], activations) == len(granted)


@pytest.mark.parametrize("count", [3, 10], ids=["part-of-the-line", "the-whole-line"])
async def test_the_same_request_sent_concurrently_gets_one_answer(
    replicas: Replicas, vendor_key: VendorKey, clock: FakeClock, count: int
) -> None:
    servers = await replicas(3)
    line = await new_line(servers[0], 10)
    envelope = request(host("site-a"), line.activation_id, count, "req-retried", clock)

    results = await asyncio.gather(
        *(servers[i % 3].activations.activate(envelope) for i in range(5)),
        return_exceptions=True,
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    answers = {r.SerializeToString() for r in results}  # type: ignore[union-attr]
    assert len(answers) == 1
    assert certificate_of(results[0], vendor_key).count == count  # type: ignore[arg-type]
    assert (await line_now(servers[1], line)).activated == count
    assert await count_rows(servers[0], activations) == 1
    granted = select(func.count()).where(audit_log.c.action == "activation.granted")
    async with servers[0].store.engine.connect() as connection:
        assert await connection.scalar(granted) == 1

    # And a later retry, sequentially, still gets the same bytes.
    again = await servers[2].activations.activate(envelope)
    assert again.SerializeToString() in answers


async def test_request_id_reused_for_another_count_is_refused(
    replica: ActivationReplica, clock: FakeClock
) -> None:
    line = await new_line(replica, 10)
    identity = host("site-a")
    await replica.activations.activate(request(identity, line.activation_id, 2, "req-1", clock))
    with pytest.raises(RequestIdReused):
        await replica.activations.activate(request(identity, line.activation_id, 3, "req-1", clock))
    other = await new_line(replica, 10)
    with pytest.raises(RequestIdReused):
        await replica.activations.activate(
            request(identity, other.activation_id, 2, "req-1", clock)
        )
    assert (await line_now(replica, line)).activated == 2
    assert (await line_now(replica, other)).activated == 0


async def test_request_ids_are_unique_per_host_not_across_hosts(
    replica: ActivationReplica, clock: FakeClock
) -> None:
    line = await new_line(replica, 10)
    await replica.activations.activate(
        request(host("site-a"), line.activation_id, 2, "op-1", clock)
    )
    await replica.activations.activate(
        request(host("site-b"), line.activation_id, 3, "op-1", clock)
    )
    assert (await line_now(replica, line)).activated == 5


async def test_host_id_that_does_not_belong_to_the_key_is_refused(
    replica: ActivationReplica, clock: FakeClock
) -> None:
    line = await new_line(replica, 10)
    identity = host("site-a")
    someone_else = host("site-b")
    with pytest.raises(HostKeyMismatch):
        await replica.activations.activate(
            request(
                identity,
                line.activation_id,
                1,
                "req-1",
                clock,
                claimed_host_id=someone_else.host_id,
            )
        )
    # Same key, but on another machine: the binding in the payload decides the host id.
    moved = HostIdentity(identity.signing_key, machine_binding("another-machine"))
    with pytest.raises(HostKeyMismatch):
        await replica.activations.activate(
            request(moved, line.activation_id, 1, "req-2", clock, claimed_host_id=identity.host_id)
        )
    # Signed under a key id other than the host id it claims.
    document = HostActivationRequest(
        request_id="req-3",
        activation_id=line.activation_id,
        count=1,
        host_id=identity.host_id,
        host_public_key=identity.public_key,
        machine_binding=identity.machine_binding,
    )
    with pytest.raises(HostKeyMismatch):
        await replica.activations.activate(seal(document, "some-key", identity.signing_key))
    # Signed by a key other than the one in the payload.
    with pytest.raises(BadSignature):
        await replica.activations.activate(
            seal(document, identity.host_id, someone_else.signing_key)
        )
    assert (await line_now(replica, line)).activated == 0
    assert await count_rows(replica, activations) == 0


async def test_expired_line_is_refused(replica: ActivationReplica, clock: FakeClock) -> None:
    line = await new_line(replica, 10, expires_at=clock.now() + dt.timedelta(days=1))
    identity = host("site-a")
    await replica.activations.activate(request(identity, line.activation_id, 1, "req-1", clock))
    clock.advance(dt.timedelta(days=1).total_seconds())
    with pytest.raises(LineExpired):
        await replica.activations.activate(request(identity, line.activation_id, 1, "req-2", clock))
    assert (await line_now(replica, line)).activated == 1
    assert await count_rows(replica, activations) == 1


async def test_not_enough_seats_left_changes_nothing(
    replica: ActivationReplica, clock: FakeClock
) -> None:
    line = await new_line(replica, 5)
    await replica.activations.activate(request(host("a"), line.activation_id, 4, "req-1", clock))
    with pytest.raises(NotEnoughSeatsLeft) as refused:
        await replica.activations.activate(
            request(host("b"), line.activation_id, 2, "req-2", clock)
        )
    assert refused.value.metadata["available"] == "1"
    assert (await line_now(replica, line)).activated == 4
    assert await count_rows(replica, activations) == 1


async def test_a_count_near_the_int32_limit_is_refused_cleanly(
    replica: ActivationReplica, clock: FakeClock
) -> None:
    line = await new_line(replica, 5)
    await replica.activations.activate(request(host("a"), line.activation_id, 1, "req-1", clock))
    with pytest.raises(InvalidInput):
        await replica.activations.activate(
            request(host("b"), line.activation_id, 2**31 - 1, "req-2", clock)
        )
    with pytest.raises(NotEnoughSeatsLeft):
        await replica.activations.activate(
            request(host("b"), line.activation_id, 100_000, "req-3", clock)
        )
    assert (await line_now(replica, line)).activated == 1
