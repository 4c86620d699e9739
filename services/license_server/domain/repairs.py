"""Repairing trusted storage: the vendor re-issues what it records this host holds.

``prepare`` signs a request with the host key, naming the host id the licenses were
activated under when the machine changed since. ``complete`` verifies the vendor's
answer, replaces trusted storage with exactly the certificates it lists (certificates it
does not list leave: the vendor no longer records them as this host's), and re-seals
storage to this host and machine in a new ledger segment. Both are idempotent.

The vendor allows a host only a few repairs a year, so ``prepare`` refuses while trusted
storage is healthy (NothingToRepair) unless forced: a repair that is not needed must not
use one up.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

from services.license_server.domain import ledger, pools
from services.license_server.domain.errors import (
    CertificateForAnotherHost,
    NothingToRepair,
    RepairFromAnotherHost,
    RequestIdReused,
    RequestNotPreparedHere,
)
from services.license_server.domain.model import (
    LeaseEvent,
    PendingRequest,
    RequestKind,
    StoredCertificate,
)
from services.license_server.domain.pools import fit_pool
from services.license_server.domain.ports import Queries
from services.license_server.domain.trust import TrustReport
from services.license_server.domain.trusted_storage import (
    TrustedStorage,
    certificate_of,
    request_id_or_new,
    stored_from,
)
from services.license_server.domain.vendor_standing import CHECK_IN_CAUSES
from tessera.activation.v1.activation_pb2 import HostRepairRequest, VendorRepairResponse
from tessera.clock import from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.envelope import open_envelope, seal
from tessera.server import failpoints


@dataclass(frozen=True)
class Repaired:
    health: TrustReport
    already_completed: bool


class Repairs:
    """Re-seals trusted storage around the vendor's re-issued certificates."""

    def __init__(self, trusted_storage: TrustedStorage) -> None:
        self.storage = trusted_storage

    async def prepare(self, request_id: str, force: bool = False) -> tuple[str, SignedEnvelope]:
        """A host-signed repair request, journaled as pending (same id, same bytes).
        Refused with NothingToRepair, journaling nothing, while trusted storage is healthy
        and ``force`` is not set; a request prepared before is returned either way."""
        storage = self.storage
        identity = storage.identity
        request_id = request_id_or_new(request_id)
        now = storage.clock.now()
        async with storage.store.transaction() as repo:
            existing = await repo.get_pending_request(request_id)
            seal_row = await repo.get_seal()
            held = [row for row in await repo.list_certificates() if row.returned_at is None]
        if existing is not None:
            if existing.kind is not RequestKind.REPAIR:
                raise RequestIdReused(
                    f"request id {request_id!r} was prepared for another request; use a new "
                    "request id (or none)",
                    metadata={"request_id": request_id},
                )
            return request_id, SignedEnvelope.FromString(existing.request_envelope)
        if seal_row is not None and seal_row.host_public_key != identity.public_key and held:
            # Storage sealed by another host key (host.key lost or replaced, or another
            # server's database): the vendor would re-issue only what it records for this
            # key, so the repair would empty trusted storage and count, and strand those
            # seats at the vendor. Refused before anything is signed.
            raise RepairFromAnotherHost(
                f"trusted storage holds {len(held)} certificate(s) "
                f"({sum(row.count for row in held)} seat(s)) activated to host "
                f"{seal_row.host_id} with another host key than this License Server's "
                f"(host {identity.host_id}); a repair cannot move them to a new key. Put "
                "that host's host.key back in the data directory and restart, or have the "
                "vendor force-return them and activate again",
                metadata={"host_id": seal_row.host_id},
            )
        if not force:
            health = await storage.judge()
            if health.healthy:
                raise NothingToRepair(
                    f"trusted storage of host {identity.host_id} is healthy (every "
                    f"certificate serves): nothing to repair, and no repair was asked of the "
                    "vendor, which allows only a few a year. If the vendor records licenses "
                    "this License Server lacks, complete the operation that activated them "
                    "(`tessera operations --unfinished`), or repair anyway with --force "
                    "(it counts as one of the year's repairs)",
                    metadata={"host_id": identity.host_id},
                )
            if all(problem.cause in CHECK_IN_CAUSES for problem in health.problems):
                # The vendor withdrew these at a check-in; it would re-issue nothing.
                raise NothingToRepair(
                    f"the certificates of host {identity.host_id} that do not serve were "
                    "withdrawn by a check-in with the vendor (superseded by a repair "
                    "elsewhere, returned, or a check-in overdue): a repair does not bring "
                    "them back and would count as one of the year's repairs. Run `tessera "
                    "check-in` for an overdue one; call the vendor if this server should "
                    "hold the others",
                    metadata={"host_id": identity.host_id},
                )
        # Only the same host key may claim the licenses of the host id it had before the
        # machine changed; a copied database names another key's host, which it may not.
        previous = ""
        if (
            seal_row is not None
            and seal_row.host_public_key == identity.public_key
            and seal_row.host_id != identity.host_id
        ):
            previous = seal_row.host_id
        envelope = seal(
            HostRepairRequest(
                request_id=request_id,
                host_id=identity.host_id,
                host_public_key=identity.public_key,
                machine_binding=identity.machine_binding,
                previous_host_id=previous,
                created_at=to_timestamp(now),
            ),
            identity.host_id,
            identity.signing_key,
        )
        existing = await storage.journal_request(
            PendingRequest(
                request_id=request_id,
                activation_id="",
                count=0,
                request_envelope=envelope.SerializeToString(),
                installed_at=None,
                kind=RequestKind.REPAIR,
            ),
            now,
        )
        if existing is not None:
            return request_id, SignedEnvelope.FromString(existing.request_envelope)
        failpoints.reach("license_server.repair.after_prepare")
        return request_id, envelope

    async def complete(self, response_envelope: SignedEnvelope) -> Repaired:
        storage = self.storage
        trusted = storage.vendor_keys()
        response = open_envelope(response_envelope, VendorRepairResponse, trusted)
        if response.host_id != storage.identity.host_id:
            raise CertificateForAnotherHost(
                f"this repair is for host {response.host_id}, not this License Server "
                f"({storage.identity.host_id}); install it on the License Server that asked",
                metadata={"host_id": response.host_id},
            )
        reissued = [
            (storage.open_certificate(envelope, trusted), envelope)
            for envelope in response.certificates
        ]
        decided_at = from_timestamp(response.repaired_at)
        now = storage.clock.now()
        events: list[LeaseEvent] = []
        async with storage.store.transaction() as repo:
            await repo.get_seal(lock=True)  # concurrent completions take turns
            pending = await repo.get_pending_request(response.request_id)
            if pending is None or pending.kind is not RequestKind.REPAIR:
                raise RequestNotPreparedHere(
                    f"repair {response.request_id!r} was not prepared by this License Server; "
                    "install the answer on the License Server that prepared the repair",
                    metadata={"request_id": response.request_id},
                )
            if pending.installed_at is not None:
                already = True
            else:
                already = False
                rows = {row.certificate_id: row for row in await repo.list_certificates()}
                changes = await _replace_certificates(repo, reissued, rows, decided_at, now)
                written = await storage.reseal(repo, now, changes)
                await repo.mark_request_installed(pending.request_id, now)
                for feature in sorted({c.feature for _, c in changes}):
                    events += await fit_pool(
                        repo,
                        feature,
                        now,
                        pools.LICENSE_NOT_HELD,
                        f"the vendor no longer records the {feature} license behind this "
                        "lease as this License Server's",
                    )
        if not already:
            storage.anchor.advance(written)
            storage.publish(events)
            failpoints.reach("license_server.repair.after_install")
        return Repaired(await storage.check(), already_completed=already)


async def _replace_certificates(
    repo: Queries,
    reissued: list[tuple[LicenseCertificate, SignedEnvelope]],
    rows: dict[str, StoredCertificate],
    decided_at: dt.datetime,
    now: dt.datetime,
) -> list[tuple[str, StoredCertificate]]:
    """Make trusted storage hold what the vendor re-issued, and record every live
    certificate in the new ledger segment.

    An answer installed late (another repair, a return or an activation came after the
    vendor decided it) never undoes what came after: a returned certificate stays
    returned, a higher revision stays, and a certificate issued after the decision stays.
    """
    changes: list[tuple[str, StoredCertificate]] = []
    for document, envelope in reissued:
        row = rows.pop(document.certificate_id, None)
        if row is not None and (row.returned_at is not None or row.revision >= document.revision):
            if row.returned_at is None:
                changes.append((ledger.KEPT, row))
            continue
        fresh = stored_from(document, envelope, row.installed_at if row else now)
        if row is not None and row.returning:
            # A return under way keeps its seats withheld.
            fresh = replace(
                fresh,
                returning=min(row.returning, fresh.count),
                return_request_id=row.return_request_id,
            )
        if row is None:
            await repo.insert_certificate(fresh)
        else:
            await repo.update_certificate(fresh)
        changes.append((ledger.REISSUED, fresh))
    for row in rows.values():
        if row.returned_at is not None:
            continue
        if from_timestamp(certificate_of(row).issued_at) > decided_at:
            changes.append((ledger.KEPT, row))  # issued after the vendor decided this repair
            continue
        gone = replace(
            row,
            returning=0,
            return_request_id=None,
            returned_at=now,
            broken_cause=None,
            broken_detail=None,
        )
        await repo.update_certificate(gone)
        changes.append((ledger.REMOVED, gone))
    return changes
