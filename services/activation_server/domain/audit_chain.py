"""The vendor's audit log: append-only and hash-chained.

Every entry's hash is SHA-256 over the previous entry's hash and the entry's canonical
content, so editing or deleting an entry breaks the chain from there on; the head row
(the newest sequence and hash) shows a deleted tail. Someone who can rewrite every later
hash and the head too goes unseen by the chain alone: pin ``head_hash`` elsewhere (every
GetAuditLog answer carries it) to catch even that.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from services.activation_server.domain.model import AuditEntry, AuditHead, AuditVerdict

# The previous hash of entry 1.
GENESIS = bytes(32)
# The actor of decisions vendor staff made (hosts are named by their host id).
VENDOR_ACTOR = "vendor"


def canonical_json(detail: Mapping[str, object]) -> str:
    """``detail`` as canonical JSON: sorted keys, compact separators, ASCII only."""
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_time(at: dt.datetime) -> str:
    """``at`` in UTC to the microsecond, e.g. ``2026-11-27T12:00:00.000000Z``."""
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(
    previous_hash: bytes,
    sequence: int,
    at: dt.datetime,
    action: str,
    subject: str,
    actor: str,
    detail: str,
) -> bytes:
    """SHA-256(previous hash || canonical JSON of the entry's content)."""
    content = json.dumps(
        [sequence, canonical_time(at), action, subject, actor, detail],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(previous_hash + content.encode()).digest()


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
