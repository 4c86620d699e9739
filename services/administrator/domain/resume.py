"""Resuming the journal when the Administrator starts.

Every unfinished online operation is taken on from where the journal says it stopped,
oldest first. Best effort: a peer that is down leaves the operation unfinished (its
last_error says why) for the next start or the operator's retry. Offline operations wait
for their response file.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from services.administrator.domain.journal import OperationJournal
from services.administrator.domain.model import Operation, OperationKind
from tessera.errors import DomainError

log = logging.getLogger("tessera.administrator")

Resume = Callable[[str], Awaitable[Operation]]


@dataclass
class ResumeReport:
    """What one pass over the journal did, by operation id."""

    finished: list[str] = field(default_factory=list)
    # Still unfinished, or refused by the vendor: operation id -> why.
    failed: dict[str, str] = field(default_factory=dict)


async def resume_unfinished(
    journal: OperationJournal, resumers: Mapping[OperationKind, Resume]
) -> ResumeReport:
    report = ResumeReport()
    for operation in await journal.unfinished_online():
        resume = resumers[operation.kind]
        try:
            done = await resume(operation.operation_id)
        except DomainError as error:
            log.warning(
                "could not finish %s operation %s yet: %s",
                operation.kind.value,
                operation.operation_id,
                error.message,
            )
            report.failed[operation.operation_id] = f"{error.reason}: {error.message}"
            continue
        except Exception as error:  # keep going: one bad row must not stop the rest
            log.exception("resuming operation %s failed", operation.operation_id)
            report.failed[operation.operation_id] = f"INTERNAL: {error}"
            continue
        log.info(
            "resumed %s operation %s: %s",
            operation.kind.value,
            operation.operation_id,
            done.state.value,
        )
        report.finished.append(operation.operation_id)
    return report
