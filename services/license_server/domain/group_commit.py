"""Checkouts, check-ins and resumes that arrive together commit together (group commit).

One transaction per call costs a BEGIN, a COMMIT and a few statements for every
checkout, check-in and resume. Here calls that arrive while a transaction is in flight
wait for the next one, and that one serves them all: one UPDATE fences and extends every
resumed lease, one releases every check-in, one conditional UPDATE per feature takes the
seats of every checkout that fits, one INSERT writes their leases. At low load a batch
holds one call and costs what a call did. Under a reconnect storm it is what lets
thousands of streams resume within seconds.

The invariants hold as they do call by call:
- Seats are taken only by the conditional UPDATE on the pool row (``take_seats``, for a
  batch's total of a feature), so replicas never over-allocate. When it fails (another
  replica took seats meanwhile, or clients wait in the queue) the batch's checkouts of
  that feature are tried one by one, as single calls are.
- Checkouts are judged in arrival order, all or nothing each; check-ins go first, so
  seats they free serve the checkouts of the same batch. A resume raises the lease's
  fencing epoch exactly as a single one does (a repeat in the same batch raises it again).
- A caller hears its grant or release only after the transaction committed. When the
  transaction fails, every caller in it gets the error and nothing of it was written.
  A checkout whose caller gave up (a cancelled RPC, a passed deadline) before the
  batch writes its lease gets nothing: its seats go back within the transaction. One
  that gives up during the COMMIT itself cannot undo it: its lease is held until its
  TTL runs out, as a lease whose grant was lost in transit is.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.license_server.domain.errors import StaleLeaseEpoch
from services.license_server.domain.metrics import LeaseMetrics
from services.license_server.domain.model import (
    Lease,
    LeaseEvent,
    LeaseResumed,
    NewLease,
    SeatsFreed,
)
from services.license_server.domain.ports import LicenseStore, Queries
from services.license_server.domain.seats import (
    RESUMED_ELSEWHERE,
    lease_not_found,
    new_lease,
    refusal,
    secret_hash,
    unusable,
)
from tessera.clock import Clock
from tessera.errors import DomainError

log = logging.getLogger(__name__)

# Calls of each kind (checkouts, check-ins, resumes) one transaction serves at most;
# bounds its statements' size.
MAX_BATCH = 256

# Under load, the next transaction waits up to this long for more calls to join it (the
# clients whose answers just went out come back with their next call), as PostgreSQL's
# commit_delay does: fewer, fuller transactions cost less per call. Only when at least
# GATHER_AFTER calls are already waiting, so a lightly loaded server answers at once; and
# it stops waiting as soon as as many more calls came as the last batch answered.
GATHER_SECONDS = 0.005
GATHER_AFTER = 8


@dataclass
class _Checkout:
    new: NewLease
    ttl: int
    done: asyncio.Future[tuple[Lease, str]]


@dataclass
class _Checkin:
    lease_id: str
    secret: str
    done: asyncio.Future[bool]


@dataclass
class _Resume:
    lease_id: str
    secret: str
    done: asyncio.Future[Lease]


@dataclass
class _Outcome:
    """What a committed batch answers each caller, and what it tells the bus."""

    answers: list[tuple[asyncio.Future[Any], object]] = field(default_factory=list)
    events: list[LeaseEvent] = field(default_factory=list)


class GroupCommit:
    """Batches the checkouts, check-ins and resumes of this process into shared
    transactions."""

    def __init__(
        self,
        store: LicenseStore,
        clock: Clock,
        publish: Callable[[LeaseEvent], None],
        metrics: LeaseMetrics,
        max_batch: int = MAX_BATCH,
        gather_seconds: float = GATHER_SECONDS,
    ) -> None:
        self.store = store
        self.clock = clock
        self.publish = publish
        self.metrics = metrics
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self._checkouts: list[_Checkout] = []
        self._checkins: list[_Checkin] = []
        self._resumes: list[_Resume] = []
        self._committer: asyncio.Task[None] | None = None
        # While the committer gathers: what it waits on, and for how many waiting calls.
        self._gathering: tuple[asyncio.Future[None], int] | None = None
        # Transactions committed and the calls they served (also in the metrics); the
        # calls of the batch committing now.
        self.calls_in_flight = 0
        self.transactions = 0
        self.calls = 0

    async def checkout(self, new: NewLease, ttl: int) -> tuple[Lease, str]:
        """A new lease on ``new``'s seats and its secret, or the DomainError why not."""
        done: asyncio.Future[tuple[Lease, str]] = asyncio.get_running_loop().create_future()
        self._checkouts.append(_Checkout(new, ttl, done))
        self._start()
        return await done

    async def checkin(self, lease_id: str, secret: str) -> bool:
        """Release a lease; False when it was already released, LeaseNotFound when no
        lease has this id and secret."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._checkins.append(_Checkin(lease_id, secret, done))
        self._start()
        return await done

    async def resume(self, lease_id: str, secret: str) -> Lease:
        """Fence out the lease's older streams and extend it: the lease with its new
        epoch and expiry, or the DomainError why it cannot be resumed."""
        done: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self._resumes.append(_Resume(lease_id, secret, done))
        self._start()
        return await done

    async def drain(self) -> None:
        """Wait until the batch committing now and those queued behind it are done (a
        graceful stop, before the database closes)."""
        committer = self._committer
        if committer is not None and not committer.done():
            with contextlib.suppress(asyncio.CancelledError):
                await committer

    def _start(self) -> None:
        if self._gathering is not None:
            gathered, calls = self._gathering
            if self.waiting >= calls and not gathered.done():
                gathered.set_result(None)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_while_pending())

    @property
    def waiting(self) -> int:
        """Calls waiting for the next batch."""
        return len(self._checkouts) + len(self._checkins) + len(self._resumes)

    async def _commit_while_pending(self) -> None:
        answered = 0  # calls the last batch of this run answered
        while self._checkouts or self._checkins or self._resumes:
            # A batch that queued up behind the last one waits a moment for more (those
            # the last batch answered): under load, not at the first call of a quiet spell.
            if answered and self.gather_seconds > 0 and self.waiting >= GATHER_AFTER:
                await self._gather(self.waiting + answered)
            # Up to max_batch calls of each kind, so no kind waits behind another's.
            checkouts = _take(self._checkouts, self.max_batch)
            checkins = _take(self._checkins, self.max_batch)
            resumes = _take(self._resumes, self.max_batch)
            callers: list[asyncio.Future[Any]] = [c.done for c in checkouts]
            callers += [c.done for c in checkins]
            callers += [r.done for r in resumes]
            if not callers:
                continue
            answered = len(callers)
            self.calls_in_flight = len(callers)
            try:
                outcome = await self._commit_retrying(checkouts, checkins, resumes)
            except Exception as error:  # nothing of the batch was written
                for done in callers:
                    if not done.done():
                        done.set_exception(error)
                continue
            except BaseException:  # cancelled (the loop stops): nobody waits forever
                self._cancel_waiting(callers)
                raise
            finally:
                self.calls_in_flight = 0
            self.transactions += 1
            self.calls += len(callers)
            self.metrics.group_committed(len(callers))
            for done, answer in outcome.answers:
                if done.done():
                    continue  # the caller gave up; what committed stays committed
                if isinstance(answer, BaseException):
                    done.set_exception(answer)
                else:
                    done.set_result(answer)
            for event in outcome.events:
                try:
                    self.publish(event)
                except Exception:  # a listener's fault must not stop the committer
                    log.exception("publishing %r failed", event)

    async def _gather(self, calls: int) -> None:
        """Wait until ``calls`` calls wait for the next batch, at most gather_seconds."""
        loop = asyncio.get_running_loop()
        gathered: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(self.gather_seconds, _resolve, gathered)
        self._gathering = (gathered, calls)
        try:
            await gathered
        except BaseException:  # cancelled (the loop stops): nobody waits forever
            self._cancel_waiting([])
            raise
        finally:
            timer.cancel()
            self._gathering = None

    def _cancel_waiting(self, callers: list[asyncio.Future[Any]]) -> None:
        """Cancel ``callers`` (a batch's) and every call waiting for the next batch."""
        callers = callers + [c.done for c in self._checkouts]
        callers += [c.done for c in self._checkins]
        callers += [r.done for r in self._resumes]
        for done in callers:
            done.cancel()

    async def _commit_retrying(
        self, checkouts: list[_Checkout], checkins: list[_Checkin], resumes: list[_Resume]
    ) -> _Outcome:
        """One transaction for the batch, run again by the store when PostgreSQL chose it
        to break a deadlock with another replica's, or to keep serializability (it was
        rolled back whole, so doing it again is doing it once): each try starts a new
        outcome, and callers hear only the committed one."""

        async def commit(repo: Queries) -> _Outcome:
            outcome = _Outcome()
            now = self.clock.now()
            if resumes:
                await self._resume(repo, resumes, now, outcome)
            if checkins:
                await self._release(repo, checkins, now, outcome)
            if checkouts:
                await self._grant(repo, checkouts, now, outcome)
            return outcome

        return await self.store.retrying_transaction(commit)

    async def _resume(
        self, repo: Queries, resumes: list[_Resume], now: dt.datetime, outcome: _Outcome
    ) -> None:
        hashes = [secret_hash(r.secret) for r in resumes]
        bumped = await repo.bump_epochs(
            [(r.lease_id, hashed) for r, hashed in zip(resumes, hashes, strict=True)], now
        )
        # lease id -> where in the answers its latest resume of this batch is
        latest: dict[str, int] = {}
        events: list[LeaseEvent] = []
        for resume, hashed in zip(resumes, hashes, strict=True):
            pair = (resume.lease_id, hashed)
            lease = bumped.get(pair) if resume.lease_id not in latest else None
            if lease is None:  # a repeat within the batch resumes again, as it would alone
                lease = await repo.bump_epoch(resume.lease_id, hashed, now)
            if lease is None:
                reason = await unusable(repo, resume.lease_id, hashed, None, now)
                outcome.answers.append((resume.done, reason))
                continue
            if resume.lease_id in latest:
                # The earlier resume of this batch is fenced out before its stream could
                # listen for it: it hears so as its answer, not as an event it would miss.
                earlier = latest[resume.lease_id]
                outcome.answers[earlier] = (
                    outcome.answers[earlier][0],
                    StaleLeaseEpoch(RESUMED_ELSEWHERE),
                )
            latest[resume.lease_id] = len(outcome.answers)
            outcome.answers.append((resume.done, lease))
            events.append(LeaseResumed(lease.lease_id, lease.epoch))
        await repo.announce_all(events)
        outcome.events += events

    async def _release(
        self, repo: Queries, checkins: list[_Checkin], now: dt.datetime, outcome: _Outcome
    ) -> None:
        hashes = [secret_hash(c.secret) for c in checkins]
        released = await repo.release_leases(
            [(c.lease_id, hashed) for c, hashed in zip(checkins, hashes, strict=True)],
            now,
            "checked_in",
        )
        answered: set[tuple[str, bytes]] = set()
        for checkin, hashed in zip(checkins, hashes, strict=True):
            pair = (checkin.lease_id, hashed)
            if pair in released and pair not in answered:
                answered.add(pair)
                outcome.answers.append((checkin.done, True))
                continue
            # Refused or a repeat within the batch: read the lease only to explain.
            lease = await repo.get_lease(checkin.lease_id, hashed)
            answer: object = lease_not_found(checkin.lease_id) if lease is None else False
            outcome.answers.append((checkin.done, answer))
        for feature in sorted(set(released.values())):
            event = SeatsFreed(feature)
            await repo.announce(event)
            outcome.events.append(event)

    async def _grant(
        self, repo: Queries, checkouts: list[_Checkout], now: dt.datetime, outcome: _Outcome
    ) -> None:
        by_feature: dict[str, list[_Checkout]] = {}
        for checkout in checkouts:
            by_feature.setdefault(checkout.new.feature, []).append(checkout)
        granted: list[_Checkout] = []
        refused: list[_Checkout] = []
        # Pool rows in one order (by feature) in every batch, on every replica: two
        # batches never wait for each other's rows the other way round.
        for feature, asking in sorted(by_feature.items()):
            # Optimistic: usually every checkout fits, and one UPDATE grants them all.
            if await repo.take_seats(feature, sum(c.new.count for c in asking), now):
                granted += asking
                continue
            # Not all fit: judge in arrival order against the pool as read, take the
            # seats of those that fit in one UPDATE, or one by one when that races.
            pool = await repo.get_pool(feature)
            free = pool.available if pool is not None else 0
            fitting: list[_Checkout] = []
            for checkout in asking:
                if checkout.new.count <= free:
                    fitting.append(checkout)
                    free -= checkout.new.count
                else:
                    refused.append(checkout)
            if not fitting:
                continue
            if await repo.take_seats(feature, sum(c.new.count for c in fitting), now):
                granted += fitting
                continue
            for checkout in fitting:  # raced or queued: one by one, as single calls
                if await repo.take_seats(feature, checkout.new.count, now):
                    granted.append(checkout)
                else:
                    refused.append(checkout)
        # A caller that gave up while the batch waited (its deadline passed, its client
        # went away) gets nothing: its seats go back before any lease is written.
        # Split once: a caller that gives up during the give-back is judged with the kept
        # ones (its lease is written and held until its TTL), never half of each.
        gone = [checkout for checkout in granted if checkout.done.done()]
        if gone:
            granted = [checkout for checkout in granted if checkout not in gone]
            seats: Counter[str] = Counter()
            for checkout in gone:
                seats[checkout.new.feature] += checkout.new.count
            await repo.give_back_seats(seats)
        leases = [(checkout, new_lease(checkout.new, checkout.ttl, now)) for checkout in granted]
        if leases:
            await repo.insert_leases([(lease, secret_hash(key)) for _, (lease, key) in leases])
        for checkout, lease_and_secret in leases:
            outcome.answers.append((checkout.done, lease_and_secret))
        for checkout in refused:
            reason: DomainError = await refusal(repo, checkout.new, now)
            outcome.answers.append((checkout.done, reason))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


T = TypeVar("T", _Checkout, _Checkin, _Resume)


def _take(pending: list[T], limit: int) -> list[T]:
    """Up to ``limit`` calls from the front of ``pending`` (removed from it), less those
    whose callers gave up before their batch began."""
    taken = pending[:limit]
    del pending[: len(taken)]
    return [call for call in taken if not call.done.done()]
