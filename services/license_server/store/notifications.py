"""Lease events between replicas, over PostgreSQL LISTEN/NOTIFY: the channel, the
payload codec, and the listener.

Each replica announces its lease events with NOTIFY inside the transaction that caused
them (``SqlLeaseQueries.announce``); this listener hands the other replicas' events to
the local bus. If the listening connection drops it reconnects; meanwhile streams still learn
of a lost lease at their next heartbeat, and waiters retry on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from services.license_server.domain.model import LeaseEnded, LeaseEvent, LeaseResumed, SeatsFreed

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "tessera_lease_events"
RECONNECT_SECONDS = 1.0


def encode_event(event: LeaseEvent, origin: str = "") -> str:
    """A NOTIFY payload for ``event``, announced by the process ``origin``."""
    if isinstance(event, LeaseEnded):
        body = {"k": "ended", "l": event.lease_id, "r": event.reason, "m": event.message}
    elif isinstance(event, LeaseResumed):
        body = {"k": "resumed", "l": event.lease_id, "e": str(event.epoch)}
    else:
        body = {"k": "freed", "f": event.feature}
    return json.dumps({**body, "o": origin}, separators=(",", ":"))


def decode_event(payload: str) -> tuple[str, LeaseEvent]:
    """(origin, event) from a NOTIFY payload; ValueError when it is not one of ours."""
    body = json.loads(payload)
    kind = body.get("k")
    origin = str(body.get("o", ""))
    if kind == "ended":
        return origin, LeaseEnded(str(body["l"]), str(body["r"]), str(body["m"]))
    if kind == "resumed":
        return origin, LeaseResumed(str(body["l"]), int(body["e"]))
    if kind == "freed":
        return origin, SeatsFreed(str(body["f"]))
    raise ValueError(f"not a lease event: {payload[:80]!r}")


class PostgresLeaseNotifications:
    """Listens for other replicas' lease events while running and hands each to
    ``publish`` (the local bus's)."""

    def __init__(
        self, database_url: str, publish: Callable[[LeaseEvent], None], origin: str
    ) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._publish = publish
        self._origin = origin
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever())
        # Wait briefly for the first connection so events are not missed at start.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout=5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen_forever(self) -> None:
        while True:
            connection: Any = None
            try:
                connection = await asyncpg.connect(self._dsn)
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _connection, lost=lost: lost.set())
                await connection.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self.connected.set()
                await lost.wait()
                log.warning("lost the lease-event connection to PostgreSQL; reconnecting")
            except asyncio.CancelledError:
                if connection is not None:
                    await connection.close()
                raise
            except Exception as error:
                log.warning("cannot listen for lease events: %s; retrying", error)
            self.connected.clear()
            await asyncio.sleep(RECONNECT_SECONDS)

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            origin, event = decode_event(payload)
        except (ValueError, KeyError) as error:
            log.warning("ignoring a malformed lease event: %s", error)
            return
        if origin != self._origin:
            self._publish(event)
