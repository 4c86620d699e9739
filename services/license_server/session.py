"""One client's lease stream: the protocol's state machine, between wire and domain.

A session holds at most one lease. It reacts to the client's messages (acquire, resume,
heartbeat, release), to lease events (revoked, expired, resumed elsewhere, seats freed)
and, while queued, to its own timer. Everything arrives through one inbox, so the order
of what the client sees is the order things happened. The one shortcut: a heartbeat that
comes while nothing else waits is answered by the stream's reader itself
(``acknowledge``), which is what handling it next from the inbox would do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable

from services.license_server.domain.errors import (
    LeaseExpired,
    LeaseProtocolViolation,
    LeaseReleased,
    LeaseRevoked,
    QueueTimeout,
    StaleLeaseEpoch,
)
from services.license_server.domain.events import LeaseEnded, LeaseEvent, LeaseResumed, SeatsFreed
from services.license_server.domain.leasing import LEASE_RESUMED_ELSEWHERE, Leasing
from services.license_server.domain.model import Grant, Waiter
from services.license_server.translate import (
    granted_to_proto,
    new_lease_from_proto,
    wait_timeout_from_proto,
)
from tessera.clock import to_timestamp
from tessera.errors import DomainError
from tessera.license.v1 import license_pb2 as pb

_TICK = object()  # a queued session's timer

# What a heartbeat finds when its stream no longer holds the lease.
LEASE_GONE = (LeaseReleased, LeaseExpired, StaleLeaseEpoch)


class LeaseSession:
    """The state of one Lease stream."""

    def __init__(self, leasing: Leasing, admit_acquire: Callable[[], None] | None = None) -> None:
        self.leasing = leasing
        # Refuses an acquire over the client host's share (raises a DomainError).
        self._admit_acquire = admit_acquire or (lambda: None)
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.held: Grant | None = None
        self.waiter: Waiter | None = None
        self.finished = False
        # Whether the client asked for a lease yet (acquire or resume); until it does,
        # the stream holds nothing and may be closed as idle.
        self.started = False
        self._ttl: int | None = None
        self._expires_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self._deadline = 0.0
        self._position = 0
        self._loop = asyncio.get_running_loop()

    def _on_event(self, event: LeaseEvent) -> None:
        self.inbox.put_nowait(event)

    async def next_item(self) -> object:
        if self.waiter is None:
            return await self.inbox.get()
        remaining = self._deadline - self._loop.time()
        wait = max(0.0, min(remaining, self.leasing.policy.waiter_refresh_seconds))
        try:
            return await asyncio.wait_for(self.inbox.get(), wait)
        except TimeoutError:
            return _TICK

    async def handle(self, item: object) -> AsyncIterator[pb.LeaseResponse]:
        if isinstance(item, pb.LeaseRequest):
            async for response in self._on_request(item):
                yield response
        elif isinstance(item, LeaseEnded | LeaseResumed):
            async for response in self._on_lease_event(item):
                yield response
        elif isinstance(item, SeatsFreed) and self.waiter is None:
            # Woken as first in line just after leaving the line: the next one may be
            # first now.
            self.leasing.bus.publish(item)
        elif isinstance(item, SeatsFreed) or item is _TICK:
            async for response in self._on_queue_turn():
                yield response

    def answers_on_the_spot(self, item: object) -> bool:
        """Whether ``item`` is a heartbeat for the lease this stream holds: most of a
        stream's traffic, so the stream's reader answers it itself (``acknowledge``) when
        nothing else waits, skipping the inbox and ``handle``."""
        return (
            self.held is not None
            and isinstance(item, pb.LeaseRequest)
            and item.WhichOneof("kind") == "heartbeat"
        )

    async def acknowledge(self) -> pb.LeaseResponse:
        """The acknowledgement of a heartbeat for the held lease, sent only once the new
        expiry is written (a crash cannot take back what it says); LeaseExpired,
        LeaseReleased or StaleLeaseEpoch when this stream no longer holds the lease."""
        held = self.held
        assert held is not None
        expires_at = await self.leasing.keep_alive(held, self._expires_at)
        self._expires_at = expires_at
        return pb.LeaseResponse(
            heartbeat_ack=pb.LeaseHeartbeatAck(expires_at=to_timestamp(expires_at))
        )

    def ended(self, error: DomainError) -> LeaseEnded:
        """Why the held lease ended, as the lease event the session's loop tells."""
        assert self.held is not None
        return LeaseEnded(self.held.lease.lease_id, error.reason, error.message)

    async def close(self) -> None:
        bus = self.leasing.bus
        if self.held is not None:
            bus.unwatch_lease(self.held.lease.lease_id, self._on_event)
        if self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            bus.unwatch_queue(waiter.request.feature, waiter.ticket)
            # Best effort: a waiter left behind drops out when its alive time passes.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.leasing.leave_queue(waiter))

    # The client's messages

    async def _on_request(self, request: pb.LeaseRequest) -> AsyncIterator[pb.LeaseResponse]:
        kind = request.WhichOneof("kind")
        busy = self.held is not None or self.waiter is not None
        if kind in ("acquire", "resume") and busy:
            raise LeaseProtocolViolation(
                f"{kind} on a stream that already holds or awaits a lease; open another "
                "stream for another lease"
            )
        if kind == "heartbeat" and self.held is None:
            raise LeaseProtocolViolation(
                "heartbeat before a lease was granted; send acquire or resume first"
            )
        if kind == "release" and not busy:
            raise LeaseProtocolViolation(
                "release before acquire or resume: this stream holds nothing to release"
            )
        if kind in ("acquire", "resume"):
            self.started = True
        if kind == "acquire":
            async for response in self._acquire(request.acquire):
                yield response
        elif kind == "resume":
            grant = await self.leasing.resume(request.resume.lease_id, request.resume.lease_secret)
            self._hold(grant)
            yield pb.LeaseResponse(granted=granted_to_proto(grant))
        elif kind == "heartbeat":
            try:
                ack = await self.acknowledge()
            except LEASE_GONE as error:
                async for response in self._revoked(error.reason, error.message):
                    yield response
            yield ack
        elif kind == "release":
            lease_id = ""
            if self.held is not None:
                lease = self.held.lease
                await self.leasing.release(lease.lease_id, self.held.secret, lease.epoch)
                lease_id = lease.lease_id
            yield pb.LeaseResponse(released=pb.LeaseReleased(lease_id=lease_id))
            self.finished = True
        else:
            raise LeaseProtocolViolation(
                "empty lease request: set acquire, resume, heartbeat or release"
            )

    async def _acquire(self, acquire: pb.LeaseAcquire) -> AsyncIterator[pb.LeaseResponse]:
        new, ttl = new_lease_from_proto(acquire)
        wait = wait_timeout_from_proto(acquire)
        try:
            self._admit_acquire()
            if wait <= 0:
                grant = await self.leasing.acquire(new, ttl)
            else:
                # Join the queue first, so a waiter ahead keeps its turn.
                self.waiter = await self.leasing.enqueue(new)
                self._ttl = ttl
                self._deadline = self._loop.time() + wait
                self.leasing.bus.watch_queue(new.feature, self.waiter.ticket, self._on_event)
                async for response in self._on_queue_turn():
                    yield response
                return
        except DomainError as error:
            yield pb.LeaseResponse(
                denied=pb.LeaseDenied(reason=error.reason, message=error.message)
            )
            raise
        self._hold(grant)
        yield pb.LeaseResponse(granted=granted_to_proto(grant))

    # Waiting in the queue

    async def _on_queue_turn(self) -> AsyncIterator[pb.LeaseResponse]:
        waiter = self.waiter
        if waiter is None:
            return
        outcome = await self.leasing.try_dequeue(waiter, self._ttl)
        if isinstance(outcome, Grant):
            self.waiter = None
            self._hold(outcome)
            yield pb.LeaseResponse(granted=granted_to_proto(outcome))
            return
        if outcome.waiter is not waiter:  # queued again at the back: its place was lost
            waiter = self.waiter = outcome.waiter
            self.leasing.bus.watch_queue(waiter.request.feature, waiter.ticket, self._on_event)
        position = outcome.position
        if self._loop.time() >= self._deadline:
            error = QueueTimeout(
                f"no {waiter.request.feature} seat freed while waiting in the queue "
                f"(position {position}); wait longer, or ask the operator to activate more",
                metadata={"feature": waiter.request.feature},
            )
            self.leasing.metrics.denied(error.reason)
            yield pb.LeaseResponse(
                denied=pb.LeaseDenied(reason=error.reason, message=error.message)
            )
            raise error
        if position != self._position:
            self._position = position
            yield pb.LeaseResponse(queued=pb.LeaseQueued(position=position))

    # Holding a lease

    def _hold(self, grant: Grant) -> None:
        self.held = grant
        self._expires_at = grant.lease.expires_at
        self.leasing.bus.watch_lease(grant.lease.lease_id, self._on_event)

    async def _on_lease_event(
        self, event: LeaseEnded | LeaseResumed
    ) -> AsyncIterator[pb.LeaseResponse]:
        held = self.held
        if held is None or event.lease_id != held.lease.lease_id:
            return
        if isinstance(event, LeaseResumed):
            if event.epoch <= held.lease.epoch:
                return  # our own resume, or an older one
            async for response in self._revoked(
                LEASE_RESUMED_ELSEWHERE, "the lease was resumed by another stream"
            ):
                yield response
        else:
            async for response in self._revoked(event.reason, event.message):
                yield response

    async def _revoked(self, reason: str, message: str) -> AsyncIterator[pb.LeaseResponse]:
        assert self.held is not None
        lease_id = self.held.lease.lease_id
        self.leasing.bus.unwatch_lease(lease_id, self._on_event)
        self.held = None
        yield pb.LeaseResponse(
            revoked=pb.LeaseRevoked(lease_id=lease_id, reason=reason, message=message)
        )
        raise LeaseRevoked(reason, message, lease_id)


def _denied(error: DomainError) -> pb.LeaseResponse:
    return pb.LeaseResponse(denied=pb.LeaseDenied(reason=error.reason, message=error.message))
