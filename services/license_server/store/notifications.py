"""Lease events from other replicas, over PostgreSQL LISTEN/NOTIFY.

Each replica announces its lease events with NOTIFY inside the transaction that caused
them (see Repository.announce); this listener hands the other replicas' events to the
local bus. If the listening connection drops it reconnects; meanwhile streams still learn
of a lost lease at their next heartbeat, and waiters retry on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from services.license_server.domain.events import NOTIFY_CHANNEL, LeaseBus, decode_event

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0


class PostgresLeaseNotifications:
    """Listens for other replicas' lease events while running."""

    def __init__(self, database_url: str, bus: LeaseBus, origin: str) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._bus = bus
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
            self._bus.publish(event)
