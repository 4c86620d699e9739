"""A network lease kept alive by the client: heartbeats, resume, failover, check-in.

``Lease.acquire`` opens a ``LeaseService.Lease`` stream on the first server of the address
that grants the seats. A keeper task then heartbeats at the interval the server asked for
(a third of the TTL or less) and watches the stream. When the stream breaks (server
restart, network blip, no acknowledgement within an interval) the keeper resumes the SAME
lease with its id and secret, never a second acquire: after a random delay ("full
jitter", also before the first attempt) it tries the server that held the lease, then the
other servers of the address, backing off exponentially, until one grants the resume or
the lease's TTL has run out. The server's verdicts end the lease: a pushed ``revoked``, or
a resume refused as expired or released.

Check-in: ``release()`` (and so ``async with``) sends ``release`` on the stream, falling
back to a unary ``Checkin`` on every server of the address, within ``release_timeout``.
The keeper checks in as well when it is cancelled (``asyncio.run`` cancels every task when
the loop shuts down), and :mod:`clients.shutdown` checks in at interpreter exit what a
dead loop could not.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass

import grpc

from clients import shutdown
from clients.errors import (
    LeaseExpired,
    LicenseError,
    LicenseLost,
    LicenseServerUnreachable,
    error_from_denial,
    error_from_revocation,
    error_from_rpc,
)
from clients.events import ExpiryWarning, Interrupted, Lost, Queued, Released, Resumed
from clients.license import EventCallback, License, LicenseState
from clients.settings import ClientSettings
from clients.transport import RELEASE, LeaseStream, StreamEnded, connected
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HEARTBEAT = pb.LeaseRequest(heartbeat=pb.LeaseHeartbeat())
RELEASE_REQUEST = pb.LeaseRequest(release=pb.LeaseRelease())


@dataclass(frozen=True)
class _Broken:
    """The stream broke; the lease may still be resumed."""

    error: LicenseError | None


class Lease(License):
    """Seats of a feature held on a License Server. Get one from
    ``LicenseClient.lease()`` / ``acquire()``; it keeps itself alive until released."""

    kind = "network"

    def __init__(
        self,
        settings: ClientSettings,
        acquire: pb.LeaseAcquire,
        wait: float | None,
        on_event: EventCallback | None,
    ) -> None:
        super().__init__(acquire.feature, acquire.count, on_event)
        self._settings = settings
        self._acquire_request = acquire
        self._wait = wait
        #: The ``host:port`` of the License Server holding the lease now.
        self.server = ""
        self.lease_id = ""
        self.epoch = 0
        self.ttl = dt.timedelta(0)
        self.heartbeat_interval = dt.timedelta(0)
        #: How often the lease was resumed on a new stream.
        self.resumes = 0
        self._expires_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self._secret = ""
        self._deadline = 0.0  # loop time by which the lease has surely expired
        self._warned = False
        self._stream: LeaseStream | None = None
        self._holding = False
        self._release_requested = False
        self._keeper: asyncio.Task[None] | None = None
        self._exit_record: shutdown.HeldLease | None = None

    @property
    def expires_at(self) -> dt.datetime:
        """The lease's expiry as the License Server last said (its clock)."""
        return self._expires_at

    def __repr__(self) -> str:
        return (
            f"<Lease {self.lease_id} {self.count} x {self.feature} on {self.server} "
            f"{self.state.value}>"
        )

    # Acquiring

    @classmethod
    async def acquire(
        cls,
        settings: ClientSettings,
        acquire: pb.LeaseAcquire,
        wait: float | None = None,
        on_event: EventCallback | None = None,
    ) -> Lease:
        """Seats from the first server of the address that grants them; the first
        server's refusal when every server refuses, LicenseServerUnreachable when none
        answers."""
        lease = cls(settings, acquire, wait, on_event)
        await lease._take_first_grant()
        lease._keeper = asyncio.create_task(
            lease._keep(), name=f"tessera lease {acquire.feature} {lease.lease_id}"
        )
        return lease

    async def _take_first_grant(self) -> None:
        loop = asyncio.get_running_loop()
        request = pb.LeaseRequest(acquire=self._acquire_request)
        attempts: list[str] = []
        refusals: list[LicenseError] = []
        for server in self._settings.servers:
            for target in server.targets():
                try:
                    stream = await LeaseStream.open(
                        target,
                        self._settings.connect_timeout,
                        self._settings.tls,
                        self._settings.metadata,
                    )
                except LicenseServerUnreachable as error:
                    attempts.append(f"{target}: {error.message}")
                    continue
                sent_at = loop.time()
                try:
                    granted = await self._grant(stream, request, self._wait)
                except LicenseServerUnreachable as error:
                    await stream.close()
                    attempts.append(f"{target}: {error.message}")
                    continue
                except LicenseError as error:
                    await stream.close()
                    refusals.append(error)
                    break  # this License Server answered; ask the next one
                except BaseException:
                    await stream.close()
                    raise
                self._adopt(stream, granted, sent_at)
                return
        if refusals:
            for other in refusals[1:]:
                log.info("also refused: %s", other)
            raise refusals[0]
        raise LicenseServerUnreachable(
            f"no License Server answers at {self._settings.address!r} "
            f"({len(attempts)} target(s) tried)",
            attempts=attempts,
        )

    async def _grant(
        self, stream: LeaseStream, request: pb.LeaseRequest, wait: float | None
    ) -> pb.LeaseGranted:
        """Send an acquire or resume; the grant, or the refusal as a LicenseError."""
        loop = asyncio.get_running_loop()
        error = await stream.send(request)
        if error is not None:
            raise error
        deadline = loop.time() + self._settings.call_timeout + (wait or 0.0)
        denied: pb.LeaseDenied | None = None
        while True:
            try:
                item = await stream.next(deadline - loop.time())
            except TimeoutError:
                raise LicenseServerUnreachable(
                    "no answer to the lease request in time",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                    server=stream.target,
                ) from None
            if isinstance(item, StreamEnded):
                if item.error is not None:
                    raise item.error
                if denied is not None:
                    raise error_from_denial(denied.reason, denied.message, stream.target)
                raise LicenseServerUnreachable(
                    "the License Server ended the stream without an answer", server=stream.target
                )
            if not isinstance(item, pb.LeaseResponse):
                continue
            kind = item.WhichOneof("kind")
            if kind == "granted":
                return item.granted
            if kind == "queued":
                self._emit(Queued(item.queued.position))
            elif kind == "denied":
                denied = item.denied  # the status that ends the stream follows
            elif kind == "revoked":
                raise error_from_revocation(
                    item.revoked.reason, item.revoked.message, stream.target
                )

    def _adopt(self, stream: LeaseStream, granted: pb.LeaseGranted, sent_at: float) -> None:
        self._stream = stream
        self._holding = True
        self.server = stream.target
        self.lease_id = granted.lease_id
        self._secret = granted.lease_secret
        self.epoch = granted.epoch
        self.ttl = granted.ttl.ToTimedelta()
        interval = granted.heartbeat_interval.ToTimedelta()
        self.heartbeat_interval = interval if interval > dt.timedelta(0) else self.ttl / 3
        self._expires_at = granted.expires_at.ToDatetime(tzinfo=dt.UTC)
        # The server counts the TTL from when it received the request, which is no
        # earlier than when it was sent: past this, the lease has surely expired.
        self._deadline = sent_at + self.ttl.total_seconds()
        self._warned = False
        self.state = LicenseState.HELD
        targets = self._settings.targets_from(self.server)
        if self._exit_record is None:
            self._exit_record = shutdown.HeldLease(
                self.lease_id, self._secret, targets, self._settings.metadata, self._settings.tls
            )
            shutdown.hold(self._exit_record)
        else:
            self._exit_record.targets = targets

    # Keeping

    async def _keep(self) -> None:
        try:
            while True:
                stream = self._stream
                assert stream is not None
                outcome = await self._hold(stream)
                self._holding = False
                await self._drop_stream()
                if isinstance(outcome, bool):
                    self._finish(Released(checked_in=outcome))
                    return
                if self._release_requested:
                    self._finish(Released(checked_in=await self._check_in()))
                    return
                self.state = LicenseState.INTERRUPTED
                self._emit(Interrupted(self.server, outcome.error, self._expires_at))
                await self._resume()
                self.resumes += 1
                self._emit(Resumed(self.server, self.epoch, self._expires_at))
        except LicenseLost as lost:
            self._holding = False
            await self._drop_stream()
            self._finish(Lost(lost))
        except asyncio.CancelledError:
            # release() while resuming, or the event loop shutting down: check in.
            self._holding = False
            await self._drop_stream()
            if self._final is None:
                self._finish(Released(checked_in=await self._check_in()))
            raise
        except Exception:
            log.exception("the keeper of lease %s failed; checking it in", self.lease_id)
            self._holding = False
            await self._drop_stream()
            self._finish(Released(checked_in=await self._check_in()))

    async def _hold(self, stream: LeaseStream) -> _Broken | bool:
        """Heartbeat on ``stream`` until it breaks (_Broken) or the lease is released on
        it (whether the server confirmed). Raises LicenseLost when the server says so."""
        loop = asyncio.get_running_loop()
        interval = self.heartbeat_interval.total_seconds()
        next_beat = loop.time() + interval
        unacknowledged: float | None = None  # when the heartbeat in flight was sent
        write_error: LicenseError | None = None
        while True:
            try:
                item = await stream.next(next_beat - loop.time())
            except TimeoutError:
                if write_error is not None:
                    return _Broken(write_error)
                if unacknowledged is not None:
                    return _Broken(
                        LicenseServerUnreachable(
                            f"no heartbeat acknowledgement within {interval:g} s",
                            code=grpc.StatusCode.DEADLINE_EXCEEDED,
                            server=stream.target,
                        )
                    )
                unacknowledged = loop.time()
                write_error = await stream.send(HEARTBEAT)
                # A failed write means the call ended: its status is on the way.
                next_beat = loop.time() + (
                    interval if write_error is None else self._settings.call_timeout
                )
                continue
            if item is RELEASE:
                return await self._release_on(stream)
            if isinstance(item, StreamEnded):
                if isinstance(item.error, LicenseLost):
                    raise item.error
                return _Broken(item.error)
            assert isinstance(item, pb.LeaseResponse)
            kind = item.WhichOneof("kind")
            if kind == "heartbeat_ack":
                if unacknowledged is not None:
                    self._deadline = unacknowledged + self.ttl.total_seconds()
                    unacknowledged = None
                self._expires_at = item.heartbeat_ack.expires_at.ToDatetime(tzinfo=dt.UTC)
            elif kind == "revoked":
                raise error_from_revocation(
                    item.revoked.reason, item.revoked.message, stream.target
                )

    async def _resume(self) -> None:
        """Resume the lease on the server that held it or another of the address, with
        jittered exponential backoff, until granted; LicenseLost when that is impossible."""
        loop = asyncio.get_running_loop()
        home = self.server
        targets = self._settings.targets_from(home)
        request = pb.LeaseRequest(
            resume=pb.LeaseResume(lease_id=self.lease_id, lease_secret=self._secret)
        )
        attempt = 0
        while True:
            self._raise_if_expired(loop.time())
            delay = self._settings.backoff.delay(attempt, self._settings.rng)
            attempt += 1
            await self._pause(min(delay, self._deadline - loop.time()))
            for target in targets:
                self._raise_if_expired(loop.time())
                await self._pause(0)
                remaining = self._deadline - loop.time()
                try:
                    stream = await LeaseStream.open(
                        target,
                        min(self._settings.connect_timeout, remaining),
                        self._settings.tls,
                        self._settings.metadata,
                    )
                except LicenseServerUnreachable as error:
                    log.debug("resume of lease %s: %s", self.lease_id, error)
                    continue
                sent_at = loop.time()
                try:
                    granted = await self._grant(stream, request, None)
                except LicenseServerUnreachable as error:
                    log.debug("resume of lease %s: %s", self.lease_id, error)
                    await stream.close()
                    continue
                except LicenseLost as gone:
                    await stream.close()
                    if gone.reason == "LEASE_NOT_FOUND" and target != home:
                        continue  # another License Server, with a database of its own
                    raise
                except LicenseError as error:
                    await stream.close()
                    log.info("resume of lease %s refused by %s: %s", self.lease_id, target, error)
                    continue
                except BaseException:
                    await stream.close()
                    raise
                self._adopt(stream, granted, sent_at)
                return

    def _raise_if_expired(self, now: float) -> None:
        if now >= self._deadline:
            raise LeaseExpired(
                "no License Server of the address could be reached before the lease's TTL "
                f"({self.ttl.total_seconds():g} s) ran out",
                reason="LEASE_EXPIRED",
                server=self.server,
            )

    async def _pause(self, seconds: float) -> None:
        """Sleep (a backoff delay), warning once when the lease is about to expire."""
        loop = asyncio.get_running_loop()
        end = loop.time() + max(seconds, 0.0)
        warn_at = self._deadline - self.ttl.total_seconds() / 3
        while True:
            now = loop.time()
            if not self._warned and now >= warn_at:
                self._warned = True
                remaining = max(self._deadline - now, 0.0)
                self._emit(ExpiryWarning(dt.timedelta(seconds=remaining), self._expires_at))
            if now >= end:
                return
            await asyncio.sleep((end if self._warned else min(end, warn_at)) - now)

    # Checking in

    async def release(self) -> bool:
        """Check the lease in (on its stream, else by unary Checkin on any server of the
        address). False when no server could be reached within ``release_timeout``: the
        seats then come back when the TTL runs out. Safe to call twice or after a loss."""
        keeper = self._keeper
        if keeper is None or self._final is not None:
            return self._checked_in()
        if not keeper.done():
            self._release_requested = True
            if self._holding and self._stream is not None:
                self._stream.inbox.put_nowait(RELEASE)
            else:
                keeper.cancel()
            # The keeper checks in even if this task is cancelled meanwhile.
            await asyncio.wait([keeper])
        return self._checked_in()

    def _checked_in(self) -> bool:
        final = self._final
        return isinstance(final, Lost) or (isinstance(final, Released) and final.checked_in)

    async def _release_on(self, stream: LeaseStream) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.release_timeout
        if await stream.send(RELEASE_REQUEST) is None:
            while True:
                try:
                    item = await stream.next(deadline - loop.time())
                except TimeoutError:
                    break
                if isinstance(item, StreamEnded):
                    break
                if not isinstance(item, pb.LeaseResponse):
                    continue
                kind = item.WhichOneof("kind")
                if kind == "released":
                    return True
                if kind == "revoked":
                    raise error_from_revocation(
                        item.revoked.reason, item.revoked.message, stream.target
                    )
        return await self._check_in()

    async def _check_in(self) -> bool:
        """Unary Checkin on the lease's server, then the others, within release_timeout."""
        request = pb.CheckinRequest(lease_id=self.lease_id, lease_secret=self._secret)
        try:
            async with asyncio.timeout(self._settings.release_timeout):
                for target in self._settings.targets_from(self.server):
                    try:
                        async with connected(
                            target, self._settings.connect_timeout, self._settings.tls
                        ) as channel:
                            await pb_grpc.LeaseServiceStub(channel).Checkin(
                                request,
                                timeout=self._settings.call_timeout,
                                metadata=self._settings.metadata,
                            )
                    except LicenseServerUnreachable:
                        continue
                    except grpc.aio.AioRpcError as rpc_error:
                        error = error_from_rpc(rpc_error, target)
                        if isinstance(error, LicenseLost) and error.reason != "LEASE_NOT_FOUND":
                            return True  # gone already: nothing left to check in
                        continue
                    return True
        except TimeoutError:
            pass
        log.warning(
            "could not check lease %s in: no License Server of %r answered; its seats "
            "return when its TTL runs out",
            self.lease_id,
            self._settings.address,
        )
        return False

    async def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

    def _finish(self, event: Lost | Released) -> None:
        shutdown.forget(self.lease_id)
        self._emit(event)
