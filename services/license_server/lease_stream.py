"""One client's Lease stream: read a message, ask leasing, write the answer.

A stream holds at most one lease. It reacts to the client's messages (acquire, resume,
heartbeat, release), to lease events (revoked, expired, resumed elsewhere, seats freed)
and, while queued, to its own timer. Everything reaches the stream's loop through one
inbox, so the order of what the client sees is the order things happened.

The one shortcut is the measured fast path (docs/performance.md): a heartbeat for the
held lease that comes while nothing else waits (no earlier message unhandled, the inbox
empty, no answer being written) is answered by the stream's reader itself, with the same
handler the loop would use, skipping the inbox, the loop and its generators. Whoever
writes to the stream holds its write turn, so answers leave one at a time, in the order
they were decided.

Whatever goes wrong ends the stream by being raised, for the error table to answer and
log; the reader hands what it meets to the loop, which raises it. Only one thing means
no more than "the client went away", and ``LeaseStream.run`` alone asks about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc

from services.license_server.domain.admission import Admission
from services.license_server.domain.errors import (
    LeaseExpired,
    LeaseProtocolViolation,
    LeaseReleased,
    LeaseRevoked,
    LeaseStreamIdle,
    ServerShuttingDown,
    StaleLeaseEpoch,
)
from services.license_server.domain.leasing import LEASE_RESUMED_ELSEWHERE, Leasing
from services.license_server.domain.model import (
    Grant,
    LeaseEnded,
    LeaseEvent,
    LeaseResumed,
    SeatsFreed,
    Waiter,
)
from services.license_server.translate import (
    granted_to_proto,
    new_lease_from_proto,
    wait_timeout_from_proto,
)
from tessera.clock import to_timestamp
from tessera.errors import DomainError
from tessera.license.v1 import license_pb2 as pb
from tessera.server.limits import peer_host

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# Client messages read ahead of the loop: beyond this the stream stops reading, so a
# client that writes without reading the answers is held back by HTTP/2 flow control
# instead of filling the server's memory.
READ_AHEAD = 16

_END = object()  # the client half-closed or went away
_SHUTDOWN = object()  # the server is stopping
_TICK = object()  # a queued stream's timer

# What a heartbeat finds when its stream no longer holds the lease.
LEASE_GONE = (LeaseReleased, LeaseExpired, StaleLeaseEpoch)


class LeaseStreams:
    """The lease streams open on one server, so that a stopping server can tell them."""

    def __init__(self, leasing: Leasing, admission: Admission) -> None:
        self.leasing = leasing
        self.admission = admission
        self.closing = False
        self._open: set[LeaseStream] = set()
        leasing.count_open_streams(lambda: len(self._open))

    def opened(self, stream: LeaseStream) -> None:
        """Count ``stream`` until ``closed``."""
        self._open.add(stream)

    def closed(self, stream: LeaseStream) -> None:
        self._open.discard(stream)

    def close(self) -> None:
        """Tell every open lease stream that the server is stopping (they may resume)."""
        self.closing = True
        for stream in self._open:
            stream.inbox.put_nowait(_SHUTDOWN)


class LeaseStream:
    """One Lease call: its reader, its loop and the state of the lease it holds or
    waits for."""

    def __init__(self, streams: LeaseStreams, context: Context) -> None:
        self.streams = streams
        self.leasing = streams.leasing
        self.admission = streams.admission
        self.context = context
        self.host = peer_host(context.peer())
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        # Held by whoever writes to the stream (the loop, or the reader answering a
        # heartbeat on the spot).
        self.turn = asyncio.Lock()
        # Client messages read but not yet handled by the loop, and how many more the
        # reader may read ahead.
        self.unhandled = 0
        self.credit = asyncio.Semaphore(READ_AHEAD)
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

    async def run(self) -> None:
        """Serve the stream until the client releases, half-closes or goes away, or an
        error ends it: a DomainError or a fault, raised for the error table. A cancelled
        call raises asyncio.CancelledError, as grpc expects."""
        self.admission.open_stream(self.host)  # from here on, closed in the finally below
        self.streams.opened(self)
        reading = asyncio.create_task(self._read())
        try:
            await self._serve()
        except Exception as error:
            if not self._client_left(error):
                raise
            log.debug("lease stream of %s ended: the client went away", self.host)
        finally:
            self.admission.close_stream(self.host)
            self.streams.closed(self)
            reading.cancel()
            await self._close()

    def _client_left(self, error: Exception) -> bool:
        """Whether ``error`` says only that the client went away: grpc refused a write
        (ExecuteBatchError, an InternalError) because the call had already ended. That
        ends the stream as quietly as a half-close; reads say EOF instead."""
        return isinstance(error, grpc.aio.InternalError) and (
            self.context.done() or self.context.cancelled()
        )

    async def _serve(self) -> None:
        idle = self.admission.limits.stream_idle_seconds
        idle_at = self._loop.time() + idle
        while True:
            if idle > 0 and not self.started:
                item = await _within(self._next_item(), idle_at - self._loop.time(), idle)
            else:
                item = await self._next_item()
            if item is _END:
                # A stream that ends without release keeps its lease until the TTL
                # runs out, so the client can resume it after a network blip.
                return
            # Holding the turn: no acknowledgement of the reader's is in flight while
            # this item is handled, nor when the stream ends with an error below.
            async with self.turn:
                if item is _SHUTDOWN:
                    raise ServerShuttingDown(
                        "the License Server is stopping; resume the lease after it "
                        "restarts or on another server"
                    )
                if isinstance(item, Exception):  # what the reader met, raised here
                    raise item
                async for response in self._handle(item):
                    await self.context.write(response)
            if isinstance(item, pb.LeaseRequest):
                self.unhandled -= 1
                self.credit.release()
            if self.finished:
                return

    async def _read(self) -> None:
        """Read until the client half-closes or goes away (``context.read``: the request
        iterator grpc offers is one more async generator around it per message)."""
        context, inbox, turn = self.context, self.inbox, self.turn
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                if (
                    self.held is not None
                    and not self.unhandled
                    and inbox.empty()
                    and not turn.locked()
                    and message.WhichOneof("kind") == "heartbeat"
                ):
                    async with turn:  # free, so taken without waiting: nothing comes between
                        answer = await self._heartbeat()
                        if isinstance(answer, LeaseEnded):
                            inbox.put_nowait(answer)  # the loop tells it, in its order
                        else:
                            await context.write(answer)
                    continue
                self.unhandled += 1
                inbox.put_nowait(message)  # unbounded: the credit below is what holds back
                await self.credit.acquire()
        except Exception as error:  # a message that does not parse, a fault, a lost write
            inbox.put_nowait(error)
        finally:
            inbox.put_nowait(_END)

    async def _next_item(self) -> object:
        if self.streams.closing:  # ahead of whatever else waits in the inbox
            return _SHUTDOWN
        if self.waiter is None:
            return await self.inbox.get()
        remaining = self._deadline - self._loop.time()
        wait = max(0.0, min(remaining, self.leasing.waiter_refresh_seconds))
        try:
            return await asyncio.wait_for(self.inbox.get(), wait)
        except TimeoutError:
            return _TICK

    def _on_event(self, event: LeaseEvent) -> None:
        self.inbox.put_nowait(event)

    async def _handle(self, item: object) -> AsyncIterator[pb.LeaseResponse]:
        if isinstance(item, pb.LeaseRequest):
            async for response in self._on_request(item):
                yield response
        elif isinstance(item, LeaseEnded | LeaseResumed):
            async for response in self._on_lease_event(item):
                yield response
        elif isinstance(item, SeatsFreed) and self.waiter is None:
            # Woken as first in line just after leaving the line: the next one may be
            # first now.
            self.leasing.pass_on(item)
        elif isinstance(item, SeatsFreed) or item is _TICK:
            async for response in self._on_queue_turn():
                yield response

    async def _close(self) -> None:
        if self.held is not None:
            self.leasing.unwatch_lease(self.held, self._on_event)
        if self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            self.leasing.unwatch_queue(waiter)
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
            answer = await self._heartbeat()
            if isinstance(answer, LeaseEnded):
                async for response in self._on_lease_event(answer):
                    yield response
            else:
                yield answer
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

    async def _heartbeat(self) -> pb.LeaseResponse | LeaseEnded:
        """The answer to a heartbeat for the held lease: its acknowledgement, given only
        once the new expiry is written (a crash cannot take back what it says), or, when
        this stream no longer holds the lease (LeaseExpired, LeaseReleased,
        StaleLeaseEpoch), why, as the lease event the loop tells."""
        held = self.held
        assert held is not None
        try:
            expires_at = await self.leasing.keep_alive(held, self._expires_at)
        except LEASE_GONE as error:
            return LeaseEnded(held.lease.lease_id, error.reason, error.message)
        self._expires_at = expires_at
        return pb.LeaseResponse(
            heartbeat_ack=pb.LeaseHeartbeatAck(expires_at=to_timestamp(expires_at))
        )

    async def _acquire(self, acquire: pb.LeaseAcquire) -> AsyncIterator[pb.LeaseResponse]:
        new, ttl = new_lease_from_proto(acquire)
        wait = wait_timeout_from_proto(acquire)
        try:
            self.admission.admit_acquire(self.host)
            if wait <= 0:
                grant = await self.leasing.acquire(new, ttl)
            else:
                # Join the queue first, so a waiter ahead keeps its turn.
                self.waiter = await self.leasing.enqueue(new)
                self._ttl = ttl
                self._deadline = self._loop.time() + wait
                self.leasing.watch_queue(self.waiter, self._on_event)
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
            self.leasing.watch_queue(waiter, self._on_event)
        position = outcome.position
        if self._loop.time() >= self._deadline:
            error = self.leasing.wait_ran_out(waiter, position)
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
        self.leasing.watch_lease(grant, self._on_event)

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
        held = self.held
        assert held is not None
        lease_id = held.lease.lease_id
        self.leasing.unwatch_lease(held, self._on_event)
        self.held = None
        yield pb.LeaseResponse(
            revoked=pb.LeaseRevoked(lease_id=lease_id, reason=reason, message=message)
        )
        raise LeaseRevoked(reason, message, lease_id)


async def _within(next_item: Awaitable[object], remaining: float, idle: float) -> object:
    """The stream's next item, unless none comes before the idle limit runs out."""
    try:
        return await asyncio.wait_for(next_item, max(0.0, remaining))
    except TimeoutError:
        raise LeaseStreamIdle(
            f"the lease stream sent no acquire or resume within {idle:g} s of opening; "
            "open a stream when there is a lease to ask for",
            metadata={"stream_idle_seconds": f"{idle:g}"},
        ) from None
