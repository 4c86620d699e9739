"""Reading and verifying the vendor's audit log; decisions append to it as they commit."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from services.activation_server.domain.audit_chain import ChainWalk
from services.activation_server.domain.model import AuditEntry, AuditHead, AuditVerdict
from services.activation_server.store.repository import ActivationStore
from tessera.errors import DomainError, InvalidInput
from tessera.validation import checked_text

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    next_after_sequence: int
    head: AuditHead


class AuditLog:
    """Reading and verifying the audit log (appending happens inside each decision)."""

    def __init__(self, store: ActivationStore) -> None:
        self.store = store

    async def page(self, subject: str, after_sequence: int, page_size: int) -> AuditPage:
        """Entries after ``after_sequence`` (optionally about one subject), oldest first;
        ``page_size`` 0 means 100, and more than 1000 means 1000."""
        subject = checked_text("subject", subject, 128)
        if after_sequence < 0:
            raise InvalidInput("after_sequence", "must not be negative")
        if page_size < 0:
            raise InvalidInput("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        async with self.store.snapshot() as repo:
            head = await repo.audit.head()
            entries = await repo.audit.entries(after_sequence, size + 1, subject or None)
        more = len(entries) > size
        entries = entries[:size]
        return AuditPage(entries, entries[-1].sequence if more else 0, head)

    async def verify(self) -> AuditVerdict:
        """Re-compute the whole chain and report the first entry that does not verify."""
        return await verify_store(self.store)


async def verify_store(store: ActivationStore, batch: int = 1000) -> AuditVerdict:
    """Walk the audit chain of ``store`` in batches, in one consistent snapshot."""
    async with store.snapshot() as repo:
        walk = ChainWalk(await repo.audit.head())
        after = 0
        while True:
            entries = await repo.audit.entries(after, batch, None)
            for entry in entries:
                if not walk.feed(entry):
                    return walk.finish()
            if len(entries) < batch:
                return walk.finish()
            after = entries[-1].sequence


async def record_refusal(
    store: ActivationStore,
    at: dt.datetime,
    action: str,
    subject: str,
    actor: str,
    refusal: DomainError,
    detail: Mapping[str, object],
) -> None:
    """Audit a refusal that ends the call with an error status, in its own transaction
    (the deciding one rolled back). Only for requests whose signature verified."""
    async with store.transaction() as repo:
        await repo.audit.append(at, action, subject, actor, refusal_detail(refusal, detail))


def refusal_detail(refusal: DomainError, detail: Mapping[str, object]) -> dict[str, object]:
    """``detail`` with the refusal's reason and message."""
    return {**detail, "reason": refusal.reason, "message": refusal.message}
