"""The frame every decision on a host's signed request shares: decided once per request id.

An activation, a return and a repair each run the same steps: verify the signed request
and its request id, decide in one transaction (or replay the answer recorded under that
request id), decide again when a concurrent retry of the same request recorded first,
audit a refusal that ends the call with an error, and count the outcome. ``decide_once``
is that frame; each kind supplies its part as a ``Decision``. A check-in answers every
request and audits no refusal, so it uses only the transaction part, ``answer_once``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from services.activation_server.domain.audit import refusal_detail
from services.activation_server.domain.ports import Audited, DuplicateRequest, Transactions
from tessera.clock import Clock
from tessera.errors import DomainError
from tessera.server import failpoints

Records = TypeVar("Records", bound=Audited, contravariant=True)
Recorded = TypeVar("Recorded")
Answer = TypeVar("Answer")
Answer_co = TypeVar("Answer_co", covariant=True)
# The records as the store hands them out, for the frame that opens the transactions.
StoreRecords = TypeVar("StoreRecords", bound=Audited)


@dataclass(frozen=True)
class RefusalNote:
    """What the audit log says about a refused request (its reason and message are
    added to ``detail``)."""

    action: str
    subject: str
    actor: str
    detail: Mapping[str, object]


class RecordedDecision(Protocol[Records, Recorded, Answer_co]):
    """One verified request, answered once per request id and recorded with its answer."""

    async def recorded(self, repo: Records) -> Recorded | None:
        """What was recorded under this request id, if anything (a decision that must
        wait for a lock takes it here, so a retry that waited finds the answer)."""
        ...

    def replay(self, recorded: Recorded) -> Answer_co:
        """The recorded answer again; RequestIdReused when the request id was used for a
        different request."""
        ...

    async def decide(self, repo: Records) -> Answer_co:
        """Decide afresh and record the answer under the request id; DuplicateRequest
        when a concurrent retry recorded first. A DomainError refuses the request."""
        ...


class Decision(RecordedDecision[Records, Recorded, Answer], Protocol):
    """A recorded decision whose refusals are audited and whose outcomes are counted."""

    async def refusal_note(self, repo: Records) -> RefusalNote:
        """How a refusal of this request is audited (in a transaction of its own)."""
        ...

    def refusal_reason(self, answer: Answer) -> str:
        """Why a signed answer refuses the request; "" when it grants it."""
        ...


async def answer_once(
    store: Transactions[StoreRecords],
    decision: RecordedDecision[StoreRecords, Recorded, Answer],
) -> Answer:
    """Decide in one transaction, or replay the answer recorded under the request id."""
    try:
        async with store.transaction() as repo:
            return await _answer(repo, decision)
    except DuplicateRequest:
        # A concurrent retry of the same request won the race; answer as it did.
        async with store.transaction() as repo:
            return await _answer(repo, decision)


async def decide_once(
    store: Transactions[StoreRecords],
    clock: Clock,
    verified: Callable[[], Decision[StoreRecords, Recorded, Answer]],
    count: Callable[[str], None],
    after_commit: str,
) -> Answer:
    """The frame of one signed request's decision.

    ``verified`` checks the request (signature, request id, fields) and returns its
    decision; a request refused there is not audited, since nobody vouches for it.
    ``count`` gets every outcome's refusal reason ("" when granted) once the answer is
    final; ``after_commit`` names the failpoint reached once the decision committed.
    """
    try:
        decision = verified()
        try:
            answer = await answer_once(store, decision)
        except DomainError as refusal:
            # The deciding transaction rolled back, so the refusal is audited apart.
            async with store.transaction() as repo:
                note = await decision.refusal_note(repo)
                await repo.audit.append(
                    clock.now(),
                    note.action,
                    note.subject,
                    note.actor,
                    refusal_detail(refusal, note.detail),
                )
            raise
        failpoints.reach(after_commit)
    except DomainError as refusal:
        count(refusal.reason)
        raise
    count(decision.refusal_reason(answer))
    return answer


async def _answer(
    repo: StoreRecords, decision: RecordedDecision[StoreRecords, Recorded, Answer]
) -> Answer:
    recorded = await decision.recorded(repo)
    if recorded is not None:
        return decision.replay(recorded)
    return await decision.decide(repo)
