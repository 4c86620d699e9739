"""A Jepsen-style history checker for leases (issue 16, "How to prove it").

Clients written from the contracts alone (``bench.history``: the generated stubs, not
the ``clients`` library), and a few of the library for variety, contend for few seats
on real License Server processes while
servers are SIGKILLed, SIGSTOPped and restarted with their clock set back; every grant,
heartbeat acknowledgement (with the ``expires_at`` told), release, revocation and
refusal goes into a history, and ``bench.lease_history.check`` proves (a) clients never
believed they held more seats than are activated, (b) no lease was reported gone before
an expiry its holder was told, (c) retries stayed idempotent. The checker lives in
``bench/`` so that the long soak (``python -m bench.history``) uses the same one; the
first tests here feed it hand-made histories, each with one violation, to show it can
fail.

The short runs here take 9-27 s each, about 45 s a database kind on a shared 2-core
machine (most of it starting License Servers). Queueing is off in them (a dead
replica's waiters leave the queue within about a second since issue 16 item 2, but a
lone SQLite server's restart still idles seats while it is down); the soak queues in half
its runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from bench.history import RunResult, Scenario, run_scenario
from bench.lease_history import Event, Kind, check
from bench.services import FEATURE, Vendor
from tests.support.databases import DatabaseFactory

# Hand-made histories: one client process, so wall = monotonic + WALL.
WALL = 1_000_000.0
SEATS = {FEATURE: 1}


def at(
    client: str,
    kind: Kind,
    time: float,
    lease: str,
    expires_in: float | None = None,
    **more: object,
) -> Event:
    """An event at monotonic ``time``; ``expires_in``: the expiry told, seconds later."""
    expires_at = None if expires_in is None else WALL + time + expires_in
    fields: dict[str, object] = {"feature": FEATURE, "count": 1, "epoch": 1, "server": "ls"}
    fields.update(more)
    return Event(
        client,
        kind,
        time,
        WALL + time,
        lease_id=lease,
        expires_at=expires_at,
        **fields,  # type: ignore[arg-type]
    )


def test_a_clean_history_passes_and_counts_what_was_believed() -> None:
    verdict = check(
        [
            at("a", Kind.GRANTED, 0.0, "L1", 6),
            at("a", Kind.ACK, 2.0, "L1", 6),
            at("a", Kind.RELEASE, 3.0, "L1"),
            # The waiter's grant arrives before the releaser hears its release
            # acknowledged: the releaser stopped using the seat when it asked.
            at("b", Kind.GRANTED, 3.001, "L2", 6),
            at("a", Kind.RELEASED, 3.002, "L1", released=True),
            # A lease whose holder stopped heartbeating is believed until its told
            # expiry only: a grant after it is no overlap, nor is the server saying so.
            at("b", Kind.REFUSED, 9.5, "L2", operation="resume", reason="LEASE_EXPIRED"),
            at("c", Kind.GRANTED, 9.1, "L3", 6),
        ],
        SEATS,
    )
    assert verdict.violations == []
    assert (verdict.grants, verdict.acks, verdict.max_believed) == (3, 1, {FEATURE: 1})


def test_the_checker_reports_more_seats_believed_than_activated() -> None:
    verdict = check(
        [
            at("a", Kind.GRANTED, 0.0, "L1", 6),
            at("a", Kind.ACK, 2.0, "L1", 6),  # believed until 8.0
            at("b", Kind.GRANTED, 7.0, "L2", 6),
        ],
        SEATS,
    )
    [violation] = verdict.violations
    assert violation.rule == "a" and violation.at == 7.0
    assert "believed they held 2" in violation.what and "L1" in violation.what
    assert verdict.max_believed == {FEATURE: 2}


def test_the_checker_reports_a_lease_freed_before_its_acknowledged_expiry() -> None:
    """Issue 16 item 1 as a history: the ack promised until 8.0, the resume after the
    restart is refused LEASE_EXPIRED at 7.5."""
    verdict = check(
        [
            at("a", Kind.GRANTED, 0.0, "L1", 6),
            at("a", Kind.ACK, 2.0, "L1", 6),
            at("a", Kind.REFUSED, 7.5, "L1", operation="resume", reason="LEASE_EXPIRED"),
        ],
        SEATS,
    )
    [violation] = verdict.violations
    assert violation.rule == "b" and "0.500 s before" in violation.what
    # The same refusal after the expiry told is no violation, nor is an operator's
    # revocation, which the contract allows at any time.
    assert check(
        [
            at("a", Kind.GRANTED, 0.0, "L1", 6),
            at("a", Kind.REFUSED, 6.5, "L1", operation="resume", reason="LEASE_EXPIRED"),
            at("b", Kind.GRANTED, 1.0, "L2", 6),
            at("b", Kind.REVOKED, 2.0, "L2", reason="REVOKED_BY_OPERATOR"),
        ],
        {FEATURE: 2},
    ).ok


def test_the_checker_reports_retries_that_are_not_idempotent() -> None:
    verdict = check(
        [
            at("a", Kind.GRANTED, 0.0, "L1", 6, epoch=1),
            at("b", Kind.GRANTED, 0.5, "L1", 6, epoch=1),  # the same lease granted new again
            at("a", Kind.RESUMED, 1.0, "L1", 6, epoch=1),  # no new epoch
            at("a", Kind.RESUMED, 1.5, "L1", 6, epoch=2, count=2),  # other seats
            at("a", Kind.RELEASE, 2.0, "L1"),
            at("a", Kind.RELEASED, 2.1, "L1", released=True),
            at("a", Kind.RELEASED, 2.2, "L1", released=True),  # released twice
            at("a", Kind.RESUMED, 2.3, "L1", 6, epoch=3),  # resumed after its release
        ],
        {FEATURE: 2},
    )
    found = [violation.what for violation in verdict.by_rule("c")]
    assert len(found) == 5, found
    assert "granted new again" in found[0]
    assert "epoch 1 not above 1" in found[1]
    assert "gave back 2" in found[2]
    assert "released twice" in found[3]
    assert "after its release was acknowledged" in found[4]


def test_the_checker_reads_each_expiry_in_the_clock_of_the_server_that_told_it() -> None:
    """A server whose clock is 30 s behind tells expiries 30 s early by the client's
    clock; what the client believes is the TTL left when it was told."""
    history = [
        at("a", Kind.GRANTED, 0.0, "L1", 6 - 30, server="slow"),
        at("b", Kind.GRANTED, 3.0, "L2", 6),
    ]
    assert check(history, SEATS).ok  # read on the wrong clock: nothing overlaps
    [violation] = check(history, SEATS, clock_offsets={"slow": -30.0}).violations
    assert violation.rule == "a"


def test_a_late_acknowledgement_makes_the_lease_believed_again() -> None:
    """The server said the seats are still the client's: from that moment on they are."""
    verdict = check(
        [
            at("a", Kind.GRANTED, 0.0, "L1", 2),
            at("b", Kind.GRANTED, 2.5, "L2", 6),  # after L1's told expiry: fine so far
            at("a", Kind.ACK, 3.0, "L1", 6),  # ... but L1's late heartbeat is acknowledged
        ],
        SEATS,
    )
    [violation] = verdict.violations
    assert violation.rule == "a" and violation.at == 3.0


# Real processes


@pytest.fixture
async def history_vendor(tmp_path: Path) -> AsyncIterator[Vendor]:
    history_vendor = await Vendor.start(tmp_path / "vendor")
    yield history_vendor
    await history_vendor.stop()


def scenario(databases: DatabaseFactory, name: str, *faults: str) -> Scenario:
    """26 stream clients, 4 unary ones and 4 of the client library on 5 seats, TTL 10 s,
    heartbeats every 0.5 s (under the heartbeat flush interval); one server on SQLite,
    two replicas on PostgreSQL."""
    postgres = databases.kind == "postgres"
    return Scenario(
        name=name,
        database=databases.kind,
        replicas=2 if postgres else 1,
        clients=26,
        unary_clients=4,
        library_clients=4,
        seats=5,
        ttl=10,
        heartbeat=0.5,
        faults=faults,
        queue_every=0,
    )


async def run(
    databases: DatabaseFactory, tmp_path: Path, history_vendor: Vendor, plan: Scenario
) -> RunResult:
    url = await databases.new("license")
    result = await run_scenario(plan, tmp_path / "run", url, history_vendor, log=print)
    print(result.line())
    if result.verdict.violations:
        result.history.dump(tmp_path / "history.jsonl")
    return result


def assert_no_violations(result: RunResult) -> None:
    assert result.verdict.violations == [], "\n".join(
        str(violation) for violation in result.verdict.violations
    )


@pytest.mark.e2e
async def test_no_seat_believed_twice_and_no_promise_broken_under_sigkill_and_sigstop(
    tmp_path: Path, databases: DatabaseFactory, history_vendor: Vendor
) -> None:
    """SQLite: SIGKILL the server right after it acknowledged a heartbeat and start it
    again, then SIGSTOP it for 3 s (the clock-step test below kills it once more).
    PostgreSQL: SIGKILL one replica, SIGSTOP the other, SIGKILL the first again (a
    killed replica starts again); their clients fail over."""
    faults = ("kill", "stop", "kill") if databases.kind == "postgres" else ("kill", "stop")
    plan = scenario(databases, "-".join(faults), *faults)
    result = await run(databases, tmp_path, history_vendor, plan)
    assert_no_violations(result)
    assert result.faults["kill"] == faults.count("kill") and result.faults["stop"] == 1
    verdict = result.verdict
    # The run did contend and the faults did break streams: leases were resumed.
    assert verdict.grants > plan.seats and verdict.resumes >= 1 and verdict.acks > 0
    assert verdict.max_believed[FEATURE] <= plan.seats


@pytest.mark.e2e
async def test_a_clock_set_back_breaks_no_promise(
    tmp_path: Path, databases: DatabaseFactory, history_vendor: Vendor
) -> None:
    """SQLite: the server is SIGKILLed and starts again with its clock 30 s behind
    (``bench.skewed_license_server``, the service's clock injection), then is SIGKILLed
    and starts again on that clock. Leases it told before keep their promise; what it
    tells after is read on its clock (the TTL left when told)."""
    if databases.kind == "postgres":
        pytest.skip("replicas sharing a database share a clock; the clock step runs on SQLite")
    plan = replace(scenario(databases, "clock-back", "clock", "kill"), clock_back=30.0)
    result = await run(databases, tmp_path, history_vendor, plan)
    assert_no_violations(result)
    assert result.faults["clock"] == 1 and result.faults["kill"] == 1
    stepped = {label for label, offset in result.offsets.items() if offset == -30.0}
    assert stepped, result.offsets
    told_by_stepped = [
        event
        for event in result.history.events
        if event.server in stepped and event.kind in (Kind.GRANTED, Kind.ACK)
    ]
    assert told_by_stepped, "the server with its clock set back granted nothing"


@pytest.mark.e2e
async def test_a_heartbeat_acknowledged_just_before_a_sigkill_keeps_its_promise(
    tmp_path: Path, databases: DatabaseFactory, history_vendor: Vendor
) -> None:
    """Heartbeats every 3 s (TTL 15 s on SQLite, 10 s on PostgreSQL, where the other
    replica answers the late resume), longer than the 1 s heartbeat flush; stream
    clients only, each resuming a broken stream 1 s before its lease runs out by its
    reckoning, as the contract allows. The server (on PostgreSQL a replica) is SIGKILLed
    right after acknowledging a heartbeat whose expiry the database does not hold yet
    (the harness looks, only to aim the kill). Before issue 16 item 1 was fixed, that
    acknowledgement was not yet durable: the lease expired up to a heartbeat interval
    early, the late resume was refused LEASE_EXPIRED inside the acknowledged lifetime,
    and its seat could go to another client. Now every acknowledgement is durable when
    sent, so the harness finds none to aim at and kills after the tenth."""
    plan = replace(
        scenario(databases, "ack-then-sigkill", "kill"),
        clients=30,
        unary_clients=0,  # a unary heartbeat is written at once
        library_clients=0,  # the library resumes at once
        # On SQLite, room for a slow restart of the lone server before the late resumes.
        ttl=15 if databases.kind == "sqlite" else 10,
        heartbeat=3.0,
        lazy_margin=1.0,
        lazy_every=1,
        # Kill at an acknowledgement the database does not hold yet, if one comes within
        # 10 (before the fix nearly every one; now none: it kills at the tenth).
        aim_unflushed=10,
    )
    result = await run(databases, tmp_path, history_vendor, plan)
    assert result.faults["kill"] == 1 and result.verdict.acks > 0
    # An acknowledgement is sent only once its expiry is written: the harness, looking at
    # ten of them in the database, found none missing (before the fix nearly every one).
    assert result.aims == [], "an acknowledged expiry was not in the database yet"
    if databases.kind == "sqlite" and result.restarts[0] > plan.ttl - plan.lazy_margin - 1:
        # The lone server came back after the late resumes had given up: nothing was
        # asked of it within the acknowledged lifetime, so the run proves nothing.
        pytest.skip(f"the server took {result.restarts[0]:.1f} s to start again")
    assert_no_violations(result)
