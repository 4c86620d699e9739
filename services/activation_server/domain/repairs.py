"""Repairs: the vendor re-issues exactly what its records say a host holds.

A repair is signed by the key that activated the host's licenses, names the host id they
were activated under (``previous_host_id``) when the machine changed, and re-binds every
active network certificate held there to the host id now. A host key may repair a limited
number of times in any 365 days; the same request id always gets the same answer and a
retry does not count again. A re-binding to another host id is recorded as the key's next
generation (``generations.py``): the host it came from is superseded.
"""

from __future__ import annotations

from dataclasses import replace

from services.activation_server.domain.certificates import reissue
from services.activation_server.domain.decisions import RefusalNote, decide_once
from services.activation_server.domain.errors import (
    LocalLicenseNotRepairable,
    RepairFromAnotherHost,
    RepairLimitReached,
    RequestIdReused,
)
from services.activation_server.domain.generations import record_rebinding
from services.activation_server.domain.host_requests import (
    checked_request_id,
    verify_host_signed,
)
from services.activation_server.domain.limits import REPAIR_WINDOW, Limits, iso_time, next_allowed
from services.activation_server.domain.metrics import VendorMetrics
from services.activation_server.domain.model import RepairRecord
from services.activation_server.domain.ports import VendorRecords, VendorStore
from services.activation_server.domain.vendor_key import Signer
from tessera.activation.v1.activation_pb2 import HostRepairRequest, VendorRepairResponse
from tessera.clock import Clock, to_timestamp
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.validation import checked_text

MAX_HOST_ID = 32


class Repairs:
    """Decides repair requests from License Servers."""

    def __init__(
        self,
        store: VendorStore,
        signer: Signer,
        clock: Clock,
        limits: Limits,
        metrics: VendorMetrics | None = None,
    ) -> None:
        self.store = store
        self.signer = signer
        self.clock = clock
        self.limits = limits
        self.metrics = metrics or VendorMetrics()

    async def repair(self, envelope: SignedEnvelope) -> SignedEnvelope:
        """Decide a signed HostRepairRequest; the same request id gets the same answer."""
        return await decide_once(
            self.store,
            self.clock,
            lambda: _Repair(
                verify_host_signed(envelope, HostRepairRequest),
                self.signer,
                self.clock,
                self.limits,
            ),
            self.metrics.repair,
            "activation_server.repair.after_commit",
        )


class _Repair:
    """One verified repair request, as ``decide_once`` decides it (a ``Decision``)."""

    def __init__(
        self, request: HostRepairRequest, signer: Signer, clock: Clock, limits: Limits
    ) -> None:
        checked_request_id(request.request_id)
        previous_host_id = checked_text("previous_host_id", request.previous_host_id, MAX_HOST_ID)
        # The host id the licenses are held under now.
        self.holder = previous_host_id or request.host_id
        self.request = request
        self.signer = signer
        self.clock = clock
        self.limits = limits

    async def recorded(self, repo: VendorRecords) -> RepairRecord | None:
        # Repairs of one host key are decided one at a time, so none slips past the limit,
        # and a retry that waited here finds the answer recorded by ``decide``.
        await repo.lock_repair_host(self.request.host_public_key)
        return await repo.get_repair(self.request.host_id, self.request.request_id)

    def replay(self, recorded: RepairRecord) -> SignedEnvelope:
        return _replay(recorded, self.request, self.holder)

    async def decide(self, repo: VendorRecords) -> SignedEnvelope:
        request, holder = self.request, self.holder
        held = await repo.held_by(holder)
        if not held and await repo.holds_local_licenses(holder):
            raise LocalLicenseNotRepairable(
                f"host {holder} holds only local licenses; they cannot be repaired (a client "
                "host whose local license broke gets a new one)",
                metadata={"host_id": holder},
            )
        if any(activation.host_public_key != request.host_public_key for activation in held):
            raise RepairFromAnotherHost(
                f"the licenses of host {holder} were activated with another key; only the "
                "License Server that activated them may repair them",
                metadata={"host_id": holder},
            )
        now = self.clock.now()
        recent = await repo.repairs_since(request.host_public_key, now - REPAIR_WINDOW)
        limit = self.limits.max_repairs_per_year
        allowed_at = next_allowed(recent, limit, REPAIR_WINDOW)
        if allowed_at is not None:
            when = iso_time(allowed_at)
            next_repair = (
                f"the next repair is allowed from {when[:10]}"
                if limit
                else "this Activation Server allows no repairs"
            )
            raise RepairLimitReached(
                f"host {request.host_id} was repaired {len(recent)} times in the last 365 "
                f"days (at most {limit}); {next_repair}",
                metadata={"next_allowed_at": when, "host_id": request.host_id},
            )
        certificates = []
        for activation in held:
            certificate = reissue(activation, self.signer, now, host_id=request.host_id)
            certificates.append(certificate)
            await repo.save_certificate(
                replace(
                    activation,
                    holder_host_id=request.host_id,
                    revision=activation.revision + 1,
                    certificate_envelope=certificate.SerializeToString(),
                )
            )
        repairs_left = limit - len(recent) - 1
        response = self.signer.seal(
            VendorRepairResponse(
                request_id=request.request_id,
                host_id=request.host_id,
                certificates=certificates,
                repaired_at=to_timestamp(now),
                repairs_left=repairs_left,
            )
        )
        await repo.insert_repair(
            RepairRecord(
                host_id=request.host_id,
                request_id=request.request_id,
                host_public_key=request.host_public_key,
                previous_host_id=holder,
                response_envelope=response.SerializeToString(),
                repaired_at=now,
            )
        )
        await repo.audit.append(
            now,
            "repair.granted",
            request.host_id,
            request.host_id,
            {
                "request_id": request.request_id,
                "previous_host_id": holder,
                "certificate_ids": [activation.certificate_id for activation in held],
                "repairs_left": repairs_left,
            },
        )
        await record_rebinding(repo, request, holder, held, now)
        return response

    async def refusal_note(self, repo: VendorRecords) -> RefusalNote:
        return RefusalNote(
            "repair.refused",
            self.request.host_id,
            self.request.host_id,
            {"request_id": self.request.request_id, "previous_host_id": self.holder},
        )

    def refusal_reason(self, answer: SignedEnvelope) -> str:
        return ""


def _replay(previous: RepairRecord, request: HostRepairRequest, holder: str) -> SignedEnvelope:
    if (previous.host_public_key, previous.previous_host_id) != (request.host_public_key, holder):
        raise RequestIdReused(
            f"request id {request.request_id!r} was already used for another repair",
            metadata={"request_id": request.request_id},
        )
    return SignedEnvelope.FromString(previous.response_envelope)
