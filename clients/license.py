"""A license the application holds: a network lease or a node-locked local license.

Both are used the same way: ``async with`` checks them in on exit; ``held`` and
``state`` say whether the license still serves; ``events()`` and the ``on_event``
callback tell what happens to it; ``wait_lost()`` returns when it is lost.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Literal, Self

from clients.errors import LicenseLost, LocalLicenseExpired
from clients.events import LeaseEvent, Lost, Released
from tessera.clock import from_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate

log = logging.getLogger(__name__)

EventCallback = Callable[[LeaseEvent], object]


class LicenseState(enum.Enum):
    HELD = "held"
    #: A network lease whose stream broke; the client is resuming it (still held).
    INTERRUPTED = "interrupted"
    LOST = "lost"
    RELEASED = "released"


class EventStream:
    """An async iterator over a license's events (see License.events)."""

    def __init__(self, subscribers: set[asyncio.Queue[LeaseEvent | None]]) -> None:
        self.queue: asyncio.Queue[LeaseEvent | None] = asyncio.Queue()
        self._subscribers = subscribers

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> LeaseEvent:
        event = await self.queue.get()
        if event is None:
            self.queue.put_nowait(None)  # stays ended
            self.close()
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        """Stop receiving events."""
        self._subscribers.discard(self.queue)


class License:
    """What the application holds for a feature. Subclasses: Lease, LocalLicense."""

    kind: Literal["network", "local"]

    def __init__(self, feature: str, count: int, on_event: EventCallback | None) -> None:
        self.feature = feature
        self.count = count
        self.state = LicenseState.HELD
        self.lost: LicenseLost | None = None
        self._on_event = on_event
        self._subscribers: set[asyncio.Queue[LeaseEvent | None]] = set()
        self._final: LeaseEvent | None = None
        self._ended = asyncio.Event()
        self._callbacks: set[asyncio.Task[object]] = set()

    @property
    def held(self) -> bool:
        """True while the license serves (an interrupted lease still does)."""
        return self.state in (LicenseState.HELD, LicenseState.INTERRUPTED)

    @property
    def expires_at(self) -> dt.datetime | None:
        """When the license stops serving unless renewed (None: never)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise the LicenseLost if the license was lost."""
        if self.lost is not None:
            raise self.lost

    async def wait_lost(self) -> LicenseLost | None:
        """Wait until the license ends: the LicenseLost saying why it was lost, or None
        when it was checked in."""
        await self._ended.wait()
        return self.lost

    def events(self) -> EventStream:
        """What happens to the license from the moment of this call, ending with Lost
        or Released; use as ``async for event in license.events()``. Subscribed at once,
        so nothing is missed between the call and the loop. A stream asked for after the
        end holds only the last event."""
        stream = EventStream(self._subscribers)
        if self._final is not None:
            stream.queue.put_nowait(self._final)
            stream.queue.put_nowait(None)
        else:
            self._subscribers.add(stream.queue)
        return stream

    async def release(self) -> bool:
        """Check the license in; True when a License Server confirmed it (or there was
        nothing to check in). Releasing twice, or after a loss, does nothing."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.release()

    # For subclasses

    def _emit(self, event: LeaseEvent) -> None:
        if self._final is not None:
            return
        if isinstance(event, Lost | Released):
            self._final = event
            if isinstance(event, Lost):
                self.state = LicenseState.LOST
                self.lost = event.error
            else:
                self.state = LicenseState.RELEASED
        if self._on_event is not None:
            try:
                outcome = self._on_event(event)
            except Exception:
                log.exception("the on_event callback of %s failed", self.feature)
            else:
                if inspect.isawaitable(outcome):
                    self._schedule(outcome)
        for queue in self._subscribers:
            queue.put_nowait(event)
            if self._final is not None:
                queue.put_nowait(None)
        if self._final is not None:
            self._ended.set()

    def _schedule(self, awaitable: Awaitable[object]) -> None:
        async def run() -> object:
            try:
                return await awaitable
            except Exception:
                log.exception("the on_event callback of %s failed", self.feature)
                return None

        task = asyncio.ensure_future(run())
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)


class LocalLicense(License):
    """A node-locked license from the client's local license store, verified offline.
    Nothing is checked out from a License Server; it is lost when it expires."""

    kind: Literal["network", "local"] = "local"

    def __init__(
        self, certificate: LicenseCertificate, count: int, on_event: EventCallback | None = None
    ) -> None:
        super().__init__(certificate.feature, count, on_event)
        self.certificate = certificate
        self._expires_at = (
            from_timestamp(certificate.expires_at) if certificate.HasField("expires_at") else None
        )
        self._watch: asyncio.Task[None] | None = None
        if self._expires_at is not None:
            self._watch = asyncio.create_task(self._expire(self._expires_at))

    @property
    def certificate_id(self) -> str:
        return self.certificate.certificate_id

    @property
    def expires_at(self) -> dt.datetime | None:
        return self._expires_at

    async def _expire(self, at: dt.datetime) -> None:
        await asyncio.sleep(max((at - dt.datetime.now(dt.UTC)).total_seconds(), 0.0))
        self._emit(
            Lost(
                LocalLicenseExpired(
                    f"the local {self.feature} license expired at {at.isoformat()}",
                    reason="LICENSE_EXPIRED",
                )
            )
        )

    async def release(self) -> bool:
        if self._watch is not None:
            self._watch.cancel()
        self._emit(Released(checked_in=True))
        return True
