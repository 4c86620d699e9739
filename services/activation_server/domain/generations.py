"""Host generations: each repair that re-binds a host key's licenses to another host id.

A repair after a machine change is legitimate (EcoStruxure allows it), but so is a copy
of a License Server's whole data directory repaired on a second machine: both present
the same host key from a new machine. The vendor cannot tell them apart at the repair,
so it records each re-binding as the key's next generation, which supersedes the host
the licenses came from. A superseded host that checks in is told so and stops serving
(``check_ins.py``); one that never checks in is bounded only by the repair limit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from services.activation_server.domain.model import ActivationRecord, HostGeneration
from services.activation_server.domain.ports import VendorRecords
from tessera.activation.v1.activation_pb2 import HostRepairRequest


async def record_rebinding(
    repo: VendorRecords,
    request: HostRepairRequest,
    previous_host_id: str,
    rebound: Sequence[ActivationRecord],
    now: dt.datetime,
) -> HostGeneration | None:
    """Record a granted repair that moved ``previous_host_id``'s licenses to the request's
    host id as the host key's next generation, and audit it ("repair.rebound", about the
    superseded host). None when the repair kept the host id (same machine). The caller
    holds the host key's repair lock, so generations are numbered one at a time."""
    if previous_host_id == request.host_id:
        return None
    generation = HostGeneration(
        host_public_key=request.host_public_key,
        generation=await repo.newest_generation(request.host_public_key) + 1,
        host_id=request.host_id,
        previous_host_id=previous_host_id,
        request_id=request.request_id,
        rebound_at=now,
    )
    await repo.insert_generation(generation)
    await repo.audit.append(
        now,
        "repair.rebound",
        previous_host_id,
        request.host_id,
        {
            "request_id": request.request_id,
            "previous_host_id": previous_host_id,
            "host_id": request.host_id,
            "generation": generation.generation,
            "certificate_ids": [activation.certificate_id for activation in rebound],
            "superseded": f"host {previous_host_id} no longer holds these certificates; "
            "a License Server still running as it is told so when it checks in",
        },
    )
    return generation


@dataclass(frozen=True)
class Lineage:
    """Where one host id stands among its host key's generations."""

    # The host's own generation (0: it activated, it was never re-bound to).
    generation: int
    # The host key's newest generation.
    current_generation: int
    # The re-binding that took this host's licenses away, if it stands: None when the
    # host is current (or licenses were re-bound back to it since).
    superseded_by: HostGeneration | None


def lineage_of(host_id: str, generations: Sequence[HostGeneration]) -> Lineage:
    """``host_id``'s place among ``generations`` (oldest first)."""
    to_host = [g for g in generations if g.host_id == host_id]
    from_host = [g for g in generations if g.previous_host_id == host_id]
    own = to_host[-1].generation if to_host else 0
    # The first re-binding away since the host last became current.
    away = [g for g in from_host if g.generation > own]
    return Lineage(
        generation=own,
        current_generation=generations[-1].generation if generations else 0,
        superseded_by=away[0] if away else None,
    )
