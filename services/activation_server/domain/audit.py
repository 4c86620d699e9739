"""The vendor's audit log: append-only and hash-chained; reading and verifying it.

Every entry's hash is SHA-256 over the previous entry's hash and the entry's canonical
content (``model.entry_hash``), so editing or deleting an entry breaks the chain from
there on; the head row (the newest sequence and hash) shows a deleted tail. Someone who
can rewrite every later hash and the head too goes unseen by the chain alone: pin
``head_hash`` elsewhere (every GetAuditLog answer carries it) to catch even that.

Decisions append to the log in their own transaction as they commit (``store.audit``
chains each entry onto the head); a refusal that ends the call with an error is audited
by ``decisions.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.activation_server.domain.model import (
    GENESIS,
    AuditEntry,
    AuditHead,
    AuditVerdict,
    entry_hash,
)
from services.activation_server.domain.ports import VendorStore
from tessera.errors import DomainError, InvalidInput
from tessera.validation import checked_text

# The actor of decisions vendor staff made (hosts are named by their host id).
VENDOR_ACTOR = "vendor"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    next_after_sequence: int
    head: AuditHead


class AuditLog:
    """Reading and verifying the audit log (appending happens inside each decision)."""

    def __init__(self, store: VendorStore) -> None:
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


async def verify_store(store: VendorStore, batch: int = 1000) -> AuditVerdict:
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


def refusal_detail(refusal: DomainError, detail: Mapping[str, object]) -> dict[str, object]:
    """``detail`` with the refusal's reason and message."""
    return {**detail, "reason": refusal.reason, "message": refusal.message}


def _missing(first: int, last: int) -> str:
    return f"entry {first} is missing" if first == last else f"entries {first}-{last} are missing"


def _hash_of(entry: AuditEntry, sequence: int) -> bytes:
    return entry_hash(
        entry.previous_hash,
        sequence,
        entry.at,
        entry.action,
        entry.subject,
        entry.actor,
        entry.detail,
    )


@dataclass
class ChainWalk:
    """Walks entries in sequence order and stops at the first one that does not verify."""

    head: AuditHead
    checked: int = 0
    first_bad: int = 0
    problem: str = ""
    _expected: int = 1
    _previous_hash: bytes = GENESIS
    _before_previous_hash: bytes | None = None
    _previous_sequence: int = 0

    def feed(self, entry: AuditEntry) -> bool:
        """Check the next entry; False once the chain is broken (stop feeding then)."""
        if entry.sequence > self.head.sequence:
            return self._bad(
                entry.sequence,
                f"entry {entry.sequence} was inserted after the head "
                f"(the log ends at {self.head.sequence})",
            )
        if entry.sequence > self._expected:
            return self._bad(self._expected, _missing(self._expected, entry.sequence - 1))
        if _hash_of(entry, entry.sequence) != entry.hash:
            if self._follows_an_insertion(entry):
                return self._bad(
                    self._previous_sequence, f"entry {self._previous_sequence} was inserted"
                )
            return self._bad(entry.sequence, f"entry {entry.sequence} was edited")
        if entry.previous_hash != self._previous_hash:
            # The entry is whole but links elsewhere: the one before it was rewritten
            # with a fresh hash, or slipped in between two entries that were linked.
            if self._previous_sequence and entry.previous_hash == self._before_previous_hash:
                return self._bad(
                    self._previous_sequence, f"entry {self._previous_sequence} was inserted"
                )
            bad = self._previous_sequence or entry.sequence
            return self._bad(bad, f"entry {bad} was edited")
        self.checked += 1
        self._before_previous_hash = self._previous_hash
        self._previous_hash = entry.hash
        self._previous_sequence = entry.sequence
        self._expected = entry.sequence + 1
        return True

    def _follows_an_insertion(self, entry: AuditEntry) -> bool:
        """Whether ``entry`` is whole under the sequence one lower and links past the entry
        before it: it was renumbered to make room for that one."""
        return (
            self._previous_sequence > 0
            and entry.previous_hash == self._before_previous_hash
            and _hash_of(entry, entry.sequence - 1) == entry.hash
        )

    def finish(self) -> AuditVerdict:
        """The verdict, once every entry was fed (or the walk stopped)."""
        if not self.problem:
            last = self._expected - 1
            if last < self.head.sequence:
                self._bad(self._expected, _missing(self._expected, self.head.sequence))
            elif self._previous_hash != self.head.hash:
                self._bad(last, f"entry {last} was edited (it no longer matches the head)")
        return AuditVerdict(
            intact=not self.problem,
            entries_checked=self.checked,
            first_bad_sequence=self.first_bad,
            problem=self.problem,
            head=self.head,
        )

    def _bad(self, sequence: int, problem: str) -> bool:
        # Only the entries before the first bad one count as verified.
        self.checked = min(self.checked, sequence - 1)
        self.first_bad = sequence
        self.problem = problem
        return False
