"""Check-ins: a License Server asks whether the certificates it holds are still its own.

The request is signed by the host key; for each certificate it lists, the vendor answers
from its records: current (held by this host), superseded (a repair re-bound it to
another host: a newer generation of this host key, see ``generations.py``), returned, or
unknown (not a certificate of this host key: nothing about it is told). The answer is
signed and recorded, so a retry gets the same bytes. Every check-in of a superseded host
is audited ("checkin.superseded"), with how often that host checked in since it was
superseded: a copy that keeps running stands out.
"""

from __future__ import annotations

import datetime as dt

from services.activation_server.domain.decisions import answer_once
from services.activation_server.domain.errors import RequestIdReused
from services.activation_server.domain.generations import lineage_of
from services.activation_server.domain.host_requests import (
    checked_request_id,
    verify_host_signed,
)
from services.activation_server.domain.limits import iso_time
from services.activation_server.domain.metrics import VendorMetrics
from services.activation_server.domain.model import (
    ActivationRecord,
    ActivationState,
    CheckInRecord,
    CheckInStanding,
)
from services.activation_server.domain.ports import VendorRecords, VendorStore
from services.activation_server.domain.vendor_key import Signer
from tessera.activation.v1.activation_pb2 import (
    CertificateCheckIn,
    HostCheckInRequest,
    VendorCheckInResult,
)
from tessera.activation.v1.activation_pb2 import CheckInStanding as StandingProto
from tessera.clock import Clock, to_timestamp
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.errors import InvalidInput
from tessera.validation import checked_text

# More than a License Server ever holds; bounds the work one request can ask for.
MAX_CERTIFICATES = 10_000
MAX_CERTIFICATE_ID = 64
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

STANDING_TO_PROTO = {
    CheckInStanding.CURRENT: StandingProto.CHECK_IN_STANDING_CURRENT,
    CheckInStanding.SUPERSEDED: StandingProto.CHECK_IN_STANDING_SUPERSEDED,
    CheckInStanding.RETURNED: StandingProto.CHECK_IN_STANDING_RETURNED,
    CheckInStanding.UNKNOWN: StandingProto.CHECK_IN_STANDING_UNKNOWN,
}


class CheckIns:
    """Answers License Servers' check-ins."""

    def __init__(
        self,
        store: VendorStore,
        signer: Signer,
        clock: Clock,
        metrics: VendorMetrics | None = None,
    ) -> None:
        self.store = store
        self.signer = signer
        self.clock = clock
        self.metrics = metrics or VendorMetrics()

    async def check_in(self, envelope: SignedEnvelope) -> SignedEnvelope:
        """Decide a signed HostCheckInRequest; the same request id gets the same answer."""
        request = verify_host_signed(envelope, HostCheckInRequest)
        checked_request_id(request.request_id)
        if len(request.certificates) > MAX_CERTIFICATES:
            raise InvalidInput("certificates", f"at most {MAX_CERTIFICATES}")
        for index, held in enumerate(request.certificates):
            checked_text(
                f"certificates[{index}].certificate_id",
                held.certificate_id,
                MAX_CERTIFICATE_ID,
                required=True,
            )
        record = await answer_once(self.store, _CheckIn(request, self.signer, self.clock))
        self.metrics.check_in(record.standing.value)
        return SignedEnvelope.FromString(record.result_envelope)


class _CheckIn:
    """One verified check-in, as ``answer_once`` answers it (a ``RecordedDecision``)."""

    def __init__(self, request: HostCheckInRequest, signer: Signer, clock: Clock) -> None:
        self.request = request
        self.signer = signer
        self.clock = clock

    async def recorded(self, repo: VendorRecords) -> CheckInRecord | None:
        return await repo.get_check_in(self.request.host_id, self.request.request_id)

    def replay(self, recorded: CheckInRecord) -> CheckInRecord:
        return _replay(recorded, self.request)

    async def decide(self, repo: VendorRecords) -> CheckInRecord:
        request = self.request
        now = self.clock.now()
        records = {
            record.certificate_id: record
            for record in await repo.certificates_by_id(
                held.certificate_id for held in request.certificates
            )
        }
        lineage = lineage_of(request.host_id, await repo.generations_of(request.host_public_key))
        certificates = [
            _standing_of(
                held.certificate_id,
                held.revision,
                records,
                request,
                rebound_away=lineage.superseded_by is not None,
            )
            for held in request.certificates
        ]
        superseded_certificates = [
            c.certificate_id
            for c in certificates
            if c.standing == StandingProto.CHECK_IN_STANDING_SUPERSEDED
        ]
        # Superseded while it still lists what was re-bound away: a copy, or an original
        # whose copy took over, is running.
        superseded = bool(superseded_certificates)
        standing = CheckInStanding.SUPERSEDED if superseded else CheckInStanding.CURRENT
        result = VendorCheckInResult(
            request_id=request.request_id,
            host_id=request.host_id,
            checked_at=to_timestamp(now),
            standing=STANDING_TO_PROTO[standing],
            certificates=certificates,
            generation=lineage.generation,
            current_generation=lineage.current_generation,
        )
        if lineage.superseded_by is not None:
            result.superseded_by_host_id = lineage.superseded_by.host_id
            result.superseded_at.FromDatetime(lineage.superseded_by.rebound_at)
        record = CheckInRecord(
            host_id=request.host_id,
            request_id=request.request_id,
            host_public_key=request.host_public_key,
            standing=standing,
            result_envelope=self.signer.seal(result).SerializeToString(),
            checked_at=now,
        )
        await repo.insert_check_in(record)
        if superseded:
            since = lineage.superseded_by.rebound_at if lineage.superseded_by is not None else EPOCH
            await repo.audit.append(
                now,
                "checkin.superseded",
                request.host_id,
                request.host_id,
                {
                    "request_id": request.request_id,
                    "flagged": True,
                    "alert": f"host {request.host_id} was superseded and still checks in: a "
                    "copy of a License Server may be running; it is told to stop serving",
                    "superseded_by_host_id": result.superseded_by_host_id,
                    "superseded_at": iso_time(lineage.superseded_by.rebound_at)
                    if lineage.superseded_by is not None
                    else None,
                    "generation": lineage.generation,
                    "current_generation": lineage.current_generation,
                    "superseded_certificate_ids": superseded_certificates,
                    "check_ins_since_superseded": await repo.check_ins_since(
                        request.host_id, CheckInStanding.SUPERSEDED, since
                    ),
                },
            )
        return record


def _standing_of(
    certificate_id: str,
    revision: int,
    records: dict[str, ActivationRecord],
    request: HostCheckInRequest,
    *,
    rebound_away: bool,
) -> CertificateCheckIn:
    record = records.get(certificate_id)
    answer = CertificateCheckIn(certificate_id=certificate_id, revision=revision)
    if record is None or record.host_public_key != request.host_public_key:
        # Not this host key's: say nothing about whose it is.
        answer.standing = StandingProto.CHECK_IN_STANDING_UNKNOWN
    elif record.state is not ActivationState.ACTIVE:
        answer.standing = StandingProto.CHECK_IN_STANDING_RETURNED
    elif record.holder_host_id == request.host_id:
        answer.standing = StandingProto.CHECK_IN_STANDING_CURRENT
    elif rebound_away:
        answer.standing = StandingProto.CHECK_IN_STANDING_SUPERSEDED
        answer.holder_host_id = record.holder_host_id
    else:
        # Another host of this key holds it, but no re-binding took it from this one
        # (e.g. a new machine checking in before its repair): not this host's.
        answer.standing = StandingProto.CHECK_IN_STANDING_UNKNOWN
    return answer


def _replay(previous: CheckInRecord, request: HostCheckInRequest) -> CheckInRecord:
    listed = VendorCheckInResult.FromString(
        SignedEnvelope.FromString(previous.result_envelope).payload
    ).certificates
    if previous.host_public_key != request.host_public_key or [
        (c.certificate_id, c.revision) for c in listed
    ] != [(c.certificate_id, c.revision) for c in request.certificates]:
        raise RequestIdReused(
            f"request id {request.request_id!r} was already used for another check-in",
            metadata={"request_id": request.request_id},
        )
    return previous
