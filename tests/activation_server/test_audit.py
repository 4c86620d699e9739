"""The vendor's audit log: every decision chained by SHA-256, paged, verified; tampering
(an edited, deleted or inserted entry, a cut-off tail) is found, by VerifyAuditLog and by
``python -m services.activation_server.audit verify``.

The Activation Server runs alone over real gRPC in process, on SQLite and PostgreSQL; the
tests tamper with its database directly, as an intruder with database access would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from alembic import command
from alembic.config import Config
from nacl.signing import SigningKey
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from services.activation_server.domain.audit import verify_store
from services.activation_server.server import MIGRATIONS
from services.activation_server.store.repository import ActivationStore
from services.activation_server.store.tables import activations, audit_head, audit_log
from tessera.activation.v1 import activation_pb2 as apb
from tessera.clock import to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.envelope import seal
from tessera.storage import create_engine, migrate, sqlite_url
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.vendor import (
    STAFF,
    ActivationServerUnderTest,
    Host,
    activate,
    expect,
    give_back,
    start_vendor_at,
)

Code = grpc.StatusCode


def expected_hash(previous: bytes, entry: apb.AuditEntry) -> bytes:
    """The documented chain: SHA-256(previous hash || canonical JSON of the content)."""
    at = entry.at.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    content = [entry.sequence, at, entry.action, entry.subject, entry.actor, entry.detail_json]
    encoded = json.dumps(content, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(previous + encoded).digest()


async def decisions(vendor: ActivationServerUnderTest, clock: FakeClock) -> None:
    """One of each kind of vendor decision, a second apart."""
    host = Host.new()
    line = await vendor.line(count=3, partial_return_allowed=True)  # entitlement.created
    clock.advance(1)
    certificate = await activate(vendor, host, line, 2)  # activation.granted
    clock.advance(1)
    await expect(  # activation.refused
        vendor.activation.Activate(
            apb.ActivateRequest(request=host.activation(line.activation_id, 5))
        ),
        Code.RESOURCE_EXHAUSTED,
        "NOT_ENOUGH_SEATS_LEFT",
    )
    clock.advance(1)
    await give_back(vendor, host, certificate, count=1)  # return.credited
    clock.advance(1)
    await give_back(vendor, host, certificate, count=1)  # return.refused (stale revision)
    clock.advance(1)
    await vendor.activation.Repair(apb.RepairRequest(request=host.repair()))  # repair.granted
    clock.advance(1)
    await vendor.staff.ForceReturn(  # force_return
        apb.ForceReturnRequest(certificate_id=certificate.certificate_id, reason="test"),
        metadata=STAFF,
    )
    clock.advance(1)
    await vendor.staff.RotateSigningKey(apb.RotateSigningKeyRequest(), metadata=STAFF)


ACTIONS = [
    "entitlement.created",
    "activation.granted",
    "activation.refused",
    "return.credited",
    "return.refused",
    "repair.granted",
    "force_return",
    "key.rotated",
]


async def test_every_decision_is_an_entry_of_one_hash_chain(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    await decisions(vendor, clock)
    entries = await vendor.audit()
    assert [entry.action for entry in entries] == ACTIONS
    assert [entry.sequence for entry in entries] == list(range(1, len(ACTIONS) + 1))
    previous = bytes(32)
    for entry in entries:
        assert entry.previous_hash == previous
        assert entry.hash == expected_hash(previous, entry)
        detail = json.loads(entry.detail_json)
        assert entry.detail_json == json.dumps(detail, sort_keys=True, separators=(",", ":"))
        previous = entry.hash
    assert {entry.actor for entry in entries[:1] + entries[6:]} == {"vendor"}

    verdict = await vendor.staff.VerifyAuditLog(apb.VerifyAuditLogRequest(), metadata=STAFF)
    assert (verdict.intact, verdict.entries_checked) == (True, len(ACTIONS))
    assert (verdict.first_bad_sequence, verdict.problem) == (0, "")
    assert (verdict.head_sequence, verdict.head_hash) == (len(ACTIONS), entries[-1].hash)


async def test_the_log_pages_by_sequence_and_filters_by_subject(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    await decisions(vendor, clock)
    every = await vendor.audit()
    pages, after = [], 0
    while True:
        page = await vendor.staff.GetAuditLog(
            apb.GetAuditLogRequest(after_sequence=after, page_size=3), metadata=STAFF
        )
        assert (page.head_sequence, page.head_hash) == (len(every), every[-1].hash)
        pages.append([entry.sequence for entry in page.entries])
        if not page.next_after_sequence:
            break
        after = page.next_after_sequence
    assert pages == [[1, 2, 3], [4, 5, 6], [7, 8]]

    line = json.loads(every[0].detail_json)["lines"][0]["activation_id"]
    about_line = await vendor.staff.GetAuditLog(
        apb.GetAuditLogRequest(subject=line), metadata=STAFF
    )
    assert [entry.action for entry in about_line.entries] == [
        "activation.granted",
        "activation.refused",
        "return.credited",
        "return.refused",
        "force_return",
    ]
    assert about_line.next_after_sequence == 0

    huge = await vendor.staff.GetAuditLog(
        apb.GetAuditLogRequest(page_size=1_000_000), metadata=STAFF
    )
    assert len(huge.entries) == len(every)  # at most 1000 a page; here all of them
    for request in (
        apb.GetAuditLogRequest(page_size=-1),
        apb.GetAuditLogRequest(after_sequence=-1),
    ):
        await expect(
            vendor.staff.GetAuditLog(request, metadata=STAFF),
            Code.INVALID_ARGUMENT,
            "INVALID_INPUT",
        )
    await expect(
        vendor.staff.GetAuditLog(apb.GetAuditLogRequest()),
        Code.UNAUTHENTICATED,
        "CREDENTIAL_MISSING",
    )


async def test_refusals_of_signed_requests_are_audited_but_junk_is_not(
    vendor: ActivationServerUnderTest,
) -> None:
    host = Host.new()
    line = await vendor.line(count=1)
    start = len(await vendor.audit())
    forged = host.activation(line.activation_id, 1)
    forged.signature = bytes(64)
    stranger = SigningKey.generate()
    junk = [
        apb.ActivateRequest(request=forged),  # bad signature
        apb.ActivateRequest(request=host.activation(line.activation_id, 0)),  # bad input
        apb.ActivateRequest(request=seal(apb.HostActivationRequest(), "x", stranger)),
    ]
    for request in junk:
        with pytest.raises(grpc.aio.AioRpcError):
            await vendor.activation.Activate(request)
    assert len(await vendor.audit()) == start

    await expect(
        vendor.activation.Activate(
            apb.ActivateRequest(request=host.activation(line.activation_id, 2))
        ),
        Code.RESOURCE_EXHAUSTED,
        "NOT_ENOUGH_SEATS_LEFT",
    )
    [refused] = await vendor.audit("activation.refused")
    assert (refused.subject, refused.actor) == (line.activation_id, host.host_id)
    assert json.loads(refused.detail_json)["reason"] == "NOT_ENOUGH_SEATS_LEFT"


async def test_two_replicas_append_to_one_unbroken_chain(
    clock: FakeClock, vendor: ActivationServerUnderTest
) -> None:
    line = await vendor.line(count=10)
    # The second replica runs over the first one's database and key files.
    replica = await start_vendor_at(vendor.data_dir, vendor.database_url, clock)
    try:
        hosts = [Host.new(f"machine-{i}") for i in range(16)]
        results = await asyncio.gather(
            *(
                (vendor if i % 2 else replica).activation.Activate(
                    apb.ActivateRequest(request=host.activation(line.activation_id, 1))
                )
                for i, host in enumerate(hosts)
            ),
            return_exceptions=True,
        )
        granted = [r for r in results if isinstance(r, apb.ActivateResponse)]
        assert len(granted) == 10
        entries = await vendor.audit()
        assert [entry.sequence for entry in entries] == list(range(1, 18))
        assert sorted(entry.action for entry in entries[1:]) == sorted(
            ["activation.granted"] * 10 + ["activation.refused"] * 6
        )
        verdict = await replica.staff.VerifyAuditLog(apb.VerifyAuditLogRequest(), metadata=STAFF)
        assert (verdict.intact, verdict.entries_checked) == (True, 17)
    finally:
        await replica.close()


# -- tampering ---------------------------------------------------------------------------


async def _edit(engine: AsyncEngine, last: int) -> tuple[int, str]:
    async with engine.begin() as connection:
        await connection.execute(
            update(audit_log).where(audit_log.c.sequence == 3).values(detail='{"count":1}')
        )
    return 3, "entry 3 was edited"


async def _edit_and_rehash(engine: AsyncEngine, last: int) -> tuple[int, str]:
    """Entry 3 edited and given a fresh, correct hash: entry 4 still links to the old one."""
    async with engine.begin() as connection:
        row = (
            (await connection.execute(select(audit_log).where(audit_log.c.sequence == 3)))
            .mappings()
            .one()
        )
        detail = '{"count":1}'
        entry = apb.AuditEntry(
            sequence=3, at=to_timestamp(row["at"]), action=row["action"],
            subject=row["subject"], actor=row["actor"], detail_json=detail,
        )  # fmt: skip
        await connection.execute(
            update(audit_log)
            .where(audit_log.c.sequence == 3)
            .values(detail=detail, hash=expected_hash(row["previous_hash"], entry))
        )
    return 3, "entry 3 was edited"


async def _delete_middle(engine: AsyncEngine, last: int) -> tuple[int, str]:
    async with engine.begin() as connection:
        await connection.execute(delete(audit_log).where(audit_log.c.sequence == 4))
    return 4, "entry 4 is missing"


async def _delete_tail(engine: AsyncEngine, last: int) -> tuple[int, str]:
    async with engine.begin() as connection:
        await connection.execute(delete(audit_log).where(audit_log.c.sequence >= last - 1))
    return last - 1, f"entries {last - 1}-{last} are missing"


async def _insert_after_head(engine: AsyncEngine, last: int) -> tuple[int, str]:
    async with engine.begin() as connection:
        head = (await connection.execute(select(audit_head))).mappings().one()
        entry = apb.AuditEntry(
            sequence=last + 1, at=to_timestamp(dt.datetime.now(dt.UTC)), action="key.rotated",
            subject="VK-0000-0000", actor="vendor", detail_json="{}",
        )  # fmt: skip
        await connection.execute(
            insert(audit_log).values(
                sequence=last + 1, at=dt.datetime.now(dt.UTC).replace(microsecond=0),
                action=entry.action, subject=entry.subject, actor=entry.actor,
                detail=entry.detail_json, previous_hash=head["hash"], hash=bytes(32),
            )
        )  # fmt: skip
    return last + 1, f"entry {last + 1} was inserted after the head (the log ends at {last})"


async def _insert_in_the_middle(engine: AsyncEngine, last: int) -> tuple[int, str]:
    """A forged entry 3, correctly chained to entry 2, with the later entries moved up one
    and the head moved to match: the renumbered entries give it away."""
    at = dt.datetime(2026, 11, 27, 12, 0, 2, tzinfo=dt.UTC)
    async with engine.begin() as connection:
        for sequence in range(last, 2, -1):
            await connection.execute(
                update(audit_log)
                .where(audit_log.c.sequence == sequence)
                .values(sequence=sequence + 1)
            )
        two = (
            (await connection.execute(select(audit_log).where(audit_log.c.sequence == 2)))
            .mappings()
            .one()
        )
        forged = apb.AuditEntry(
            sequence=3, at=to_timestamp(at), action="return.credited",
            subject=two["subject"], actor=two["actor"], detail_json='{"credited":2}',
        )  # fmt: skip
        digest = expected_hash(two["hash"], forged)
        await connection.execute(
            insert(audit_log).values(
                sequence=3, at=at, action=forged.action, subject=forged.subject,
                actor=forged.actor, detail=forged.detail_json, previous_hash=two["hash"],
                hash=digest,
            )
        )  # fmt: skip
        tail = (
            (await connection.execute(select(audit_log).where(audit_log.c.sequence == last + 1)))
            .mappings()
            .one()
        )
        await connection.execute(update(audit_head).values(sequence=last + 1, hash=tail["hash"]))
    return 3, "entry 3 was inserted"


async def _delete_head_row(engine: AsyncEngine, last: int) -> tuple[int, str]:
    """Rolling the head back with the tail: the chain is whole but shorter than it was.
    Only a head pinned elsewhere shows that; here the head is merely lowered by one."""
    async with engine.begin() as connection:
        previous = (
            (await connection.execute(select(audit_log).where(audit_log.c.sequence == last - 1)))
            .mappings()
            .one()
        )
        await connection.execute(delete(audit_log).where(audit_log.c.sequence == last))
        await connection.execute(
            update(audit_head).values(sequence=last - 1, hash=previous["hash"])
        )
    return 0, ""


TAMPERING: dict[str, Callable[[AsyncEngine, int], Awaitable[tuple[int, str]]]] = {
    "edited": _edit,
    "edited-and-rehashed": _edit_and_rehash,
    "deleted-in-the-middle": _delete_middle,
    "deleted-tail": _delete_tail,
    "inserted-after-the-head": _insert_after_head,
    "inserted-in-the-middle": _insert_in_the_middle,
}


async def audit_cli(*args: str) -> tuple[int, str]:
    """Run ``python -m services.activation_server.audit`` as an operator would."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.activation_server.audit", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


@pytest.mark.parametrize("tampering", sorted(TAMPERING))
async def test_verification_finds_the_first_tampered_entry(
    vendor: ActivationServerUnderTest, clock: FakeClock, tampering: str
) -> None:
    await decisions(vendor, clock)

    first_bad, problem = await TAMPERING[tampering](vendor.engine, len(ACTIONS))

    verdict = await vendor.staff.VerifyAuditLog(apb.VerifyAuditLogRequest(), metadata=STAFF)
    assert not verdict.intact
    assert (verdict.first_bad_sequence, verdict.problem) == (first_bad, problem)
    assert verdict.entries_checked == first_bad - 1


async def test_the_audit_command_exits_0_when_intact_and_1_when_broken(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    await decisions(vendor, clock)
    code, output = await audit_cli("verify", "--database-url", vendor.database_url)
    assert code == 0, output
    assert output.startswith(f"audit log intact: {len(ACTIONS)} entries verified")

    await _delete_tail(vendor.engine, len(ACTIONS))

    code, output = await audit_cli("verify", "--database-url", vendor.database_url)
    assert code == 1, output
    last = len(ACTIONS)
    assert f"BROKEN at entry {last - 1}: entries {last - 1}-{last} are missing" in output


async def test_a_tail_cut_together_with_the_head_needs_a_pinned_head(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    """Whoever rewrites the head too leaves a whole, shorter chain: the head hash from an
    earlier GetAuditLog, kept elsewhere, is what shows it."""
    await decisions(vendor, clock)
    pinned = await vendor.staff.GetAuditLog(apb.GetAuditLogRequest(page_size=1), metadata=STAFF)
    await _delete_head_row(vendor.engine, len(ACTIONS))
    verdict = await vendor.staff.VerifyAuditLog(apb.VerifyAuditLogRequest(), metadata=STAFF)
    assert verdict.intact
    assert (verdict.head_sequence, verdict.head_hash) != (pinned.head_sequence, pinned.head_hash)


async def test_the_audit_command_reads_the_data_directory(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock
) -> None:
    if databases.kind != "sqlite":
        pytest.skip("the data directory holds the default SQLite database")
    data_dir = tmp_path / "activation_server"
    vendor = await start_vendor_at(data_dir, sqlite_url(data_dir, "activation.db"), clock)
    try:
        await decisions(vendor, clock)
        code, output = await audit_cli("verify", "--data-dir", str(data_dir))
        assert code == 0, output
        assert f"{len(ACTIONS)} entries verified" in output
        await _edit(vendor.engine, len(ACTIONS))
        code, output = await audit_cli("verify", "--data-dir", str(data_dir))
        assert code == 1, output
    finally:
        await vendor.close()
    code, output = await audit_cli("verify", "--data-dir", str(tmp_path / "nothing-here"))
    assert code == 2, output
    assert not (tmp_path / "nothing-here").exists()


# -- the migration that introduced the chain ---------------------------------------------


async def _alembic(engine: AsyncEngine, action: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    async with engine.begin() as connection:

        def run(sync_connection: Connection) -> None:
            config.attributes["connection"] = sync_connection
            getattr(command, action)(config, revision)

        await connection.run_sync(run)


async def test_the_migration_chains_the_existing_log_and_keeps_each_activations_certificate(
    databases: DatabaseFactory,
) -> None:
    engine = create_engine(await databases.new("activation"))
    try:
        await _alembic(engine, "upgrade", "0001")
        at = dt.datetime(2026, 11, 1, 9, 30, 15, 123456, tzinfo=dt.UTC)
        vendor_key = SigningKey.generate()
        certificate = seal(
            LicenseCertificate(certificate_id="cert-1", count=2, host_id="HOST-1"),
            "VK-1",
            vendor_key,
        )
        answer = seal(
            apb.VendorActivationResponse(request_id="r-1", certificate=certificate),
            "VK-1",
            vendor_key,
        )
        async with engine.begin() as connection:
            for statement, values in [
                ("INSERT INTO entitlements VALUES (:e, 'ACME', '', :at)", {"e": "ENT-1", "at": at}),
                (
                    "INSERT INTO entitlement_lines (activation_id, entitlement_id, position, "
                    "feature, kind, count, activated) VALUES "
                    "('ACT-1', 'ENT-1', 0, 'client.station', 'network', 5, 2)",
                    {},
                ),
                (
                    "INSERT INTO activations VALUES "
                    "('HOST-1', 'r-1', 'ACT-1', :key, 2, 'cert-1', :answer, :at)",
                    {"key": b"k" * 32, "answer": answer.SerializeToString(), "at": at},
                ),
                (
                    "INSERT INTO audit_log (at, action, subject, detail) VALUES "
                    "(:at, 'entitlement.created', 'ENT-1', :d1), "
                    "(:at, 'activation.granted', 'ACT-1', :d2)",
                    {
                        "at": at,
                        "d1": json.dumps({"customer_organization": "ACME"}, sort_keys=True),
                        "d2": json.dumps({"host_id": "HOST-1", "count": 2}, sort_keys=True),
                    },
                ),
            ]:
                if engine.dialect.name == "sqlite":
                    values = {
                        k: v.replace(tzinfo=None) if isinstance(v, dt.datetime) else v
                        for k, v in values.items()
                    }
                await connection.execute(text(statement), values)

        await migrate(engine, MIGRATIONS)

        store = ActivationStore(engine)
        verdict = await verify_store(store)
        assert (verdict.intact, verdict.entries_checked, verdict.head.sequence) == (True, 2, 2)
        async with store.transaction() as repo:
            entries = await repo.audit.entries(0, 10, None)
            [record] = await repo.list_activations(None, None)
        assert [(e.actor, e.at) for e in entries] == [("vendor", at), ("HOST-1", at)]
        assert (record.holder_host_id, record.activated_count, record.revision) == ("HOST-1", 2, 0)
        assert record.state.value == "active"
        assert SignedEnvelope.FromString(record.certificate_envelope) == certificate
        async with engine.connect() as connection:
            assert await connection.scalar(select(activations.c.registration)) is None

        # And back: the log keeps its entries in order, the activation its row.
        await _alembic(engine, "downgrade", "0001")
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT id, action FROM audit_log"))).all()
            assert sorted(rows) == [(1, "entitlement.created"), (2, "activation.granted")]
            count = await connection.scalar(text("SELECT count FROM activations"))
            assert count == 2
    finally:
        await engine.dispose()
