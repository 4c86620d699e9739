"""A Jepsen-style history of leases, and the checker that judges it.

Clients record what they were *told* (and what they did) with the time they learned it;
nothing here looks at the server's database. The checker then proves three things:

(a) **Never more believed than activated.** At no instant did clients believe they held
    more seats of a feature than are activated. A client believes it holds a lease from
    the moment it receives the grant until the earliest of: it asks to release it (it
    stops using the seats before it asks, so a waiter granted the seat before the release
    is acknowledged is no overlap), a revocation notice, a refusal saying the lease is
    gone, or the latest ``expires_at`` it was told (grant, resume or heartbeat ack). An
    acknowledgement that arrives after the belief ran out starts a new stretch of belief:
    the server said the seats are still the client's.
(b) **Never freed before an acknowledged expiry.** No server reported a lease expired,
    released, not found or not held (a refusal of a resume, heartbeat or check-in, or a
    ``LEASE_EXPIRED`` / ``LEASE_NOT_HELD`` notice) before the latest ``expires_at`` it
    had told the lease's holder, unless the client released it or a revocation that the
    contract allows early came first (operator, license returned or expired, trusted
    storage broken). A seat given to another client while the lease was believed held is
    caught by (a).
(c) **Every retry idempotent, where a client can see it.** A lease id is granted new only
    once; a resume gives back the same lease (feature, count) with ``resumed`` set and a
    higher epoch than any before; a lease is acknowledged released at most once (a second
    check-in answers ``released: false``); nothing resumes a lease after its release was
    acknowledged.

Times: every event carries the recorder's monotonic and wall clock. ``expires_at`` is the
server's wall clock; the checker maps it onto the monotonic timeline through the event's
own (wall, monotonic) pair and the telling server's known clock offset (``clock_offsets``,
seconds the server's clock is ahead of the recorder's: set when a test starts a server
under ``faketime``). That is the client's own reckoning, "the TTL that was left when I was
told", so a server whose clock is off does not move what the client believes.

The checker is pure: ``check(history, seats)`` returns a ``Verdict``; the harness that
produces histories (real processes, faults) is ``bench.history``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path


class Kind(StrEnum):
    """What a client learned or did."""

    GRANTED = "granted"  # a new lease: lease_id, feature, count, expires_at, epoch
    RESUMED = "resumed"  # a resume granted: the same fields, resumed set
    ACK = "ack"  # a heartbeat acknowledged: expires_at
    RELEASE = "release"  # the client stops using the seats and asks to release them
    RELEASED = "released"  # release acknowledged; ``released`` False: it was already
    REVOKED = "revoked"  # a revocation notice on the stream: reason
    REFUSED = "refused"  # a call refused with a reason: operation, reason
    LOST = "lost"  # the client gave the lease up by its own reckoning (informational)


# Refusals and notices that say the lease is gone at the server.
GONE = frozenset(
    {
        "LEASE_EXPIRED",
        "LEASE_RELEASED",
        "LEASE_NOT_FOUND",
        "LEASE_NOT_HELD",
        "REVOKED_BY_OPERATOR",
        "LICENSE_EXPIRED",
        "LICENSE_RETURNED",
        "TRUSTED_STORAGE_BROKEN",
        "LICENSE_NOT_HELD",
    }
)
# Of those, the ones the contract allows before the expiry a client was told.
ALLOWED_EARLY = frozenset(
    {
        "REVOKED_BY_OPERATOR",
        "LICENSE_EXPIRED",
        "LICENSE_RETURNED",
        "TRUSTED_STORAGE_BROKEN",
        "LICENSE_NOT_HELD",
    }
)
# Measurement slack: the clocks are read in different processes, to the microsecond.
TOLERANCE = 0.001


@dataclass(frozen=True)
class Event:
    """One thing one client learned or did, when it did."""

    client: str
    kind: Kind
    mono: float  # the recorder's time.monotonic()
    wall: float  # the recorder's time.time()
    lease_id: str = ""
    feature: str = ""
    count: int = 0
    expires_at: float | None = None  # POSIX seconds on the telling server's clock
    epoch: int = 0
    server: str = ""  # which server (incarnation) answered: its clock offset's key
    reason: str = ""
    operation: str = ""  # for REFUSED: acquire, resume, heartbeat, checkin, release
    released: bool | None = None  # for RELEASED


class History:
    """Events in the order they were recorded, and a way to wait for the next one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._waiters: list[tuple[frozenset[Kind], asyncio.Future[Event]]] = []

    def record(self, client: str, kind: Kind, **fields: object) -> Event:
        event = Event(client, kind, time.monotonic(), time.time(), **fields)  # type: ignore[arg-type]
        self.events.append(event)
        waiting, self._waiters = self._waiters, []
        for kinds, future in waiting:
            if kind not in kinds:
                self._waiters.append((kinds, future))
            elif not future.done():
                future.set_result(event)
        return event

    async def next(self, *kinds: Kind) -> Event:
        """The next event of one of ``kinds`` recorded from now on."""
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiters.append((frozenset(kinds), future))
        return await future

    async def count_reaches(self, count: int, *kinds: Kind) -> None:
        """Wait until ``count`` events of ``kinds`` have been recorded in all."""
        while self.count(*kinds) < count:
            await self.next(*kinds)

    def count(self, *kinds: Kind) -> int:
        return sum(1 for event in self.events if event.kind in kinds)

    def dump(self, path: Path) -> None:
        """One JSON object per line, for a failed run's post-mortem."""
        with path.open("w") as out:
            for event in self.events:
                out.write(json.dumps(asdict(event)) + "\n")


@dataclass(frozen=True)
class Violation:
    rule: str  # "a", "b" or "c"
    at: float  # monotonic
    what: str

    def __str__(self) -> str:
        return f"({self.rule}) at {self.at:.3f}: {self.what}"


@dataclass
class Verdict:
    """What the checker found."""

    violations: list[Violation] = field(default_factory=list)
    grants: int = 0
    resumes: int = 0
    acks: int = 0
    releases: int = 0
    leases: int = 0
    # feature -> the most seats clients believed they held at one instant
    max_believed: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_rule(self, rule: str) -> list[Violation]:
        return [violation for violation in self.violations if violation.rule == rule]

    def summary(self, seats: Mapping[str, int]) -> str:
        believed = ", ".join(
            f"{feature} {most}/{seats.get(feature, 0)}"
            for feature, most in sorted(self.max_believed.items())
        )
        return (
            f"{self.grants} grants, {self.resumes} resumes, {self.acks} acks, "
            f"{self.releases} releases over {self.leases} leases; max believed held "
            f"{believed or '-'}; violations {len(self.violations)} "
            f"(a {len(self.by_rule('a'))}, b {len(self.by_rule('b'))}, "
            f"c {len(self.by_rule('c'))})"
        )


@dataclass
class _Lease:
    lease_id: str
    feature: str = ""
    count: int = 0
    # (received, expiry) for each grant, resume and ack, on the monotonic timeline
    told: list[tuple[float, float]] = field(default_factory=list)
    # when belief ended (release asked, revoked, reported gone), if it did
    ended: float | None = None
    released_by_client: float | None = None
    release_acknowledged: float | None = None
    epoch: int = -1


def check(
    history: History | Iterable[Event],
    seats: Mapping[str, int],
    clock_offsets: Mapping[str, float] | None = None,
) -> Verdict:
    """Judge a history against the seats activated per feature; see the module doc."""
    events = sorted(
        history.events if isinstance(history, History) else history, key=lambda e: e.mono
    )
    offsets = clock_offsets or {}
    verdict = Verdict()
    leases: dict[str, _Lease] = {}

    def expiry(event: Event) -> float:
        assert event.expires_at is not None
        real = event.expires_at - offsets.get(event.server, 0.0)
        return real - (event.wall - event.mono)

    def promised(lease: _Lease, before: float) -> float:
        """The latest expiry the lease's holder was told before ``before``."""
        return max((until for at, until in lease.told if at <= before), default=float("-inf"))

    for event in events:
        lease = leases.setdefault(event.lease_id, _Lease(event.lease_id))
        if event.kind == Kind.GRANTED:
            verdict.grants += 1
            if lease.told or lease.feature:
                verdict.violations.append(
                    Violation(
                        "c",
                        event.mono,
                        f"lease {event.lease_id} granted new again (to {event.client})",
                    )
                )
            lease.feature, lease.count, lease.epoch = event.feature, event.count, event.epoch
            lease.told.append((event.mono, expiry(event)))
        elif event.kind == Kind.RESUMED:
            verdict.resumes += 1
            problems = []
            if (lease.feature, lease.count) != (event.feature, event.count):
                problems.append(
                    f"gave back {event.count} {event.feature!r} for a lease of "
                    f"{lease.count} {lease.feature!r}"
                )
            if event.epoch <= lease.epoch:
                problems.append(f"epoch {event.epoch} not above {lease.epoch}")
            if lease.release_acknowledged is not None:
                problems.append("resumed after its release was acknowledged")
            for problem in problems:
                verdict.violations.append(
                    Violation("c", event.mono, f"resume of {event.lease_id}: {problem}")
                )
            lease.epoch = max(lease.epoch, event.epoch)
            lease.told.append((event.mono, expiry(event)))
        elif event.kind == Kind.ACK:
            verdict.acks += 1
            lease.told.append((event.mono, expiry(event)))
        elif event.kind == Kind.RELEASE:
            verdict.releases += 1
            if lease.released_by_client is None:
                lease.released_by_client = event.mono
            _end(lease, event.mono)
        elif event.kind == Kind.RELEASED:
            if event.released:
                if lease.release_acknowledged is not None:
                    verdict.violations.append(
                        Violation(
                            "c",
                            event.mono,
                            f"lease {event.lease_id} released twice (not idempotent)",
                        )
                    )
                lease.release_acknowledged = event.mono
            _end(lease, event.mono)
        elif event.kind in (Kind.REVOKED, Kind.REFUSED) and event.reason in GONE:
            if event.kind == Kind.REFUSED and event.operation == "acquire":
                continue  # not about a lease
            told = promised(lease, event.mono)
            asked_release = lease.released_by_client is not None
            if (
                not asked_release
                and event.reason not in ALLOWED_EARLY
                and event.mono < told - TOLERANCE
            ):
                verdict.violations.append(
                    Violation(
                        "b",
                        event.mono,
                        f"lease {event.lease_id} of {event.client}: {event.operation or 'notice'} "
                        f"answered {event.reason} from {event.server or '?'} "
                        f"{told - event.mono:.3f} s before the expiry it was told",
                    )
                )
            _end(lease, event.mono)
    leases.pop("", None)
    verdict.leases = len(leases)
    verdict.violations.extend(_over_belief(leases.values(), seats, verdict))
    verdict.violations.sort(key=lambda violation: violation.at)
    return verdict


def _end(lease: _Lease, at: float) -> None:
    if lease.ended is None or at < lease.ended:
        lease.ended = at


def believed(lease: _Lease) -> list[tuple[float, float]]:
    """The stretches of time the lease's holder believed it held it."""
    stretches: list[tuple[float, float]] = []
    latest = float("-inf")
    end = lease.ended if lease.ended is not None else float("inf")
    for at, until in sorted(lease.told):
        latest = max(latest, until)
        start, stop = at, min(latest, end)
        if start >= stop:
            continue
        if stretches and start <= stretches[-1][1]:
            stretches[-1] = (stretches[-1][0], max(stretches[-1][1], stop))
        else:
            stretches.append((start, stop))
    return stretches


def _over_belief(
    leases: Iterable[_Lease], seats: Mapping[str, int], verdict: Verdict
) -> list[Violation]:
    """Rule (a), by a sweep over the start and end of every stretch of belief."""
    edges: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for lease in leases:
        if not lease.feature:
            continue
        for start, stop in believed(lease):
            edges[lease.feature].append((start, lease.count, lease.lease_id))
            edges[lease.feature].append((stop, -lease.count, lease.lease_id))
    violations = []
    for feature, marks in edges.items():
        # At one instant ends come before starts: [start, stop) stretches.
        marks.sort(key=lambda mark: (mark[0], mark[1]))
        held: dict[str, int] = {}
        total = most = 0
        over = False
        activated = seats.get(feature, 0)
        for at, delta, lease_id in marks:
            total += delta
            if delta > 0:
                held[lease_id] = delta
            else:
                held.pop(lease_id, None)
            most = max(most, total)
            if total > activated and not over:
                violations.append(
                    Violation(
                        "a",
                        at,
                        f"clients believed they held {total} {feature!r} seats of {activated}: "
                        f"{', '.join(sorted(held))}",
                    )
                )
            over = total > activated
        verdict.max_believed[feature] = most
    return violations
