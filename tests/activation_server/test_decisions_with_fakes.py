"""The decision frame (``domain/decisions.py``) over an in-memory store: no database.

``decide_once`` is what activations, returns and repairs share: replay a retried request
id, decide again when a concurrent retry recorded first, audit a refusal once in its
own transaction, count every outcome. The fakes implement the domain's ports.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from services.activation_server.domain.decisions import RefusalNote, answer_once, decide_once
from services.activation_server.domain.errors import RequestIdReused
from services.activation_server.domain.model import (
    GENESIS,
    AuditEntry,
    AuditHead,
    canonical_json,
    entry_hash,
)
from services.activation_server.domain.ports import DuplicateRequest
from tessera.errors import DomainError, InvalidInput

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
AFTER_COMMIT = "activation_server.test.after_commit"


class SeatsGone(DomainError):
    reason = "SEATS_GONE"


class FixedClock:
    def now(self) -> dt.datetime:
        return NOW


class FakeAuditTrail:
    """The hash-chained audit log, in a list (``ports.AuditTrail``)."""

    def __init__(self) -> None:
        self.log: list[AuditEntry] = []

    async def head(self) -> AuditHead:
        if not self.log:
            return AuditHead(0, GENESIS)
        return AuditHead(self.log[-1].sequence, self.log[-1].hash)

    async def append(
        self, at: dt.datetime, action: str, subject: str, actor: str, detail: Mapping[str, object]
    ) -> AuditEntry:
        head = await self.head()
        detail_json = canonical_json(detail)
        sequence = head.sequence + 1
        entry = AuditEntry(
            sequence,
            at,
            action,
            subject,
            actor,
            detail_json,
            head.hash,
            entry_hash(head.hash, sequence, at, action, subject, actor, detail_json),
        )
        self.log.append(entry)
        return entry

    async def entries(
        self, after_sequence: int, limit: int, subject: str | None
    ) -> list[AuditEntry]:
        found = [e for e in self.log if e.sequence > after_sequence]
        return [e for e in found if subject in (None, e.subject)][:limit]

    def actions(self) -> list[str]:
        return [entry.action for entry in self.log]


@dataclass(frozen=True)
class Answered:
    """A recorded decision: what was asked under the request id, and the answer."""

    asked: str
    answer: str


@dataclass
class FakeRecords:
    """What one transaction sees (``ports.Audited`` plus the fake decision's table)."""

    audit: FakeAuditTrail = field(default_factory=FakeAuditTrail)
    answers: dict[str, Answered] = field(default_factory=dict)
    seats: int = 1
    # What other transactions committed: the unique index on request ids sees it.
    committed_elsewhere: Callable[[], FakeRecords] | None = None

    async def insert_answer(self, request_id: str, answered: Answered) -> None:
        """Record an answer; DuplicateRequest when its request id is recorded, as the
        store's ``insert_*`` queries do."""
        elsewhere = self.committed_elsewhere() if self.committed_elsewhere else None
        if request_id in self.answers or (elsewhere and request_id in elsewhere.answers):
            raise DuplicateRequest(request_id)
        self.answers[request_id] = answered


class FakeStore:
    """``ports.Transactions``: each transaction works on a copy, kept only on commit."""

    def __init__(self) -> None:
        self.committed = FakeRecords()
        self.transactions = 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeRecords]:
        self.transactions += 1
        working = copy.deepcopy(self.committed)
        working.committed_elsewhere = lambda: self.committed
        yield working
        working.committed_elsewhere = None
        self.committed = working


@dataclass
class SeatRequest:
    """A fake kind of decision: take a seat for ``asked`` under ``request_id``."""

    request_id: str
    asked: str
    decided: int = 0
    # Called inside decide, before the answer is recorded (a concurrent retry, say).
    meanwhile: Callable[[], None] | None = None

    async def recorded(self, repo: FakeRecords) -> Answered | None:
        return repo.answers.get(self.request_id)

    def replay(self, recorded: Answered) -> str:
        if recorded.asked != self.asked:
            raise RequestIdReused(f"request id {self.request_id!r} was already used")
        return recorded.answer

    async def decide(self, repo: FakeRecords) -> str:
        self.decided += 1
        await repo.audit.append(NOW, "seat.granted", self.asked, "host", {})
        if repo.seats == 0:
            raise SeatsGone(f"no seat left for {self.asked}")
        repo.seats -= 1
        answer = f"seat for {self.asked}"
        if self.meanwhile is not None:
            self.meanwhile()
        await repo.insert_answer(self.request_id, Answered(self.asked, answer))
        return answer

    async def refusal_note(self, repo: FakeRecords) -> RefusalNote:
        return RefusalNote("seat.refused", self.asked, "host", {"request_id": self.request_id})

    def refusal_reason(self, answer: str) -> str:
        return ""


@dataclass
class Frame:
    store: FakeStore = field(default_factory=FakeStore)
    counted: list[str] = field(default_factory=list)

    async def decide(self, request: SeatRequest | Exception) -> str:
        def verified() -> SeatRequest:
            if isinstance(request, Exception):
                raise request
            return request

        return await decide_once(
            self.store, FixedClock(), verified, self.counted.append, AFTER_COMMIT
        )


async def test_a_retried_request_id_replays_the_recorded_answer() -> None:
    frame = Frame()
    first = SeatRequest("r-1", "feature-a")
    retry = SeatRequest("r-1", "feature-a")

    assert await frame.decide(first) == "seat for feature-a"
    assert await frame.decide(retry) == "seat for feature-a"

    assert (first.decided, retry.decided) == (1, 0)
    assert frame.store.committed.seats == 0
    assert frame.store.committed.audit.actions() == ["seat.granted"]
    assert frame.counted == ["", ""]


async def test_a_refusal_is_audited_once_and_what_the_decision_wrote_rolls_back() -> None:
    frame = Frame()
    await frame.decide(SeatRequest("r-1", "feature-a"))

    with pytest.raises(SeatsGone):
        await frame.decide(SeatRequest("r-2", "feature-b"))

    log = frame.store.committed.audit.log
    assert [entry.action for entry in log] == ["seat.granted", "seat.refused"]
    refused = log[-1]
    assert (refused.subject, refused.actor, refused.at) == ("feature-b", "host", NOW)
    assert refused.detail == canonical_json(
        {"request_id": "r-2", "reason": "SEATS_GONE", "message": "no seat left for feature-b"}
    )
    assert "r-2" not in frame.store.committed.answers
    assert frame.counted == ["", "SEATS_GONE"]


async def test_a_request_id_reused_for_another_request_is_refused_and_audited() -> None:
    frame = Frame()
    await frame.decide(SeatRequest("r-1", "feature-a"))

    with pytest.raises(RequestIdReused):
        await frame.decide(SeatRequest("r-1", "feature-b"))

    assert frame.store.committed.audit.actions() == ["seat.granted", "seat.refused"]
    assert frame.counted == ["", RequestIdReused.reason]


async def test_a_concurrent_retry_that_recorded_first_is_answered_as_it_was() -> None:
    frame = Frame()
    store = frame.store

    def concurrent_retry_commits() -> None:
        # The other transaction recorded the same request id and committed first.
        store.committed.answers["r-1"] = Answered("feature-a", "seat for feature-a (other)")
        store.committed.seats = 0

    request = SeatRequest("r-1", "feature-a", meanwhile=concurrent_retry_commits)

    assert await frame.decide(request) == "seat for feature-a (other)"
    assert request.decided == 1
    assert store.transactions == 2
    assert store.committed.audit.actions() == []
    assert frame.counted == [""]


async def test_a_request_refused_before_its_decision_is_counted_but_not_audited() -> None:
    frame = Frame()

    with pytest.raises(InvalidInput):
        await frame.decide(InvalidInput("request_id", "1-128 letters, digits or ._:-"))

    assert frame.store.transactions == 0
    assert frame.counted == [InvalidInput.reason]


async def test_answer_once_replays_without_auditing_or_counting() -> None:
    store = FakeStore()
    first = SeatRequest("r-1", "feature-a")

    assert await answer_once(store, first) == "seat for feature-a"
    assert await answer_once(store, SeatRequest("r-1", "feature-a")) == "seat for feature-a"
    with pytest.raises(RequestIdReused):
        await answer_once(store, SeatRequest("r-1", "feature-b"))

    assert first.decided == 1
    assert store.committed.audit.actions() == ["seat.granted"]
